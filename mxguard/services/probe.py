"""The console's "Test connection": connect to each downstream server of a domain now, report its TLS.

For each server, in failover order:

1. **Policy check** — the gateway's own :class:`~mxguard.smtp.delivery.DownstreamConnection`
   opens a connection under the domain's TLS policy, exactly as a delivery would,
   and says what would happen: deliver with TLS, deliver in clear, or defer
   (``451 4.7.5`` when the policy cannot be met, ``451 4.4.1`` when unreachable).
2. **Diagnostics** — a second connection does STARTTLS (when offered) with a
   verifying context (the domain's CA file, or the system trust store; RFC 6125
   name check against the server's host name) to learn whether the chain and
   name verify; if they do not, a third, non-verifying handshake still shows the
   certificate (subject, SANs, issuer, expiry, SHA-256 fingerprint), the
   negotiated version and the cipher.

Nothing is sent beyond EHLO, STARTTLS and QUIT.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import asdict, dataclass, field
from typing import Any

import aiosmtplib
from aiosmtplib import errors as smtperr

from mxguard.config import DownstreamSettings
from mxguard.errors import ConfigError
from mxguard.services.domains import DomainView
from mxguard.smtp.delivery import DownstreamConnection, RouteFailure
from mxguard.smtp.routing import Route
from mxguard.tls.certs import describe_der
from mxguard.tls.contexts import client_context
from mxguard.tls.explain import RoutePolicyReport, explain_route
from mxguard.tls.policy import DownstreamTls


@dataclass
class CertificateReport:
    subject: str
    issuer: str
    sans: list[str]
    not_before: str
    not_after: str
    days_left: int
    sha256: str


@dataclass
class ServerProbe:
    """What one downstream server offered, and what the domain's policy would do with it.

    Attributes:
        server: ``host:port``.
        reachable: the TCP connection and the SMTP greeting worked.
        starttls_offered: EHLO listed STARTTLS.
        tls_version, cipher: negotiated in the diagnostic handshake.
        certificate: the server's leaf certificate.
        verified: chain and name verify against the domain's CA file or the
            system store (``None`` when no handshake happened).
        verify_error: why not, in OpenSSL's words.
        fingerprint_match: the pinned fingerprint matched (``None`` when no pin).
        policy_outcome: ``deliver-tls``, ``deliver-clear``, ``defer`` or ``unreachable``.
        policy_detail: the reply the sender would get, or the TLS that would be used.
        policy_source: what decided the policy (the setting, DANE or MTA-STS).
        tlsa: the matching TLSA record, when DANE decided.
        error: connection or handshake error text.
    """

    server: str
    reachable: bool = False
    greeting: str = ""
    starttls_offered: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    certificate: CertificateReport | None = None
    verified: bool | None = None
    verify_error: str | None = None
    fingerprint_match: bool | None = None
    policy_outcome: str = "unreachable"
    policy_detail: str = ""
    #: What decided the TLS policy (``setting``, ``dane``, ``mta-sts``, ``mta-sts-testing``).
    policy_source: str | None = None
    #: With DANE: the TLSA record the certificate matched.
    tlsa: str | None = None
    error: str | None = None
    elapsed_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DomainProbe:
    """The probe of every server of a domain, and what the route as a whole would do."""

    domain: str
    downstream_tls: str
    servers: list[ServerProbe] = field(default_factory=list)
    #: Which source decides each server's policy, with the TLSA records and MTA-STS policy found.
    tls_policy: RoutePolicyReport | None = None

    @property
    def route_outcome(self) -> str:
        """The first server that would take mail decides (failover order); else ``defer``."""
        for probe in self.servers:
            if probe.policy_outcome in ("deliver-tls", "deliver-clear"):
                return f"{probe.policy_outcome} via {probe.server}"
        return "defer"

    def as_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "downstream_tls": self.downstream_tls, "route_outcome": self.route_outcome,
                "servers": [s.as_dict() for s in self.servers],
                "tls_policy": self.tls_policy.as_dict() if self.tls_policy else None}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc)
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


async def _policy_check(route: Route, settings: DownstreamSettings, hostname: str, probe: ServerProbe) -> None:
    conn = DownstreamConnection(route, settings, hostname)
    try:
        info = await conn.open()
    except RouteFailure as failure:
        unreachable = not failure.tls_related
        probe.policy_outcome = "unreachable" if unreachable else "defer"
        probe.policy_detail = f"{failure.reply.one_line()} ({'; '.join(failure.attempts)})"
        return
    except ConfigError as exc:
        probe.policy_outcome = "defer"
        probe.policy_detail = str(exc)
        return
    probe.policy_source, probe.tlsa = info.policy, info.tlsa
    try:
        if info.tls:
            probe.policy_outcome = "deliver-tls"
            probe.policy_detail = f"deliver over {info.describe_tls()}"
        else:
            probe.policy_outcome = "deliver-clear"
            probe.policy_detail = "deliver without TLS" + (f" ({info.tls_fallback})" if info.tls_fallback else "")
    finally:
        await conn.close()


def _verify_context(domain: DomainView) -> ssl.SSLContext:
    """A verifying client context: chain and host name (RFC 6125), like ``verify`` mode."""
    return client_context(DownstreamTls.VERIFY, domain.tls_ca_file, domain.tls_min_version, False)


def _plain_context(domain: DomainView) -> ssl.SSLContext:
    return client_context(DownstreamTls.REQUIRED, None, domain.tls_min_version, False)


async def _handshake(host: str, port: int, settings: DownstreamSettings, hostname: str,
                     ctx: ssl.SSLContext | None, probe: ServerProbe) -> ssl.SSLObject | None:
    """Connect, EHLO, and STARTTLS with ``ctx`` if offered. Returns the SSL object; fills ``probe``."""
    client = aiosmtplib.SMTP(hostname=host, port=port, local_hostname=hostname, start_tls=False, use_tls=False,
                             timeout=settings.command_timeout)
    try:
        greeting = await client.connect(timeout=settings.connect_timeout)
        probe.reachable = True
        probe.greeting = f"{greeting.code} {greeting.message}"[:200]
        await client.ehlo()
        probe.starttls_offered = client.supports_extension("starttls")
        if not probe.starttls_offered or ctx is None:
            return None
        await client.starttls(server_hostname=host, tls_context=ctx, timeout=settings.connect_timeout)
        sslobj = client.get_transport_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj else None
        if sslobj is not None:
            probe.tls_version = sslobj.version()
            cipher = sslobj.cipher()
            probe.cipher = cipher[0] if cipher else None
        if der:
            info = describe_der(der)
            probe.certificate = CertificateReport(
                subject=info.subject, issuer=info.issuer, sans=list(info.sans),
                not_before=info.not_before.isoformat(), not_after=info.not_after.isoformat(),
                days_left=int(info.days_left), sha256=info.sha256)
        return sslobj
    finally:
        try:
            if client.is_connected:
                await client.quit(timeout=2)
        except (smtperr.SMTPException, OSError, asyncio.TimeoutError):
            pass
        client.close()


async def _diagnose(host: str, port: int, domain: DomainView, settings: DownstreamSettings, hostname: str,
                    probe: ServerProbe) -> None:
    try:
        await _handshake(host, port, settings, hostname, _verify_context(domain), probe)
        probe.verified = True if probe.tls_version else None
    except ssl.SSLCertVerificationError as exc:
        probe.verified = False
        probe.verify_error = _reason(exc)
        try:  # again without verification, to show what the server presents
            await _handshake(host, port, settings, hostname, _plain_context(domain), probe)
        except (smtperr.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError) as exc2:
            probe.error = f"TLS handshake failed: {_reason(exc2)}"
    except ConfigError as exc:
        probe.error = str(exc)
    except (smtperr.SMTPException, OSError, asyncio.TimeoutError) as exc:
        probe.error = _reason(exc)
    if domain.tls_fingerprint and probe.certificate:
        probe.fingerprint_match = probe.certificate.sha256 == domain.tls_fingerprint


async def probe_domain(domain: DomainView, settings: DownstreamSettings, local_hostname: str) -> DomainProbe:
    """Test every downstream server of ``domain`` now (servers are probed one after another).

    Args:
        domain: the domain's settings (its TLS policy decides ``policy_outcome``).
        settings: connect and command timeouts (seconds).
        local_hostname: the name given in EHLO (the gateway's host name).

    Returns:
        one :class:`ServerProbe` per server, in failover order. Never raises for
        network problems: they are reported in the result.
    """
    result = DomainProbe(domain.name, domain.downstream_tls)
    base = Route.for_domain(domain)
    result.tls_policy = await effective_policy(domain, settings)
    for host, port in base.servers:
        probe = ServerProbe(server=f"{host}:{port}")
        started = asyncio.get_running_loop().time()
        single = Route(servers=((host, port),), tls=base.tls, ca_file=base.ca_file, fingerprint=base.fingerprint,
                       min_version=base.min_version, policy_domain=base.policy_domain)
        await _policy_check(single, settings, local_hostname, probe)
        await _diagnose(host, port, domain, settings, local_hostname, probe)
        probe.elapsed_ms = round((asyncio.get_running_loop().time() - started) * 1000, 1)
        result.servers.append(probe)
    return result


async def effective_policy(domain: DomainView, settings: DownstreamSettings) -> RoutePolicyReport:
    """Per server of ``domain``: which source decides its TLS policy now (the setting, DANE,
    MTA-STS), with the TLSA records and MTA-STS policy found; DNS and the policy fetch
    only, no SMTP connection. See :func:`mxguard.tls.explain.explain_route`."""
    return await explain_route(domain.name, domain.downstream_tls, list(Route.for_domain(domain).servers), settings)
