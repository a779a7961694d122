"""Which downstream route a recipient's mail takes, from an in-memory copy of the domain table.

The directory is loaded at start-up and reloaded when the database's
configuration generation moves (polled about once a second, and at once for
changes made inside this process), so each RCPT costs a dictionary lookup,
not a query.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from email.parser import BytesHeaderParser
from email.policy import compat32

import dns.exception
import dns.resolver
import structlog

from mxguard.netaddr import parse_host_port
from mxguard.services.domains import DomainView, current_generation, list_domains
from mxguard.storage.db import SQLAlchemyError, Store
from mxguard.tls.policy import DownstreamTls
from mxguard.tls.resolver import dns_resolver

log = structlog.get_logger("mxguard.routing")


@dataclass(frozen=True)
class Route:
    """Where and how mail for a domain is delivered.

    Two domains with the same servers and the same TLS policy share a route,
    and so share one downstream connection within a session.

    Attributes:
        servers: ``(host, port)`` pairs in failover order.
        tls: downstream TLS mode.
        ca_file: CA bundle for ``verify`` (``None``: system trust store).
        fingerprint: pinned SHA-256 of the server certificate for ``verify``.
        min_version: lowest TLS version, ``"1.2"`` or ``"1.3"``.
    """

    servers: tuple[tuple[str, int], ...]
    tls: DownstreamTls
    ca_file: str | None = None
    fingerprint: str | None = None
    min_version: str = "1.2"
    #: CRL checked against the server's leaf certificate in ``verify`` mode by CA chain.
    crl_file: str | None = None
    #: The recipient domain whose MTA-STS policy applies (``mta-sts`` mode only; RFC 8461
    #: policies belong to a domain, so such routes are not shared between domains).
    policy_domain: str | None = None
    #: This route is a ``dane``/``dane-only``/``mta-sts`` route relaxed to opportunistic by the
    #: message's ``TLS-Required: No`` (RFC 8689 section 5); see :func:`route_for_message`.
    relaxed: bool = False
    #: Outbound delivery (:mod:`mxguard.relay.destinations`): ``(MX host, port, address)`` in the
    #: order to try, IPv6 and IPv4, resolved already; when set, the connection tries these
    #: instead of ``servers`` (each host's name still decides TLSA, MTA-STS and the TLS name).
    addresses: tuple[tuple[str, int, str], ...] = ()
    #: An internet destination: where DANE does not apply, ``policy_domain``'s MTA-STS policy does
    #: (see :func:`mxguard.tls.resolver.resolve_server_policy`).
    sts_fallback: bool = False

    @classmethod
    def for_domain(cls, domain: DomainView) -> "Route":
        tls = DownstreamTls(domain.downstream_tls)
        return cls(
            servers=tuple(parse_host_port(s, default_port=25) for s in domain.servers),
            tls=tls,
            ca_file=domain.tls_ca_file,
            fingerprint=domain.tls_fingerprint,
            min_version=domain.tls_min_version,
            crl_file=domain.tls_crl_file if tls is DownstreamTls.VERIFY else None,
            policy_domain=domain.name if tls is DownstreamTls.MTA_STS else None,
        )

    def describe(self) -> str:
        relaxed = " (TLS-Required: No)" if self.relaxed else ""
        tls = self.tls.value + ("+mta-sts" if self.sts_fallback else "")
        return ",".join(f"{h}:{p}" for h, p in self.servers) + f" tls={tls}{relaxed}"


#: Modes whose TLS requirement comes from what the destination publishes (DANE, MTA-STS).
PUBLISHED_POLICY_MODES = (DownstreamTls.DANE, DownstreamTls.DANE_ONLY, DownstreamTls.MTA_STS)


def sender_opted_out(message: bytes) -> bool:
    """The message carries ``TLS-Required: No`` (RFC 8689 section 5)."""
    head = message.split(b"\r\n\r\n", 1)[0][:65536]
    values = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n").get_all("TLS-Required") or []
    return any(str(v).strip().lower() == "no" for v in values)


def route_for_message(route: Route, message: bytes, *, requiretls: bool = False) -> Route:
    """The route with ``TLS-Required: No`` applied (RFC 8689 section 5).

    The sender's header relaxes only what the destination publishes: a ``dane``,
    ``dane-only`` or ``mta-sts`` route becomes ``opportunistic`` (STARTTLS when
    offered). The administrator's own ``required``/``verify`` stays, and with
    REQUIRETLS the header is ignored, as the RFC says.
    """
    if requiretls or route.tls not in PUBLISHED_POLICY_MODES or not sender_opted_out(message):
        return route
    return replace(route, tls=DownstreamTls.OPPORTUNISTIC, relaxed=True)


class DomainDirectory:
    """In-memory map of served domains, kept in step with the database.

    Args:
        store: the database.
        poll_interval: seconds between generation checks.
    """

    def __init__(self, store: Store, poll_interval: float = 1.0):
        self.store = store
        self.poll_interval = poll_interval
        self._domains: dict[str, DomainView] = {}
        self._routes: dict[str, Route] = {}
        self._generation: int | None = None
        self._task: asyncio.Task | None = None
        self.loaded_at = 0.0
        #: Coroutine functions called after every (re)load: other caches that follow the
        #: configuration generation (the recipients' sender lists).
        self.listeners: list[Callable[[], Awaitable[None]]] = []

    async def load(self) -> None:
        """Read every domain now (raises SQLAlchemyError if the database is down)."""
        generation = await current_generation(self.store)
        domains = await list_domains(self.store)
        self._domains = {d.name: d for d in domains}
        self._routes = {d.name: Route.for_domain(d) for d in domains}
        self._generation = generation
        self.loaded_at = time.monotonic()
        log.debug("domains loaded", count=len(domains), generation=generation)
        for listener in self.listeners:
            await listener()

    async def refresh_if_changed(self) -> bool:
        """Reload when the configuration generation moved; True if it did."""
        generation = await current_generation(self.store)
        if generation != self._generation:
            await self.load()
            return True
        return False

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="domain-directory-poll")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.refresh_if_changed()
            except (SQLAlchemyError, OSError) as exc:
                # Keep serving with the last known configuration.
                log.warning("cannot refresh domains; using the last loaded set", error=str(exc).splitlines()[0])

    def lookup(self, address: str) -> tuple[DomainView, Route] | None:
        """The domain and route for a recipient address, or ``None`` if not served."""
        _, _, domain = address.rpartition("@")
        domain = domain.rstrip(".").lower()
        if domain.startswith("[") or not domain:
            return None  # address literals are never served
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
        view = self._domains.get(domain)
        return (view, self._routes[domain]) if view else None

    def domains(self) -> list[DomainView]:
        return list(self._domains.values())


async def external_route(domain: str, *, relay: str = "", nameservers: list[str] | None = None) -> Route | None:
    """How the gateway's own mail (DSNs, notifications) reaches a domain it does not serve.

    Through ``relay`` (``HOST:PORT``) when set, else the domain's MX hosts in
    preference order, port 25 (RFC 5321 section 5.1; no MX record: the domain
    itself, the implicit MX). TLS is opportunistic: such a message is never
    held back for want of TLS.

    Args:
        domain: the recipient domain.
        relay: the ``dsn.relay`` setting.
        nameservers: ``HOST[:PORT]`` resolvers; the system resolver when empty.

    Returns:
        the route, or ``None`` for a null MX (RFC 7505) or a domain that does not exist.
    """
    if relay:
        return Route(servers=(parse_host_port(relay, default_port=25),), tls=DownstreamTls.OPPORTUNISTIC)
    resolver = dns_resolver(nameservers or [], 10.0)
    try:
        answer = await resolver.resolve(domain, "MX")
        mxs = sorted((r.preference, str(r.exchange).rstrip(".")) for r in answer)
        if mxs == [(0, "")]:
            return None  # null MX: the domain accepts no mail
        servers = tuple((host, 25) for _, host in mxs)
    except dns.resolver.NoAnswer:
        servers = ((domain, 25),)  # implicit MX: the domain's own address
    except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers, dns.exception.Timeout):
        return None
    return Route(servers=servers, tls=DownstreamTls.OPPORTUNISTIC)
