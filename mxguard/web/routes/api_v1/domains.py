"""``/domains``: served domains, their downstream servers and TLS policy; connection test;
hosted MTA-STS (``/domains/{name}/mta-sts``) and the DNS check of its records; partner TLS
rules (``/domains/{name}/partners``)."""

from fastapi import APIRouter, Depends, Response

from mxguard.errors import ValidationFailed
from mxguard.services import domains as svc
from mxguard.services import hosted_sts
from mxguard.services import partners
from mxguard.services.dns_check import check_records, settings_resolver
from mxguard.services.access import Actor
from mxguard.services.probe import probe_domain
from mxguard.web.context import WebContext
from mxguard.web.deps import api_actor, get_ctx
from mxguard.web.routes.api_v1.schemas import (DnsCheckOut, DomainChange, DomainIn, DomainOut, DomainPatch,
                                               MtaStsChange, MtaStsOut, MtaStsPatch, PartnerRuleIn, PartnerRuleOut,
                                               ProbeOut)

router = APIRouter(prefix="/domains", tags=["domains"])


def _out(view: svc.DomainView) -> DomainOut:
    return DomainOut(**view.as_dict())


@router.get("", response_model=list[DomainOut], summary="List domains")
async def list_domains(actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return [_out(v) for v in await svc.list_domains(ctx.store, actor=actor)]


@router.post("", response_model=DomainOut, status_code=201, summary="Add a domain")
async def add_domain(body: DomainIn, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    fields = body.model_dump(exclude={"name", "servers", "org"})
    try:
        view = await svc.add_domain(ctx.store, body.name, body.servers, actor=actor, org=body.org, **fields)
    except ValidationFailed as exc:
        # The service calls the domain's name "domain"; this body calls it "name".
        raise ValidationFailed.combine([ValidationFailed("name" if field == "domain" else field, message)
                                        for field, message in exc.errors]) from None
    await ctx.config_changed()
    return _out(view)


@router.get("/{name}", response_model=DomainOut, summary="One domain")
async def get_domain(name: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return _out(await svc.get_domain(ctx.store, name, actor=actor))


@router.patch("/{name}", response_model=DomainChange, summary="Change a domain (applies to the next transaction)")
async def update_domain(name: str, body: DomainPatch, actor: Actor = Depends(api_actor),
                        ctx: WebContext = Depends(get_ctx)):
    before, after = await svc.update_domain(ctx.store, name, actor=actor, **body.model_dump(exclude_unset=True))
    await ctx.config_changed()
    return DomainChange(before=_out(before), after=_out(after))


@router.delete("/{name}", status_code=204, response_class=Response, summary="Remove a domain")
async def remove_domain(name: str, force: bool = False, actor: Actor = Depends(api_actor),
                        ctx: WebContext = Depends(get_ctx)):
    """409 while messages for the domain are queued in the spool, unless ``?force=true``."""
    await svc.remove_domain(ctx.store, name, actor=actor, force=force)
    await ctx.config_changed()
    return Response(status_code=204)


@router.post("/{name}/test", response_model=ProbeOut, summary="Test connection to each downstream server now")
async def test_domain(name: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    view = await svc.get_domain(ctx.store, name, actor=actor)
    probe = await probe_domain(view, ctx.settings.downstream, ctx.settings.hostname)
    return ProbeOut(**probe.as_dict())


@router.get("/{name}/mta-sts", response_model=MtaStsOut, summary="Hosted MTA-STS policy and the DNS records to publish")
async def get_mta_sts(name: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    s = ctx.settings
    policy = await hosted_sts.get_hosted_policy(ctx.store, name, s.mx_hosts, s.hostname, actor=actor)
    return MtaStsOut(**policy.as_dict())


@router.patch("/{name}/mta-sts", response_model=MtaStsChange, summary="Change the hosted MTA-STS mode or max_age")
async def set_mta_sts(name: str, body: MtaStsPatch, actor: Actor = Depends(api_actor),
                      ctx: WebContext = Depends(get_ctx)):
    """A changed policy text gets a new id: publish the new ``_mta-sts`` record from ``after.records``."""
    s = ctx.settings
    try:
        before, after = await hosted_sts.set_hosted_policy(ctx.store, name, s.mx_hosts, s.hostname, actor=actor,
                                                           mode=body.mode, max_age=body.max_age)
    except ValidationFailed as exc:
        # The service names the settings as the domain form does; this body says mode / max_age.
        raise ValidationFailed.combine([ValidationFailed(field.removeprefix("mta_sts_"), message)
                                        for field, message in exc.errors]) from None
    return MtaStsChange(before=MtaStsOut(**before.as_dict()), after=MtaStsOut(**after.as_dict()))


@router.post("/{name}/dns-check", response_model=list[DnsCheckOut],
             summary="Look up the records to publish now: ok, mismatch, missing or error for each")
async def dns_check(name: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    s = ctx.settings
    policy = await hosted_sts.get_hosted_policy(ctx.store, name, s.mx_hosts, s.hostname, actor=actor)
    return [DnsCheckOut(**c.as_dict()) for c in await check_records(policy, settings_resolver(s))]


@router.get("/{name}/partners", response_model=list[PartnerRuleOut], summary="The domain's partner TLS rules")
async def list_partners(name: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return [PartnerRuleOut(**v.as_dict()) for v in await partners.list_rules(ctx.store, name, actor=actor)]


@router.post("/{name}/partners", response_model=PartnerRuleOut, status_code=201,
             summary="Add a partner TLS rule (530 5.7.0 at MAIL in clear, 550 5.7.1 at RCPT when not met)")
async def add_partner(name: str, body: PartnerRuleIn, actor: Actor = Depends(api_actor),
                      ctx: WebContext = Depends(get_ctx)):
    """409 when the domain has a rule for that sender already; 422 naming the field for bad input."""
    fields = body.model_dump(exclude={"sender"})
    view = await partners.add_rule(ctx.store, name, body.sender, actor=actor, **fields)
    await ctx.config_changed()
    return PartnerRuleOut(**view.as_dict())


@router.delete("/{name}/partners/{sender}", status_code=204, response_class=Response,
               summary="Remove the partner TLS rule for a sender pattern")
async def remove_partner(name: str, sender: str, actor: Actor = Depends(api_actor),
                         ctx: WebContext = Depends(get_ctx)):
    await partners.remove_rule(ctx.store, name, sender, actor=actor)
    await ctx.config_changed()
    return Response(status_code=204)
