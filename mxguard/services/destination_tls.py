"""Per-destination TLS overrides for outbound delivery (Postfix ``smtp_tls_policy_maps``).

One table for the whole gateway (destinations are internet domains, not an organization's),
so only administrators change it. Every change is validated, audited and bumps the
configuration generation. The levels and matching are :mod:`mxguard.relay.destinations`'.
"""

from __future__ import annotations

import os

from sqlalchemy import select

from dataclasses import dataclass, field
from typing import Any

from mxguard.config import DownstreamSettings
from mxguard.errors import AlreadyExists, NotFound, ValidationFailed
from mxguard.relay.destinations import LEVELS, DestinationTls, destination_route, matching_override
from mxguard.relay.mx import MxFailure, resolve_mx
from mxguard.tls.explain import ServerPolicyReport, explain_destination
from mxguard.services import audit
from mxguard.services.access import SYSTEM, Actor
from mxguard.services.domains import bump_generation, normalize_domain_name
from mxguard.storage.db import Store
from mxguard.storage.models import DestinationTlsPolicy


def normalize_pattern(text: str) -> str:
    """``example.org`` or ``.example.org``, lower-case A-labels.

    Raises:
        ValidationFailed: (``pattern``) neither a domain nor ``.`` + domain.
    """
    raw = (text or "").strip()
    suffix = raw.startswith(".")
    try:
        domain = normalize_domain_name(raw[1:] if suffix else raw)
    except ValidationFailed:
        raise ValidationFailed("pattern", f"{text!r} is not a domain (example.org) or a suffix "
                                          "(.example.org)") from None
    return ("." if suffix else "") + domain


def validate(pattern: str, level: str, ca_file: str | None = None) -> DestinationTls:
    """An override from operator input.

    Raises:
        ValidationFailed: a bad ``pattern``, a ``level`` not in :data:`LEVELS`, or a ``ca_file``
            that does not exist or is given for a level other than ``verify``.
    """
    pattern = normalize_pattern(pattern)
    level = (level or "").strip().lower()
    if level not in LEVELS:
        raise ValidationFailed("level", f"{level!r} is not one of: {', '.join(LEVELS)}")
    if ca_file:
        if level != "verify":
            raise ValidationFailed("ca_file", "a CA file is used by the level 'verify' only")
        ca_file = os.path.abspath(ca_file)
        if not os.path.isfile(ca_file):
            raise ValidationFailed("ca_file", f"{ca_file} does not exist")
    return DestinationTls(pattern, level, ca_file or None)


def _view(row: DestinationTlsPolicy) -> DestinationTls:
    return DestinationTls(row.pattern, row.level, row.ca_file)


async def add_override(store: Store, pattern: str, level: str, *, ca_file: str | None = None,
                       replace: bool = False, actor: Actor = SYSTEM) -> DestinationTls:
    """Add (or with ``replace``, change) the override for a destination pattern.

    Raises:
        PermissionDenied: the actor is not an administrator.
        ValidationFailed: see :func:`validate`.
        AlreadyExists: the pattern has an override and ``replace`` is false.
    """
    actor.require_admin()
    view = validate(pattern, level, ca_file)
    async with store.session() as session:
        row = (await session.execute(select(DestinationTlsPolicy).where(
            DestinationTlsPolicy.pattern == view.pattern))).scalar_one_or_none()
        before = _view(row).as_dict() if row is not None else None
        if row is not None and not replace:
            raise AlreadyExists(f"{view.pattern} has a TLS override already ({row.level}); remove or replace it")
        if row is None:
            session.add(DestinationTlsPolicy(pattern=view.pattern, level=view.level, ca_file=view.ca_file))
        else:
            row.level, row.ca_file = view.level, view.ca_file
        audit.record(session, actor, "relay.destination_tls.set", view.pattern, before=before, after=view.as_dict())
        await bump_generation(session)
        await session.commit()
    return view


async def list_overrides(store: Store, *, actor: Actor = SYSTEM) -> list[DestinationTls]:
    """Every override, by pattern.

    Raises:
        PermissionDenied: the actor is not an administrator.
    """
    actor.require_admin()
    async with store.session() as session:
        rows = (await session.execute(select(DestinationTlsPolicy).order_by(DestinationTlsPolicy.pattern))).scalars()
        return [_view(r) for r in rows]


async def remove_override(store: Store, pattern: str, *, actor: Actor = SYSTEM) -> DestinationTls:
    """Remove the override for a pattern.

    Raises:
        PermissionDenied: the actor is not an administrator.
        ValidationFailed: ``pattern`` is not a pattern.
        NotFound: no override for it.
    """
    actor.require_admin()
    pattern = normalize_pattern(pattern)
    async with store.session() as session:
        row = (await session.execute(select(DestinationTlsPolicy).where(
            DestinationTlsPolicy.pattern == pattern))).scalar_one_or_none()
        if row is None:
            raise NotFound(f"no TLS override for {pattern}")
        view = _view(row)
        await session.delete(row)
        audit.record(session, actor, "relay.destination_tls.remove", pattern, before=view.as_dict())
        await bump_generation(session)
        await session.commit()
    return view


async def all_overrides(store: Store) -> list[DestinationTls]:
    """Every override, for delivery (no actor: the gateway's own read)."""
    async with store.session() as session:
        return [_view(r) for r in (await session.execute(select(DestinationTlsPolicy))).scalars()]


@dataclass
class DestinationReport:
    """How mail to a destination would go now (``destination-tls show``, the console).

    Attributes:
        domain: the destination domain.
        override: the matching override, if any.
        mode: the route's TLS mode (``dane`` with ``mta_sts`` fallback is the default over a
            DNSSEC-validated MX answer, ``mta-sts`` over an unsigned one).
        sts_fallback: MTA-STS decides where DANE does not apply.
        mx_secure: the MX answer was DNSSEC-validated.
        hosts: ``[(MX host, preference, [addresses])]`` in the order tried.
        servers: the resolver's decision per address.
        failure: the reply when there is no host (null MX, no such domain, DNS failure).
    """

    domain: str
    override: DestinationTls | None = None
    mode: str = ""
    sts_fallback: bool = False
    mx_secure: bool = False
    hosts: list[tuple[str, int, list[str]]] = field(default_factory=list)
    servers: list[ServerPolicyReport] = field(default_factory=list)
    failure: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "override": self.override.as_dict() if self.override else None,
                "mode": self.mode, "sts_fallback": self.sts_fallback, "mx_secure": self.mx_secure,
                "hosts": [{"name": h, "preference": p, "addresses": a} for h, p, a in self.hosts],
                "servers": [s.as_dict() for s in self.servers], "failure": self.failure}


async def explain(store: Store, settings: DownstreamSettings, domain: str, *,
                  actor: Actor = SYSTEM) -> DestinationReport:
    """Look the destination up as the next outbound delivery would (MX, override, TLS per
    address); DNS lookups and an MTA-STS fetch only, no SMTP connection.

    Raises:
        PermissionDenied: the actor is not an administrator.
        ValidationFailed: (``domain``) not a domain name.
    """
    actor.require_admin()
    name = normalize_domain_name(domain)
    override = matching_override(name, await all_overrides(store))
    report = DestinationReport(name, override)
    try:
        mx = await resolve_mx(name, dns_servers=settings.dns_servers, timeout=settings.dns_timeout,
                              max_hosts=settings.outbound_max_mx, max_addresses=settings.outbound_max_addresses)
    except MxFailure as failure:
        report.failure = failure.reply.one_line()
        return report
    route = destination_route(mx, override, port=settings.outbound_port)
    report.mode, report.sts_fallback, report.mx_secure = route.tls.value, route.sts_fallback, mx.secure
    report.hosts = [(h.name, h.preference, list(h.addresses)) for h in mx.hosts]
    report.servers = await explain_destination(name, route.tls, list(route.addresses), settings,
                                               sts_fallback=route.sts_fallback)
    return report
