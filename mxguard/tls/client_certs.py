"""Client certificates an SMTP client showed at STARTTLS, judged against a partner's rule.

OpenSSL has already checked, during the handshake, that a certificate chains
to one of the CA files of *some* partner rule (Python's ``ssl`` cannot take a
certificate without verifying it; see :mod:`mxguard.tls.contexts`). Here each
rule is judged on its own terms with ``cryptography``: the chain to *its* CA
file (``cryptography.x509.verification``, the RFC 5280 client profile), its
fingerprints, its host name (RFC 6125 section 6.4 on SAN dNSNames) and its CRL
(RFC 5280 section 6.3, the CRL's signature checked against the CA).

Only the leaf is available (Python 3.11 exposes no peer chain), so a partner
whose certificates come from an intermediate CA lists that intermediate in
the rule's CA file.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from mxguard.tls.certs import sha256_fingerprint


@dataclass(frozen=True)
class PeerCertificate:
    """The leaf certificate a client presented.

    Attributes:
        der: the DER bytes as ``SSLObject.getpeercert(binary_form=True)`` gave them.
        subject: the subject as an RFC 4514 string (``CN=mta.partner.example,O=Partner``).
        sha256: SHA-256 of ``der``, 64 lower-case hex digits.
        cert: the parsed certificate.
    """

    der: bytes
    subject: str
    sha256: str
    cert: x509.Certificate


def peer_certificate(der: bytes | None) -> PeerCertificate | None:
    """Parse a client's DER certificate; ``None`` when there is none or it does not parse."""
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string()
    except ValueError:
        return None
    return PeerCertificate(der, subject, sha256_fingerprint(der), cert)


def _file_key(path: str) -> tuple[str, int, int]:
    """``(path, mtime_ns, size)``: a changed file is read again, an unchanged one is not."""
    st = os.stat(path)
    return path, st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=64)
def _cas(key: tuple[str, int, int]) -> tuple[x509.Certificate, ...]:
    with open(key[0], "rb") as f:
        data = f.read()
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{key[0]} holds no PEM certificate") from None
    return tuple(certs)


def load_ca_file(path: str) -> tuple[x509.Certificate, ...]:
    """The certificates of a PEM bundle (cached until the file changes).

    Raises:
        OSError: the file cannot be read.
        ValueError: it holds no PEM certificate.
    """
    return _cas(_file_key(path))


@functools.lru_cache(maxsize=64)
def _cas_from_text(text: str) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificates(text.encode("ascii")))
    except (ValueError, UnicodeEncodeError):
        raise ValueError("holds no PEM certificate (-----BEGIN CERTIFICATE----- ...)") from None


def load_ca_pem(text: str) -> tuple[x509.Certificate, ...]:
    """The certificates of a PEM bundle given as text (a rule's stored CA; cached by content).

    Raises:
        ValueError: it holds no PEM certificate, or a block that does not parse.
    """
    return _cas_from_text(text)


@functools.lru_cache(maxsize=64)
def _crl(key: tuple[str, int, int]) -> x509.CertificateRevocationList:
    with open(key[0], "rb") as f:
        data = f.read()
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise ValueError(f"{key[0]} is not a CRL (PEM or DER)") from None


def load_crl(path: str) -> x509.CertificateRevocationList:
    """A CRL file, PEM or DER (cached until the file changes).

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not a CRL.
    """
    return _crl(_file_key(path))


def crl_issuer(crl: x509.CertificateRevocationList, cas: tuple[x509.Certificate, ...]) -> x509.Certificate | None:
    """The CA among ``cas`` that signed ``crl`` (same name, valid signature), else ``None``."""
    for ca in cas:
        if ca.subject == crl.issuer and crl.is_signature_valid(ca.public_key()):
            return ca
    return None


def _allows_client_auth(_policy, _cert, eku: x509.ExtendedKeyUsage | None) -> None:
    if eku is not None and not {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(eku):
        raise ValueError("the extended key usage does not allow clientAuth")


def chain_problem(cert: x509.Certificate, cas: tuple[x509.Certificate, ...],
                  now: dt.datetime | None = None) -> str | None:
    """Why ``cert`` does not chain to one of ``cas`` as a client certificate, or ``None`` if it does.

    Verified by ``cryptography``'s RFC 5280 path validation with its client
    profile, with two CA/B Forum web-PKI criticality rules relaxed that RFC 5280
    leaves open and private CAs often set otherwise: the leaf's subjectAltName
    and extendedKeyUsage may be marked critical. An extended key usage, when
    present, must still allow clientAuth (RFC 5280 4.2.1.12).
    """
    ee_policy = (ExtensionPolicy.webpki_defaults_ee()
                 .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
                 .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _allows_client_auth))
    verifier = (PolicyBuilder().store(Store(list(cas))).time(now or dt.datetime.now(dt.timezone.utc))
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
                .build_client_verifier())
    try:
        verifier.verify(cert, [])
    except VerificationError as exc:
        return str(exc)[:200] or "verification failed"
    return None


def revocation_problem(cert: x509.Certificate, crl: x509.CertificateRevocationList,
                       cas: tuple[x509.Certificate, ...]) -> str | None:
    """``"certificate revoked"`` when ``crl`` lists ``cert``; another reason when the CRL cannot
    decide it (not the certificate's issuer's, or not signed by a CA in ``cas``); ``None`` when
    the certificate is not revoked. Fails closed: a CRL that cannot vouch is a refusal.
    """
    if crl.issuer != cert.issuer:
        return "the CRL is not the certificate issuer's"
    if crl_issuer(crl, cas) is None:
        return "the CRL is not signed by the CA"
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        return "certificate revoked"
    return None


def dns_names(cert: x509.Certificate) -> list[str]:
    """The SAN dNSName entries (RFC 5280 4.2.1.6), as written; empty when there is no SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)]


def name_matches(presented: str, host: str) -> bool:
    """RFC 6125 section 6.4: ``presented`` (a dNSName) names ``host``.

    Case-insensitive, a final dot ignored; a wildcard only as the whole
    left-most label (``*.example.com``) and matching exactly one label, never
    a bare ``*`` or a wildcard over a public-looking single label.
    """
    p = presented.strip().rstrip(".").lower()
    h = host.strip().rstrip(".").lower()
    if not p or not h:
        return False
    if not p.startswith("*."):
        return "*" not in p and p == h
    rest = p[2:]
    if "*" in rest or "." not in rest:
        return False
    first, dot, tail = h.partition(".")
    return bool(first and dot) and tail == rest


def host_problem(cert: x509.Certificate, host: str) -> str | None:
    """Why ``cert`` does not name ``host`` in a SAN dNSName, or ``None`` if it does.

    The subject CN is not consulted (RFC 6125 section 6.4.4: not when a SAN is present,
    and a client certificate without one is not accepted for a host name either).
    """
    if any(name_matches(name, host) for name in dns_names(cert)):
        return None
    return f"the client certificate does not name {host}"
