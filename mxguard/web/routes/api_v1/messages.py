"""``/messages``: the message log (search, one record)."""

import datetime as dt
from typing import Literal

from fastapi import APIRouter, Depends, Query

from mxguard.services import messages as svc
from mxguard.services.access import Actor
from mxguard.web.context import WebContext
from mxguard.web.deps import api_actor, get_ctx
from mxguard.web.routes.api_v1.schemas import MessageOut

router = APIRouter(prefix="/messages", tags=["message log"])
Disposition = Literal["delivered", "rejected", "deferred", "quarantined", "spooled", "partial", "aborted",
                      "tls-report", "held"]
Direction = Literal["inbound", "outbound"]


@router.get("", response_model=list[MessageOut], summary="Search the message log (newest first)")
async def search(sender: str | None = Query(None, max_length=300), recipient: str | None = Query(None, max_length=300),
                 subject: str | None = Query(None, max_length=300), client_ip: str | None = Query(None, max_length=64),
                 disposition: Disposition | None = None, tls: bool | None = Query(None, description="inbound TLS"),
                 since: dt.datetime | None = None, until: dt.datetime | None = None,
                 limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0),
                 direction: Direction | None = Query(None, description="inbound (from the internet) or outbound "
                                                                       "(relayed for an organization)"),
                 actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    rows = await svc.search_messages(ctx.store, actor, sender=sender, recipient=recipient, subject=subject,
                                     client_ip=client_ip, disposition=disposition, tls=tls, since=since, until=until,
                                     limit=limit, offset=offset, direction=direction)
    return [svc.as_dict(r) for r in rows]


@router.get("/{entry_id}", response_model=MessageOut, summary="One message-log record, every field")
async def get_message(entry_id: int, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return svc.as_dict(await svc.get_message(ctx.store, actor, entry_id))
