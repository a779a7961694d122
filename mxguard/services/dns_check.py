"""DNS check: are the records a hosted MTA-STS domain needs published, and with the right values?

Reads, through the configured stub resolver (:func:`mxguard.tls.resolver.dns_resolver`), the
domain's MX records, the policy host ``mta-sts.<domain>``, ``_mta-sts.<domain>`` TXT
(RFC 8461 section 3.1) and ``_smtp._tls.<domain>`` TXT (RFC 8460 section 3), and says per
record: ``ok``, ``mismatch``, ``missing`` or ``error`` (the lookup itself failed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver
import structlog

from mxguard.config import Settings
from mxguard.services.hosted_sts import HOST_PREFIX, HostedPolicy
from mxguard.tls.mta_sts import PolicyError, parse_txt
from mxguard.tls.resolver import dns_resolver

log = structlog.get_logger("mxguard.mta_sts")

OK, MISMATCH, MISSING, ERROR = "ok", "mismatch", "missing", "error"


@dataclass(frozen=True)
class RecordCheck:
    """The outcome for one record.

    Attributes:
        name: owner name with the trailing dot.
        type: ``MX``, ``CNAME`` (policy host; A/AAAA accepted), ``TXT``.
        expected: what should be there (zone-file value; ``(none)`` when nothing should).
        found: what the resolver answered, one string per record (``[]``: nothing).
        status: ``ok``, ``mismatch``, ``missing`` or ``error``.
        detail: why, in one sentence.
    """

    name: str
    type: str
    expected: str
    found: list[str]
    status: str
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


class _Lookup:
    """One resolver for the whole check; answers as text, and ``None`` for NXDOMAIN/no data."""

    def __init__(self, resolver: dns.asyncresolver.Resolver):
        self.resolver = resolver

    async def records(self, name: str, rdtype: str) -> tuple[list, str | None]:
        """``(rdata list, canonical name when a CNAME was followed)``; ``([], None)`` when none.

        Raises:
            dns.exception.DNSException: the lookup failed (timeout, SERVFAIL, no server answered).
        """
        try:
            answer = await self.resolver.resolve(name, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], None
        canonical = answer.canonical_name.to_text().lower()
        return list(answer), (canonical if canonical != name.lower() else None)

    async def txt(self, name: str) -> list[str]:
        rdatas, _ = await self.records(name, "TXT")
        # A TXT record's strings are one value (RFC 7208 3.3 reads them so; RFC 8461 does too).
        return [b"".join(r.strings).decode("utf-8", "replace") for r in rdatas]

    async def addresses(self, name: str) -> tuple[set[str], str | None]:
        found: set[str] = set()
        canonical = None
        for rdtype in ("A", "AAAA"):
            rdatas, cname = await self.records(name, rdtype)
            found.update(r.address for r in rdatas)
            canonical = canonical or cname
        return found, canonical


def _failed(name: str, rdtype: str, expected: str, exc: Exception) -> RecordCheck:
    return RecordCheck(name, rdtype, expected, [], ERROR, f"lookup failed: {type(exc).__name__}")


async def _check_mx(lookup: _Lookup, policy: HostedPolicy) -> RecordCheck:
    name = f"{policy.domain}."
    expected = ", ".join(f"10 {h}." for h in policy.mx)
    try:
        rdatas, _ = await lookup.records(name, "MX")
    except dns.exception.DNSException as exc:
        return _failed(name, "MX", expected, exc)
    found = sorted(f"{r.preference} {r.exchange.to_text().lower()}" for r in rdatas)
    hosts = {r.exchange.to_text().rstrip(".").lower() for r in rdatas}
    if not hosts:
        return RecordCheck(name, "MX", expected, found, MISSING, "no MX record: mail for the domain does not "
                                                                  "come to the gateway")
    extra, absent = sorted(hosts - set(policy.mx)), sorted(set(policy.mx) - hosts)
    if extra:
        # RFC 8461 section 4.1: under enforce, senders skip MX hosts the policy does not list.
        return RecordCheck(name, "MX", expected, found, MISMATCH,
                           f"MX host(s) {', '.join(extra)} are not the gateway's: not in the policy's mx lines")
    if absent:
        return RecordCheck(name, "MX", expected, found, MISMATCH, f"no MX record for {', '.join(absent)}")
    return RecordCheck(name, "MX", expected, found, OK, "every MX host is the gateway's")


async def _check_policy_host(lookup: _Lookup, policy: HostedPolicy) -> RecordCheck:
    name = f"{HOST_PREFIX}{policy.domain}."
    expected = f"{policy.gateway_host}."
    gateway_names = {policy.gateway_host, *policy.mx}
    try:
        found_addresses, canonical = await lookup.addresses(name)
        gateway_addresses: set[str] = set()
        for host in sorted(gateway_names):
            gateway_addresses |= (await lookup.addresses(f"{host}."))[0]
    except dns.exception.DNSException as exc:
        return _failed(name, "CNAME", expected, exc)
    found = ([f"CNAME {canonical}"] if canonical else []) + sorted(found_addresses)
    if canonical and canonical.rstrip(".") in gateway_names:
        return RecordCheck(name, "CNAME", expected, found, OK, "points at the gateway")
    if not found_addresses:
        return RecordCheck(name, "CNAME", expected, found, MISSING,
                           "the policy host has no address: senders cannot fetch the policy")
    if gateway_addresses and found_addresses <= gateway_addresses:
        return RecordCheck(name, "CNAME", expected, found, OK, "its addresses are the gateway's")
    known = ", ".join(sorted(gateway_addresses)) or "none found"
    return RecordCheck(name, "CNAME", expected, found, MISMATCH,
                       f"its addresses are not the gateway's ({known})")


async def _check_sts_txt(lookup: _Lookup, policy: HostedPolicy) -> RecordCheck:
    name = f"_mta-sts.{policy.domain}."
    expected = f"v=STSv1; id={policy.policy_id}" if policy.served else "(none)"
    try:
        values = await lookup.txt(name)
    except dns.exception.DNSException as exc:
        return _failed(name, "TXT", expected, exc)
    records = [v for v in values if v.startswith("v=STSv1")]
    if not policy.served:
        if records:
            return RecordCheck(name, "TXT", expected, values, MISMATCH,
                               "the gateway serves no policy for the domain (mode off): remove the record")
        return RecordCheck(name, "TXT", expected, values, OK, "no policy announced, none served")
    if not records:
        return RecordCheck(name, "TXT", expected, values, MISSING, "no v=STSv1 record: senders look for no policy")
    try:
        found_id = parse_txt(values)
    except PolicyError as exc:
        return RecordCheck(name, "TXT", expected, values, MISMATCH, str(exc))
    if found_id is None:
        return RecordCheck(name, "TXT", expected, values, MISMATCH,
                           "more than one v=STSv1 record: senders take that as no policy (RFC 8461 3.1)")
    if found_id != policy.policy_id:
        return RecordCheck(name, "TXT", expected, values, MISMATCH,
                           f"id {found_id} is not the current policy's {policy.policy_id}: senders keep a "
                           "cached older policy")
    return RecordCheck(name, "TXT", expected, values, OK, "announces the current policy")


async def _check_tlsrpt(lookup: _Lookup, policy: HostedPolicy) -> RecordCheck:
    name = f"_smtp._tls.{policy.domain}."
    expected = policy.tlsrpt_suggestion
    try:
        values = await lookup.txt(name)
    except dns.exception.DNSException as exc:
        return _failed(name, "TXT", expected, exc)
    records = [v for v in values if v.startswith("v=TLSRPTv1")]
    if not records:
        return RecordCheck(name, "TXT", expected, values, MISSING, "no v=TLSRPTv1 record: no TLS reports")
    if len(records) > 1:
        return RecordCheck(name, "TXT", expected, values, MISMATCH,
                           "more than one v=TLSRPTv1 record: senders send no reports (RFC 8460 3)")
    fields = dict(part.strip().partition("=")[::2] for part in records[0].split(";") if part.strip())
    targets = [t.strip() for t in fields.get("rua", "").split(",") if t.strip()]
    if not targets or not all(t.startswith(("mailto:", "https:")) for t in targets):
        return RecordCheck(name, "TXT", expected, values, MISMATCH, "rua must name mailto: or https: targets")
    return RecordCheck(name, "TXT", expected, values, OK, f"reports go to {', '.join(targets)}")


async def check_records(policy: HostedPolicy, resolver: dns.asyncresolver.Resolver) -> list[RecordCheck]:
    """Look every record of :meth:`HostedPolicy.records` up and compare.

    Args:
        policy: the domain's hosted policy (its id is the expected ``_mta-sts`` id).
        resolver: the stub resolver (``dns_resolver(settings.downstream.dns_servers or
            settings.filters.dns_servers, ...)``).

    Returns:
        MX, then (while served) the policy host, then ``_mta-sts`` TXT, then ``_smtp._tls`` TXT.
        A failed lookup is a row with status ``error``, never an exception.
    """
    lookup = _Lookup(resolver)
    checks = [await _check_mx(lookup, policy)]
    if policy.served:
        checks.append(await _check_policy_host(lookup, policy))
    checks.append(await _check_sts_txt(lookup, policy))
    checks.append(await _check_tlsrpt(lookup, policy))
    log.info("DNS check", domain=policy.domain, results={c.name: c.status for c in checks})
    return checks


def settings_resolver(settings: Settings) -> dns.asyncresolver.Resolver:
    """The stub resolver the check asks: ``downstream.dns_servers``, else ``filters.dns_servers``,
    else the system's; ``downstream.dns_timeout`` seconds per lookup."""
    servers = settings.downstream.dns_servers or settings.filters.dns_servers
    return dns_resolver(list(servers), settings.downstream.dns_timeout)
