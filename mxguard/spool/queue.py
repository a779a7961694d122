"""The spool table: enqueue sealed copies, claim due entries, record attempts, and the operator's view.

Claiming follows the several-nodes design: on PostgreSQL due rows are taken
with ``SELECT … FOR UPDATE SKIP LOCKED`` and given a lease (owner + expiry),
so each entry is worked on by exactly one worker, and an entry whose worker
died becomes due again when its lease runs out. On SQLite, writes are
serialised by the database and one worker runs per data dir.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mxguard.config import SpoolSettings
from mxguard.errors import Conflict, NotFound
from mxguard.storage.db import Store
from mxguard.storage.models import SpoolAttempt, SpoolEntry, utcnow
from mxguard.storage.sealing import Sealer


def seal_context(txn_id: str) -> bytes:
    """Associated data binding a sealed spool body to its transaction."""
    return b"spool:" + txn_id.encode()


@dataclass
class NewSpoolEntry:
    """What the proxy hands to the spool for one route leg (or a DSN)."""

    txn_id: str
    domain: str
    mail_from: str
    recipients: list[str]
    message: bytes
    subject: str = ""
    body_8bit: bool = False
    smtputf8: bool = False
    #: REQUIRETLS (RFC 8689) was asked for: delivered only over verified TLS to a REQUIRETLS server.
    requiretls: bool = False
    sender_aligned: bool = False
    kind: str = "message"
    first_reply: str = ""
    #: Try at once instead of after the first retry interval (DSNs).
    due_now: bool = False
    #: The relaying organization of an outbound entry (who may see it besides admins).
    org_id: int | None = None


def backoff(attempts: int, settings: SpoolSettings, rng: random.Random | None = None) -> float:
    """Seconds to wait after ``attempts`` failed attempts: exponential, capped, with jitter.

    ``first_retry * backoff_factor ** (attempts - 1)``, at most ``max_retry``,
    then multiplied by a random factor in ``1 ± jitter``.
    """
    rng = rng or random
    base = min(settings.max_retry, settings.first_retry * settings.backoff_factor ** max(0, attempts - 1))
    return base * (1 + rng.uniform(-settings.jitter, settings.jitter))


def add_entries(session: AsyncSession, entries: list[NewSpoolEntry], sealer: Sealer,
                settings: SpoolSettings, *, now: dt.datetime | None = None) -> list[SpoolEntry]:
    """Stage spool rows in ``session`` (the caller commits: the sender's 250 waits for that commit).

    The first retry is due after ``settings.first_retry`` seconds (with jitter).
    """
    now = now or utcnow()
    rows = []
    for e in entries:
        key_id, blob = sealer.seal(e.message, seal_context(e.txn_id))
        row = SpoolEntry(
            kind=e.kind, txn_id=e.txn_id, created_at=now, expires_at=now + dt.timedelta(seconds=settings.max_age),
            domain=e.domain, mail_from=e.mail_from,
            recipients=[{"rcpt": r, "status": "pending", "reply": e.first_reply} for r in e.recipients],
            size=len(e.message), body_8bit=e.body_8bit, smtputf8=e.smtputf8, requiretls=e.requiretls,
            sender_aligned=e.sender_aligned,
            subject=e.subject[:500], key_id=key_id, body=blob, status="queued", attempts=0,
            next_attempt_at=now if e.due_now else now + dt.timedelta(seconds=backoff(1, settings)),
            last_reply=e.first_reply, org_id=e.org_id)
        session.add(row)
        rows.append(row)
    return rows


async def enqueue(store: Store, entries: list[NewSpoolEntry], sealer: Sealer, settings: SpoolSettings) -> list[int]:
    """Write entries durably (commit before return); returns their ids.

    Raises:
        SQLAlchemyError: nothing was stored; the caller must not accept the message.
    """
    async with store.session() as session:
        rows = add_entries(session, entries, sealer, settings)
        await session.commit()
        return [r.id for r in rows]


async def claim_due(store: Store, owner: str, settings: SpoolSettings, *, limit: int | None = None,
                    ids: list[int] | None = None, now: dt.datetime | None = None) -> list[SpoolEntry]:
    """Take up to ``limit`` due entries for ``owner`` under a lease.

    Args:
        owner: this worker's identity (node + process).
        ids: claim these entries now regardless of their due time (``spool retry``).

    Returns:
        the claimed rows (detached; the lease is committed).
    """
    now = now or utcnow()
    limit = limit or settings.batch
    free = or_(SpoolEntry.lease_until.is_(None), SpoolEntry.lease_until < now)
    q = select(SpoolEntry).where(SpoolEntry.status == "queued", free)
    if ids is not None:
        q = q.where(SpoolEntry.id.in_(ids))
    else:
        q = q.where(SpoolEntry.next_attempt_at <= now)
    q = q.order_by(SpoolEntry.next_attempt_at).limit(limit)
    async with store.session() as session:
        if store.is_postgres:
            q = q.with_for_update(skip_locked=True)
        rows = list((await session.execute(q)).scalars().all())
        if not rows:
            return []
        until = now + dt.timedelta(seconds=settings.lease)
        # Re-check the lease in the UPDATE itself so two SQLite processes cannot both win.
        result = await session.execute(
            update(SpoolEntry).where(SpoolEntry.id.in_([r.id for r in rows]), free)
            .values(lease_owner=owner, lease_until=until).returning(SpoolEntry.id))
        won = {row_id for (row_id,) in result.all()}
        await session.commit()
        claimed = [r for r in rows if r.id in won]
        for r in claimed:
            r.lease_owner, r.lease_until = owner, until
        return claimed


async def record_attempt(store: Store, entry: SpoolEntry, attempt: SpoolAttempt, settings: SpoolSettings,
                         *, now: dt.datetime | None = None) -> SpoolEntry:
    """Save the outcome of one attempt: recipient states, status, next due time; release the lease.

    ``entry.recipients`` must already hold the new per-recipient states.
    """
    now = now or utcnow()
    pending = [r for r in entry.recipients if r["status"] == "pending"]
    entry.attempts += 1
    entry.last_attempt_at = now
    entry.last_reply = attempt.reply
    if not pending:
        entry.status = "delivered" if all(r["status"] == "delivered" for r in entry.recipients) else "failed"
        entry.completed_at = now
    elif now >= entry.expires_at:
        entry.status = "expired"
        entry.completed_at = now
    else:
        # The last attempt happens at expiry, not after it. A spooled inbound message was
        # tried in line before it was spooled (that try is not in ``attempts``); outbound mail
        # is first tried from the spool, so its first retry comes after ``first_retry``.
        failed_tries = entry.attempts + (0 if entry.kind == "outbound" else 1)
        entry.next_attempt_at = min(entry.expires_at,
                                    now + dt.timedelta(seconds=backoff(failed_tries, settings)))
    async with store.session() as session:
        attempt.spool_id = entry.id
        session.add(attempt)
        await session.execute(
            update(SpoolEntry).where(SpoolEntry.id == entry.id).values(
                recipients=entry.recipients, attempts=entry.attempts, last_attempt_at=now,
                last_reply=entry.last_reply, status=entry.status, completed_at=entry.completed_at,
                next_attempt_at=entry.next_attempt_at, lease_owner=None, lease_until=None))
        await session.commit()
    return entry


# -- the operator's view (used through mxguard.services.spool) ----------------------------
#
# ``domains`` restricts every query to what an org-admin may see: a collection of domain
# names (entries of those domains) or a :class:`Scope` (also the organization's outbound
# entries, whatever their destination); ``None`` means no restriction.

@dataclass(frozen=True)
class Scope:
    """An org-admin's share of the spool.

    Attributes:
        domains: the organization's served domains: their inbound entries and DSNs (whose
            ``domain`` is the organization's) are visible.
        org_id: the organization: its outbound entries (``SpoolEntry.org_id``) are visible;
            another organization's outbound entry never is, even to one of these domains.
    """

    domains: frozenset[str]
    org_id: int | None

    def clause(self):
        """The SQL condition for rows inside this scope."""
        own_domain = and_(SpoolEntry.org_id.is_(None), SpoolEntry.kind != "outbound",
                          SpoolEntry.domain.in_(sorted(self.domains)))
        return own_domain if self.org_id is None else or_(SpoolEntry.org_id == self.org_id, own_domain)

    def allows(self, entry: SpoolEntry) -> bool:
        """The Python twin of :meth:`clause` for a loaded row."""
        if entry.org_id is not None:
            return entry.org_id == self.org_id
        return entry.kind != "outbound" and entry.domain in self.domains


def _scoped(q, domains: Collection[str] | Scope | None):
    if domains is None:
        return q
    if isinstance(domains, Scope):
        return q.where(domains.clause())
    return q.where(SpoolEntry.domain.in_(list(domains)))


def _visible(entry: SpoolEntry, domains: Collection[str] | Scope | None) -> bool:
    if domains is None:
        return True
    if isinstance(domains, Scope):
        return domains.allows(entry)
    return entry.domain in domains


async def list_entries(store: Store, *, domain: str | None = None, status: str | None = "queued",
                       limit: int | None = 500, domains: Collection[str] | Scope | None = None) -> list[SpoolEntry]:
    """Entries oldest first; ``status=None`` lists every status, ``limit=None`` every entry."""
    q = _scoped(select(SpoolEntry).order_by(SpoolEntry.created_at, SpoolEntry.id), domains)
    if limit is not None:
        q = q.limit(limit)
    if status:
        q = q.where(SpoolEntry.status == status)
    if domain:
        q = q.where(SpoolEntry.domain == domain.lower())
    async with store.session() as session:
        return list((await session.execute(q)).scalars().all())


async def get_entry(store: Store, entry_id: int, *,
                    domains: Collection[str] | Scope | None = None) -> tuple[SpoolEntry, list[SpoolAttempt]]:
    """One entry and its attempts (oldest first).

    Raises:
        NotFound: no such entry, or not in ``domains``.
    """
    async with store.session() as session:
        entry = await session.get(SpoolEntry, entry_id)
        if entry is None or not _visible(entry, domains):
            raise NotFound(f"spool entry {entry_id} does not exist")
        attempts = (await session.execute(select(SpoolAttempt).where(SpoolAttempt.spool_id == entry_id)
                                          .order_by(SpoolAttempt.id))).scalars().all()
        return entry, list(attempts)


async def make_due_now(store: Store, *, entry_id: int | None = None, domain: str | None = None,
                       ids: Collection[int] | None = None, domains: Collection[str] | Scope | None = None) -> list[int]:
    """Make held (``queued``) entries due at once; returns their ids.

    Args:
        entry_id: only this entry.
        domain: only this domain's entries.
        ids: only these entries.
        domains: only entries of these domains (``None``: any).

    Raises:
        NotFound: ``entry_id`` is unknown, not in ``domains``, or no longer held.
    """
    conds = [SpoolEntry.status == "queued"]
    if entry_id is not None:
        conds.append(SpoolEntry.id == entry_id)
    if domain:
        conds.append(SpoolEntry.domain == domain.lower())
    if ids is not None:
        conds.append(SpoolEntry.id.in_(list(ids)))
    async with store.session() as session:
        found = list((await session.execute(_scoped(select(SpoolEntry.id).where(and_(*conds)), domains)))
                     .scalars().all())
        if entry_id is not None and not found:
            raise NotFound(f"spool entry {entry_id} is not held (unknown or already done)")
        if found:
            await session.execute(update(SpoolEntry).where(SpoolEntry.id.in_(found)).values(next_attempt_at=utcnow()))
            await session.commit()
        return found


async def get_entries(store: Store, ids: Collection[int]) -> list[SpoolEntry]:
    """The entries with these ids that still exist, by id."""
    if not ids:
        return []
    async with store.session() as session:
        return list((await session.execute(select(SpoolEntry).where(SpoolEntry.id.in_(list(ids)))
                                           .order_by(SpoolEntry.id))).scalars().all())


async def entries_of_transaction(store: Store, txn_id: str, *,
                                 domains: Collection[str] | Scope | None = None) -> list[SpoolEntry]:
    """The entries (any status) of the SMTP transaction ``txn_id``, by id: one per route, so a
    transaction for several domains (or several outbound destinations) has several.

    Args:
        txn_id: the transaction ID the sender was given (``queued as ...``); case-insensitive.
        domains: only entries of these domains (``None``: any).
    """
    q = _scoped(select(SpoolEntry).where(SpoolEntry.txn_id.in_({txn_id, txn_id.upper()}))
                .order_by(SpoolEntry.id), domains)
    async with store.session() as session:
        return list((await session.execute(q)).scalars().all())


async def delete_entry(store: Store, entry_id: int, *, domains: Collection[str] | Scope | None = None,
                       before_commit: Callable[[AsyncSession, SpoolEntry], Awaitable[None]] | None = None,
                       now: dt.datetime | None = None) -> SpoolEntry:
    """Remove an entry and its attempts for good.

    An entry under a live lease is refused: its worker may be handing it to the
    downstream server at this moment, and a deleted message must never be
    delivered. The lease is re-checked in the DELETE itself, so a worker cannot
    claim the entry between the check and the delete.

    Args:
        domains: only entries of these domains (``None``: any).
        before_commit: called inside the transaction (e.g. to add an audit entry).

    Raises:
        NotFound: no such entry, or not in ``domains``.
        Conflict: a worker holds the entry's lease.
    """
    now = now or utcnow()
    async with store.session() as session:
        entry = await session.get(SpoolEntry, entry_id)
        if entry is None or not _visible(entry, domains):
            raise NotFound(f"spool entry {entry_id} does not exist")
        free = or_(SpoolEntry.lease_until.is_(None), SpoolEntry.lease_until < now)
        gone = await session.execute(delete(SpoolEntry).where(SpoolEntry.id == entry_id, free)
                                     .returning(SpoolEntry.id).execution_options(synchronize_session=False))
        if gone.first() is None:
            await session.rollback()
            raise Conflict(f"spool entry {entry_id} is being delivered right now; look again in a moment")
        await session.execute(delete(SpoolAttempt).where(SpoolAttempt.spool_id == entry_id))
        if before_commit is not None:
            await before_commit(session, entry)
        await session.commit()
        return entry


async def stats(store: Store, *, domains: Collection[str] | Scope | None = None) -> dict[str, Any]:
    """Counts by status; held messages, bytes and the oldest held entry's age (seconds) by domain.

    Returns:
        ``{"by_status": {status: n}, "held": n, "by_domain": [{"domain", "messages", "bytes",
        "oldest_age_seconds"}], "oldest_age_seconds": float | None}``
    """
    now = utcnow()

    def age(oldest: dt.datetime | None) -> float | None:
        if oldest is None:
            return None
        if isinstance(oldest, str):  # SQLite may hand an aggregate back as text
            oldest = dt.datetime.fromisoformat(oldest)
        if oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=dt.timezone.utc)
        return max(0.0, (now - oldest).total_seconds())

    async with store.session() as session:
        by_status = dict((await session.execute(_scoped(
            select(SpoolEntry.status, func.count()).group_by(SpoolEntry.status), domains))).all())
        rows = (await session.execute(_scoped(
            select(SpoolEntry.domain, func.count(), func.sum(SpoolEntry.size), func.min(SpoolEntry.created_at))
            .where(SpoolEntry.status == "queued").group_by(SpoolEntry.domain).order_by(SpoolEntry.domain),
            domains))).all()
    by_domain = [{"domain": d, "messages": n, "bytes": int(b or 0), "oldest_age_seconds": age(o)}
                 for d, n, b, o in rows]
    ages = [d["oldest_age_seconds"] for d in by_domain if d["oldest_age_seconds"] is not None]
    return {"by_status": by_status, "held": by_status.get("queued", 0), "by_domain": by_domain,
            "oldest_age_seconds": max(ages) if ages else None}


async def reseal_all(store: Store, sealer: Sealer, *, batch: int = 200) -> int:
    """Re-seal every spool body not sealed with the current key (``keys rotate``); returns the count.

    Works in small batches so the gateway keeps running; old keys stay in the
    key file, so entries not yet re-sealed remain readable meanwhile.
    """
    done = 0
    current = sealer.current_key_id
    while True:
        async with store.session() as session:
            rows = (await session.execute(select(SpoolEntry).where(SpoolEntry.key_id != current)
                                          .limit(batch))).scalars().all()
            if not rows:
                return done
            for row in rows:
                plain = sealer.open(row.body, seal_context(row.txn_id))
                row.key_id, row.body = sealer.seal(plain, seal_context(row.txn_id))
            await session.commit()
            done += len(rows)
