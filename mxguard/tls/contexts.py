"""SSLContext factories for the two hops.

Inbound (server) contexts: TLS 1.2 minimum, forward-secret AEAD suites only
(ECDHE with AES-GCM or ChaCha20-Poly1305; TLS 1.3 suites are all AEAD and
forward secret), no compression, no renegotiation, session tickets on.
SSLv2/SSLv3/TLS 1.0/TLS 1.1 are never offered (RFC 7568, RFC 8996).

Downstream (client) contexts are made per (mode, CA file, minimum version) and
cached, since building one with the system trust store costs milliseconds.
"""

from __future__ import annotations

import functools
import os
import ssl
import tempfile
from collections.abc import Mapping
from pathlib import Path

import structlog

from mxguard.errors import ConfigError
from mxguard.tls import sni
from mxguard.tls.policy import DownstreamTls

#: TLS 1.2 suites: ECDHE key exchange (forward secrecy) with AEAD ciphers only.
FORWARD_SECRET_AEAD_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
#: Downstream: the organization's own server may be older, so CBC suites are
#: allowed, but only with forward secrecy and never the broken ones.
CLIENT_CIPHERS = "DEFAULT:!aNULL:!eNULL:!kRSA:!3DES:!RC4:!MD5:!EXPORT"

log = structlog.get_logger("mxguard.tls")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _harden(ctx: ssl.SSLContext, min_version: str, ciphers: str) -> None:
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(ciphers)


def server_context(cert_file: Path, key_file: Path, *, min_version: str = "1.2",
                   extra: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """Context for inbound STARTTLS and the HTTPS console.

    Args:
        cert_file: PEM certificate chain (leaf first).
        key_file: PEM private key.
        min_version: ``"1.2"`` or ``"1.3"``.
        extra: a second ``(cert, key)`` of another key type (e.g. RSA beside ECDSA); OpenSSL
            offers each client the one its signature algorithms allow. The main certificate
            wins when both have the same key type.

    Raises:
        ConfigError: the files cannot be loaded into OpenSSL.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, min_version, FORWARD_SECRET_AEAD_TLS12)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.verify_mode = ssl.CERT_NONE  # senders do not present client certificates to an MX
    if extra is not None:
        try:  # loaded first, so that the main certificate replaces it if the key types match
            ctx.load_cert_chain(str(extra[0]), str(extra[1]))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls.extra_cert_file/tls.extra_key_file: cannot load {extra[0]} / {extra[1]}: "
                              f"{exc}") from None
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.cert_file/tls.key_file: cannot load {cert_file} / {key_file}: {exc}") from None
    return ctx


def add_certificate(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    """Load a second certificate (for example RSA beside ECDSA) into a server context.

    OpenSSL keeps one certificate per key type and picks the one the client's
    signature algorithms allow.
    """
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load extra certificate {cert_file}: {exc}") from None


def server_context_from_pem(cert_pem: bytes, key_pem: bytes, *, min_version: str = "1.2") -> ssl.SSLContext:
    """A server context (as :func:`server_context`) for a chain and key held in memory.

    OpenSSL loads chains only from files through the ``ssl`` module, so both are
    written for the moment of loading into a fresh private directory (mode 0700,
    files 0600) and removed at once.

    Args:
        cert_pem: PEM chain, leaf first.
        key_pem: unencrypted PEM private key.
        min_version: ``"1.2"`` or ``"1.3"``.

    Raises:
        ConfigError: OpenSSL refuses the pair.
    """
    from mxguard.tls.certs import write_private

    with tempfile.TemporaryDirectory(prefix="mxguard-sni-") as tmp:
        os.chmod(tmp, 0o700)
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        write_private(cert_file, cert_pem)
        write_private(key_file, key_pem)
        try:
            return server_context(cert_file, key_file, min_version=min_version)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(f"{cert_file} / {key_file}", "the certificate and key")) from None


@functools.lru_cache(maxsize=64)
def client_context(mode: DownstreamTls, ca_file: str | None = None, min_version: str = "1.2",
                   pinned: bool = False, crl_file: str | None = None, crl_stamp: int = 0) -> ssl.SSLContext:
    """Context for STARTTLS to a downstream server.

    Args:
        mode: the domain's downstream TLS mode (``off`` is not valid here).
        ca_file: PEM bundle to verify against in ``verify`` mode; ``None`` uses
            the system trust store.
        min_version: lowest protocol version accepted.
        pinned: ``verify`` by a pinned fingerprint: the chain is not checked
            here; the caller compares the leaf's SHA-256 after the handshake.
        crl_file: in ``verify`` mode by chain, a CRL (PEM) of the leaf's issuer: OpenSSL checks
            the leaf against it (``VERIFY_CRL_CHECK_LEAF``, RFC 5280 6.3), so a revoked, or a
            CRL that is not the issuer's or has expired, fails the handshake as
            verification errors do.
        crl_stamp: the CRL file's modification time (ns): a changed file makes a new context.

    Raises:
        ConfigError: the CA file cannot be read.
        ValueError: ``mode`` is ``off``.
    """
    if mode is DownstreamTls.OFF:
        raise ValueError("no TLS context for mode 'off'")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx, min_version, CLIENT_CIPHERS)
    if mode is DownstreamTls.VERIFY and not pinned:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            if ca_file:
                ctx.load_verify_locations(cafile=ca_file)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls_ca_file: cannot load {ca_file}: {exc}") from None
        if crl_file:
            try:
                ctx.load_verify_locations(cafile=crl_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"tls_crl_file: cannot load {crl_file}: {exc}") from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ReloadableServerContext:
    """A server context whose certificate can be replaced while connections are open.

    ``context`` is the :class:`ssl.SSLContext` handed to the HTTPS server and
    ``smtp_context`` the one handed to the SMTP listener: the same certificates,
    but only SMTP asks for a client certificate, and only while partner rules
    need one (:meth:`set_client_cas`). Its SNI callback (called for every ClientHello, with
    or without SNI) moves each new handshake onto the context for its server
    name (:meth:`set_sni`: exact name, then one-label wildcard, see
    :func:`mxguard.tls.sni.select`) or else the current gateway context, so
    :meth:`reload` and :meth:`set_sni` affect the next handshake only;
    established sessions keep theirs. This also works when the new key type differs from the old
    one (ECDSA → RSA), which ``load_cert_chain`` on a shared context would not
    do (OpenSSL keeps one certificate per key type).

    Args:
        cert_file, key_file: PEM chain and key.
        min_version: ``"1.2"`` or ``"1.3"``.

    Raises:
        ConfigError: the files cannot be loaded.
    """

    def __init__(self, cert_file: Path, key_file: Path, *, min_version: str = "1.2",
                 extra: tuple[Path, Path] | None = None):
        self.min_version = min_version
        self.extra = extra
        self.current = server_context(cert_file, key_file, min_version=min_version, extra=extra)
        self.context = server_context(cert_file, key_file, min_version=min_version, extra=extra)
        self.smtp_context = server_context(cert_file, key_file, min_version=min_version, extra=extra)
        self.by_name: Mapping[str, ssl.SSLContext] = {}
        self.client_cas: tuple[str, ...] = ()
        self.client_ca_pems: tuple[str, ...] = ()
        self.context.sni_callback = self._select
        self.smtp_context.sni_callback = self._select

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # One dict lookup (two for a wildcard) per handshake; the map is replaced whole, never mutated.
        ssl_object.context = sni.select(self.by_name, server_name) or self.current
        return None

    def set_sni(self, by_name: Mapping[str, ssl.SSLContext]) -> None:
        """Use these per-name contexts for new handshakes (names as :func:`mxguard.tls.sni.normalize_sni_name`
        returns them); an empty mapping serves the gateway certificate to everyone."""
        for ctx in by_name.values():
            _trust_clients(ctx, self.client_cas, self.client_ca_pems)
        self.by_name = dict(by_name)

    def set_client_cas(self, ca_files: list[str] | tuple[str, ...],
                       ca_pems: list[str] | tuple[str, ...] = ()) -> None:
        """Ask SMTP clients for a certificate that chains to one of ``ca_files`` or of the PEM
        bundles ``ca_pems`` (text, as rules store them); both empty: ask for none.

        OpenSSL verifies a shown certificate during the handshake (Python's ``ssl`` has
        no way to take one unverified), against the store of the context the SNI
        callback chose, with the verify mode and flags of ``smtp_context``; so every
        selectable context gets the CA files first, then the request is switched on.
        A client that shows no certificate is unaffected; one whose certificate chains
        to none of the files fails the handshake. Which rule a certificate meets is
        decided later (:mod:`mxguard.tls.client_certs`). CA files only accumulate in
        the contexts until they are rebuilt: an extra trusted CA lets a handshake
        succeed, never a rule.
        """
        cas, pems = tuple(ca_files), tuple(ca_pems)
        if cas == self.client_cas and pems == self.client_ca_pems:
            return
        self.client_cas, self.client_ca_pems = cas, pems
        for ctx in (self.current, *self.by_name.values()):
            _trust_clients(ctx, cas, pems)
        _trust_clients(self.smtp_context, cas, pems)
        wanted = bool(cas or pems)
        self.smtp_context.verify_mode = ssl.CERT_OPTIONAL if wanted else ssl.CERT_NONE
        log.info("client certificates " + ("requested" if wanted else "not requested"), ca_files=len(cas),
                 ca_bundles=len(pems))

    def reload(self, cert_file: Path, key_file: Path) -> None:
        """Use a new chain and key for handshakes from now on.

        Raises:
            ConfigError: the files cannot be loaded; the old certificate stays in use.
        """
        current = server_context(cert_file, key_file, min_version=self.min_version, extra=self.extra)
        _trust_clients(current, self.client_cas, self.client_ca_pems)
        self.current = current


def _trust_clients(ctx: ssl.SSLContext, ca_files: tuple[str, ...], ca_pems: tuple[str, ...] = ()) -> None:
    """Load CA files and PEM bundles to verify client certificates against. A self-signed partner
    certificate may be its own CA (partial chains allowed). One that cannot be loaded is logged and
    skipped: its partner's rule then refuses at RCPT (451 4.7.0) rather than every handshake failing."""
    if not ca_files and not ca_pems:
        return
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    # The system's CAs too: senders no rule covers often show publicly issued client
    # certificates (large hosted services do), and those must not fail the handshake.
    # Trust here only lets the handshake through; each rule checks its own CA file.
    ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    for path in ca_files:
        try:
            ctx.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            log.error("partner CA file cannot be loaded", ca_file=path, error=str(exc)[:200])
    for pem in ca_pems:
        try:
            ctx.load_verify_locations(cadata=pem)
        except (ssl.SSLError, ValueError) as exc:
            log.error("stored partner CA bundle cannot be loaded", error=str(exc)[:200])
