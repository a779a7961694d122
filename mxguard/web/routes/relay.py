"""The console's relay page per organization: source networks, SMTP AUTH users, client certificates.

Admins see every organization's page, org-admins their own (another is 404). A new AUTH user's
password is shown once, on the page that answers the form, and never again.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse

from mxguard.errors import AlreadyExists, NotFound, ValidationFailed
from mxguard.services import relay as svc
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, console_user, csrf_checked, get_ctx

router = APIRouter(include_in_schema=False)


async def _render(request: Request, me: ConsoleUser, ctx: WebContext, name: str, *, error: str | None = None,
                  password: tuple[str, str] | None = None, status: int = 200):
    networks = await svc.list_networks(ctx.store, name, actor=me.actor)  # NotFound for another organization
    users = await svc.list_credentials(ctx.store, name, actor=me.actor)
    certs = await svc.list_certificates(ctx.store, name, actor=me.actor)
    return request.app.state.templates.TemplateResponse(request, "relay.html", {
        "me": me, "org": networks[0].org if networks else name.strip(), "networks": networks, "users": users,
        "certs": certs, "error": error, "password": password, "active": "/orgs"}, status_code=status)


@router.get("/orgs/{name}/relay")
async def page(request: Request, name: str, me: ConsoleUser = Depends(console_user),
               ctx: WebContext = Depends(get_ctx)):
    """Who may relay for the organization."""
    return await _render(request, me, ctx, name)


@router.post("/orgs/{name}/relay")
async def change(request: Request, name: str, me: ConsoleUser = Depends(csrf_checked),
                 ctx: WebContext = Depends(get_ctx)):
    """One change from the page's forms: ``action`` is add-network, remove-network, add-user,
    remove-user, add-cert or remove-cert."""
    form = await request.form()
    action = str(form.get("action", ""))
    value = str(form.get("value", "")).strip()
    actor = me.actor
    password = None
    try:
        if action == "add-network":
            await svc.add_network(ctx.store, name, value, note=str(form.get("note", "")), actor=actor)
        elif action == "remove-network":
            await svc.remove_network(ctx.store, name, value, actor=actor)
        elif action == "add-user":
            view, secret = await svc.add_credential(ctx.store, name, value, actor=actor)
            password = (view.username, secret)
        elif action == "remove-user":
            await svc.remove_credential(ctx.store, name, value, actor=actor)
        elif action == "add-cert":
            pem = str(form.get("pem", ""))
            kind = str(form.get("kind", "fingerprint"))
            await svc.add_certificate(ctx.store, name, fingerprint=(value or None) if kind == "fingerprint" else None,
                                      cert_pem=pem if kind == "cert" else None, ca_pem=pem if kind == "ca" else None,
                                      actor=actor)
        elif action == "remove-cert":
            await svc.remove_certificate(ctx.store, name, value, actor=actor)
        else:
            raise ValidationFailed("action", "is not one of the page's actions")
    except NotFound:
        raise
    except (ValidationFailed, AlreadyExists) as exc:
        return await _render(request, me, ctx, name, error=str(exc), status=422)
    await ctx.config_changed()
    if password is not None:
        return await _render(request, me, ctx, name, password=password)
    return RedirectResponse(f"/orgs/{name}/relay", status_code=303)
