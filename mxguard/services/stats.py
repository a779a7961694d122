"""Figures for the dashboard and the TLS page, computed in SQL from the message log.

All times are UTC. Aggregation runs in the database (GROUP BY, conditional
sums), so the cost does not grow with what Python holds in memory.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Integer, case, func, select

from mxguard.services.access import Actor
from mxguard.services.domains import list_domains
from mxguard.services.messages import visible_domains
from mxguard.storage.db import Store
from mxguard.storage.messagelog import recipient_domain_clause
from mxguard.storage.models import MessageLogEntry as M


@dataclass(frozen=True)
class TlsShare:
    """TLS counts over a window.

    Attributes:
        transactions: message-log records in the window.
        inbound_tls: of those, how many senders used STARTTLS.
        downstream: records with a downstream connection.
        downstream_tls: of those, over TLS.
        downstream_verified: of those, with a verified certificate (or pinned fingerprint).
    """

    transactions: int = 0
    inbound_tls: int = 0
    downstream: int = 0
    downstream_tls: int = 0
    downstream_verified: int = 0

    @staticmethod
    def _pct(part: int, whole: int) -> float | None:
        return round(100.0 * part / whole, 1) if whole else None

    @property
    def inbound_pct(self) -> float | None:
        return self._pct(self.inbound_tls, self.transactions)

    @property
    def downstream_pct(self) -> float | None:
        return self._pct(self.downstream_tls, self.downstream)

    @property
    def verified_pct(self) -> float | None:
        return self._pct(self.downstream_verified, self.downstream)


def _true(col):
    return func.coalesce(func.sum(case((col.is_(True), 1), else_=0)), 0)


async def tls_share(store: Store, since: dt.datetime, *, domains: list[str] | None = None) -> TlsShare:
    """TLS counts since ``since``; ``domains`` restricts to transactions with a recipient there."""
    q = select(func.count(), _true(M.inbound_tls), func.count(M.downstream_tls), _true(M.downstream_tls),
               _true(M.downstream_verified)).where(M.ts >= since)
    if domains is not None:
        q = q.where(recipient_domain_clause(domains))
    async with store.session() as session:
        row = (await session.execute(q)).one()
    return TlsShare(*(int(v or 0) for v in row))


def _hour_bucket(store: Store):
    if store.is_postgres:
        return func.to_char(func.date_trunc("hour", func.timezone("UTC", M.ts)), "YYYY-MM-DD HH24:00")
    return func.strftime("%Y-%m-%d %H:00", M.ts)


async def hourly_dispositions(store: Store, actor: Actor, *, hours: int = 24,
                              now: dt.datetime | None = None) -> tuple[list[str], dict[str, list[int]]]:
    """Messages per hour by disposition for the last ``hours`` hours.

    Returns:
        ``(hour labels "YYYY-MM-DD HH:00", {disposition: [count per hour]})``.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    end = now.replace(minute=0, second=0, microsecond=0)
    labels = [(end - dt.timedelta(hours=h)).strftime("%Y-%m-%d %H:00") for h in range(hours - 1, -1, -1)]
    bucket = _hour_bucket(store).label("bucket")
    q = (select(bucket, M.disposition, func.count().cast(Integer))
         .where(M.ts >= end - dt.timedelta(hours=hours - 1)).group_by(bucket, M.disposition))
    domains = await visible_domains(store, actor)
    if domains is not None:
        q = q.where(recipient_domain_clause(domains))
    async with store.session() as session:
        rows = (await session.execute(q)).all()
    index = {label: i for i, label in enumerate(labels)}
    series: dict[str, list[int]] = {}
    for label, disposition, count in rows:
        if label in index:
            series.setdefault(disposition, [0] * len(labels))[index[label]] += int(count)
    return labels, dict(sorted(series.items()))


async def overall_tls(store: Store, actor: Actor, *, hours: int = 24) -> TlsShare:
    """TLS counts of everything the actor may see, over the last ``hours`` hours."""
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours)
    return await tls_share(store, since, domains=await visible_domains(store, actor))


async def per_domain_tls(store: Store, actor: Actor) -> list[tuple[str, TlsShare, TlsShare]]:
    """For each domain the actor may see: ``(name, last 24 h, last 30 days)``."""
    now = dt.datetime.now(dt.timezone.utc)
    out = []
    for d in await list_domains(store, actor=actor):
        day = await tls_share(store, now - dt.timedelta(hours=24), domains=[d.name])
        month = await tls_share(store, now - dt.timedelta(days=30), domains=[d.name])
        out.append((d.name, day, month))
    return out
