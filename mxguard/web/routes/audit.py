"""Audit log page: who changed what, before → after."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from mxguard.services import audit as audit_service
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, console_user, get_ctx

router = APIRouter(include_in_schema=False)
PAGE = 100


@router.get("/audit")
async def audit_page(request: Request, page: int = Query(1, ge=1, le=100000), me: ConsoleUser = Depends(console_user),
                     ctx: WebContext = Depends(get_ctx)):
    """The audit log, newest first, 100 per page."""
    entries = await audit_service.list_entries(ctx.store, me.actor, limit=PAGE + 1, offset=(page - 1) * PAGE)
    return request.app.state.templates.TemplateResponse(request, "audit.html", {
        "me": me, "entries": entries[:PAGE], "page": page, "more": len(entries) > PAGE})
