"""The gateway's own certificate: show it, and replace it after checking the new one.

An uploaded PEM chain and key are written to temporary files next to the
configured ``tls.cert_file``/``tls.key_file`` (mode 0600), checked with
:func:`mxguard.tls.certs.load_chain` (parses, key matches leaf, not expired)
and loaded into OpenSSL once; only then do they replace the configured files
(``os.replace``, atomic on one file system). The running gateway then
swaps its server context (:meth:`mxguard.gateway.Gateway.reload_certificate`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography import x509

from mxguard.config import Settings
from mxguard.errors import ConfigError, ValidationFailed
from mxguard.services import audit
from mxguard.services.access import SYSTEM, Actor
from mxguard.storage.db import Store
from mxguard.tls.certs import CertificateInfo, describe, load_chain, write_private
from mxguard.tls.contexts import server_context

#: Largest accepted upload per file, in bytes (a long chain is a few KiB).
MAX_PEM_BYTES = 64 * 1024


def current_chain(settings: Settings) -> list[CertificateInfo]:
    """The configured certificate chain, leaf first. Raises ConfigError when unreadable."""
    path = settings.path(settings.tls.cert_file)
    try:
        return [describe(c) for c in x509.load_pem_x509_certificates(path.read_bytes())]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tls.cert_file: cannot read {path}: {exc}") from None


def _summary(info: CertificateInfo) -> dict:
    return {"subject": info.subject, "sans": info.sans, "not_after": info.not_after.isoformat(), "sha256": info.sha256}


async def install_certificate(settings: Settings, store: Store, cert_pem: bytes, key_pem: bytes, *,
                              actor: Actor = SYSTEM) -> CertificateInfo:
    """Validate and install a new certificate chain and key (admins only).

    Args:
        settings: where the files go (``tls.cert_file``, ``tls.key_file``).
        store: for the audit entry.
        cert_pem: PEM chain, leaf first.
        key_pem: unencrypted PEM private key of the leaf.

    Returns:
        the new leaf's description.

    Raises:
        PermissionDenied: not an admin.
        ValidationFailed: field ``certificate`` or ``key`` — too large, not PEM,
            key does not match, expired, or OpenSSL refuses it. Nothing is changed then.
    """
    actor.require_admin()
    for name, data in (("certificate", cert_pem), ("key", key_pem)):
        if not data or not data.strip():
            raise ValidationFailed(name, "is empty")
        if len(data) > MAX_PEM_BYTES:
            raise ValidationFailed(name, f"is larger than {MAX_PEM_BYTES} bytes")
    cert_path = settings.path(settings.tls.cert_file)
    key_path = settings.path(settings.tls.key_file)
    tag = secrets.token_hex(4)
    tmp_cert = cert_path.with_name(f".{cert_path.name}.{tag}.new")
    tmp_key = key_path.with_name(f".{key_path.name}.{tag}.new")
    try:
        write_private(tmp_cert, cert_pem)
        write_private(tmp_key, key_pem)
        try:
            chain = load_chain(tmp_cert, tmp_key)
            server_context(tmp_cert, tmp_key, min_version=settings.tls.min_version)
        except ConfigError as exc:
            text = str(exc).replace(str(tmp_cert), "the certificate").replace(str(tmp_key), "the key")
            field = "key" if text.startswith("tls.key_file") else "certificate"
            raise ValidationFailed(field, text.split(": ", 1)[-1]) from None
        before = None
        try:
            before = _summary(current_chain(settings)[0])
        except ConfigError:
            pass
        os.replace(tmp_key, key_path)
        os.replace(tmp_cert, cert_path)
    finally:
        for p in (tmp_cert, tmp_key):
            Path(p).unlink(missing_ok=True)
    info = describe(chain[0])
    async with store.session() as session:
        audit.record(session, actor, "tls.certificate", settings.hostname, before=before, after=_summary(info))
        await session.commit()
    return info
