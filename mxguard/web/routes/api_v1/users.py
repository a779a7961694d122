"""``/users``: console users (admins: all; org-admins: their organization)."""

from fastapi import APIRouter, Depends

from mxguard.services import users as svc
from mxguard.services.access import Actor
from mxguard.web.context import WebContext
from mxguard.web.deps import api_actor, get_ctx
from mxguard.web.routes.api_v1.schemas import UserCreated, UserIn, UserOut

router = APIRouter(prefix="/users", tags=["users"])


def _out(view: svc.UserView, cls=UserOut, **extra):
    return cls(email=view.email, role=view.role, org=view.org, locked_until=view.locked_until,
               last_login_at=view.last_login_at, created_at=view.created_at, **extra)


@router.get("", response_model=list[UserOut], summary="List users")
async def list_users(actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return [_out(u) for u in await svc.list_users(ctx.store, actor=actor)]


@router.post("", response_model=UserCreated, status_code=201, summary="Create a user")
async def add_user(body: UserIn, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    view, generated = await svc.add_user(ctx.store, body.email, body.role, org=body.org, password=body.password,
                                         actor=actor)
    return _out(view, UserCreated, generated_password=generated)
