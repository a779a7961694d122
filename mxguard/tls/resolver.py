"""The TLS policy resolver: "may this message go to this server, and how".

Every delivery path (the in-line downstream leg, spool retries, quarantine
releases, the gateway's own mail) connects through
:class:`mxguard.smtp.delivery.DownstreamConnection`, which asks
:func:`resolve_server_policy` before it connects to each server and
:meth:`ServerPolicy.check_certificate` after the handshake. So the rule lives
here once.

Sources, in the order they can decide:

* the domain's setting (``off``, ``opportunistic``, ``required``, ``verify``);
* DANE (RFC 7672) for the modes ``dane`` and ``dane-only``: DNSSEC-validated
  TLSA records make TLS mandatory and the certificate must match them; a bogus
  answer defers (``4.7.5``), never falls back to clear text;
* MTA-STS (RFC 8461) for the mode ``mta-sts``: an ``enforce`` policy allows
  only matching MX hosts, over PKIX-verified TLS.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.resolver
import structlog

from mxguard.netaddr import is_ip_address, parse_host_port
from mxguard.tls.dane import (DANE_TA, DaneLookup, DnssecStatus, TrustAnchorMismatch, lookup_tlsa,
                              matching_record, verify_ta_chain)
from mxguard.tls.mta_sts import PolicyError, StsFetcher
from mxguard.tls.policy import DownstreamTls

log = structlog.get_logger("mxguard.tls")


class PolicyRefusal(Exception):
    """The policy forbids using this server now (the caller tries the next, then defers with 4.7.5).

    Attributes:
        reason: a short text for the log and the message log.
        result_type: the RFC 8460 (TLS-RPT) result type, e.g. ``dnssec-invalid``.
    """

    def __init__(self, reason: str, result_type: str, policy: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.result_type = result_type
        #: The policy source that refused (``mta-sts``...), when the caller cannot tell from the
        #: mode alone (an outbound route consults DANE, then MTA-STS); ``None`` otherwise.
        self.policy = policy


@dataclass
class ServerPolicy:
    """The effective TLS policy for one server.

    Attributes:
        mode: the mode that applies after resolution (``dane`` falls back to
            ``opportunistic`` when DANE does not apply).
        source: what decided it: ``setting`` or ``dane``.
        connect_host: where to connect (an address from the validating resolver
            when DANE looked the name up, else the configured host).
        dane: the TLSA lookup, when one was made.
    """

    mode: DownstreamTls
    source: str
    connect_host: str
    dane: DaneLookup | None = None
    #: An RFC 8460 result type to report although delivery goes on (MTA-STS ``testing`` with an
    #: MX host outside the policy; a policy that could not be fetched), with the policy it is
    #: about (``mta-sts``): the session counts as that failure in the TLS-RPT report.
    report_failure: str | None = None
    report_policy: str | None = None

    @property
    def mandatory(self) -> bool:
        return self.mode.mandatory or self.source == "dane"

    @property
    def verify_pkix(self) -> bool:
        """The chain and name are checked by the TLS library (``verify``, MTA-STS ``enforce``);
        DANE checks TLSA instead."""
        return self.mode is DownstreamTls.VERIFY and self.source in ("setting", "mta-sts")

    def check_certificate(self, chain_der: list[bytes]) -> str | None:
        """After the handshake: the matching TLSA record's text, or ``None`` when DANE does not apply.

        Args:
            chain_der: the server's certificates as sent, leaf first (DER); DANE-TA(2) needs the
                issuer it names among them.

        Raises:
            PolicyRefusal: DANE applies and no usable record matches (``validation-failure``,
                RFC 7672 section 2.2 and RFC 8460 section 4.3).
        """
        if self.source != "dane" or self.dane is None:
            return None
        record = matching_record(self.dane, chain_der)
        if record is None:
            raise PolicyRefusal(f"certificate matches none of the TLSA records of {self.dane.host}",
                                "validation-failure")
        if record.usage == DANE_TA:
            try:
                verify_ta_chain(self.dane.host, chain_der, record)
            except TrustAnchorMismatch as exc:
                raise PolicyRefusal(str(exc), "validation-failure") from None
        return record.describe()


def dns_resolver(dns_servers: list[str], timeout: float) -> dns.asyncresolver.Resolver:
    """A stub resolver asking ``dns_servers`` (``HOST[:PORT]``; the system's when empty).

    Args:
        dns_servers: the servers; all on the first one's port (dnspython has one port per resolver).
        timeout: seconds for a whole lookup (dnspython's ``lifetime``).
    """
    resolver = dns.asyncresolver.Resolver(configure=not dns_servers)
    if dns_servers:
        hosts = [parse_host_port(n, default_port=53) for n in dns_servers]
        resolver.nameservers = [h for h, _ in hosts]
        resolver.port = hosts[0][1]
    resolver.lifetime = timeout
    return resolver


def _resolver(dns_servers: list[str], timeout: float) -> tuple[list[str] | None, int]:
    if not dns_servers:
        return None, 53
    parsed = [parse_host_port(s, default_port=53) for s in dns_servers]
    return [host for host, _ in parsed], parsed[0][1]


_address_cache: dict[tuple, tuple[float, str]] = {}


async def _address(host: str, nameservers: list[str] | None, port: int, timeout: float, *,
                   secure: bool = True) -> str:
    """:func:`_lookup_address`, cached like the TLSA answers (refusals are not cached)."""
    key = (host.rstrip(".").lower(), tuple(nameservers or ()), port, secure)
    now = time.monotonic()
    hit = _address_cache.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    address = await _lookup_address(host, nameservers, port, timeout, secure=secure)
    if len(_address_cache) >= TLSA_CACHE_SIZE:
        _address_cache.clear()
    _address_cache[key] = (now + TLSA_CACHE_SECONDS, address)
    return address


async def _lookup_address(host: str, nameservers: list[str] | None, port: int, timeout: float, *,
                          secure: bool = True) -> str:
    """An IPv4 address of ``host`` from the configured resolver; with ``secure``, from a
    DNSSEC-validated answer only (RFC 7672 section 2.2.1).

    Raises:
        PolicyRefusal: no address, or (``secure``) the answer is bogus or unsigned.
    """
    resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
    if nameservers is not None:
        resolver.nameservers = nameservers
        resolver.port = port
    resolver.lifetime = timeout
    resolver.flags = dns.flags.RD | dns.flags.AD
    try:
        answer = await resolver.resolve(host, "A")
    except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout):
        raise PolicyRefusal(f"DNSSEC validation failed for the address of {host}", "dnssec-invalid") from None
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        raise PolicyRefusal(f"{host} has no address", "dnssec-invalid") from None
    if secure and not answer.response.flags & dns.flags.AD:
        raise PolicyRefusal(f"the address of {host} is not DNSSEC-signed", "dnssec-invalid")
    return answer[0].address


async def _secure_addresses(host: str, nameservers: list[str] | None, port: int, timeout: float) -> set[str]:
    """Every IPv4 and IPv6 address of ``host`` from DNSSEC-validated answers (RFC 7672 section
    2.2.1: under DANE the server's addresses must be secure too); cached like :func:`_address`.

    Raises:
        PolicyRefusal: a lookup failed, an answer is not DNSSEC-signed, or there is no address.
    """
    key = ("secure-set", host.rstrip(".").lower(), tuple(nameservers or ()), port)
    now = time.monotonic()
    hit = _address_cache.get(key)
    if hit is not None and hit[0] > now:
        return set(hit[1].split())
    resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
    if nameservers is not None:
        resolver.nameservers = nameservers
        resolver.port = port
    resolver.lifetime = timeout
    resolver.flags = dns.flags.RD | dns.flags.AD
    found: set[str] = set()
    for rdtype in ("AAAA", "A"):
        try:
            answer = await resolver.resolve(host, rdtype)
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout):
            raise PolicyRefusal(f"DNSSEC validation failed for the address of {host}", "dnssec-invalid") from None
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        if not answer.response.flags & dns.flags.AD:
            raise PolicyRefusal(f"the address of {host} is not DNSSEC-signed", "dnssec-invalid")
        found.update(r.address for r in answer)
    if not found:
        raise PolicyRefusal(f"{host} has no address", "dnssec-invalid")
    if len(_address_cache) >= TLSA_CACHE_SIZE:
        _address_cache.clear()
    _address_cache[key] = (now + TLSA_CACHE_SECONDS, " ".join(sorted(found)))
    return found


_fetchers: dict[tuple, StsFetcher] = {}

#: TLSA answers by (host, port, resolver), kept for :data:`TLSA_CACHE_SECONDS` (a bogus answer
#: for :data:`BOGUS_CACHE_SECONDS`): the validating resolver caches too, but a lookup per
#: connection would cost a round trip and its CPU on every message.
TLSA_CACHE_SECONDS = 300.0
BOGUS_CACHE_SECONDS = 30.0
TLSA_CACHE_SIZE = 10000
_tlsa_cache: dict[tuple, tuple[float, DaneLookup]] = {}


async def _cached_tlsa(host: str, port: int, nameservers: list[str] | None, ns_port: int,
                       timeout: float) -> DaneLookup:
    key = (host.rstrip(".").lower(), port, tuple(nameservers or ()), ns_port)
    now = time.monotonic()
    hit = _tlsa_cache.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    lookup = await lookup_tlsa(host, port, nameservers=nameservers, nameserver_port=ns_port, timeout=timeout)
    if len(_tlsa_cache) >= TLSA_CACHE_SIZE:
        _tlsa_cache.clear()
    ttl = BOGUS_CACHE_SECONDS if lookup.status is DnssecStatus.BOGUS else TLSA_CACHE_SECONDS
    _tlsa_cache[key] = (now + ttl, lookup)
    return lookup


def forget_cached_lookups() -> None:
    """Drop every cached TLSA answer and MTA-STS policy (tests; an operator's zone change)."""
    _tlsa_cache.clear()
    _address_cache.clear()
    _fetchers.clear()


def sts_fetcher(dns_servers: list[str], timeout: float, ca_file: str = "", https_port: int = 443) -> StsFetcher:
    """The process's MTA-STS fetcher (and so its policy cache) for these settings."""
    key = (tuple(dns_servers), timeout, ca_file, https_port)
    fetcher = _fetchers.get(key)
    if fetcher is None:
        nameservers, ns_port = _resolver(dns_servers, timeout)
        verify: bool | ssl.SSLContext = ssl.create_default_context(cafile=ca_file) if ca_file else True
        fetcher = _fetchers[key] = StsFetcher(nameservers, ns_port, timeout, verify, https_port)
    return fetcher


async def _mta_sts_policy(host: str, port: int, policy_domain: str | None, dns_servers: list[str],
                          timeout: float, sts: StsFetcher, address: str | None = None) -> ServerPolicy:
    """RFC 8461 section 4 for one MX host of ``policy_domain`` (``address``: where to connect,
    when the caller resolved the host already)."""
    nameservers, ns_port = _resolver(dns_servers, timeout)
    if address is None:
        address = host
        if nameservers and not is_ip_address(host):
            address = await _address(host, nameservers, ns_port, timeout, secure=False)
    if not policy_domain:
        return ServerPolicy(DownstreamTls.OPPORTUNISTIC, "setting", address)
    try:
        policy = await sts.policy(policy_domain)
    except PolicyError as exc:
        # No policy could be had and none is cached: MTA-STS does not apply (section 5.1).
        log.warning("MTA-STS policy unavailable; opportunistic TLS", domain=policy_domain, reason=str(exc),
                    result_type=exc.result_type)
        return ServerPolicy(DownstreamTls.OPPORTUNISTIC, "setting", address,
                            report_failure=exc.result_type, report_policy="mta-sts")
    if policy is None or policy.mode == "none":
        return ServerPolicy(DownstreamTls.OPPORTUNISTIC, "setting", address)
    if not policy.matches(host):
        if policy.mode == "enforce":
            raise PolicyRefusal(f"{host} does not match the MTA-STS mx patterns of {policy_domain} "
                                f"({', '.join(policy.mx)})", "validation-failure", "mta-sts")
        log.warning("MTA-STS testing: MX host does not match the policy", domain=policy_domain, host=host)
        return ServerPolicy(DownstreamTls.OPPORTUNISTIC, "mta-sts-testing", address,
                            report_failure="validation-failure", report_policy="mta-sts-testing")
    if policy.mode == "testing":
        return ServerPolicy(DownstreamTls.OPPORTUNISTIC, "mta-sts-testing", address)
    return ServerPolicy(DownstreamTls.VERIFY, "mta-sts", address)


async def resolve_server_policy(mode: DownstreamTls, host: str, port: int, *, dns_servers: list[str],
                                timeout: float = 5.0, policy_domain: str | None = None,
                                sts: StsFetcher | None = None, relaxed: bool = False,
                                address: str | None = None, sts_fallback: bool = False) -> ServerPolicy:
    """Decide the TLS policy for one server before connecting.

    Args:
        mode: the domain's downstream TLS mode.
        host: the server's host name or address, as configured (or from MX).
        port: its TCP port; the TLSA name is ``_<port>._tcp.<host>`` (RFC 6698 section 3).
        dns_servers: the validating resolver(s), ``HOST[:PORT]`` (empty: the system's).
        timeout: seconds per lookup.
        policy_domain: the recipient domain (``mta-sts`` mode).
        sts: the MTA-STS fetcher (default: the process's, see :func:`sts_fetcher`).
        relaxed: the route is a published-policy route (DANE, MTA-STS) that the message's
            ``TLS-Required: No`` relaxed to ``opportunistic`` (RFC 8689 section 5): source
            ``tls-required-no``, and the address still comes from the configured resolver, as it
            would have under the policy (unsigned answers are fine: no DANE).
        address: the IPv4 or IPv6 address to connect to, when the caller resolved ``host``
            already (outbound delivery: :mod:`mxguard.relay.mx`); under DANE it must be among
            the host's DNSSEC-validated addresses. ``None``: the resolver looks the host up.
        sts_fallback: an internet destination (outbound): with mode ``dane`` and no usable
            TLSA records, the ``policy_domain``'s MTA-STS policy decides (RFC 8461 section 2:
            DANE takes precedence where both exist).

    Returns:
        The :class:`ServerPolicy`; for ``dane``, DANE when usable TLSA records exist,
        else ``opportunistic`` (RFC 7672 section 2.2: no usable TLSA, no DANE).

    Raises:
        PolicyRefusal: ``dane``/``dane-only`` with a bogus TLSA answer (``dnssec-invalid``),
            ``dane-only`` without usable TLSA (``tlsa-invalid``), or an MTA-STS ``enforce``
            policy whose ``mx`` patterns do not match ``host`` (``validation-failure``).
    """
    if mode is DownstreamTls.MTA_STS:
        return await _mta_sts_policy(host, port, policy_domain, dns_servers, timeout,
                                     sts or sts_fetcher(dns_servers, timeout), address)
    if relaxed:
        nameservers, ns_port = _resolver(dns_servers, timeout)
        if address is None:
            address = (await _address(host, nameservers, ns_port, timeout, secure=False)
                       if nameservers and not is_ip_address(host) else host)
        return ServerPolicy(DownstreamTls.OPPORTUNISTIC, "tls-required-no", address)
    if not mode.uses_dane:
        return ServerPolicy(mode, "setting", address or host)
    if is_ip_address(host):
        if mode is DownstreamTls.DANE_ONLY:
            raise PolicyRefusal(f"{host} is an address: DANE needs a host name with TLSA records", "tlsa-invalid")
        return ServerPolicy(DownstreamTls.OPPORTUNISTIC, "setting", host)
    nameservers, ns_port = _resolver(dns_servers, timeout)
    lookup = await _cached_tlsa(host, port, nameservers, ns_port, timeout)
    if lookup.status is DnssecStatus.BOGUS:
        raise PolicyRefusal(f"DNSSEC validation of the TLSA records of {host} failed ({lookup.error})",
                            "dnssec-invalid")
    if not lookup.applies:
        if mode is DownstreamTls.DANE_ONLY:
            raise PolicyRefusal(f"{host} has no usable DNSSEC-signed TLSA records ({lookup.status})",
                                "tlsa-invalid")
        if sts_fallback and mode is DownstreamTls.DANE and policy_domain:
            policy = await _mta_sts_policy(host, port, policy_domain, dns_servers, timeout,
                                           sts or sts_fetcher(dns_servers, timeout), address)
            policy.dane = lookup
            return policy
        if address is None:
            # The configured resolver also names the address (unsigned is fine without DANE).
            address = await _address(host, nameservers, ns_port, timeout, secure=False) if nameservers else host
        return ServerPolicy(DownstreamTls.OPPORTUNISTIC, "setting", address, lookup)
    if address is None:
        address = await _address(host, nameservers, ns_port, timeout)
    elif address not in await _secure_addresses(host, nameservers, ns_port, timeout):
        raise PolicyRefusal(f"{address} is not among the DNSSEC-validated addresses of {host}", "dnssec-invalid")
    return ServerPolicy(DownstreamTls.REQUIRED, "dane", address, lookup)
