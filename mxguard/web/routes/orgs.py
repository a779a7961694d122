"""Organizations: the message-links switch and the notification settings (admins: all, org-admins: their own)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse

from mxguard.errors import ValidationFailed
from mxguard.services import orgsettings
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, console_user, csrf_checked, get_ctx

router = APIRouter(include_in_schema=False)

LABELS = {
    "message_links": "Message links: summaries carry deliver/view links and the Message Center offers View "
                     "(off: users sign in and deliver to their inbox, which keeps delivery encrypted end to end)",
    "notify_virus_recipient": "Tell the recipient when a virus addressed to them was stopped",
    "notify_virus_admin": "Tell the alert address when a virus was stopped",
    "notify_route_down": "Alert when a downstream server has been unreachable (mail spooling) for the minutes below",
    "notify_cert_expiry": "Alert when a gateway certificate (its own or one by SNI) or a downstream server's expires within 14 days",
    "notify_engine_down": "Alert when a filtering engine is down",
}


async def _render(request: Request, me: ConsoleUser, ctx: WebContext, *, error: ValidationFailed | None = None,
                  saved: str = "", status: int = 200):
    views = await orgsettings.list_settings(ctx.store, actor=me.actor)
    return request.app.state.templates.TemplateResponse(request, "orgs.html", {
        "me": me, "orgs": views, "labels": LABELS, "switches": orgsettings.SWITCHES,
        "error": str(error) if error else None, "saved": saved, "active": "/orgs"}, status_code=status)


@router.get("/orgs")
async def page(request: Request, saved: str = "", me: ConsoleUser = Depends(console_user),
               ctx: WebContext = Depends(get_ctx)):
    """Each visible organization's quarantine and notification settings."""
    return await _render(request, me, ctx, saved=saved)


@router.post("/orgs/{name}")
async def update(request: Request, name: str, me: ConsoleUser = Depends(csrf_checked),
                 ctx: WebContext = Depends(get_ctx)):
    """Save one organization's settings (unchecked boxes are off)."""
    form = await request.form()
    changes = {key: key in form for key in orgsettings.SWITCHES}
    changes["alert_address"] = str(form.get("alert_address", ""))
    changes["route_down_minutes"] = str(form.get("route_down_minutes", "30"))
    try:
        view = await orgsettings.update_settings(ctx.store, name, actor=me.actor, **changes)
    except ValidationFailed as exc:
        return await _render(request, me, ctx, error=exc, status=422)
    return RedirectResponse(f"/orgs?saved={view.org}", status_code=303)
