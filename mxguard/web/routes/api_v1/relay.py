"""``/orgs/{org}/relay/...``: who may relay for an organization (networks, AUTH users, client
certificates), and ``/relay/held``: outbound mail held by a rate limit. Admins and the
organization's org-admins; another organization is 404."""

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from mxguard.services import relay as svc
from mxguard.services.access import Actor
from mxguard.web.context import WebContext
from mxguard.web.deps import api_actor, get_ctx

router = APIRouter(tags=["outbound relay"])


class _In(BaseModel):
    """Request bodies: unknown fields are refused (422)."""

    model_config = ConfigDict(extra="forbid")


class RelayNetworkIn(_In):
    """A source network to register."""

    network: str = Field(max_length=64, description="IP network, e.g. 192.0.2.0/24")
    note: str = Field("", max_length=200)


class RelayNetworkOut(BaseModel):
    """A registered source network (CIDR)."""

    network: str
    note: str = ""


class RelayUserIn(_In):
    """An SMTP AUTH user to create; the password is at least 16 characters."""

    username: str = Field(max_length=255)
    password: str | None = Field(None, min_length=16, max_length=1000,
                                 description="Omit to have one generated (returned once)")


class RelayUserOut(BaseModel):
    """An SMTP AUTH user; ``password`` only once, when the gateway generated it."""

    username: str
    password: str | None = None


class RelayCertIn(_In):
    """A client certificate to register: exactly one of the three."""

    fingerprint: str | None = Field(None, max_length=100, description="SHA-256 of the client's leaf certificate")
    cert_pem: str | None = Field(None, max_length=20000, description="The client's certificate itself")
    ca_pem: str | None = Field(None, max_length=20000, description="An issuing CA certificate")
    label: str = Field("", max_length=1000)


class RelayCertOut(BaseModel):
    """A registered client certificate: ``fingerprint`` (a leaf) or ``ca``, its SHA-256."""

    kind: str
    fingerprint: str
    label: str = ""


class HeldOut(BaseModel):
    """An outbound message held by a rate limit (its spool entry)."""

    id: int
    txn_id: str
    mail_from: str
    domain: str
    recipients: list[str]
    subject: str


@router.get("/orgs/{org}/relay/networks", response_model=list[RelayNetworkOut], summary="Relay source networks")
async def list_networks(org: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return [RelayNetworkOut(network=v.network, note=v.note) for v in await svc.list_networks(ctx.store, org, actor=actor)]


@router.post("/orgs/{org}/relay/networks", response_model=RelayNetworkOut, status_code=201,
             summary="Let sessions from a network relay for the organization")
async def add_network(org: str, body: RelayNetworkIn, actor: Actor = Depends(api_actor),
                      ctx: WebContext = Depends(get_ctx)):
    view = await svc.add_network(ctx.store, org, body.network, note=body.note, actor=actor)
    await ctx.config_changed()
    return RelayNetworkOut(network=view.network, note=view.note)


@router.delete("/orgs/{org}/relay/networks/{network:path}", status_code=204, response_class=Response,
               summary="Remove a relay network (the prefix length after a slash)")
async def remove_network(org: str, network: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    await svc.remove_network(ctx.store, org, network, actor=actor)
    await ctx.config_changed()
    return Response(status_code=204)


@router.get("/orgs/{org}/relay/users", response_model=list[RelayUserOut], summary="SMTP AUTH users (no passwords)")
async def list_users(org: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return [RelayUserOut(username=v.username) for v in await svc.list_credentials(ctx.store, org, actor=actor)]


@router.post("/orgs/{org}/relay/users", response_model=RelayUserOut, status_code=201,
             summary="Create an SMTP AUTH user; a generated password is returned this once")
async def add_user(org: str, body: RelayUserIn, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    view, password = await svc.add_credential(ctx.store, org, body.username, body.password, actor=actor)
    await ctx.config_changed()
    return RelayUserOut(username=view.username, password=password if body.password is None else None)


@router.delete("/orgs/{org}/relay/users/{username}", status_code=204, response_class=Response,
               summary="Remove an SMTP AUTH user")
async def remove_user(org: str, username: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    await svc.remove_credential(ctx.store, org, username, actor=actor)
    await ctx.config_changed()
    return Response(status_code=204)


@router.get("/orgs/{org}/relay/certs", response_model=list[RelayCertOut], summary="Relay client certificates")
async def list_certs(org: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return [RelayCertOut(kind=v.kind, fingerprint=v.fingerprint, label=v.label)
            for v in await svc.list_certificates(ctx.store, org, actor=actor)]


@router.post("/orgs/{org}/relay/certs", response_model=RelayCertOut, status_code=201,
             summary="Register a client certificate: exactly one of fingerprint, cert_pem, ca_pem")
async def add_cert(org: str, body: RelayCertIn, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    view = await svc.add_certificate(ctx.store, org, fingerprint=body.fingerprint, cert_pem=body.cert_pem,
                                     ca_pem=body.ca_pem, label=body.label, actor=actor)
    await ctx.config_changed()
    return RelayCertOut(kind=view.kind, fingerprint=view.fingerprint, label=view.label)


@router.delete("/orgs/{org}/relay/certs/{fingerprint}", status_code=204, response_class=Response,
               summary="Remove a relay client certificate")
async def remove_cert(org: str, fingerprint: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    await svc.remove_certificate(ctx.store, org, fingerprint, actor=actor)
    await ctx.config_changed()
    return Response(status_code=204)


@router.get("/relay/held", response_model=list[HeldOut], summary="Outbound mail held by a rate limit")
async def list_held(actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return [HeldOut(id=v.id, txn_id=v.txn_id, mail_from=v.mail_from, domain=v.domain, recipients=list(v.recipients),
                    subject=v.subject) for v in await svc.list_held(ctx.store, actor=actor)]


@router.post("/relay/held/{entry_id}/release", response_model=HeldOut, summary="Send a held outbound message")
async def release(entry_id: int, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    v = await svc.release_held(ctx.store, entry_id, actor=actor)
    return HeldOut(id=v.id, txn_id=v.txn_id, mail_from=v.mail_from, domain=v.domain, recipients=list(v.recipients),
                   subject=v.subject)
