"""Say, per downstream server, which source decides the TLS policy and what it found.

For ``mxguard domain show``, ``mxguard domain test``, the console's domain page
and its **Test connection**. The answer comes from the same resolver the
deliveries use (:func:`mxguard.tls.resolver.resolve_server_policy`, with its
caches), so what is shown is what the next delivery would do; only DNS
lookups and the MTA-STS policy fetch are made, no SMTP connection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mxguard.config import DownstreamSettings
from mxguard.tls.dane import DaneLookup
from mxguard.tls.mta_sts import PolicyError
from mxguard.tls.policy import DownstreamTls
from mxguard.tls.resolver import PolicyRefusal, resolve_server_policy, sts_fetcher

#: What a decided policy asks of the connection, by source (shown to administrators).
_MEANING = {
    "dane": "TLS required; the certificate must match a TLSA record (RFC 7672)",
    "mta-sts": "TLS required; chain and name verified (PKIX), host matched the policy's mx (RFC 8461)",
    "mta-sts-testing": "MTA-STS testing: opportunistic TLS, failures only reported (RFC 8461 5)",
}


@dataclass
class ServerPolicyReport:
    """The effective TLS policy for one server.

    Attributes:
        server: ``host:port``.
        source: ``setting``, ``dane``, ``mta-sts``, ``mta-sts-testing``, or ``refused``
            (the resolver forbids this server now: deliveries skip it, then defer with ``4.7.5``).
        mode: the mode that applies after resolution (``dane`` may become ``opportunistic``).
        meaning: one line for people: what the connection must do.
        refusal: why the server is refused (``source == "refused"``).
        result_type: the RFC 8460 result type of the refusal.
        dnssec: the TLSA answer's DNSSEC status (``secure``, ``insecure``, ``bogus``, ...)
            when a TLSA lookup was made.
        tlsa: the TLSA records of a secure answer (``usage selector mtype data``).
        requiretls: whether a REQUIRETLS message (RFC 8689) may use this server: only
            over DANE or PKIX-verified TLS, and only when the server offers REQUIRETLS
            (known at connection time, not here).
    """

    server: str
    source: str
    mode: str
    meaning: str
    refusal: str | None = None
    result_type: str | None = None
    dnssec: str | None = None
    tlsa: list[str] = field(default_factory=list)
    requiretls: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoutePolicyReport:
    """The servers' reports and, in ``mta-sts`` mode, the domain's MTA-STS policy.

    Attributes:
        domain: the served domain.
        setting: its ``downstream_tls`` mode.
        servers: one :class:`ServerPolicyReport` per server, failover order.
        mta_sts: ``{"id", "mode", "mx", "max_age"}`` of the policy in force,
            ``{"error", "result_type"}`` when none could be had, ``None`` outside ``mta-sts`` mode
            or when the domain publishes no policy (``{"none": True}``).
    """

    domain: str
    setting: str
    servers: list[ServerPolicyReport]
    mta_sts: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "setting": self.setting, "mta_sts": self.mta_sts,
                "servers": [s.as_dict() for s in self.servers]}


def _requiretls(source: str, mode: DownstreamTls) -> str:
    if source in ("dane", "mta-sts") or mode is DownstreamTls.VERIFY:
        return "allowed when the server offers REQUIRETLS"
    return "refused (550 5.7.10 or DSN): TLS here is not verified by DANE or PKIX"


def _tlsa_lines(lookup: DaneLookup | None) -> tuple[str | None, list[str]]:
    if lookup is None:
        return None, []
    return str(lookup.status), [r.describe() for r in lookup.records]


async def explain_route(domain: str, setting: str, servers: list[tuple[str, int]],
                        settings: DownstreamSettings) -> RoutePolicyReport:
    """Resolve the policy of each server as the next delivery would.

    Args:
        domain: the served (recipient) domain; the MTA-STS policy domain.
        setting: the domain's ``downstream_tls`` value.
        servers: ``(host, port)`` pairs in failover order.
        settings: ``[downstream]``: resolver, timeouts, MTA-STS CA file and port.

    Returns:
        The :class:`RoutePolicyReport`. Lookup problems are part of the answer
        (``source == "refused"`` or ``mta_sts["error"]``), never raised.
    """
    mode = DownstreamTls(setting)
    sts = sts_fetcher(settings.dns_servers, settings.dns_timeout, settings.mta_sts_ca_file, settings.mta_sts_port)
    out = RoutePolicyReport(domain, setting, [])
    if mode is DownstreamTls.MTA_STS:
        try:
            policy = await sts.policy(domain)
        except PolicyError as exc:
            out.mta_sts = {"error": str(exc), "result_type": exc.result_type}
        else:
            out.mta_sts = ({"none": True} if policy is None else
                           {"id": policy.policy_id, "mode": policy.mode, "mx": list(policy.mx),
                            "max_age": policy.max_age})
    for host, port in servers:
        server = f"{host}:{port}"
        try:
            policy = await resolve_server_policy(mode, host, port, dns_servers=settings.dns_servers,
                                                 timeout=settings.dns_timeout,
                                                 policy_domain=domain if mode is DownstreamTls.MTA_STS else None,
                                                 sts=sts)
        except PolicyRefusal as refusal:
            out.servers.append(ServerPolicyReport(
                server, "refused", setting, f"not used: {refusal.reason}; deliveries defer with 451 4.7.5",
                refusal=refusal.reason, result_type=refusal.result_type,
                requiretls="refused: the server is not used"))
            continue
        dnssec, tlsa = _tlsa_lines(policy.dane)
        meaning = _MEANING.get(policy.source, f"the domain's setting: {policy.mode.value}")
        if policy.source == "setting" and mode.uses_dane:
            meaning = (f"DANE does not apply ({dnssec or 'an address has no TLSA'}): opportunistic TLS "
                       "(RFC 7672 2.2)")
        elif policy.source == "setting" and mode is DownstreamTls.MTA_STS:
            meaning = "no MTA-STS policy in force: opportunistic TLS (RFC 8461 5.1)"
        out.servers.append(ServerPolicyReport(server, policy.source, policy.mode.value, meaning, dnssec=dnssec,
                                              tlsa=tlsa, requiretls=_requiretls(policy.source, policy.mode)))
    return out


async def explain_destination(domain: str, mode: DownstreamTls, targets: list[tuple[str, int, str]],
                              settings: DownstreamSettings, *,
                              sts_fallback: bool = False) -> list[ServerPolicyReport]:
    """:func:`explain_route` for an outbound destination: each MX address as the next delivery
    would treat it (DANE, then MTA-STS, else opportunistic, or an override's mode).

    Args:
        domain: the destination domain (the MTA-STS policy domain).
        mode: the route's mode (:func:`mxguard.relay.destinations.destination_route`).
        targets: ``(MX host, port, address)`` in the order delivery tries them.
        settings: ``[downstream]``.
        sts_fallback: the route's MTA-STS-where-DANE-does-not-apply flag.

    Returns:
        One report per target; refusals are reports (``source == "refused"``), never raised.
    """
    sts = sts_fetcher(settings.dns_servers, settings.dns_timeout, settings.mta_sts_ca_file, settings.mta_sts_port)
    out: list[ServerPolicyReport] = []
    for host, port, address in targets:
        server = f"{host}:{port} [{address}]"
        try:
            policy = await resolve_server_policy(mode, host, port, dns_servers=settings.dns_servers,
                                                 timeout=settings.dns_timeout, policy_domain=domain, sts=sts,
                                                 address=address, sts_fallback=sts_fallback)
        except PolicyRefusal as refusal:
            out.append(ServerPolicyReport(server, "refused", mode.value,
                                          f"not used: {refusal.reason}; deliveries defer with 451 4.7.5",
                                          refusal=refusal.reason, result_type=refusal.result_type,
                                          requiretls="refused: the server is not used"))
            continue
        dnssec, tlsa = _tlsa_lines(policy.dane)
        meaning = _MEANING.get(policy.source, f"{policy.mode.value} TLS")
        if policy.source == "setting" and mode.uses_dane:
            meaning = f"DANE does not apply ({dnssec or 'no TLSA lookup'}): opportunistic TLS (RFC 7672 2.2)"
        elif policy.source == "setting" and (mode is DownstreamTls.MTA_STS or sts_fallback):
            meaning = "no DANE and no MTA-STS policy in force: opportunistic TLS"
        out.append(ServerPolicyReport(server, policy.source, policy.mode.value, meaning, dnssec=dnssec, tlsa=tlsa,
                                      requiretls=_requiretls(policy.source, policy.mode)))
    return out
