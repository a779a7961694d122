"""Certificates: generate the self-signed one ``init`` writes, load and describe PEM files.

Uses ``cryptography`` only; nothing here talks to the network.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import ssl
import _ssl  # the chain getter's DER constant on Python < 3.13
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mxguard.errors import ConfigError


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def generate_self_signed(hostname: str, *, extra_names: list[str] | None = None,
                         days: int = 825, key_type: str = "ec") -> tuple[bytes, bytes]:
    """Make a self-signed server certificate.

    Args:
        hostname: the gateway's host name, used as CN and first SAN.
        extra_names: more SANs (DNS names or IP addresses).
        days: validity in days (825 is the CA/Browser Forum ceiling most clients accept).
        key_type: ``"ec"`` for ECDSA P-256 (the default: cheap handshakes) or ``"rsa"`` for RSA-2048.

    Returns:
        ``(cert_pem, key_pem)`` as bytes; the key is unencrypted PKCS#8.
    """
    key = ec.generate_private_key(ec.SECP256R1()) if key_type == "ec" else rsa.generate_private_key(65537, 2048)
    names = [hostname] + [n for n in (extra_names or []) if n != hostname]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert_pem, key_pem


@dataclass(frozen=True)
class CertificateInfo:
    """What an administrator wants to see about a certificate."""

    subject: str
    issuer: str
    sans: list[str]
    not_before: dt.datetime
    not_after: dt.datetime
    sha256: str  # hex, lower case, no colons
    key_type: str

    @property
    def days_left(self) -> float:
        return (self.not_after - dt.datetime.now(dt.timezone.utc)).total_seconds() / 86400


def sha256_fingerprint(der: bytes) -> str:
    """SHA-256 over the DER certificate, lower-case hex without separators."""
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Accept ``AB:CD:...`` or ``abcd...``; return 64 lower-case hex digits.

    Raises:
        ValueError: not a SHA-256 fingerprint.
    """
    value = text.replace(":", "").replace(" ", "").lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("must be a SHA-256 fingerprint: 64 hex digits, colons allowed")
    return value


def describe(cert: x509.Certificate) -> CertificateInfo:
    """Summarise a parsed certificate."""
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(v) for v in san_ext.get_values_for_type(x509.DNSName)]
        sans += [str(v) for v in san_ext.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        sans = []
    public_key = cert.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        key_type = f"ECDSA {public_key.curve.name}"
    elif isinstance(public_key, rsa.RSAPublicKey):
        key_type = f"RSA-{public_key.key_size}"
    else:
        key_type = type(public_key).__name__
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        sans=sans,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha256=sha256_fingerprint(cert.public_bytes(serialization.Encoding.DER)),
        key_type=key_type,
    )


def describe_der(der: bytes) -> CertificateInfo:
    """Summarise a DER certificate (as ``SSLObject.getpeercert(True)`` returns it)."""
    return describe(x509.load_der_x509_certificate(der))


class CertificateProblem(ValueError):
    """An uploaded or configured chain/key pair is unusable.

    Attributes:
        field: ``"certificate"`` or ``"key"``: which of the two is at fault.
        message: what is wrong, for the operator (no path, no trace).
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_chain_pem(cert_pem: bytes, key_pem: bytes, *, now: dt.datetime | None = None,
                    refuse_not_yet_valid: bool = False, check_order: bool = False) -> list[x509.Certificate]:
    """Parse and check a PEM certificate chain and its private key, in memory.

    Checks that both parse, that the key belongs to the leaf (the first
    certificate), and that the leaf has not expired; optionally that the leaf
    is already valid and that each certificate was issued by the next one
    (RFC 8446 4.4.2: the sender's certificate first, each following one
    certifying the one before it).

    Args:
        cert_pem: PEM chain, leaf first.
        key_pem: unencrypted PEM private key.
        now: the time to check validity at (UTC; default: now).
        refuse_not_yet_valid: refuse a leaf whose notBefore lies in the future.
        check_order: verify each certificate's signature with the next one's key.

    Returns:
        the parsed chain, leaf first.

    Raises:
        CertificateProblem: naming ``certificate`` or ``key``, with the reason.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise CertificateProblem("certificate", f"holds no PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateProblem("key", f"holds no unencrypted PEM private key ({exc})") from None
    leaf = chain[0]
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise CertificateProblem("key", "does not match the certificate (the first one in the chain)")
    if leaf.not_valid_after_utc < now:
        raise CertificateProblem("certificate", f"expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    if refuse_not_yet_valid and leaf.not_valid_before_utc > now:
        raise CertificateProblem("certificate", f"is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if check_order:
        for number, (cert, issuer) in enumerate(zip(chain, chain[1:]), 1):
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                raise CertificateProblem("certificate", f"certificate {number + 1} of the chain did not issue "
                                                        f"certificate {number}; give the leaf first, then each "
                                                        "issuer in order") from None
    return chain


def load_chain(cert_path: Path, key_path: Path, *,
               keys: tuple[str, str] = ("tls.cert_file", "tls.key_file")) -> list[x509.Certificate]:
    """Load and check a PEM certificate chain and its key from files.

    Checks that the files parse, that the key matches the leaf, and that the
    leaf has not expired (:func:`check_chain_pem`). Used by ``init``, ``serve``
    and certificate upload.

    Raises:
        ConfigError: a file is missing or unreadable, the chain is empty, the
            key does not belong to the leaf, or the leaf has expired; the message
            names the setting (``keys``: the names of the two settings).
    """
    cert_key, key_key = keys
    try:
        cert_pem = cert_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{cert_key}: {cert_path} does not exist") from None
    try:
        key_pem = key_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{key_key}: {key_path} does not exist") from None
    try:
        return check_chain_pem(cert_pem, key_pem)
    except CertificateProblem as exc:
        if exc.field == "key" and exc.message.startswith("does not match"):
            raise ConfigError(f"{key_key}: {key_path} does not match the certificate in {cert_path}") from None
        setting, path = (key_key, key_path) if exc.field == "key" else (cert_key, cert_path)
        raise ConfigError(f"{setting}: {path} {exc.message}") from None


def peer_certificate_info(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> CertificateInfo | None:
    """Describe the peer's leaf certificate of an established TLS connection, if any."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return describe_der(der) if der else None


def peer_chain_der(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> list[bytes]:
    """The certificates the peer sent, leaf first, as DER bytes (``[]`` without a certificate).

    DANE-TA(2) (RFC 7672 section 3.1.2) matches an issuer the server sent, not only its leaf.
    Python 3.13 names this ``get_unverified_chain()``; 3.10 to 3.12 have it on the underlying
    ``_ssl`` object only. Where neither is there, the leaf alone.
    """
    if ssl_object is None:
        return []
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    chain = getter() if getter is not None else None
    if chain:
        return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in chain]
    der = ssl_object.getpeercert(binary_form=True)
    return [der] if der else []


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate issued by :func:`make_private_ca`'s CA, as PEM."""

    cert_pem: bytes
    key_pem: bytes


def make_private_ca(common_name: str = "mxguard private CA", days: int = 3650
                    ) -> tuple[bytes, Callable[..., IssuedCertificate]]:
    """A small private CA, for the demo's downstream server and for labs.

    Returns:
        ``(ca_cert_pem, issue)`` where ``issue(names: list[str]) -> IssuedCertificate``
        signs an ECDSA P-256 server certificate for the given DNS names / IPs.
    """
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    ca_cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(names: list[str], valid_days: int = 365) -> IssuedCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=valid_days))
            .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return IssuedCertificate(
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))

    return ca_cert.public_bytes(serialization.Encoding.PEM), issue
