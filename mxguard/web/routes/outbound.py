"""Outbound delivery in the console: TLS overrides per internet destination (admins) and the
served domains' DKIM keys, with the TXT record to publish and a DNS check of it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse

from mxguard.errors import AlreadyExists, NotFound, ValidationFailed
from mxguard.relay.destinations import LEVELS
from mxguard.relay.dkim import ALGORITHMS
from mxguard.services import destination_tls, dkim_keys
from mxguard.services import domains as domain_service
from mxguard.services.dns_check import settings_resolver
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, console_user, csrf_checked, get_ctx

router = APIRouter(include_in_schema=False)

#: What ``?saved=`` says after a change (fixed texts: a link cannot put words on the page).
NOTICES = {"tls": "TLS override saved; the next delivery to that destination uses it.",
           "tls-removed": "Override removed; the destination gets the default again.",
           "dkim": "DKIM key generated and active: publish its TXT record below."}


async def _render(request: Request, me: ConsoleUser, ctx: WebContext, *, status: int = 200, tls_error=None,
                  tls_form: dict | None = None, dkim_error=None, dkim_form: dict | None = None, checks=None,
                  notice: str | None = None, report=None, report_error=None):
    overrides = await destination_tls.list_overrides(ctx.store, actor=me.actor) if me.actor.is_admin else []
    domains = await domain_service.list_domains(ctx.store, actor=me.actor)
    keys = {d.name: await dkim_keys.list_keys(ctx.store, d.name, actor=me.actor) for d in domains}
    return request.app.state.templates.TemplateResponse(request, "outbound.html", {
        "me": me, "overrides": overrides, "levels": list(LEVELS), "algorithms": ALGORITHMS, "domains": domains,
        "keys": keys, "tls_error": str(tls_error) if tls_error else None, "tls_form": tls_form or {},
        "dkim_error": str(dkim_error) if dkim_error else None, "dkim_form": dkim_form or {},
        "checks": checks or {}, "notice": notice, "report": report,
        "report_error": str(report_error) if report_error else None,
    }, status_code=status)


@router.get("/outbound")
async def page(request: Request, saved: str = "", me: ConsoleUser = Depends(console_user),
               ctx: WebContext = Depends(get_ctx)):
    """The destination TLS overrides and every visible domain's DKIM keys."""
    return await _render(request, me, ctx, notice=NOTICES.get(saved))


@router.post("/outbound/destination-tls")
async def add_override(request: Request, me: ConsoleUser = Depends(csrf_checked), ctx: WebContext = Depends(get_ctx)):
    """Add or replace an override; a bad field re-shows the page naming it."""
    form = await request.form()
    values = {k: str(form.get(k, "")).strip() for k in ("pattern", "level", "ca_file")}
    try:
        await destination_tls.add_override(ctx.store, values["pattern"], values["level"],
                                                  ca_file=values["ca_file"] or None,
                                                  replace=bool(form.get("replace")), actor=me.actor)
    except (ValidationFailed, AlreadyExists) as exc:
        return await _render(request, me, ctx, tls_error=exc, tls_form=values,
                             status=422 if isinstance(exc, ValidationFailed) else 409)
    await ctx.config_changed()
    return RedirectResponse("/outbound?saved=tls", status_code=303)


@router.post("/outbound/destination-tls/remove")
async def remove_override(request: Request, me: ConsoleUser = Depends(csrf_checked),
                          ctx: WebContext = Depends(get_ctx)):
    form = await request.form()
    await destination_tls.remove_override(ctx.store, str(form.get("pattern", "")), actor=me.actor)
    await ctx.config_changed()
    return RedirectResponse("/outbound?saved=tls-removed", status_code=303)


@router.post("/outbound/dkim")
async def generate(request: Request, me: ConsoleUser = Depends(csrf_checked), ctx: WebContext = Depends(get_ctx)):
    """Generate a domain's DKIM key (sealed) and show the record to publish."""
    form = await request.form()
    values = {k: str(form.get(k, "")).strip() for k in ("domain", "selector", "algorithm")}
    try:
        view = await dkim_keys.generate_key(ctx.store, ctx.keyring.get(), values["domain"],
                                            selector=values["selector"] or None,
                                            algorithm=values["algorithm"] or "rsa", actor=me.actor)
    except (ValidationFailed, AlreadyExists, NotFound) as exc:
        return await _render(request, me, ctx, dkim_error=exc, dkim_form=values,
                             status=422 if isinstance(exc, ValidationFailed) else 409 if isinstance(
                                 exc, AlreadyExists) else 404)
    return RedirectResponse(f"/outbound?saved=dkim#dkim-{view.domain}", status_code=303)


@router.post("/outbound/dkim/check")
async def check(request: Request, me: ConsoleUser = Depends(csrf_checked), ctx: WebContext = Depends(get_ctx)):
    """Look a domain's key records up through the configured resolver and show each one's state."""
    form = await request.form()
    name = str(form.get("domain", "")).strip()
    resolver = settings_resolver(ctx.settings)
    results = {}
    for view in await dkim_keys.list_keys(ctx.store, name, actor=me.actor):
        results[(view.domain, view.selector)] = await dkim_keys.check_dns(view, resolver)
    return await _render(request, me, ctx, checks=results)


@router.post("/outbound/explain")
async def explain(request: Request, me: ConsoleUser = Depends(csrf_checked), ctx: WebContext = Depends(get_ctx)):
    """How mail to a destination would go now (MX hosts, override, TLS per address); admins."""
    form = await request.form()
    try:
        report = await destination_tls.explain(ctx.store, ctx.settings.downstream, str(form.get("domain", "")),
                                               actor=me.actor)
    except ValidationFailed as exc:
        return await _render(request, me, ctx, report_error=exc, status=422)
    return await _render(request, me, ctx, report=report)
