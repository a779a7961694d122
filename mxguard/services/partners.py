"""Partner TLS rules: mail from a sender domain to a served domain must arrive over TLS,
optionally with a client certificate (chains to a CA file, has a fingerprint, names a host,
is not on a CRL).

The rule belongs to the recipient's domain; :mod:`mxguard.smtp.partners` applies
it at MAIL (``530 5.7.0`` in clear, RFC 3207) and at RCPT (``550 5.7.1``). Every
change is validated (files exist and parse, fingerprints are SHA-256), audited
and bumps the configuration generation, as domain changes do.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select

from mxguard.errors import AlreadyExists, NotFound, ValidationCollector, ValidationFailed
from mxguard.services import audit
from mxguard.services.access import SYSTEM, Actor
from mxguard.services.domains import _scoped_row, bump_generation, normalize_domain_name
from mxguard.storage.db import Store
from mxguard.storage.models import Domain, PartnerTlsRule
from mxguard.tls.certs import normalize_fingerprint
from mxguard.tls.client_certs import crl_issuer, load_ca_file, load_ca_pem, load_crl

MIN_TLS_CHOICES = ("none", "1.2", "1.3")
#: Largest CA bundle taken as text, in bytes (a bundle of a few CAs is a few KiB).
MAX_CA_PEM_BYTES = 64 * 1024


@dataclass(frozen=True)
class PartnerRuleView:
    """One partner rule, read-only.

    Attributes:
        domain: the served (recipient) domain the rule belongs to.
        sender: ``partner.example`` (exactly that domain) or ``*.partner.example`` (its sub-domains).
        min_tls: ``none`` (TLS only because a certificate is required), ``1.2`` or ``1.3``.
        require_cert: a client certificate must be shown.
        ca_file: path of the PEM bundle the certificate must chain to, on the gateway host.
        ca_pem: or that bundle itself as text (stored in the database); one of the two is
            required with ``require_cert``.
        fingerprints: accepted SHA-256 fingerprints (lower-case hex); empty: any.
        cert_host: host name the certificate must carry as a SAN dNSName.
        crl_file: the CA's CRL; a listed certificate is refused.
        enabled: the rule is applied.
    """

    domain: str
    sender: str
    min_tls: str = "1.2"
    require_cert: bool = False
    ca_file: str | None = None
    ca_pem: str | None = None
    fingerprints: tuple[str, ...] = ()
    cert_host: str | None = None
    crl_file: str | None = None
    enabled: bool = True

    @property
    def requires_tls(self) -> bool:
        return self.min_tls != "none" or self.require_cert

    @property
    def ca_subjects(self) -> list[str]:
        """The subjects (RFC 4514) of the stored CA bundle's certificates; empty for a CA file or none."""
        if not self.ca_pem:
            return []
        try:
            return [c.subject.rfc4514_string() for c in load_ca_pem(self.ca_pem)]
        except ValueError:
            return []

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fingerprints"] = list(self.fingerprints)
        data["ca_subjects"] = self.ca_subjects
        return data


def requirement(rule: PartnerRuleView) -> str:
    """What the rule asks for, in words (``over TLS 1.2+ with a client certificate from its CA``)."""
    words = "over TLS" + (f" {rule.min_tls}+" if rule.min_tls != "none" else "")
    if rule.require_cert:
        words += " with a client certificate from its CA"
        if rule.fingerprints:
            words += " with an accepted fingerprint"
        if rule.cert_host:
            words += f" naming {rule.cert_host}"
        if rule.crl_file:
            words += " that is not revoked"
    return words


def normalize_sender_domain(text: str) -> str | None:
    """A sender's domain as rules compare it: lower-case A-labels without a final dot.

    ``None`` for what is no domain (empty, an address literal, not IDNA-encodable).
    """
    domain = text.strip().rstrip(".").lower()
    if not domain or domain.startswith("["):
        return None
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def sender_domain_of(address: str) -> str | None:
    """The normalized domain of an envelope sender (``None`` for ``<>`` or no domain)."""
    local, at, domain = address.rpartition("@")
    return normalize_sender_domain(domain) if at and local else None


def covers(pattern: str, domain: str) -> bool:
    """True when a rule's sender pattern covers a normalized sender domain.

    ``partner.example`` covers that domain only; ``*.partner.example`` covers
    every domain below it (any depth), not ``partner.example`` itself.
    """
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def normalize_pattern(text: str) -> str:
    """Check and normalize a sender pattern.

    Raises:
        ValidationFailed: (``sender``) not a domain or ``*.`` + domain.
    """
    raw = (text or "").strip()
    wildcard = raw.startswith("*.")
    domain = normalize_sender_domain(raw[2:] if wildcard else raw)
    labels = domain.split(".") if domain else []
    if (not domain or "*" in domain or "@" in domain or len(domain) > 253
            or any(not label or len(label) > 63 for label in labels)
            or any(not (c.isalnum() or c in "-.") for c in domain)):
        raise ValidationFailed("sender", f"{text!r} is not a domain (partner.example) or *.partner.example")
    return ("*." if wildcard else "") + domain


def _existing_file(key: str, path: str) -> str:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ValidationFailed(key, f"{path} does not exist")
    return path


def check_ca_pem(text: str) -> tuple[str, tuple]:
    """Check a CA bundle given as text: size, PEM certificates only, loadable by OpenSSL.

    Returns:
        ``(normalized text, certificates)``: the certificates re-encoded as PEM, one
        block after another (comments and other text between blocks dropped).

    Raises:
        ValidationFailed: (``ca_pem``) empty, larger than :data:`MAX_CA_PEM_BYTES`, not
            PEM certificates, or refused by OpenSSL.
    """
    from cryptography.hazmat.primitives.serialization import Encoding

    if not text or not text.strip():
        raise ValidationFailed("ca_pem", "is empty")
    if len(text.encode("utf-8", "replace")) > MAX_CA_PEM_BYTES:
        raise ValidationFailed("ca_pem", f"is larger than {MAX_CA_PEM_BYTES} bytes")
    try:
        cas = load_ca_pem(text)
    except ValueError as exc:
        raise ValidationFailed("ca_pem", str(exc)) from None
    normalized = "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in cas)
    try:
        ssl.create_default_context(cadata=normalized)
    except (ssl.SSLError, ValueError) as exc:
        raise ValidationFailed("ca_pem", f"OpenSSL refuses it: {exc}") from None
    return normalized, cas


def validate_rule(domain: str, sender: str, *, min_tls: str = "1.2", require_cert: bool = False,
                  ca_file: str | None = None, ca_pem: str | None = None,
                  fingerprints: list[str] | tuple[str, ...] = (), cert_host: str | None = None,
                  crl_file: str | None = None, enabled: bool = True) -> PartnerRuleView:
    """A rule from operator input, every field checked.

    A fingerprint, host name or CRL implies ``require_cert``; a required
    certificate needs a CA, as a file on the gateway (``ca_file``) or as PEM
    text (``ca_pem``), not both (the handshake verifies against it); a CRL
    must be signed by a CA of that bundle.

    Raises:
        ValidationFailed: every invalid field at once (``sender``, ``min_tls``, ``ca_file``,
            ``ca_pem``, ``fingerprints``, ``cert_host``, ``crl_file``).
    """
    check = ValidationCollector()
    pattern = sender
    with check:
        pattern = normalize_pattern(sender)
    min_tls = str(min_tls or "none").strip().lower()
    with check:
        if min_tls not in MIN_TLS_CHOICES:
            raise ValidationFailed("min_tls", f"{min_tls!r} is not one of: {', '.join(MIN_TLS_CHOICES)}")
    prints: list[str] = []
    with check:
        for value in fingerprints or ():
            try:
                prints.append(normalize_fingerprint(value))
            except ValueError as exc:
                raise ValidationFailed("fingerprints", f"{value!r}: {exc}") from None
    host = (cert_host or "").strip().rstrip(".").lower() or None
    with check:
        if host is not None and normalize_sender_domain(host) is None:
            raise ValidationFailed("cert_host", f"{cert_host!r} is not a host name")
        host = normalize_sender_domain(host) if host else None
    require_cert = bool(require_cert or prints or host or crl_file)
    ca_pem = ca_pem if ca_pem and ca_pem.strip() else None
    cas = ()
    if ca_file and ca_pem:
        with check:
            raise ValidationFailed("ca_pem", "give the CA as a file on the gateway (ca_file) or as PEM text "
                                             "(ca_pem), not both")
    elif ca_file:
        with check:
            ca_file = _existing_file("ca_file", ca_file)
            try:
                cas = load_ca_file(ca_file)
            except (OSError, ValueError) as exc:
                raise ValidationFailed("ca_file", str(exc)) from None
    elif ca_pem:
        with check:
            ca_pem, cas = check_ca_pem(ca_pem)
    elif require_cert:
        with check:
            raise ValidationFailed("ca_file", "a client certificate is required: give the CA it chains to, as a "
                                              "CA file on the gateway or as PEM text (ca_pem; a self-signed "
                                              "partner certificate may be its own CA)")
    if crl_file:
        with check:
            crl_file = _existing_file("crl_file", crl_file)
            try:
                crl = load_crl(crl_file)
            except (OSError, ValueError) as exc:
                raise ValidationFailed("crl_file", str(exc)) from None
            if cas and crl_issuer(crl, cas) is None:
                raise ValidationFailed("crl_file", "the CRL is not signed by a CA of the rule's CA bundle")
    with check:
        if min_tls == "none" and not require_cert:
            raise ValidationFailed("min_tls", "the rule would require nothing: give a TLS version or a client "
                                              "certificate")
    check.raise_if_any()
    return PartnerRuleView(domain=domain, sender=pattern, min_tls=min_tls, require_cert=require_cert,
                           ca_file=ca_file or None, ca_pem=ca_pem if not ca_file else None,
                           fingerprints=tuple(dict.fromkeys(prints)), cert_host=host,
                           crl_file=crl_file or None, enabled=bool(enabled))


def _view(row: PartnerTlsRule, domain: str) -> PartnerRuleView:
    return PartnerRuleView(domain=domain, sender=row.sender, min_tls=row.min_tls, require_cert=row.require_cert,
                           ca_file=row.ca_file, ca_pem=row.ca_pem, fingerprints=tuple(row.fingerprints or ()), cert_host=row.cert_host,
                           crl_file=row.crl_file, enabled=row.enabled)


async def add_rule(store: Store, domain: str, sender: str, *, actor: Actor = SYSTEM, **fields: Any) -> PartnerRuleView:
    """Add a partner rule to a served domain (fields as :func:`validate_rule` takes them).

    CA and CRL files are paths on the gateway host: administrators only. A CA given as
    PEM text (``ca_pem``) is stored in the database; org-admins may give one.

    Raises:
        NotFound: no such domain, or not the actor's.
        PermissionDenied: an org-admin gave a CA or CRL file.
        AlreadyExists: the domain has a rule for that sender pattern.
        ValidationFailed: a field is invalid.
    """
    actor.require_console()  # Message Center users never manage a domain's rules
    name = normalize_domain_name(domain)
    if fields.get("ca_file") or fields.get("crl_file"):
        actor.require_admin()
    view = validate_rule(name, sender, **fields)
    async with store.session() as session:
        row = await _scoped_row(session, name, actor)
        exists = await session.scalar(select(PartnerTlsRule.id).where(
            PartnerTlsRule.domain_id == row.id, PartnerTlsRule.sender == view.sender))
        if exists is not None:
            raise AlreadyExists(f"{name} has a partner rule for {view.sender} already; remove it first")
        session.add(PartnerTlsRule(domain_id=row.id, sender=view.sender, min_tls=view.min_tls,
                                   require_cert=view.require_cert, ca_file=view.ca_file, ca_pem=view.ca_pem,
                                   fingerprints=list(view.fingerprints), cert_host=view.cert_host,
                                   crl_file=view.crl_file, enabled=view.enabled))
        audit.record(session, actor, "domain.partner.add", f"{name} {view.sender}", org_id=row.org_id,
                     after=view.as_dict())
        await bump_generation(session)
        await session.commit()
    return view


async def list_rules(store: Store, domain: str, *, actor: Actor = SYSTEM) -> list[PartnerRuleView]:
    """A served domain's partner rules, by sender pattern.

    Raises:
        NotFound: no such domain, or not the actor's.
        PermissionDenied: the actor is not an admin or org-admin.
    """
    actor.require_console()
    name = normalize_domain_name(domain)
    async with store.session() as session:
        row = await _scoped_row(session, name, actor)
        rows = (await session.execute(select(PartnerTlsRule).where(PartnerTlsRule.domain_id == row.id)
                                      .order_by(PartnerTlsRule.sender))).scalars().all()
        return [_view(r, name) for r in rows]


async def remove_rule(store: Store, domain: str, sender: str, *, actor: Actor = SYSTEM) -> PartnerRuleView:
    """Remove the rule for a sender pattern.

    Raises:
        NotFound: no such domain (or not the actor's), or no rule for that pattern.
        ValidationFailed: ``sender`` is not a pattern.
        PermissionDenied: the actor is not an admin or org-admin.
    """
    actor.require_console()
    name = normalize_domain_name(domain)
    pattern = normalize_pattern(sender)
    async with store.session() as session:
        row = await _scoped_row(session, name, actor)
        rule = (await session.execute(select(PartnerTlsRule).where(
            PartnerTlsRule.domain_id == row.id, PartnerTlsRule.sender == pattern))).scalar_one_or_none()
        if rule is None:
            raise NotFound(f"{name} has no partner rule for {pattern}")
        view = _view(rule, name)
        await session.delete(rule)
        audit.record(session, actor, "domain.partner.remove", f"{name} {pattern}", org_id=row.org_id,
                     before=view.as_dict())
        await bump_generation(session)
        await session.commit()
    return view


async def enabled_rules(store: Store) -> list[PartnerRuleView]:
    """Every enabled rule of every domain (for the gateway's in-memory copy)."""
    async with store.session() as session:
        rows = (await session.execute(
            select(PartnerTlsRule, Domain.name).join(Domain, Domain.id == PartnerTlsRule.domain_id)
            .where(PartnerTlsRule.enabled.is_(True)))).all()
    return [_view(rule, name) for rule, name in rows]
