"""Who may relay for an organization: source networks, SMTP AUTH credentials, client certificates.

The outbound relay (:mod:`mxguard.relay`) lets an organization's own servers
send to the internet through the gateway. A session may relay for an
organization when it comes from one of the organization's **networks**, has
authenticated with one of its **credentials** (SMTP AUTH PLAIN/LOGIN after
STARTTLS, RFC 4954; the password is stored as an argon2id hash only, RFC 9106),
or showed one of its **client certificates** at STARTTLS (a SHA-256 leaf
fingerprint, or an issuing CA whose certificates are all accepted).

Admins manage every organization's entries, org-admins their own (another
organization is "not found", as elsewhere); every change is audited and bumps
the configuration generation so running gateways reload.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from cryptography import x509
from sqlalchemy import select

from mxguard.errors import AlreadyExists, NotFound, ValidationFailed
from mxguard.services import audit
from mxguard.services.access import SYSTEM, Actor
from mxguard.services.domains import bump_generation
from mxguard.services.passwords import hash_password, verify_password  # noqa: F401 - the relay's API
from mxguard.storage.db import Store
from mxguard.storage.models import Domain, Organization, RelayClientCert, RelayCredential, RelayNetwork
from mxguard.tls.certs import normalize_fingerprint, sha256_fingerprint

#: Shortest relay password accepted (a server's secret, typed once into its configuration).
MIN_PASSWORD_LENGTH = 16
_USERNAME = re.compile(r"^[A-Za-z0-9._@+-]{1,255}$")


def generate_password() -> str:
    """A random relay password (24 URL-safe characters, 144 bits)."""
    return secrets.token_urlsafe(18)


def normalize_network(text: str) -> str:
    """A source network in canonical CIDR form (``192.0.2.7`` -> ``192.0.2.7/32``).

    Raises:
        ValidationFailed: (``network``) not an IPv4/IPv6 address or network, or host bits set.
    """
    raw = (text or "").strip()
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        raise ValidationFailed("network", f"{raw!r} is not an IP network such as 192.0.2.0/24 ({exc})") from None
    if net.prefixlen == 0:
        raise ValidationFailed("network", "a network covering every address would make the gateway an open relay")
    return str(net)


def normalize_username(text: str) -> str:
    """A relay user name: 1-255 of letters, digits and ``. _ @ + -``.

    Raises:
        ValidationFailed: (``username``) anything else.
    """
    name = (text or "").strip()
    if not _USERNAME.match(name):
        raise ValidationFailed("username", "must be 1-255 letters, digits or . _ @ + -")
    return name


def check_password(password: str) -> None:
    """Raises ValidationFailed (``password``) when the password is shorter than 16 characters."""
    if len(password or "") < MIN_PASSWORD_LENGTH:
        raise ValidationFailed("password", f"must be at least {MIN_PASSWORD_LENGTH} characters")


@dataclass(frozen=True)
class RelayNetworkView:
    """A registered source network: ``network`` in CIDR form, with a note."""

    org: str
    network: str
    note: str = ""


@dataclass(frozen=True)
class RelayCredentialView:
    """An SMTP AUTH identity (never its password or hash)."""

    org: str
    username: str
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class RelayCertView:
    """A registered client certificate.

    Attributes:
        id: the entry's id (for removal).
        kind: ``fingerprint`` (this leaf only) or ``ca`` (any leaf the CA issued).
        fingerprint: SHA-256 of the leaf (``fingerprint``) or of the CA certificate (``ca``).
        label: the certificate's subject, or a note.
    """

    id: int
    org: str
    kind: str
    fingerprint: str
    label: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RelayAccessData:
    """Everything the SMTP front door needs to decide who may relay (loaded with the configuration).

    Attributes:
        orgs: ``{org_id: name}``.
        domains: ``{org_id: frozenset of the organization's domain names}``.
        networks: ``[(network, org_id)]``.
        credentials: ``{username: (org_id, argon2 hash)}``.
        fingerprints: ``{leaf sha256: org_id}``.
        cas: ``[(CA certificate, org_id)]``.
        trust_pem: the PEM certificates a client's handshake must be able to chain to (the CAs and
            the registered leaves that came with their certificate).
    """

    orgs: dict[int, str]
    domains: dict[int, frozenset[str]]
    networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]]
    credentials: dict[str, tuple[int, str]]
    fingerprints: dict[str, int]
    cas: list[tuple[x509.Certificate, int]]
    trust_pem: tuple[str, ...]


async def _org_row(session, org: str, actor: Actor) -> Organization:
    actor.require_console()
    row = (await session.execute(select(Organization).where(Organization.name == (org or "").strip()))
           ).scalar_one_or_none()
    if row is None or not actor.may_see_org(row.id):
        raise NotFound(f"organization {(org or '').strip()!r} does not exist")
    return row


# -- networks -------------------------------------------------------------------------------

async def add_network(store: Store, org: str, network: str, *, note: str = "", actor: Actor = SYSTEM
                      ) -> RelayNetworkView:
    """Register a source network from which sessions may relay for ``org``.

    Raises:
        NotFound: no such organization, or not the actor's.
        PermissionDenied: the actor is not an admin or org-admin.
        AlreadyExists: another organization or this one has that network already.
        ValidationFailed: (``network``) not a network.
    """
    net = normalize_network(network)
    async with store.session() as session:
        row = await _org_row(session, org, actor)
        exists = await session.scalar(select(RelayNetwork.org_id).where(RelayNetwork.network == net))
        if exists is not None:
            raise AlreadyExists(f"the relay network {net} is registered already"
                                + (" for this organization" if exists == row.id else ""))
        session.add(RelayNetwork(org_id=row.id, network=net, note=(note or "")[:200]))
        view = RelayNetworkView(row.name, net, (note or "")[:200])
        audit.record(session, actor, "relay.network.add", f"{row.name} {net}", org_id=row.id, after=asdict(view))
        await bump_generation(session)
        await session.commit()
    return view


async def list_networks(store: Store, org: str, *, actor: Actor = SYSTEM) -> list[RelayNetworkView]:
    """The organization's relay networks (raises NotFound for another organization)."""
    async with store.session() as session:
        row = await _org_row(session, org, actor)
        rows = (await session.execute(select(RelayNetwork).where(RelayNetwork.org_id == row.id)
                                      .order_by(RelayNetwork.network))).scalars().all()
        return [RelayNetworkView(row.name, r.network, r.note) for r in rows]


async def remove_network(store: Store, org: str, network: str, *, actor: Actor = SYSTEM) -> RelayNetworkView:
    """Remove a relay network.

    Raises:
        NotFound: no such organization (or not the actor's), or it has no such network.
        ValidationFailed: (``network``) not a network.
    """
    net = normalize_network(network)
    async with store.session() as session:
        row = await _org_row(session, org, actor)
        item = (await session.execute(select(RelayNetwork).where(
            RelayNetwork.org_id == row.id, RelayNetwork.network == net))).scalar_one_or_none()
        if item is None:
            raise NotFound(f"{row.name} has no relay network {net}")
        view = RelayNetworkView(row.name, item.network, item.note)
        await session.delete(item)
        audit.record(session, actor, "relay.network.remove", f"{row.name} {net}", org_id=row.id, before=asdict(view))
        await bump_generation(session)
        await session.commit()
    return view


# -- credentials -----------------------------------------------------------------------------

async def add_credential(store: Store, org: str, username: str, password: str | None = None, *,
                         actor: Actor = SYSTEM) -> tuple[RelayCredentialView, str]:
    """Create an SMTP AUTH identity for ``org``; returns it and the password (generated when ``None``).

    The password is shown to the caller this once: only its argon2id hash is stored.

    Raises:
        NotFound: no such organization, or not the actor's.
        AlreadyExists: the user name is taken (user names are unique across the gateway).
        ValidationFailed: (``username``/``password``) malformed or too short.
    """
    name = normalize_username(username)
    if password is None:
        password = generate_password()
    check_password(password)
    digest = hash_password(password)
    async with store.session() as session:
        row = await _org_row(session, org, actor)
        if await session.scalar(select(RelayCredential.id).where(RelayCredential.username == name)) is not None:
            raise AlreadyExists(f"the relay user name {name} is taken")
        session.add(RelayCredential(org_id=row.id, username=name, password_hash=digest))
        view = RelayCredentialView(row.name, name)
        audit.record(session, actor, "relay.credential.add", f"{row.name} {name}", org_id=row.id,
                     after={"org": row.name, "username": name})
        await bump_generation(session)
        await session.commit()
    return view, password


async def list_credentials(store: Store, org: str, *, actor: Actor = SYSTEM) -> list[RelayCredentialView]:
    """The organization's relay user names (never a password or hash)."""
    async with store.session() as session:
        row = await _org_row(session, org, actor)
        rows = (await session.execute(select(RelayCredential).where(RelayCredential.org_id == row.id)
                                      .order_by(RelayCredential.username))).scalars().all()
        return [RelayCredentialView(row.name, r.username, r.created_at) for r in rows]


async def remove_credential(store: Store, org: str, username: str, *, actor: Actor = SYSTEM) -> RelayCredentialView:
    """Remove an SMTP AUTH identity (raises NotFound when the organization has none of that name)."""
    name = normalize_username(username)
    async with store.session() as session:
        row = await _org_row(session, org, actor)
        item = (await session.execute(select(RelayCredential).where(
            RelayCredential.org_id == row.id, RelayCredential.username == name))).scalar_one_or_none()
        if item is None:
            raise NotFound(f"{row.name} has no relay user {name}")
        await session.delete(item)
        audit.record(session, actor, "relay.credential.remove", f"{row.name} {name}", org_id=row.id,
                     before={"org": row.name, "username": name})
        await bump_generation(session)
        await session.commit()
    return RelayCredentialView(row.name, name)


# -- client certificates -------------------------------------------------------------------------

def _fingerprint(text: str) -> str:
    try:
        return normalize_fingerprint(text or "")
    except ValueError as exc:
        raise ValidationFailed("fingerprint", str(exc)) from None


def parse_certificate_pem(pem: str, field: str) -> x509.Certificate:
    """The first certificate of a PEM text.

    Raises:
        ValidationFailed: (``field``) no PEM certificate in it.
    """
    try:
        return x509.load_pem_x509_certificates((pem or "").encode())[0]
    except (ValueError, IndexError):
        raise ValidationFailed(field, "is not a PEM certificate") from None


async def add_certificate(store: Store, org: str, *, fingerprint: str | None = None, cert_pem: str | None = None,
                          ca_pem: str | None = None, label: str = "", actor: Actor = SYSTEM) -> RelayCertView:
    """Register a client certificate for ``org``: exactly one of a leaf's SHA-256 ``fingerprint``, the
    leaf itself (``cert_pem``: its fingerprint is taken and it is trusted for the handshake, so a
    self-signed certificate works) or an issuing CA (``ca_pem``: every certificate it issued is accepted).

    Raises:
        NotFound: no such organization, or not the actor's.
        AlreadyExists: that fingerprint or CA is registered already.
        ValidationFailed: none or several given, or one is malformed.
    """
    given = [v for v in (fingerprint, cert_pem, ca_pem) if v]
    if len(given) != 1:
        raise ValidationFailed("certificate", "give exactly one of a fingerprint, a certificate or a CA certificate")
    trust = None
    if fingerprint:
        kind, digest = "fingerprint", _fingerprint(fingerprint)
    else:
        cert = parse_certificate_pem(cert_pem or ca_pem, "cert" if cert_pem else "ca")
        from cryptography.hazmat.primitives.serialization import Encoding
        der = cert.public_bytes(Encoding.DER)
        kind, digest = ("fingerprint" if cert_pem else "ca"), sha256_fingerprint(der)
        trust = cert.public_bytes(Encoding.PEM).decode()
        label = label or cert.subject.rfc4514_string()
        if ca_pem:
            try:
                basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                basic = None
            if basic is None or not basic.ca:
                raise ValidationFailed("ca", "is not a CA certificate (basicConstraints CA:TRUE)")
    async with store.session() as session:
        row = await _org_row(session, org, actor)
        if await session.scalar(select(RelayClientCert.id).where(RelayClientCert.fingerprint == digest)) is not None:
            raise AlreadyExists(f"the client certificate {digest} is registered already")
        item = RelayClientCert(org_id=row.id, kind=kind, fingerprint=digest, ca_pem=trust, label=(label or "")[:1000])
        session.add(item)
        await session.flush()
        view = RelayCertView(item.id, row.name, kind, digest, item.label)
        audit.record(session, actor, "relay.certificate.add", f"{row.name} {digest}", org_id=row.id,
                     after=view.as_dict())
        await bump_generation(session)
        await session.commit()
    return view


async def list_certificates(store: Store, org: str, *, actor: Actor = SYSTEM) -> list[RelayCertView]:
    """The organization's registered client certificates."""
    async with store.session() as session:
        row = await _org_row(session, org, actor)
        rows = (await session.execute(select(RelayClientCert).where(RelayClientCert.org_id == row.id)
                                      .order_by(RelayClientCert.id))).scalars().all()
        return [RelayCertView(r.id, row.name, r.kind, r.fingerprint or "", r.label) for r in rows]


async def remove_certificate(store: Store, org: str, fingerprint: str, *, actor: Actor = SYSTEM) -> RelayCertView:
    """Remove a registered client certificate by its fingerprint (raises NotFound when it is not the org's)."""
    digest = _fingerprint(fingerprint)
    async with store.session() as session:
        row = await _org_row(session, org, actor)
        item = (await session.execute(select(RelayClientCert).where(
            RelayClientCert.org_id == row.id, RelayClientCert.fingerprint == digest))).scalar_one_or_none()
        if item is None:
            raise NotFound(f"{row.name} has no relay client certificate {digest}")
        view = RelayCertView(item.id, row.name, item.kind, digest, item.label)
        await session.delete(item)
        audit.record(session, actor, "relay.certificate.remove", f"{row.name} {digest}", org_id=row.id,
                     before=view.as_dict())
        await bump_generation(session)
        await session.commit()
    return view


# -- the gateway's in-memory copy ------------------------------------------------------------------

async def load_access_data(store: Store) -> RelayAccessData:
    """Every organization's relay entries and domains (for :class:`mxguard.relay.access.RelayAccess`)."""
    async with store.session() as session:
        orgs = dict((await session.execute(select(Organization.id, Organization.name))).all())
        domains: dict[int, set[str]] = {}
        for name, org_id in (await session.execute(select(Domain.name, Domain.org_id)
                                                   .where(Domain.org_id.is_not(None)))).all():
            domains.setdefault(org_id, set()).add(name)
        networks = [(ipaddress.ip_network(n), o) for n, o in
                    (await session.execute(select(RelayNetwork.network, RelayNetwork.org_id))).all()]
        credentials = {u: (o, h) for u, o, h in (await session.execute(
            select(RelayCredential.username, RelayCredential.org_id, RelayCredential.password_hash))).all()}
        certs = (await session.execute(select(RelayClientCert))).scalars().all()
    fingerprints: dict[str, int] = {}
    cas: list[tuple[x509.Certificate, int]] = []
    trust: list[str] = []
    for c in certs:
        if c.kind == "fingerprint" and c.fingerprint:
            fingerprints[c.fingerprint] = c.org_id
        elif c.kind == "ca" and c.ca_pem:
            cas.append((x509.load_pem_x509_certificate(c.ca_pem.encode()), c.org_id))
        if c.ca_pem:
            trust.append(c.ca_pem)
    # Longest prefix first: the most specific registered network decides.
    networks.sort(key=lambda item: -item[0].prefixlen)
    return RelayAccessData(orgs, {o: frozenset(d) for o, d in domains.items()}, networks, credentials,
                           fingerprints, cas, tuple(trust))


# -- outbound mail held by a rate limit ------------------------------------------------------------

@dataclass(frozen=True)
class HeldView:
    """An outbound spool entry held by a rate limit (status ``held``)."""

    id: int
    txn_id: str
    mail_from: str
    domain: str
    recipients: tuple[str, ...]
    subject: str
    created_at: dt.datetime


async def _held_rows(session, actor: Actor, entry_id: int | None = None):
    from mxguard.storage.models import SpoolEntry

    actor.require_console()
    q = select(SpoolEntry).where(SpoolEntry.kind == "outbound", SpoolEntry.status == "held")
    if entry_id is not None:
        q = q.where(SpoolEntry.id == entry_id)
    # The relaying organization is the entry's org_id (set at acceptance), never the sender's or
    # the destination's domain string.
    q = actor.scope(q, SpoolEntry.org_id)
    return list((await session.execute(q.order_by(SpoolEntry.id))).scalars().all())


def _held_view(row) -> HeldView:
    return HeldView(row.id, row.txn_id, row.mail_from, row.domain, tuple(r["rcpt"] for r in row.recipients),
                    row.subject, row.created_at)


async def list_held(store: Store, *, actor: Actor = SYSTEM) -> list[HeldView]:
    """Outbound messages held by a rate limit, oldest first (an org-admin sees its organization's only)."""
    async with store.session() as session:
        return [_held_view(r) for r in await _held_rows(session, actor)]


async def release_held(store: Store, entry_id: int, *, actor: Actor = SYSTEM) -> HeldView:
    """Let a held outbound message go: its spool entry is queued and due now.

    Raises:
        NotFound: no held outbound entry with that id (or not the actor's organization's).
    """
    from mxguard.storage.models import utcnow

    async with store.session() as session:
        rows = await _held_rows(session, actor, entry_id)
        if not rows:
            raise NotFound(f"no held outbound message {entry_id}")
        row = rows[0]
        row.status, row.next_attempt_at = "queued", utcnow()
        view = _held_view(row)
        audit.record(session, actor, "relay.release", f"spool #{row.id}", org_id=row.org_id,
                     after={"mail_from": row.mail_from, "domain": row.domain})
        await session.commit()
    return view
