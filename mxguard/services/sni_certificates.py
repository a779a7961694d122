"""Certificates chosen by SNI: add (validated), list, remove — with tenancy, the audit log and sealing.

A certificate is stored for one name: a host name or a one-label wildcard
(:mod:`mxguard.tls.sni`). It belongs to the organization of the served
domain that name is under (the longest such domain); only a global admin may
add one for a name under no served domain of the actor's organization. The
private key is sealed with the gateway's sealing key (AES-256-GCM, the key
file every node shares) and never leaves the database in clear except into
the gateway's OpenSSL contexts. Every change bumps the configuration
generation, so each gateway process uses it for its next handshake.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from mxguard.errors import AlreadyExists, ConfigError, NotFound, PermissionDenied, ValidationFailed
from mxguard.services import audit
from mxguard.services.access import SYSTEM, Actor
from mxguard.services.certificates import MAX_PEM_BYTES
from mxguard.services.domains import bump_generation
from mxguard.storage.db import Store
from mxguard.storage.models import Domain, Organization, SniCertificate, utcnow
from mxguard.storage.sealing import Sealer, SealingError
from mxguard.tls.certs import CertificateProblem, check_chain_pem, describe, sha256_fingerprint
from mxguard.tls.contexts import server_context_from_pem
from mxguard.tls.sni import WILDCARD, normalize_sni_name, san_covers

log = structlog.get_logger("mxguard.sni")


def seal_context(name: str) -> bytes:
    """Associated data binding a sealed key to its name's row."""
    return b"sni-key:" + name.encode("ascii")


@dataclass(frozen=True)
class SniCertView:
    """One stored SNI certificate, without its key.

    Attributes:
        name: host name or ``*.`` wildcard.
        domain: the served domain it is under (``None``: none).
        org: that domain's organization's name.
        subject, sans: of the leaf.
        not_before, not_after: the leaf's validity (UTC).
        fingerprint: SHA-256 of the leaf, lower-case hex.
        created_at: when it was added (UTC).
    """

    name: str
    domain: str | None
    org: str | None
    subject: str
    sans: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str
    created_at: dt.datetime

    @property
    def days_left(self) -> float:
        """Days until ``not_after`` (negative once expired)."""
        return (self.not_after - dt.datetime.now(dt.timezone.utc)).total_seconds() / 86400

    def as_dict(self) -> dict:
        data = asdict(self)
        data["sans"] = list(self.sans)
        return data


def _view(row: SniCertificate, org: str | None) -> SniCertView:
    info = describe(x509.load_pem_x509_certificates(row.cert_pem.encode("ascii"))[0])
    return SniCertView(row.name, row.domain, org, info.subject, tuple(info.sans), info.not_before,
                       info.not_after, row.fingerprint, row.created_at)


def validate_upload(name: str, cert_pem: bytes, key_pem: bytes, *, min_version: str = "1.2",
                    now: dt.datetime | None = None) -> tuple[str, list[x509.Certificate]]:
    """Check an uploaded certificate for ``name`` before it is stored.

    Refused: an empty or oversized file, a chain that does not parse or is out
    of order, a key that does not belong to the leaf, a leaf that has expired
    or is not valid yet, a leaf whose SAN DNS names do not cover ``name``
    (RFC 6125 6.4.3: a wildcard covers one label; a wildcard name needs the
    same wildcard in the SAN), and a pair OpenSSL will not load.

    Args:
        name: the name to serve it for.
        cert_pem: PEM chain, leaf first.
        key_pem: unencrypted PEM private key.
        min_version: the gateway's ``tls.min_version``.
        now: the time validity is checked at (UTC; default: now).

    Returns:
        ``(normalised name, parsed chain)``.

    Raises:
        ValidationFailed: field ``name``, ``certificate`` or ``key``, saying why.
    """
    normalized = normalize_sni_name(name)
    for field, data in (("certificate", cert_pem), ("key", key_pem)):
        if not data or not data.strip():
            raise ValidationFailed(field, "is empty")
        if len(data) > MAX_PEM_BYTES:
            raise ValidationFailed(field, f"is larger than {MAX_PEM_BYTES} bytes")
    try:
        chain = check_chain_pem(cert_pem, key_pem, now=now, refuse_not_yet_valid=True, check_order=True)
    except CertificateProblem as exc:
        raise ValidationFailed(exc.field, exc.message) from None
    sans = describe(chain[0]).sans
    if not san_covers(sans, normalized):
        listed = ", ".join(sans) or "none"
        hint = " (a wildcard name needs that wildcard itself in the SAN)" if normalized.startswith(WILDCARD) else ""
        raise ValidationFailed("certificate", f"its subject alternative names ({listed}) do not cover "
                                              f"{normalized}{hint}")
    try:
        server_context_from_pem(cert_pem, key_pem, min_version=min_version)
    except ConfigError as exc:
        raise ValidationFailed("certificate", f"OpenSSL refuses it: {exc}") from None
    return normalized, chain


async def _owning_domain(session, name: str) -> Domain | None:
    """The served domain ``name`` is under (equal or a subdomain; the longest such), or ``None``."""
    base = name[len(WILDCARD):] if name.startswith(WILDCARD) else name
    labels = base.split(".")
    candidates = [".".join(labels[i:]) for i in range(len(labels) - 1)]
    rows = (await session.execute(select(Domain).where(Domain.name.in_(candidates)))).unique().scalars().all()
    return max(rows, key=lambda d: len(d.name), default=None)


async def _refuse(store: Store, actor: Actor, name: str, reason: str) -> None:
    # In its own transaction: the refused change rolls back, the refusal stays on record.
    async with store.session() as session:
        audit.record(session, actor, "tls.sni.add.refused", name, org_id=actor.org_id, after={"refused": reason})
        await session.commit()


async def add_sni_certificate(store: Store, sealer: Sealer, name: str, cert_pem: bytes, key_pem: bytes, *,
                              actor: Actor = SYSTEM, replace: bool = False,
                              min_version: str = "1.2") -> SniCertView:
    """Validate and store a certificate for ``name``; gateways serve it from their next handshake on.

    Args:
        store: the database.
        sealer: seals the private key (the data dir's sealing key file).
        name: host name or ``*.`` wildcard.
        cert_pem: PEM chain, leaf first.
        key_pem: unencrypted PEM private key of the leaf.
        actor: who asks; an org-admin only for names under their organization's domains.
        replace: replace a certificate stored for the name already (renewal).
        min_version: the gateway's ``tls.min_version`` (the OpenSSL load check).

    Raises:
        ValidationFailed: see :func:`validate_upload`.
        PermissionDenied: a plain user, or an org-admin for a name under no domain
            of their organization (audit entry ``tls.sni.add.refused``).
        AlreadyExists: the name has a certificate and ``replace`` is false.
    """
    actor.require_console()
    normalized, chain = validate_upload(name, cert_pem, key_pem, min_version=min_version)
    leaf = chain[0]
    fingerprint = sha256_fingerprint(leaf.public_bytes(serialization.Encoding.DER))
    async with store.session() as session:
        owner = await _owning_domain(session, normalized)
        if not actor.is_admin and (owner is None or owner.org_id != actor.org_id):
            reason = (f"{normalized} is not under a domain of organization {actor.org!r}; only an administrator "
                      "may add a certificate for it")
            await _refuse(store, actor, normalized, reason)
            raise PermissionDenied(reason)
        row = (await session.execute(select(SniCertificate).where(SniCertificate.name == normalized))
               ).scalar_one_or_none()
        before = None
        if row is not None:
            if not replace or not actor.may_see_org(row.org_id):
                raise AlreadyExists(f"a certificate for {normalized} is stored already; remove it first or "
                                    "replace it")
            before = _view(row, None).as_dict()
        else:
            row = SniCertificate(name=normalized)
            session.add(row)
        key_id, sealed = sealer.seal(key_pem, seal_context(normalized))
        row.domain = owner.name if owner else None
        row.org_id = owner.org_id if owner else None
        row.cert_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain).decode("ascii")
        row.key_id, row.sealed_key = key_id, sealed
        row.not_after, row.fingerprint, row.created_at = leaf.not_valid_after_utc, fingerprint, utcnow()
        try:
            await session.flush()
        except IntegrityError:
            raise AlreadyExists(f"a certificate for {normalized} is stored already") from None
        await bump_generation(session)
        view = _view(row, owner.org.name if owner and owner.org else None)
        audit.record(session, actor, "tls.sni.replace" if before else "tls.sni.add", normalized,
                     org_id=row.org_id, before=before, after=view.as_dict())
        await session.commit()
    log.info("SNI certificate stored", name=normalized, fingerprint=fingerprint, replaced=before is not None,
             actor=actor.name)
    return view


async def list_sni_certificates(store: Store, *, actor: Actor = SYSTEM) -> list[SniCertView]:
    """The certificates the actor may see, by name (admins: all; org-admins: their organization's).

    Raises:
        PermissionDenied: a plain user.
    """
    actor.require_console()
    q = actor.scope(select(SniCertificate, Organization.name)
                    .outerjoin(Organization, Organization.id == SniCertificate.org_id)
                    .order_by(SniCertificate.name), SniCertificate.org_id)
    async with store.session() as session:
        return [_view(row, org) for row, org in (await session.execute(q)).all()]


async def remove_sni_certificate(store: Store, name: str, *, actor: Actor = SYSTEM) -> SniCertView:
    """Delete the certificate for ``name``; from the next handshake on the name gets the gateway's.

    Raises:
        ValidationFailed: ``name`` is not a host name or wildcard.
        NotFound: no certificate for the name, or not the actor's organization's.
    """
    actor.require_console()
    normalized = normalize_sni_name(name)
    async with store.session() as session:
        row = (await session.execute(select(SniCertificate).where(SniCertificate.name == normalized))
               ).scalar_one_or_none()
        if row is None or not actor.may_see_org(row.org_id):
            raise NotFound(f"no certificate for {normalized}")
        view = _view(row, None)
        audit.record(session, actor, "tls.sni.remove", normalized, org_id=row.org_id, before=view.as_dict())
        await session.delete(row)
        await bump_generation(session)
        await session.commit()
    log.info("SNI certificate removed", name=normalized, actor=actor.name)
    return view


@dataclass(frozen=True)
class SniMaterial:
    """What a gateway process needs to serve one name: the chain and the opened key (PEM bytes)."""

    name: str
    fingerprint: str
    cert_pem: bytes
    key_pem: bytes


async def stored_fingerprints(store: Store) -> dict[str, str]:
    """``{name: fingerprint}`` of every stored certificate (cheap: no keys opened)."""
    async with store.session() as session:
        rows = (await session.execute(select(SniCertificate.name, SniCertificate.fingerprint))).all()
    return {name: fp for name, fp in rows}


async def load_material(store: Store, sealer: Sealer, names: list[str]) -> list[SniMaterial]:
    """The chains and opened keys of ``names`` (for the gateway's contexts).

    A key that cannot be opened (its sealing key is not in this node's key
    file) is left out and logged: that name gets the gateway certificate.
    """
    if not names:
        return []
    async with store.session() as session:
        rows = (await session.execute(select(SniCertificate).where(SniCertificate.name.in_(names)))).scalars().all()
    out = []
    for r in rows:
        try:
            out.append(SniMaterial(r.name, r.fingerprint, r.cert_pem.encode("ascii"),
                                   sealer.open(r.sealed_key, seal_context(r.name))))
        except SealingError as exc:
            log.warning("SNI certificate's key cannot be opened; serving the gateway certificate for it",
                        name=r.name, error=str(exc))
    return out


async def reseal_keys(store: Store, sealer: Sealer) -> int:
    """Re-seal every SNI private key not sealed with the current key (``keys rotate``); returns the count.

    The key material does not change, so gateways need not rebuild their contexts.
    """
    async with store.session() as session:
        rows = (await session.execute(select(SniCertificate).where(SniCertificate.key_id != sealer.current_key_id))
                ).scalars().all()
        for row in rows:
            plain = sealer.open(row.sealed_key, seal_context(row.name))
            row.key_id, row.sealed_key = sealer.seal(plain, seal_context(row.name))
        await session.commit()
    return len(rows)


class SniContexts:
    """One gateway process's per-name server contexts, kept in step with the database.

    :meth:`load` runs after every reload of the domain directory (which follows
    the configuration generation, so every node sees a change within about a
    second); it builds contexts only for names whose fingerprint changed, and
    hands the whole map to :meth:`ReloadableServerContext.set_sni
    <mxguard.tls.contexts.ReloadableServerContext.set_sni>`.

    Args:
        store: the database.
        keyring: the sealing keys (:class:`~mxguard.storage.sealing.KeyRing`).
        target: the gateway's :class:`~mxguard.tls.contexts.ReloadableServerContext`.
        min_version: ``tls.min_version``.
    """

    def __init__(self, store: Store, keyring, target, *, min_version: str = "1.2"):
        self.store = store
        self.keyring = keyring
        self.target = target
        self.min_version = min_version
        self._built: dict[str, tuple[str, object]] = {}  # name -> (fingerprint, SSLContext)

    async def load(self) -> None:
        wanted = await stored_fingerprints(self.store)
        stale = [n for n, fp in wanted.items() if self._built.get(n, ("",))[0] != fp]
        built = {n: v for n, v in self._built.items() if n in wanted and n not in stale}
        for item in await load_material(self.store, self.keyring.get(), stale):
            try:
                ctx = server_context_from_pem(item.cert_pem, item.key_pem, min_version=self.min_version)
            except ConfigError as exc:
                log.warning("SNI certificate not loadable; serving the gateway certificate for it",
                            name=item.name, error=str(exc))
                continue
            built[item.name] = (item.fingerprint, ctx)
        if stale or set(built) != set(self._built):
            log.info("SNI certificates loaded", names=sorted(built), changed=sorted(stale))
        self._built = built
        self.target.set_sni({n: ctx for n, (_, ctx) in built.items()})
