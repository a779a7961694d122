"""DANE for SMTP (RFC 7672, RFC 6698): TLSA lookups that trust only DNSSEC, and matching.

The lookup asks the configured resolver for ``_<port>._tcp.<host>`` TLSA and
trusts the answer only when the resolver says it validated it (the AD bit,
RFC 4035 section 3.2.3, RFC 6840 section 5.7), as Postfix does: mxguard does
not validate signatures itself, so the resolver must be a validating one on a
trusted path (loopback, usually unbound).

The outcome of a lookup is one of:

* ``secure`` with usable records: DANE applies; the server's certificate must
  match one of them, or nothing is sent (RFC 7672 section 2.2);
* ``secure`` without usable records, or ``insecure`` (unsigned zone), or
  ``none`` (no TLSA): DANE does not apply and the domain's other policy does;
* ``bogus``: the resolver failed validation (SERVFAIL): the delivery is
  deferred with ``4.7.5`` (RFC 7672 section 2.2.2), nothing is sent in clear.

Only usages DANE-TA(2) and DANE-EE(3) are usable for SMTP (RFC 7672 section
3.1.3); selectors Cert(0) and SPKI(1); matching types Full(0), SHA2-256(1) and
SHA2-512(2). Everything else is ignored as "unusable".
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.rdatatype
import dns.resolver
from cryptography import x509
from cryptography.hazmat.primitives import serialization

#: RFC 6698 section 2.1.1 / RFC 7218 acronyms.
DANE_TA, DANE_EE = 2, 3
SELECTOR_CERT, SELECTOR_SPKI = 0, 1
MATCH_FULL, MATCH_SHA256, MATCH_SHA512 = 0, 1, 2


class DnssecStatus(StrEnum):
    """What the validating resolver said about the TLSA RRset."""

    SECURE = "secure"
    INSECURE = "insecure"
    BOGUS = "bogus"
    NONE = "none"  # no TLSA RRset (NXDOMAIN or NODATA), whether signed or not


@dataclass(frozen=True)
class TlsaRecord:
    """One TLSA record (RFC 6698 section 2.1).

    Attributes:
        usage: certificate usage (2 DANE-TA, 3 DANE-EE are the usable ones for SMTP).
        selector: 0 full certificate, 1 SubjectPublicKeyInfo.
        mtype: matching type: 0 exact, 1 SHA-256, 2 SHA-512.
        data: the association data, bytes.
    """

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 section 3.1.3: only DANE-TA and DANE-EE, with known selector and matching type."""
        return (self.usage in (DANE_TA, DANE_EE) and self.selector in (SELECTOR_CERT, SELECTOR_SPKI)
                and self.mtype in (MATCH_FULL, MATCH_SHA256, MATCH_SHA512))

    def describe(self) -> str:
        """Presentation form, e.g. ``3 1 1 ab12...`` (RFC 6698 section 2.2)."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass
class DaneLookup:
    """The TLSA answer for one host and port.

    Attributes:
        host: the MX host name, lower case, no trailing dot.
        port: TCP port (25 for SMTP).
        status: see :class:`DnssecStatus`.
        records: every TLSA record of a ``secure`` answer (empty otherwise: an
            unvalidated answer is never used, RFC 7672 section 2.1.1).
        error: a short reason for ``bogus`` (for the log and TLS-RPT).
    """

    host: str
    port: int
    status: DnssecStatus
    records: list[TlsaRecord] = field(default_factory=list)
    error: str = ""

    @property
    def usable_records(self) -> list[TlsaRecord]:
        return [r for r in self.records if r.usable]

    @property
    def applies(self) -> bool:
        """DANE governs this connection: secure and at least one usable record (RFC 7672 section 2.2)."""
        return self.status is DnssecStatus.SECURE and bool(self.usable_records)


def tlsa_name(host: str, port: int = 25) -> str:
    """``_25._tcp.mx.example.com.`` for ``mx.example.com`` (RFC 6698 section 3)."""
    return f"_{port}._tcp.{host.rstrip('.').lower()}."


async def lookup_tlsa(host: str, port: int = 25, *, nameservers: Sequence[str] | None = None,
                      nameserver_port: int = 53, timeout: float = 5.0) -> DaneLookup:
    """Ask a validating resolver for the TLSA RRset of ``host``.

    Args:
        host: the server's host name (from a secure MX answer, or the domain's setting).
        port: the service port, 25 for SMTP.
        nameservers: IP addresses of the validating resolver(s); ``None``: the system's.
        nameserver_port: their UDP/TCP port.
        timeout: seconds for the whole lookup.

    Returns:
        A :class:`DaneLookup`. A resolver that answers SERVFAIL (validation failure,
        RFC 4035 section 5.5) or does not answer gives ``bogus``: the caller must defer.
    """
    resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
    if nameservers is not None:
        resolver.nameservers = list(nameservers)
        resolver.port = nameserver_port
    resolver.lifetime = timeout
    # Ask for the AD bit explicitly (RFC 6840 section 5.7); no CD: the resolver must validate.
    resolver.flags = dns.flags.RD | dns.flags.AD
    name = tlsa_name(host, port)
    clean_host = host.rstrip(".").lower()
    try:
        answer = await resolver.resolve(name, dns.rdatatype.TLSA, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return DaneLookup(clean_host, port, DnssecStatus.NONE)
    except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as exc:
        return DaneLookup(clean_host, port, DnssecStatus.BOGUS, error=f"{name}: {type(exc).__name__}")
    secure = bool(answer.response.flags & dns.flags.AD)
    if answer.rrset is None:
        return DaneLookup(clean_host, port, DnssecStatus.NONE)
    if not secure:
        return DaneLookup(clean_host, port, DnssecStatus.INSECURE)
    records = [TlsaRecord(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer.rrset]
    return DaneLookup(clean_host, port, DnssecStatus.SECURE, records)


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == SELECTOR_CERT:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == MATCH_SHA256:
        return hashlib.sha256(data).digest()
    if mtype == MATCH_SHA512:
        return hashlib.sha512(data).digest()
    return data


def record_matches(record: TlsaRecord, cert_der: bytes) -> bool:
    """Whether one certificate (DER bytes) matches one record's selector, matching type and data.

    Raises:
        ValueError: ``cert_der`` is not a DER certificate.
    """
    cert = x509.load_der_x509_certificate(cert_der)
    return _digest(_selected(cert, record.selector), record.mtype) == record.data


def matching_record(lookup: DaneLookup, chain_der: Sequence[bytes]) -> TlsaRecord | None:
    """The first usable record the server's chain satisfies, or ``None``.

    DANE-EE(3) matches the leaf only, with no name or expiry check (RFC 7672
    section 3.1.1). DANE-TA(2) matches any certificate the server sent above
    the leaf; the caller must then also have verified the leaf's chain up to it
    and the name (RFC 7672 section 3.1.2) — with only the leaf at hand
    (``chain_der`` of one), DANE-TA cannot match.

    Args:
        lookup: a ``secure`` lookup.
        chain_der: the server's certificates as sent, leaf first, DER bytes each.
    """
    if not chain_der:
        return None
    for record in lookup.usable_records:
        candidates = chain_der[:1] if record.usage == DANE_EE else chain_der[1:]
        for cert_der in candidates:
            try:
                if record_matches(record, cert_der):
                    return record
            except ValueError:
                return None
    return None


class TrustAnchorMismatch(Exception):
    """A DANE-TA(2) record matched a certificate of the chain, but the leaf does not chain to it
    or does not name the host (RFC 7672 section 3.1.2); the message says why."""


def verify_ta_chain(host: str, chain_der: Sequence[bytes], record: TlsaRecord) -> None:
    """With DANE-TA(2), the leaf must chain up to the certificate the record matched, within the
    chain the server sent, and name ``host`` (RFC 7672 sections 3.1.2 and 3.2.2; the SAN
    ``dNSName`` rules of RFC 6125). Chain building and name checks are done by
    ``cryptography``'s X.509 verifier, with the matched certificate as the only trust anchor.

    Args:
        host: the server's host name (the TLSA base domain), ASCII.
        chain_der: the certificates as the server sent them, leaf first (DER).
        record: the DANE-TA record :func:`matching_record` returned for ``chain_der``.

    Raises:
        TrustAnchorMismatch: no matched anchor, a broken chain, a name mismatch, or an expired
            certificate in the path.
    """
    from cryptography.x509.verification import (Criticality, DNSName, ExtensionPolicy, PolicyBuilder, Store,
                                                VerificationError)

    try:
        certs = [x509.load_der_x509_certificate(d) for d in chain_der]
    except ValueError as exc:
        raise TrustAnchorMismatch(f"the server's chain does not parse: {exc}") from None
    anchors = [c for d, c in zip(chain_der[1:], certs[1:]) if record_matches(record, d)]
    if not anchors:
        raise TrustAnchorMismatch("no certificate above the leaf matches the DANE-TA record")
    try:
        # The CA/Browser Forum's profile for the leaf is not DANE's: private PKIs behind DANE-TA
        # (RFC 7672 3.1.2) need only a chain to the anchor and the name; issuers keep the
        # web PKI's CA rules (basic constraints, key usage).
        verifier = (PolicyBuilder().store(Store(anchors))
                    .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                        ee_policy=ExtensionPolicy.permit_all().require_present(
                                            x509.SubjectAlternativeName, Criticality.AGNOSTIC, None))
                    .build_server_verifier(DNSName(host.rstrip("."))))
        verifier.verify(certs[0], certs[1:])
    except (VerificationError, ValueError) as exc:
        raise TrustAnchorMismatch(f"the certificate of {host} does not verify up to the DANE-TA "
                                  f"trust anchor: {exc}") from None
