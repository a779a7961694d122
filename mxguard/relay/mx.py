"""MX resolution for outbound delivery (RFC 5321 section 5.1, RFC 7505), through the configured
resolver (``[downstream] dns_servers``, :func:`mxguard.tls.resolver.dns_resolver`).

* MX records in preference order, lowest first; hosts of equal preference in random order
  (RFC 5321 section 5.1: "SHOULD be tried in random order" to spread the load).
* No MX records (but the name exists): the domain itself is the implicit MX, preference 0.
* Null MX (``0 .``, RFC 7505): the domain takes no mail, ``556 5.1.10`` (permanent).
* NXDOMAIN: ``550 5.1.2`` (permanent: the destination domain does not exist).
* SERVFAIL, timeouts, no server answering: ``451 4.4.3`` (temporary: directory server failure).
* Each MX host's IPv6 (AAAA) and IPv4 (A) addresses; a host without any is skipped. When no
  host has an address: ``451 4.4.3`` if a lookup failed, else ``550 5.4.4`` (no route).

The MX answer's DNSSEC status (the AD bit of a validating resolver) is kept: DANE applies to
the MX hosts only when the MX RRset itself is validated (RFC 7672 section 2.2.1).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.resolver
import structlog

from mxguard.smtp.replies import Reply
from mxguard.tls.resolver import dns_resolver

log = structlog.get_logger("mxguard.relay")


@dataclass(frozen=True)
class MxHost:
    """One MX host.

    Attributes:
        name: the host name, lower-case, no trailing dot.
        preference: the MX preference (lower first).
        addresses: IPv6 then IPv4 addresses, as text.
    """

    name: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class MxResult:
    """Where mail for a destination domain goes.

    Attributes:
        domain: the destination domain.
        hosts: the usable hosts in the order to try.
        secure: the MX answer (or, for an implicit MX, the domain's address answer) was
            DNSSEC-validated (AD bit).
        implicit: no MX records: the domain itself is the host (RFC 5321 section 5.1).
    """

    domain: str
    hosts: tuple[MxHost, ...]
    secure: bool
    implicit: bool = False


class MxFailure(Exception):
    """No host to deliver to; ``reply`` says why (permanent or temporary, with its enhanced code)."""

    def __init__(self, reply: Reply):
        super().__init__(reply.one_line())
        self.reply = reply


def null_mx(domain: str) -> Reply:
    """The permanent refusal for a domain that publishes a null MX (RFC 7505 section 4.2)."""
    return Reply(556, "5.1.10", f"{domain} accepts no mail (null MX, RFC 7505)")


def _temporary(domain: str, what: str) -> Reply:
    return Reply(451, "4.4.3", f"DNS lookup of {what} for {domain} failed; will try again")


async def _addresses(resolver, host: str, limit: int) -> tuple[tuple[str, ...], bool]:
    """``(addresses, a lookup failed)``: AAAA then A, at most ``limit``."""
    found: list[str] = []
    failed = False
    for rdtype in ("AAAA", "A"):
        try:
            answer = await resolver.resolve(host, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.YXDOMAIN):
            failed = True
            continue
        found.extend(r.address for r in answer if r.address not in found)
    return tuple(found[:limit]), failed


async def resolve_mx(domain: str, *, dns_servers: list[str], timeout: float = 5.0, max_hosts: int = 5,
                     max_addresses: int = 4, rng: random.Random | None = None) -> MxResult:
    """The hosts and addresses to try for ``domain``, in order.

    Args:
        domain: the destination domain (A-labels; a trailing dot is ignored).
        dns_servers: ``HOST[:PORT]`` resolvers (``[downstream] dns_servers``; empty: the system's).
        timeout: seconds per lookup.
        max_hosts: at most this many MX hosts (the most preferred).
        max_addresses: at most this many addresses per host.
        rng: the shuffle of equal preferences (tests pass a seeded one).

    Returns:
        the :class:`MxResult` (at least one host with an address).

    Raises:
        MxFailure: null MX (``556 5.1.10``), no such domain (``550 5.1.2``), a DNS failure
            (``451 4.4.3``), or no host with an address (``550 5.4.4``).
    """
    domain = domain.rstrip(".").lower()
    rng = rng or random.Random()
    resolver = dns_resolver(dns_servers, timeout)
    resolver.flags = dns.flags.RD | dns.flags.AD
    implicit = False
    try:
        answer = await resolver.resolve(domain, "MX")
        secure = bool(answer.response.flags & dns.flags.AD)
        records = [(r.preference, str(r.exchange).rstrip(".").lower()) for r in answer]
    except dns.resolver.NXDOMAIN:
        raise MxFailure(Reply(550, "5.1.2", f"{domain} does not exist (NXDOMAIN)")) from None
    except dns.resolver.NoAnswer as exc:
        response = exc.kwargs.get("response")
        secure = bool(response is not None and response.flags & dns.flags.AD)
        records, implicit = [(0, domain)], True
    except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.YXDOMAIN):
        raise MxFailure(_temporary(domain, "the MX records")) from None
    if any(host == "" for _, host in records):
        # RFC 7505 section 3: "0 ." is the only MX of such a domain; a "." among others is
        # no host either, and the domain's intent is clear: no mail.
        raise MxFailure(null_mx(domain))
    by_preference: dict[int, list[str]] = {}
    for preference, host in records:
        by_preference.setdefault(preference, [])
        if host not in by_preference[preference]:
            by_preference[preference].append(host)
    ordered: list[tuple[int, str]] = []
    for preference in sorted(by_preference):
        hosts = by_preference[preference]
        rng.shuffle(hosts)
        ordered.extend((preference, h) for h in hosts)
    usable: list[MxHost] = []
    lookup_failed = False
    for preference, host in ordered[:max_hosts]:
        addresses, failed = await _addresses(resolver, host, max_addresses)
        lookup_failed = lookup_failed or failed
        if addresses:
            usable.append(MxHost(host, preference, addresses))
        else:
            log.info("MX host has no address; skipped", domain=domain, host=host, lookup_failed=failed)
    if not usable:
        if lookup_failed:
            raise MxFailure(_temporary(domain, "the MX hosts' addresses"))
        what = "the domain" if implicit else "any MX host"
        raise MxFailure(Reply(550, "5.4.4", f"no address for {what} of {domain}: mail cannot be routed"))
    return MxResult(domain, tuple(usable), secure, implicit)
