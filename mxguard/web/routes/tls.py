"""TLS page: the gateway's certificate, replacing it (validated, hot-reloaded), TLS shares per domain."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse
from starlette.datastructures import UploadFile

from mxguard.errors import ConfigError, ValidationFailed
from mxguard.services import certificates, stats
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, console_user, csrf_checked, get_ctx

router = APIRouter(include_in_schema=False)


async def _render(request: Request, me: ConsoleUser, ctx: WebContext, *, error: str | None = None,
                  saved: bool = False, status: int = 200):
    try:
        chain, chain_error = certificates.current_chain(ctx.settings), None
    except ConfigError as exc:
        chain, chain_error = [], str(exc)
    return request.app.state.templates.TemplateResponse(request, "tls.html", {
        "me": me, "chain": chain, "chain_error": chain_error, "error": error, "saved": saved,
        "per_domain": await stats.per_domain_tls(ctx.store, me.actor),
    }, status_code=status)


@router.get("/tls")
async def tls_page(request: Request, saved: int = 0, me: ConsoleUser = Depends(console_user),
                   ctx: WebContext = Depends(get_ctx)):
    """The gateway certificate, the upload form (admins) and TLS shares per domain."""
    return await _render(request, me, ctx, saved=bool(saved))


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
