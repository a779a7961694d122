"""DKIM keys for outbound mail (RFC 6376): generation, the DNS record to publish, signing.

Two algorithms: ``rsa`` (RSA-2048, ``rsa-sha256``; RFC 8301 asks for at least 1024 bits,
2048 is today's usual size) and ``ed25519`` (``ed25519-sha256``, RFC 8463). The private key
is kept sealed by :mod:`mxguard.services.dkim_keys`; signing itself is dkimpy's, through
:class:`mxguard.dkim_signing.DkimSigner`.
"""

from __future__ import annotations

import base64
import re
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mxguard.dkim_signing import DkimSigner, signer_from_pem
from mxguard.smtp.headers import header_block_end

ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048
#: Header fields signed on outbound mail (RFC 6376 section 5.4.1's list, From first); a field
#: the message lacks is signed as absent, so it cannot be added later.
SIGNED_HEADERS = ["From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To", "References",
                  "MIME-Version", "Content-Type", "Content-Transfer-Encoding"]
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")


def valid_selector(selector: str) -> bool:
    """A selector is one or more DNS labels (RFC 6376 section 3.1), here lower-case LDH."""
    return len(selector) <= 63 and bool(_SELECTOR.match(selector))


def generate_key(algorithm: str) -> tuple[bytes, str]:
    """A new key pair.

    Args:
        algorithm: ``rsa`` (2048 bits) or ``ed25519``.

    Returns:
        ``(PKCS#8 PEM private key, base64 value of the p= tag)``: for RSA the DER
        SubjectPublicKeyInfo (RFC 6376 section 3.6.1), for Ed25519 the raw 32-byte public key
        (RFC 8463 section 4.2).

    Raises:
        ValueError: another algorithm.
    """
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raise ValueError(f"{algorithm!r} is not one of: {', '.join(ALGORITHMS)}")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, base64.b64encode(public).decode("ascii")


def record_name(domain: str, selector: str) -> str:
    """The owner name of the key record: ``<selector>._domainkey.<domain>.`` (RFC 6376 section 3.6.2.1)."""
    return f"{selector}._domainkey.{domain}."


def record_value(algorithm: str, public_key: str) -> str:
    """The TXT value to publish: ``v=DKIM1; k=rsa|ed25519; p=...`` (RFC 6376 section 3.6.1)."""
    return f"v=DKIM1; k={algorithm}; p={public_key}"


def zone_line(domain: str, selector: str, algorithm: str, public_key: str) -> str:
    """The record as a zone-file line, the value split into strings of at most 255 octets
    (RFC 1035 section 3.3.14; RSA-2048 keys are longer)."""
    value = record_value(algorithm, public_key)
    chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{record_name(domain, selector)} IN TXT ( {chunks} )"


def public_key_of(txt: str) -> str | None:
    """The ``p=`` value of a published key record (spaces removed), ``None`` when it has none."""
    for tag in txt.split(";"):
        name, _, value = tag.strip().partition("=")
        if name.strip() == "p":
            return re.sub(r"\s+", "", value)
    return None


def from_header_domain(message: bytes) -> str | None:
    """The domain of the first address in the message's ``From`` header (RFC 5322 section
    3.6.2), lower-case; ``None`` when there is none or it has no domain."""
    head = message[:header_block_end(message)]
    value = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n").get("From")
    if value is None:
        return None
    addresses = getaddresses([str(value)])
    domain = addresses[0][1].rpartition("@")[2].strip().lower() if addresses else ""
    return domain or None


def signer(pem: bytes, selector: str, domain: str) -> DkimSigner:
    """A signer for ``d=domain; s=selector`` from the private key PEM.

    Raises:
        mxguard.dkim_signing.KeyFileError: the PEM is not a usable key.
    """
    return signer_from_pem(pem, selector, domain)


def sign_outbound(message: bytes, key: DkimSigner) -> bytes:
    """``message`` with a ``DKIM-Signature`` (relaxed/relaxed, :data:`SIGNED_HEADERS`) in front.

    Raises:
        dkim.DKIMException: the message cannot be signed (malformed header block).
    """
    return key.sign(message, SIGNED_HEADERS)
