"""A domain's partner TLS rules in the console (``/domains/{name}/partners``): list, add, remove.

The rules themselves are :mod:`mxguard.services.partners` (the CLI and the API use the same
functions). Admins and the org-admins of the domain's organization only; another
organization's domain is "not found". A CA is pasted or uploaded as PEM and stored in the
database; CA and CRL *files* (paths on the gateway host) are offered to admins only.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse
from starlette.datastructures import FormData, UploadFile

from mxguard.errors import AlreadyExists, NotFound, PermissionDenied, ValidationFailed
from mxguard.services import domains as domain_service
from mxguard.services import partners
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, console_user, csrf_checked, get_ctx

router = APIRouter(include_in_schema=False)

_STATUS = {ValidationFailed: 422, AlreadyExists: 409, PermissionDenied: 403, NotFound: 404}
_MESSAGES = {"added": "Rule added; the next SMTP transaction applies it.",
             "removed": "Rule removed; the next SMTP transaction no longer applies it."}


async def _render(request: Request, me: ConsoleUser, ctx: WebContext, name: str, *, saved: str = "",
                  error: Exception | None = None, form: dict | None = None, status: int = 200):
    view = await domain_service.get_domain(ctx.store, name, actor=me.actor)
    rules = await partners.list_rules(ctx.store, view.name, actor=me.actor)
    return request.app.state.templates.TemplateResponse(request, "partners.html", {
        "me": me, "domain": view, "rules": rules, "requirement": partners.requirement,
        "min_tls_choices": partners.MIN_TLS_CHOICES, "saved": _MESSAGES.get(saved, ""),
        "error": str(error) if error else None,
        "error_field": error.field if isinstance(error, ValidationFailed) else None, "form": form or {},
    }, status_code=status)


async def _ca_pem(form: FormData) -> str | None:
    """The CA bundle from the form: the uploaded file if one was chosen, else the pasted text."""
    upload = form.get("ca_pem_file")
    if isinstance(upload, UploadFile) and upload.filename:
        data = await upload.read(partners.MAX_CA_PEM_BYTES + 1)
        return data.decode("utf-8", "replace")
    text = str(form.get("ca_pem") or "")
    return text if text.strip() else None


def _form_values(form: FormData) -> dict:
    lines = str(form.get("fingerprints") or "").replace(",", "\n").splitlines()
    return {"sender": str(form.get("sender") or "").strip(),
            "min_tls": str(form.get("min_tls") or "1.2").strip(),
            "require_cert": form.get("require_cert") == "on",
            "fingerprints": [line.strip() for line in lines if line.strip()],
            "cert_host": str(form.get("cert_host") or "").strip() or None,
            "ca_file": str(form.get("ca_file") or "").strip() or None,
            "crl_file": str(form.get("crl_file") or "").strip() or None}


@router.get("/domains/{name}/partners")
async def partners_page(request: Request, name: str, saved: str = "", me: ConsoleUser = Depends(console_user),
                        ctx: WebContext = Depends(get_ctx)):
    """The domain's partner rules and the form to add one."""
    return await _render(request, me, ctx, name, saved=saved)


@router.post("/domains/{name}/partners")
async def add_partner(request: Request, name: str, me: ConsoleUser = Depends(csrf_checked),
                      ctx: WebContext = Depends(get_ctx)):
    """Add a rule from the form; an invalid field re-shows the form naming it (nothing is stored)."""
    view = await domain_service.get_domain(ctx.store, name, actor=me.actor)  # 404 before reading input
    form = await request.form()
    values = _form_values(form)
    try:
        ca_pem = await _ca_pem(form)
        await partners.add_rule(ctx.store, view.name, values.pop("sender"), actor=me.actor, ca_pem=ca_pem,
                                **values)
    except (ValidationFailed, AlreadyExists, PermissionDenied) as exc:
        shown = {**_form_values(form), "ca_pem": str(form.get("ca_pem") or "")}
        return await _render(request, me, ctx, view.name, error=exc, form=shown, status=_STATUS[type(exc)])
    await ctx.config_changed()
    return RedirectResponse(f"/domains/{view.name}/partners?saved=added", status_code=303)


@router.post("/domains/{name}/partners/remove")
async def remove_partner(request: Request, name: str, me: ConsoleUser = Depends(csrf_checked),
                         ctx: WebContext = Depends(get_ctx)):
    """Remove the rule for the form's ``sender`` pattern."""
    view = await domain_service.get_domain(ctx.store, name, actor=me.actor)
    form = await request.form()
    try:
        await partners.remove_rule(ctx.store, view.name, str(form.get("sender") or ""), actor=me.actor)
    except (ValidationFailed, NotFound) as exc:
        return await _render(request, me, ctx, view.name, error=exc, status=_STATUS[type(exc)])
    await ctx.config_changed()
    return RedirectResponse(f"/domains/{view.name}/partners?saved=removed", status_code=303)
