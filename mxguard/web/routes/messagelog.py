"""Message log: search and one page per transaction with every field the log keeps."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Depends, Query, Request

from mxguard.errors import ValidationFailed
from mxguard.services import messages
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, console_user, get_ctx

router = APIRouter(include_in_schema=False)
PAGE = 100


def parse_time(value: str | None, field: str) -> dt.datetime | None:
    """``YYYY-MM-DDTHH:MM`` (a datetime-local field) or ISO 8601, taken as UTC when no offset.

    Raises:
        ValidationFailed: named after ``field``.
    """
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValidationFailed(field, f"{value!r} is not a date and time (YYYY-MM-DDTHH:MM)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def parse_tls(value: str | None) -> bool | None:
    if value in (None, "", "any"):
        return None
    if value in ("yes", "no"):
        return value == "yes"
    raise ValidationFailed("tls", "must be yes, no or any")


@router.get("/log")
async def search(request: Request, sender: str = Query("", max_length=300), recipient: str = Query("", max_length=300),
                 subject: str = Query("", max_length=300), client_ip: str = Query("", max_length=64),
                 disposition: str = Query(""), tls: str = Query(""), since: str = Query(""), until: str = Query(""),
                 page: int = Query(1, ge=1, le=100000), direction: str = Query("", max_length=16),
                 me: ConsoleUser = Depends(console_user), ctx: WebContext = Depends(get_ctx)):
    """Search the message log (each filter optional); 100 per page, newest first."""
    if disposition and disposition not in messages.DISPOSITIONS:
        raise ValidationFailed("disposition", f"must be one of {', '.join(messages.DISPOSITIONS)}")
    rows = await messages.search_messages(
        ctx.store, me.actor, sender=sender or None, recipient=recipient or None, subject=subject or None,
        client_ip=client_ip.strip() or None, disposition=disposition or None, tls=parse_tls(tls),
        since=parse_time(since, "since"), until=parse_time(until, "until"), limit=PAGE + 1, offset=(page - 1) * PAGE,
        direction=direction or None)
    form = {"sender": sender, "recipient": recipient, "subject": subject, "client_ip": client_ip,
            "disposition": disposition, "tls": tls, "since": since, "until": until,
            "direction": direction}
    return request.app.state.templates.TemplateResponse(request, "messagelog.html", {
        "me": me, "rows": rows[:PAGE], "more": len(rows) > PAGE, "page": page, "form": form,
        "dispositions": messages.DISPOSITIONS, "directions": messages.DIRECTIONS})


@router.get("/log/{entry_id}")
async def detail(request: Request, entry_id: int, me: ConsoleUser = Depends(console_user),
                 ctx: WebContext = Depends(get_ctx)):
    """Every field the log keeps for one transaction (404 when not visible)."""
    entry = await messages.get_message(ctx.store, me.actor, entry_id)
    return request.app.state.templates.TemplateResponse(request, "message.html", {
        "me": me, "entry": entry, "fields": messages.as_dict(entry)})
