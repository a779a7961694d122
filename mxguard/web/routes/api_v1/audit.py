"""``/audit``: the audit log (newest first)."""

from fastapi import APIRouter, Depends, Query

from mxguard.services import audit as svc
from mxguard.services.access import Actor
from mxguard.web.context import WebContext
from mxguard.web.deps import api_actor, get_ctx
from mxguard.web.routes.api_v1.schemas import AuditOut

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", response_model=list[AuditOut], summary="Audit log entries")
async def list_entries(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0),
                       action: str | None = Query(None, max_length=64), target: str | None = Query(None, max_length=400),
                       actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    entries = await svc.list_entries(ctx.store, actor, limit=limit, offset=offset, action=action, target=target)
    return [AuditOut(id=e.id, ts=e.ts, actor=e.actor, action=e.action, target=e.target, before=e.before,
                     after=e.after) for e in entries]
