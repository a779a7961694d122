"""DKIM signatures (RFC 6376) on the gateway's own messages, made by dkimpy.

Keys are PEM files, RSA (``rsa-sha256``; at least 1024 bits, RFC 8301 section 3.2) or Ed25519
(``ed25519-sha256``, RFC 8463). They are read with ``cryptography`` and handed to dkimpy in the
form it takes: PKCS#1 PEM for RSA, the base64 32-byte seed for Ed25519.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

#: RFC 8301 section 3.2: signers MUST use RSA keys of at least 1024 bits.
MIN_RSA_BITS = 1024


class KeyFileError(ValueError):
    """A DKIM key file that cannot be used; the message says why (no path of the key in it)."""


@dataclass(frozen=True)
class DkimSigner:
    """Signs messages as ``d=domain; s=selector``.

    Attributes:
        selector: the ``s=`` tag; the public key is at ``<selector>._domainkey.<domain>`` TXT.
        domain: the ``d=`` tag, the signing domain.
        algorithm: ``b"rsa-sha256"`` or ``b"ed25519-sha256"``.
        key: the private key as dkimpy takes it.
    """

    selector: str
    domain: str
    algorithm: bytes
    key: bytes

    def sign(self, message: bytes, headers: list[str], *, tlsrpt: bool = False) -> bytes:
        """``message`` (RFC 5322 bytes, CRLF) with a ``DKIM-Signature`` field in front.

        Args:
            headers: the field names to sign (``From`` must be among them, RFC 6376 5.4).
            tlsrpt: the message is a TLS report (RFC 8460 5.3: no ``l=`` body length).

        Raises:
            dkim.DKIMException: the message or the header list is malformed.
        """
        signature = dkim.sign(message, self.selector.encode(), self.domain.encode(), self.key,
                              signature_algorithm=self.algorithm, canonicalize=(b"relaxed", b"relaxed"),
                              include_headers=[h.lower().encode() for h in headers], tlsrpt=tlsrpt)
        return signature + message


def load_signer(path: Path, selector: str, domain: str) -> DkimSigner:
    """Read a PEM private key (RSA or Ed25519, unencrypted) for signing as ``d=domain; s=selector``.

    Raises:
        KeyFileError: the file cannot be read, holds no unencrypted PEM private key, holds
            another key type, or an RSA key below 1024 bits.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file: {exc.strerror or exc}") from None
    return signer_from_pem(data, selector, domain)


def signer_from_pem(data: bytes, selector: str, domain: str) -> DkimSigner:
    """:func:`load_signer` for PEM bytes already read (a key kept sealed in the database).

    Raises:
        KeyFileError: as :func:`load_signer`.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError("the key is encrypted; give an unencrypted PEM private key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError("not a PEM private key (RSA or Ed25519)") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"RSA key of {key.key_size} bits; DKIM needs at least {MIN_RSA_BITS} (RFC 8301)")
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        return DkimSigner(selector, domain, b"rsa-sha256", pem)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return DkimSigner(selector, domain, b"ed25519-sha256", base64.b64encode(seed))
    raise KeyFileError(f"a key of another type ({type(key).__name__}); DKIM signs with RSA or Ed25519 (RFC 8463)")
