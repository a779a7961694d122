"""``/tls``: the gateway certificate (read, replace), certificates by SNI, ACME (status, request,
renew now), and TLS shares per domain."""

from fastapi import APIRouter, Depends, HTTPException, Response

from mxguard.errors import AcmeFailed, ConfigError
from mxguard.services import acme, certificates, stats
from mxguard.services import sni_certificates as sni
from mxguard.services.access import Actor
from mxguard.tls.certs import CertificateInfo
from mxguard.web.acme_http01 import responder_server
from mxguard.web.context import WebContext
from mxguard.web.deps import api_actor, get_ctx
from mxguard.web.routes.api_v1.schemas import (AcmeIssuedOut, AcmeNameOut, AcmeRenewIn, AcmeRequestIn,
                                               AcmeStatusOut, CertificateIn, CertificateOut, DomainTlsOut,
                                               SniCertificateIn, SniCertificateOut, TlsShareOut)

router = APIRouter(prefix="/tls", tags=["tls"])


def _cert(info: CertificateInfo) -> CertificateOut:
    return CertificateOut(subject=info.subject, issuer=info.issuer, sans=info.sans, not_before=info.not_before,
                          not_after=info.not_after, days_left=int(info.days_left), sha256=info.sha256,
                          key_type=info.key_type)


def share_out(share: stats.TlsShare) -> TlsShareOut:
    return TlsShareOut(transactions=share.transactions, inbound_tls=share.inbound_tls, downstream=share.downstream,
                       downstream_tls=share.downstream_tls, downstream_verified=share.downstream_verified,
                       inbound_pct=share.inbound_pct, downstream_pct=share.downstream_pct,
                       verified_pct=share.verified_pct)


@router.get("/certificate", response_model=list[CertificateOut], summary="The gateway's certificate chain")
async def get_certificate(actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    actor.require_console()
    return [_cert(c) for c in certificates.current_chain(ctx.settings)]


@router.put("/certificate", response_model=CertificateOut,
            summary="Replace the certificate (validated first; new handshakes use it at once) (admin)")
async def put_certificate(body: CertificateIn, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    info = await certificates.install_certificate(ctx.settings, ctx.store, body.certificate_pem.encode(),
                                                  body.key_pem.encode(), actor=actor)
    if ctx.reload_certificate is not None:
        ctx.reload_certificate()
    return _cert(info)


def _sni(view: sni.SniCertView) -> SniCertificateOut:
    return SniCertificateOut(name=view.name, domain=view.domain, org=view.org, subject=view.subject,
                             sans=list(view.sans), not_before=view.not_before, not_after=view.not_after,
                             days_left=int(view.days_left), sha256=view.fingerprint, created_at=view.created_at)


@router.get("/certificates", response_model=list[SniCertificateOut], summary="Certificates chosen by SNI")
async def list_sni(actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return [_sni(v) for v in await sni.list_sni_certificates(ctx.store, actor=actor)]


@router.post("/certificates", response_model=SniCertificateOut, status_code=201,
             summary="Add a certificate for a host name or wildcard (validated; every gateway serves it at once)")
async def add_sni(body: SniCertificateIn, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    """409 when the name has one already (unless ``replace``); 403 for an org-admin's name under no domain of
    their organization; 422 naming ``name``, ``certificate`` or ``key`` when validation refuses it."""
    view = await sni.add_sni_certificate(ctx.store, ctx.keyring.get(), body.name, body.certificate_pem.encode(),
                                         body.key_pem.encode(), actor=actor, replace=body.replace,
                                         min_version=ctx.settings.tls.min_version)
    await ctx.config_changed()
    return _sni(view)


@router.delete("/certificates/{name}", status_code=204, response_class=Response,
               summary="Remove the certificate for a name (it gets the gateway certificate again)")
async def remove_sni(name: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    await sni.remove_sni_certificate(ctx.store, name, actor=actor)
    await ctx.config_changed()
    return Response(status_code=204)


@router.get("/domains", response_model=list[DomainTlsOut], summary="Inbound/downstream TLS per domain, 24 h and 30 days")
async def per_domain(actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return [DomainTlsOut(domain=name, last_24h=share_out(day), last_30d=share_out(month))
            for name, day, month in await stats.per_domain_tls(ctx.store, actor)]


def _issued(issued) -> AcmeIssuedOut:
    """The API's view of an :class:`mxguard.tls.acme_client.Issued`."""
    return AcmeIssuedOut(names=list(issued.names), certificates=[_sni(v) for v in issued.views])


async def _acme_order(ctx: WebContext, order) -> AcmeIssuedOut:
    """Run an ACME order; the CA's refusal is 502 (what it said), ACME off or misconfigured 409."""
    try:
        issued = await order
    except AcmeFailed as exc:
        raise HTTPException(502, str(exc)) from None
    except ConfigError as exc:
        raise HTTPException(409, str(exc)) from None
    await ctx.config_changed()
    return _issued(issued)


@router.get("/acme", response_model=AcmeStatusOut, summary="ACME: settings and the state of every name it issued (admin)")
async def acme_status(actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    status = await acme.acme_status(ctx.settings, ctx.store, actor=actor)
    return AcmeStatusOut(enabled=status.enabled, directory_url=status.directory_url, http_listen=status.http_listen,
                         renew_before_days=status.renew_before_days,
                         certificates=[AcmeNameOut(**e.as_dict()) for e in status.entries])


@router.post("/acme/certificates", response_model=AcmeIssuedOut, status_code=201,
             summary="Order a certificate for names from the ACME CA now (HTTP-01; admin)")
async def acme_request(body: AcmeRequestIn, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    """Answers when the order is over (at most ``acme.order_timeout``). 422 naming ``name`` for a bad or wildcard
    name; 409 when a name has a certificate (unless ``replace``) or ACME is off; 502 with what the CA said when
    it refused or a challenge failed."""
    actor.require_admin()
    return await _acme_order(ctx, acme.request_certificate(
        ctx.settings, ctx.store, ctx.keyring.get(), body.names, replace=body.replace, actor=actor,
        make_responder=responder_server))


@router.post("/acme/renew", response_model=AcmeIssuedOut, summary="Renew a certificate ACME issued, now (admin)")
async def acme_renew(body: AcmeRenewIn, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    """404 when ACME issued nothing for the name; 502 with what the CA said when the renewal failed (recorded
    in the status; the current certificate stays in use)."""
    actor.require_admin()
    return await _acme_order(ctx, acme.renew_now(ctx.settings, ctx.store, ctx.keyring.get(), body.name,
                                                 actor=actor, make_responder=responder_server))
