"""DKIM signing keys of served domains for outbound mail: generate, show, check in DNS, sign.

``generate`` makes a key pair (:mod:`mxguard.relay.dkim`), stores the private key sealed with
the keyring (AES-256-GCM, bound to ``dkim:<domain>:<selector>``) and returns the TXT record
to publish at ``<selector>._domainkey.<domain>`` (RFC 6376 section 3.6.2.1). The newest key of
a domain is the active one: outbound mail from that domain is signed with it at delivery.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver
from sqlalchemy import select, update

from mxguard.dkim_signing import DkimSigner
from mxguard.errors import AlreadyExists, NotFound, ValidationFailed
from mxguard.relay import dkim as keys
from mxguard.services import audit
from mxguard.services.access import SYSTEM, Actor
from mxguard.services.domains import _scoped_row, normalize_domain_name
from mxguard.storage.db import Store
from mxguard.storage.models import DkimKey, Domain
from mxguard.storage.sealing import Sealer


def seal_context(domain: str, selector: str) -> bytes:
    """Associated data binding a sealed DKIM key to its domain and selector."""
    return f"dkim:{domain}:{selector}".encode()


@dataclass(frozen=True)
class DkimKeyView:
    """One key, without its private half.

    Attributes:
        domain: the signing domain (``d=``), a served domain.
        selector: the ``s=`` tag.
        algorithm: ``rsa`` or ``ed25519``.
        public_key: base64 ``p=`` value.
        active: outbound mail is signed with this key.
        created_at: when it was generated (UTC).
    """

    domain: str
    selector: str
    algorithm: str
    public_key: str
    active: bool
    created_at: dt.datetime

    @property
    def record_name(self) -> str:
        return keys.record_name(self.domain, self.selector)

    @property
    def record_value(self) -> str:
        return keys.record_value(self.algorithm, self.public_key)

    @property
    def zone_line(self) -> str:
        return keys.zone_line(self.domain, self.selector, self.algorithm, self.public_key)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data.update(record_name=self.record_name, record_value=self.record_value, zone_line=self.zone_line)
        return data


def _view(row: DkimKey, domain: str) -> DkimKeyView:
    return DkimKeyView(domain, row.selector, row.algorithm, row.public_key, row.active, row.created_at)


async def generate_key(store: Store, sealer: Sealer, domain: str, *, selector: str | None = None,
                       algorithm: str = "rsa", actor: Actor = SYSTEM) -> DkimKeyView:
    """Generate and store a domain's new active key (older keys stay, inactive, until removed).

    Args:
        sealer: the keyring's current sealer.
        domain: a served domain.
        selector: the ``s=`` tag (default ``mxg<YYYYMM>``, so a new key gets a new record).
        algorithm: ``rsa`` (2048 bits) or ``ed25519``.

    Raises:
        NotFound: not a served domain, or not the actor's.
        PermissionDenied: the actor is not an admin or org-admin.
        ValidationFailed: (``selector``, ``algorithm``) invalid.
        AlreadyExists: the domain has a key with that selector.
    """
    actor.require_console()  # before the work of making a key
    name = normalize_domain_name(domain)
    algorithm = (algorithm or "").strip().lower()
    if algorithm not in keys.ALGORITHMS:
        raise ValidationFailed("algorithm", f"{algorithm!r} is not one of: {', '.join(keys.ALGORITHMS)}")
    selector = (selector or f"mxg{dt.datetime.now(dt.timezone.utc):%Y%m}").strip().lower()
    if not keys.valid_selector(selector):
        raise ValidationFailed("selector", f"{selector!r} is not a DNS label (letters, digits, '-')")
    pem, public = keys.generate_key(algorithm)
    async with store.session() as session:
        row = await _scoped_row(session, name, actor)
        exists = await session.scalar(select(DkimKey.id).where(DkimKey.domain_id == row.id,
                                                               DkimKey.selector == selector))
        if exists is not None:
            raise AlreadyExists(f"{name} has a DKIM key with selector {selector}; choose another selector")
        key_id, blob = sealer.seal(pem, seal_context(name, selector))
        await session.execute(update(DkimKey).where(DkimKey.domain_id == row.id).values(active=False))
        key = DkimKey(domain_id=row.id, selector=selector, algorithm=algorithm, key_id=key_id, private_key=blob,
                      public_key=public, active=True, created_at=dt.datetime.now(dt.timezone.utc))
        session.add(key)
        view = _view(key, name)
        audit.record(session, actor, "domain.dkim.generate", f"{name} {selector}", org_id=row.org_id,
                     after={"selector": selector, "algorithm": algorithm})
        await session.commit()
    return view


async def list_keys(store: Store, domain: str, *, actor: Actor = SYSTEM) -> list[DkimKeyView]:
    """A domain's keys, newest first.

    Raises:
        NotFound: not a served domain, or not the actor's.
        PermissionDenied: the actor is not an admin or org-admin.
    """
    name = normalize_domain_name(domain)
    async with store.session() as session:
        row = await _scoped_row(session, name, actor)
        rows = (await session.execute(select(DkimKey).where(DkimKey.domain_id == row.id)
                                      .order_by(DkimKey.created_at.desc(), DkimKey.id.desc()))).scalars()
        return [_view(r, name) for r in rows]


async def remove_key(store: Store, domain: str, selector: str, *, actor: Actor = SYSTEM) -> DkimKeyView:
    """Delete a key for good (remove its DNS record afterwards, not before: mail in transit).

    Raises:
        NotFound: no such domain (or not the actor's), or no key with that selector.
    """
    name = normalize_domain_name(domain)
    async with store.session() as session:
        row = await _scoped_row(session, name, actor)
        key = (await session.execute(select(DkimKey).where(DkimKey.domain_id == row.id,
                                                           DkimKey.selector == selector.strip().lower()))
               ).scalar_one_or_none()
        if key is None:
            raise NotFound(f"{name} has no DKIM key with selector {selector}")
        view = _view(key, name)
        await session.delete(key)
        audit.record(session, actor, "domain.dkim.remove", f"{name} {view.selector}", org_id=row.org_id)
        await session.commit()
    return view


async def activate_key(store: Store, domain: str, selector: str, *, actor: Actor = SYSTEM) -> DkimKeyView:
    """Make the key with ``selector`` the one outbound mail of ``domain`` is signed with (the
    others stay stored, inactive): a rollback after a new key, or a planned rotation back.

    Raises:
        NotFound: no such domain (or not the actor's), or no key with that selector.
        PermissionDenied: the actor is not an admin or org-admin.
    """
    name = normalize_domain_name(domain)
    async with store.session() as session:
        row = await _scoped_row(session, name, actor)
        key = (await session.execute(select(DkimKey).where(DkimKey.domain_id == row.id,
                                                           DkimKey.selector == selector.strip().lower()))
               ).scalar_one_or_none()
        if key is None:
            raise NotFound(f"{name} has no DKIM key with selector {selector}")
        await session.execute(update(DkimKey).where(DkimKey.domain_id == row.id, DkimKey.id != key.id)
                              .values(active=False))
        key.active = True
        view = _view(key, name)
        audit.record(session, actor, "domain.dkim.activate", f"{name} {view.selector}", org_id=row.org_id)
        await session.commit()
    return view


async def signing_domain(store: Store, envelope_domain: str, from_domain: str | None) -> str:
    """Which domain's key signs an outbound message: the ``From`` header's domain when it is a
    served domain of the envelope sender's domain's organization with an active key (the
    signature then aligns with ``From`` for DMARC, RFC 7489 section 3.1.1), else the envelope
    sender's domain. Never another organization's domain (domains of no organization, the
    administrators' own, count as one organization).

    Args:
        envelope_domain: the envelope sender's domain (the relay checked it is the organization's).
        from_domain: the ``From`` header's domain, if any.
    """
    envelope_domain = envelope_domain.rstrip(".").lower()
    from_domain = (from_domain or "").rstrip(".").lower()
    if not from_domain or from_domain == envelope_domain:
        return envelope_domain
    async with store.session() as session:
        rows = dict((await session.execute(select(Domain.name, Domain.org_id).where(
            Domain.name.in_([envelope_domain, from_domain])))).all())
        if envelope_domain not in rows or from_domain not in rows or rows[envelope_domain] != rows[from_domain]:
            return envelope_domain
        has_key = await session.scalar(select(DkimKey.id).join(Domain, Domain.id == DkimKey.domain_id)
                                       .where(Domain.name == from_domain, DkimKey.active.is_(True)))
    return from_domain if has_key is not None else envelope_domain


async def signer_for(store: Store, sealer: Sealer, domain: str) -> DkimSigner | None:
    """The signer of a domain's active key, or ``None`` (no key; the domain is not served).

    Raises:
        SealingError: the sealed key cannot be opened with the key file.
        mxguard.dkim_signing.KeyFileError: the stored key is unusable.
    """
    name = domain.rstrip(".").lower()
    async with store.session() as session:
        key = (await session.execute(select(DkimKey).join(Domain, Domain.id == DkimKey.domain_id)
                                     .where(Domain.name == name, DkimKey.active.is_(True)))).scalars().first()
    if key is None:
        return None
    pem = sealer.open(key.private_key, seal_context(name, key.selector))
    return keys.signer(pem, key.selector, name)


async def reseal_keys(store: Store, sealer: Sealer) -> int:
    """Re-seal every DKIM private key not sealed with the current key (``keys rotate``); the count.

    Raises:
        SealingError: a key cannot be opened with the key file.
    """
    async with store.session() as session:
        rows = (await session.execute(select(DkimKey, Domain.name).join(Domain, Domain.id == DkimKey.domain_id)
                                      .where(DkimKey.key_id != sealer.current_key_id))).all()
        for row, name in rows:
            plain = sealer.open(row.private_key, seal_context(name, row.selector))
            row.key_id, row.private_key = sealer.seal(plain, seal_context(name, row.selector))
        await session.commit()
    return len(rows)


@dataclass(frozen=True)
class DkimDnsCheck:
    """What DNS says about one key's record.

    Attributes:
        status: ``ok`` (the published ``p=`` is the key's), ``mismatch`` (another key or no
            ``p=``), ``missing`` (no TXT record) or ``error`` (the lookup failed).
        found: the TXT values the resolver answered.
        detail: one sentence.
    """

    name: str
    expected: str
    found: list[str]
    status: str
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


async def check_dns(view: DkimKeyView, resolver: dns.asyncresolver.Resolver) -> DkimDnsCheck:
    """Look the key's TXT record up through ``resolver`` and compare its ``p=`` with the key's.

    A failed lookup is the status ``error``, never an exception.
    """
    name = view.record_name
    try:
        answer = await resolver.resolve(name, "TXT")
        found = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return DkimDnsCheck(name, view.record_value, [], "missing", "no TXT record is published at this name")
    except dns.exception.DNSException as exc:
        return DkimDnsCheck(name, view.record_value, [], "error", f"lookup failed: {type(exc).__name__}")
    published = [keys.public_key_of(v) for v in found if v.replace(" ", "").lower().startswith("v=dkim1")
                 or "p=" in v]
    if view.public_key in published:
        return DkimDnsCheck(name, view.record_value, found, "ok", "the published key is this key")
    if any(p == "" for p in published):
        return DkimDnsCheck(name, view.record_value, found, "mismatch", "the record revokes the key (empty p=)")
    return DkimDnsCheck(name, view.record_value, found, "mismatch", "the published record holds another key")
