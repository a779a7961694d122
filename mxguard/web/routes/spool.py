"""Spool: per domain, the held messages, each one's attempts and last reply; retry now, delete.

Every change is a POST form with the session's CSRF token, answered with a
redirect (post/redirect/get) whose query string carries the outcome for the
notice. Deleting asks for a confirmation on a page of its own first.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse

from mxguard.services import domains as domain_service
from mxguard.services import spool as spool_service
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, console_user, csrf_checked, get_ctx

router = APIRouter(include_in_schema=False)
LIMIT = 500
STATUS_CHOICES = [("queued", "held"), ("delivered", "delivered"), ("failed", "failed"), ("expired", "expired"),
                  ("held", "over a rate limit (outbound)"),
                  ("all", "any")]


def _render(request: Request, name: str, context: dict, status: int = 200):
    return request.app.state.templates.TemplateResponse(request, name, context, status_code=status)


@router.get("/spool")
async def spool_page(request: Request, domain: str = Query("", max_length=253), status: str = Query("queued"),
                     retried: int | None = Query(None, ge=0), delivered: int = Query(0, ge=0),
                     deleted: int | None = Query(None, ge=0),
                     me: ConsoleUser = Depends(console_user), ctx: WebContext = Depends(get_ctx)):
    """Held messages per domain (count, bytes, oldest) and a table of entries, filtered by domain and status."""
    stats = await spool_service.stats(ctx.store, me.actor)
    rows = await spool_service.list_entries(ctx.store, me.actor, domain=domain or None, status=status,
                                            limit=LIMIT + 1)
    configured = [d.name for d in await domain_service.list_domains(ctx.store, actor=me.actor)]
    choices = sorted(set(configured) | {d.domain for d in stats.by_domain})
    return _render(request, "spool.html", {
        "me": me, "stats": stats, "rows": rows[:LIMIT], "more": len(rows) > LIMIT, "limit": LIMIT,
        "domain": domain.strip().lower(), "status": status, "domains": choices, "statuses": STATUS_CHOICES,
        "retried": retried, "delivered": delivered, "deleted": deleted})


@router.post("/spool/retry")
async def retry_domain(request: Request, me: ConsoleUser = Depends(csrf_checked), ctx: WebContext = Depends(get_ctx)):
    """Deliver every held message of the form's ``domain`` now (every visible one when empty)."""
    domain = str((await request.form()).get("domain", "")).strip()
    outcomes = await spool_service.retry(ctx.store, ctx.settings, me.actor, domain=domain or None,
                                         worker=ctx.spool_worker, wait=spool_service.RETRY_WAIT)
    delivered = sum(1 for o in outcomes if o.entry is not None and o.entry.status == "delivered")
    query = {"domain": domain.lower(), "retried": len(outcomes), "delivered": delivered} if domain else {
        "retried": len(outcomes), "delivered": delivered}
    return RedirectResponse(f"/spool?{urlencode(query)}", status_code=303)


@router.get("/spool/{entry_id}")
async def entry_page(request: Request, entry_id: int, retried: str = Query(""), me: ConsoleUser = Depends(console_user),
                     ctx: WebContext = Depends(get_ctx)):
    """One entry: envelope, recipients' states, every attempt (time, node, server, TLS, reply); actions."""
    entry, attempts = await spool_service.get_entry(ctx.store, me.actor, entry_id)
    return _render(request, "spool_entry.html", {"me": me, "entry": entry, "attempts": attempts,
                                                 "retried": retried})


@router.post("/spool/{entry_id}/retry")
async def retry_entry(entry_id: int, me: ConsoleUser = Depends(csrf_checked), ctx: WebContext = Depends(get_ctx)):
    """Deliver one held message now, whatever its back-off."""
    outcomes = await spool_service.retry(ctx.store, ctx.settings, me.actor, entry_id=entry_id,
                                         worker=ctx.spool_worker, wait=spool_service.RETRY_WAIT)
    outcome = outcomes[0] if outcomes else None
    if outcome is None or outcome.entry is None:
        return RedirectResponse("/spool", status_code=303)
    how = "running" if outcome.in_progress else "attempted" if outcome.attempted else "elsewhere"
    return RedirectResponse(f"/spool/{entry_id}?retried={how}", status_code=303)


@router.get("/spool/{entry_id}/delete")
async def confirm_delete(request: Request, entry_id: int, me: ConsoleUser = Depends(console_user),
                         ctx: WebContext = Depends(get_ctx)):
    """Asks before deleting: the message will never be delivered."""
    entry, _ = await spool_service.get_entry(ctx.store, me.actor, entry_id)
    return _render(request, "spool_delete.html", {"me": me, "entry": entry})


@router.post("/spool/{entry_id}/delete")
async def delete_entry(request: Request, entry_id: int, me: ConsoleUser = Depends(csrf_checked),
                       ctx: WebContext = Depends(get_ctx)):
    """Delete for good, once confirmed (``confirm=yes``); otherwise show the confirmation page."""
    if (await request.form()).get("confirm") != "yes":
        return RedirectResponse(f"/spool/{entry_id}/delete", status_code=303)
    entry = await spool_service.delete_entry(ctx.store, me.actor, entry_id)
    return RedirectResponse(f"/spool?{urlencode({'deleted': entry.id})}", status_code=303)
