"""The ACME account key: an ECDSA P-256 key in a PEM file of mode 0600, generated on first use."""

from __future__ import annotations

import os
from pathlib import Path

import josepy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import structlog

log = structlog.get_logger("mxguard.acme")


class AccountKeyError(Exception):
    """The account key file exists but is not a usable key (the message says why)."""


def load_account_key(path: Path) -> josepy.JWKEC:
    """Read the account key.

    Args:
        path: PEM file holding an unencrypted ECDSA P-256 private key.

    Raises:
        AccountKeyError: unreadable, not PEM, encrypted, or not P-256 (RFC 8555 6.2 signs with ES256 here).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AccountKeyError(f"cannot read it: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AccountKeyError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise AccountKeyError("must be an ECDSA P-256 key (delete it to have a new one generated)")
    return josepy.JWKEC(key=key)


def ensure_account_key(path: Path) -> josepy.JWKEC:
    """The account key at ``path``, generated (P-256, mode 0600, parent made 0700) when absent.

    Raises:
        AccountKeyError: see :func:`load_account_key`.
        OSError: the file cannot be created.
    """
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        # O_EXCL: two processes generating at once must not overwrite each other's key.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_account_key(path)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        log.info("ACME account key generated", path=str(path))
    return load_account_key(path)
