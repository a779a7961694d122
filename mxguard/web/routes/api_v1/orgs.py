"""``/orgs``: organizations (create: admins only)."""

from fastapi import APIRouter, Depends

from mxguard.services import orgs as svc
from mxguard.services.access import Actor
from mxguard.web.context import WebContext
from mxguard.web.deps import api_actor, get_ctx
from mxguard.web.routes.api_v1.schemas import OrgIn, OrgOut

router = APIRouter(prefix="/orgs", tags=["organizations"])


@router.get("", response_model=list[OrgOut], summary="List organizations")
async def list_orgs(actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    actor.require_console()
    return [OrgOut(name=o.name, created_at=o.created_at) for o in await svc.list_orgs(ctx.store, actor=actor)]


@router.post("", response_model=OrgOut, status_code=201, summary="Create an organization (admin)")
async def add_org(body: OrgIn, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    view = await svc.add_org(ctx.store, body.name, actor=actor)
    return OrgOut(name=view.name, created_at=view.created_at)
