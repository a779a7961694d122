"""TLS page: the gateway's certificate, replacing it (validated, hot-reloaded), certificates by SNI
(list, upload, remove), ACME (status per name, request, renew now; administrators), TLS shares
per domain."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse
from starlette.datastructures import UploadFile

from mxguard.errors import AcmeFailed, AlreadyExists, ConfigError, NotFound, PermissionDenied, ValidationFailed
from mxguard.services import acme, certificates, stats
from mxguard.services import sni_certificates as sni
from mxguard.web.acme_http01 import responder_server
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, console_user, csrf_checked, get_ctx

router = APIRouter(include_in_schema=False)


async def _render(request: Request, me: ConsoleUser, ctx: WebContext, *, error: str | None = None,
                  saved: bool = False, status: int = 200, sni_saved: str = "", sni_error: str | None = None,
                  sni_form: dict | None = None, acme_saved: str = "", acme_error: str | None = None,
                  acme_form: dict | None = None):
    try:
        chain, chain_error = certificates.current_chain(ctx.settings), None
    except ConfigError as exc:
        chain, chain_error = [], str(exc)
    acme_status = await acme.acme_status(ctx.settings, ctx.store, actor=me.actor) if me.actor.is_admin else None
    return request.app.state.templates.TemplateResponse(request, "tls.html", {
        "me": me, "chain": chain, "chain_error": chain_error, "error": error, "saved": saved,
        "per_domain": await stats.per_domain_tls(ctx.store, me.actor),
        "sni_certs": await sni.list_sni_certificates(ctx.store, actor=me.actor),
        "sni_saved": sni_saved, "sni_error": sni_error, "sni_form": sni_form or {},
        "acme": acme_status, "acme_saved": acme_saved, "acme_error": acme_error, "acme_form": acme_form or {},
    }, status_code=status)


@router.get("/tls")
async def tls_page(request: Request, saved: int = 0, sni_saved: str = "", acme_saved: str = "",
                   me: ConsoleUser = Depends(console_user), ctx: WebContext = Depends(get_ctx)):
    """The gateway certificate, the upload form (admins), certificates by SNI, ACME (admins) and TLS shares
    per domain."""
    message = {"added": "Certificate stored; new STARTTLS and HTTPS handshakes for its name use it now.",
               "removed": "Certificate removed; its name gets the gateway certificate from the next handshake on."}
    acme_message = {"issued": "Certificate issued by the ACME CA and stored; handshakes for its names use it now.",
                    "renewed": "Certificate renewed; handshakes for its names use the new one now."}
    return await _render(request, me, ctx, saved=bool(saved), sni_saved=message.get(sni_saved, ""),
                         acme_saved=acme_message.get(acme_saved, ""))


async def _read(upload: UploadFile | str | None, field: str) -> bytes:
    """The uploaded file's bytes (at most one byte over the limit, so the service can refuse it)."""
    if isinstance(upload, UploadFile):
        return await upload.read(certificates.MAX_PEM_BYTES + 1)
    if isinstance(upload, str) and upload.strip():
        return upload.encode()  # pasted PEM text
    raise ValidationFailed(field, "no file was chosen")


@router.post("/tls/certificate")
async def upload(request: Request, me: ConsoleUser = Depends(csrf_checked), ctx: WebContext = Depends(get_ctx)):
    """Validate and install an uploaded chain and key, then hot-reload it."""
    form = await request.form()
    try:
        cert_pem = await _read(form.get("certificate"), "certificate")
        key_pem = await _read(form.get("key"), "key")
        await certificates.install_certificate(ctx.settings, ctx.store, cert_pem, key_pem, actor=me.actor)
    except ValidationFailed as exc:
        return await _render(request, me, ctx, error=str(exc), status=422)
    if ctx.reload_certificate is not None:
        ctx.reload_certificate()
    return RedirectResponse("/tls?saved=1", status_code=303)


_SNI_STATUS = {ValidationFailed: 422, PermissionDenied: 403, AlreadyExists: 409, NotFound: 404}


@router.post("/tls/sni")
async def sni_upload(request: Request, me: ConsoleUser = Depends(csrf_checked), ctx: WebContext = Depends(get_ctx)):
    """Validate and store a certificate for a name; every gateway serves it from its next handshake on."""
    form = await request.form()
    name = str(form.get("name") or "")
    replace = form.get("replace") == "on"
    try:
        cert_pem = await _read(form.get("certificate"), "certificate")
        key_pem = await _read(form.get("key"), "key")
        await sni.add_sni_certificate(ctx.store, ctx.keyring.get(), name, cert_pem, key_pem, actor=me.actor,
                                      replace=replace, min_version=ctx.settings.tls.min_version)
    except (ValidationFailed, PermissionDenied, AlreadyExists) as exc:
        return await _render(request, me, ctx, sni_error=str(exc), status=_SNI_STATUS[type(exc)],
                             sni_form={"name": name, "replace": replace})
    await ctx.config_changed()
    return RedirectResponse("/tls?sni_saved=added", status_code=303)


@router.post("/tls/sni/remove")
async def sni_remove(request: Request, me: ConsoleUser = Depends(csrf_checked), ctx: WebContext = Depends(get_ctx)):
    """Remove the certificate for the form's ``name``."""
    form = await request.form()
    try:
        await sni.remove_sni_certificate(ctx.store, str(form.get("name") or ""), actor=me.actor)
    except (ValidationFailed, NotFound) as exc:
        return await _render(request, me, ctx, sni_error=str(exc), status=_SNI_STATUS[type(exc)])
    await ctx.config_changed()
    return RedirectResponse("/tls?sni_saved=removed", status_code=303)


_ACME_STATUS = {ValidationFailed: 422, AlreadyExists: 409, NotFound: 404, ConfigError: 409, AcmeFailed: 502}


def _acme_status_code(exc: Exception) -> int:
    return next(code for kind, code in _ACME_STATUS.items() if isinstance(exc, kind))


@router.post("/tls/acme/request")
async def acme_request(request: Request, me: ConsoleUser = Depends(csrf_checked), ctx: WebContext = Depends(get_ctx)):
    """Order a certificate for the form's names (one per line or comma-separated) now; answers when it is over."""
    me.actor.require_admin()
    form = await request.form()
    text = str(form.get("names") or "")
    names = [n.strip() for n in text.replace(",", "\n").splitlines() if n.strip()]
    replace = form.get("replace") == "on"
    try:
        await acme.request_certificate(ctx.settings, ctx.store, ctx.keyring.get(), names, replace=replace,
                                       actor=me.actor, make_responder=responder_server)
    except tuple(_ACME_STATUS) as exc:
        return await _render(request, me, ctx, acme_error=str(exc), status=_acme_status_code(exc),
                             acme_form={"names": text, "replace": replace})
    await ctx.config_changed()
    return RedirectResponse("/tls?acme_saved=issued#acme", status_code=303)


@router.post("/tls/acme/renew")
async def acme_renew(request: Request, me: ConsoleUser = Depends(csrf_checked), ctx: WebContext = Depends(get_ctx)):
    """Renew the certificate ACME issued for the form's ``name`` now; a failure is shown and recorded."""
    me.actor.require_admin()
    form = await request.form()
    try:
        await acme.renew_now(ctx.settings, ctx.store, ctx.keyring.get(), str(form.get("name") or ""),
                             actor=me.actor, make_responder=responder_server)
    except tuple(_ACME_STATUS) as exc:
        return await _render(request, me, ctx, acme_error=str(exc), status=_acme_status_code(exc))
    await ctx.config_changed()
    return RedirectResponse("/tls?acme_saved=renewed#acme", status_code=303)
