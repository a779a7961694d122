"""Domains: list, add, edit, remove, "Test connection" to the downstream servers, and the
hosted MTA-STS settings with the DNS records to publish and their DNS check. The domain's
partner TLS rules have a page of their own (:mod:`mxguard.web.routes.partners`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse
from starlette.datastructures import FormData

from mxguard.errors import AlreadyExists, Conflict, ValidationFailed
from mxguard.services import domains as domain_service
from mxguard.services import hosted_sts
from mxguard.services import orgs as org_service
from mxguard.services import partners
from mxguard.services.dns_check import check_records, settings_resolver
from mxguard.services.probe import effective_policy, probe_domain
from mxguard.tls.policy import DownstreamTls, InboundTls, TlsVersion
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, console_user, csrf_checked, get_ctx

router = APIRouter(include_in_schema=False)

#: The settings the domain form edits, in page order. Settings added to
#: ``DOMAIN_DEFAULTS`` by other features (on-unreachable, filter thresholds,
#: attachment rules) get a line here and a block in ``domain_form.html``.
FORM_FIELDS = ("inbound_tls", "downstream_tls", "tls_ca_file", "tls_crl_file", "tls_fingerprint", "tls_min_version")
CHOICES = {
    "inbound_tls": [e.value for e in InboundTls],
    "downstream_tls": [e.value for e in DownstreamTls],
    "tls_min_version": [e.value for e in TlsVersion],
}


def _form_values(form: FormData) -> dict:
    servers = [line.strip() for line in str(form.get("servers", "")).replace(",", "\n").splitlines() if line.strip()]
    values = {key: str(form.get(key, "")).strip() for key in FORM_FIELDS}
    values["servers"] = servers
    values["org"] = str(form.get("org", "")).strip()
    return values


async def _hosted(ctx: WebContext, me: ConsoleUser, name: str) -> hosted_sts.HostedPolicy:
    s = ctx.settings
    return await hosted_sts.get_hosted_policy(ctx.store, name, s.mx_hosts, s.hostname, actor=me.actor)


async def _render_form(request: Request, me: ConsoleUser, ctx: WebContext, *, domain: dict, is_new: bool,
                       error: ValidationFailed | str | None = None, probe=None, saved: bool = False,
                       status: int = 200, tls_policy=None, sts_error: ValidationFailed | None = None,
                       sts_saved: bool = False, dns_check=None):
    orgs = await org_service.list_orgs(ctx.store, actor=me.actor)
    field = error.field if isinstance(error, ValidationFailed) else None
    hosted = None if is_new else await _hosted(ctx, me, domain["name"])
    partner_count = 0 if is_new else len(await partners.list_rules(ctx.store, domain["name"], actor=me.actor))
    return request.app.state.templates.TemplateResponse(request, "domain_form.html", {
        "me": me, "domain": domain, "is_new": is_new, "choices": CHOICES, "orgs": orgs,
        "error": str(error) if error else None, "error_field": field, "probe": probe, "saved": saved,
        "tls_policy": tls_policy or (probe.tls_policy if probe is not None else None),
        "hosted": hosted, "sts_modes": hosted_sts.MODES, "sts_error": str(sts_error) if sts_error else None,
        "sts_error_field": sts_error.field if sts_error else None, "sts_saved": sts_saved, "dns_check": dns_check,
        "max_age_range": (hosted_sts.MIN_MAX_AGE, hosted_sts.MAX_MAX_AGE), "partner_count": partner_count,
    }, status_code=status)


@router.get("/domains")
async def list_page(request: Request, me: ConsoleUser = Depends(console_user), ctx: WebContext = Depends(get_ctx)):
    """The domains the user may see."""
    views = await domain_service.list_domains(ctx.store, actor=me.actor)
    return request.app.state.templates.TemplateResponse(request, "domains.html", {"me": me, "domains": views})


@router.get("/domains/new")
async def new_form(request: Request, me: ConsoleUser = Depends(console_user), ctx: WebContext = Depends(get_ctx)):
    """An empty domain form with the defaults."""
    blank = {"name": "", "servers": [], **domain_service.DOMAIN_DEFAULTS, "org": me.actor.org or ""}
    return await _render_form(request, me, ctx, domain=blank, is_new=True)


@router.post("/domains/new")
async def create(request: Request, me: ConsoleUser = Depends(csrf_checked), ctx: WebContext = Depends(get_ctx)):
    """Add a domain from the form; errors re-show the form naming the field."""
    form = await request.form()
    values = _form_values(form)
    name = str(form.get("name", "")).strip()
    try:
        view = await domain_service.add_domain(
            ctx.store, name, values.pop("servers"), actor=me.actor, org=values.pop("org") or None,
            **{k: v or None for k, v in values.items()})
    except (ValidationFailed, AlreadyExists, Conflict) as exc:
        return await _render_form(request, me, ctx, domain={"name": name, **_form_values(form)}, is_new=True,
                                  error=exc, status=422 if isinstance(exc, ValidationFailed) else 409)
    await ctx.config_changed()
    return RedirectResponse(f"/domains/{view.name}?saved=1", status_code=303)


@router.get("/domains/{name}")
async def edit_form(request: Request, name: str, saved: int = 0, sts_saved: int = 0,
                    me: ConsoleUser = Depends(console_user), ctx: WebContext = Depends(get_ctx)):
    """One domain's settings, which source decides each server's TLS policy now, and its hosted MTA-STS."""
    view = await domain_service.get_domain(ctx.store, name, actor=me.actor)
    tls_policy = await effective_policy(view, ctx.settings.downstream)
    return await _render_form(request, me, ctx, domain=view.as_dict(), is_new=False, saved=bool(saved),
                              tls_policy=tls_policy, sts_saved=bool(sts_saved))


@router.post("/domains/{name}")
async def update(request: Request, name: str, me: ConsoleUser = Depends(csrf_checked),
                 ctx: WebContext = Depends(get_ctx)):
    """Save a domain's settings; the next SMTP transaction uses them."""
    current = await domain_service.get_domain(ctx.store, name, actor=me.actor)
    values = _form_values(await request.form())
    org = values.pop("org")
    changes = dict(values)
    if me.actor.is_admin:
        changes["org"] = org
    try:
        await domain_service.update_domain(ctx.store, current.name, actor=me.actor, **changes)
    except ValidationFailed as exc:
        return await _render_form(request, me, ctx, domain={"name": current.name, **values, "org": org},
                                  is_new=False, error=exc, status=422)
    await ctx.config_changed()
    return RedirectResponse(f"/domains/{current.name}?saved=1", status_code=303)


@router.post("/domains/{name}/delete")
async def delete(name: str, force: bool = Form(False), me: ConsoleUser = Depends(csrf_checked),
                 ctx: WebContext = Depends(get_ctx)):
    """Remove a domain (refused with 409 while mail for it is queued, unless forced)."""
    await domain_service.remove_domain(ctx.store, name, actor=me.actor, force=force)
    await ctx.config_changed()
    return RedirectResponse("/domains", status_code=303)


@router.post("/domains/{name}/test")
async def test_connection(request: Request, name: str, me: ConsoleUser = Depends(csrf_checked),
                          ctx: WebContext = Depends(get_ctx)):
    """Probe each downstream server now and show the result under the form."""
    view = await domain_service.get_domain(ctx.store, name, actor=me.actor)
    probe = await probe_domain(view, ctx.settings.downstream, ctx.settings.hostname)
    return await _render_form(request, me, ctx, domain=view.as_dict(), is_new=False, probe=probe)


@router.post("/domains/{name}/mta-sts")
async def set_mta_sts(request: Request, name: str, me: ConsoleUser = Depends(csrf_checked),
                      ctx: WebContext = Depends(get_ctx)):
    """Save the hosted MTA-STS mode and max_age; a changed policy gets a new id (shown in the records)."""
    view = await domain_service.get_domain(ctx.store, name, actor=me.actor)
    form = await request.form()
    s = ctx.settings
    try:
        await hosted_sts.set_hosted_policy(ctx.store, view.name, s.mx_hosts, s.hostname, actor=me.actor,
                                           mode=str(form.get("mta_sts_mode", "")).strip() or None,
                                           max_age=str(form.get("mta_sts_max_age", "")).strip() or None)
    except ValidationFailed as exc:
        return await _render_form(request, me, ctx, domain=view.as_dict(), is_new=False, sts_error=exc, status=422)
    return RedirectResponse(f"/domains/{view.name}?sts_saved=1#mta-sts", status_code=303)


@router.post("/domains/{name}/dns-check")
async def dns_check(request: Request, name: str, me: ConsoleUser = Depends(csrf_checked),
                    ctx: WebContext = Depends(get_ctx)):
    """Look the records to publish up through the configured resolver and show each one's state."""
    view = await domain_service.get_domain(ctx.store, name, actor=me.actor)
    checks = await check_records(await _hosted(ctx, me, view.name), settings_resolver(ctx.settings))
    return await _render_form(request, me, ctx, domain=view.as_dict(), is_new=False, dns_check=checks)
