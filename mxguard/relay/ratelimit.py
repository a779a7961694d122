"""Outbound rate limits: messages per window (an hour by default) per sender and per organization.

The counters live in the database (``relay_rate_counters``), so every worker
process and every node counts into the same numbers. Each accepted message adds
one to its sender's and its organization's counter of the current window with
one atomic ``UPDATE … RETURNING`` (an ``INSERT`` starts a new window), so
exactly one message sees each count: the first message over a limit is the one
that alerts the organization's admins, once per window, however many workers
are relaying.

A compromised account (a leaked relay password, an infected workstation) is
the usual reason for a burst; mail over a limit is held, not refused, so the
organization's legitimate mail is not lost and an administrator decides.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import delete, insert, update
from sqlalchemy.exc import IntegrityError

from mxguard.storage.db import Store
from mxguard.storage.models import RelayRateCounter, utcnow


@dataclass(frozen=True)
class RateCount:
    """One counter after a message was counted.

    Attributes:
        scope: ``sender:<address>`` or ``org:<id>``.
        count: messages in the window, this one included.
        limit: the limit for this scope.
        window_start: the start of the window (UTC).
    """

    scope: str
    count: int
    limit: int
    window_start: dt.datetime

    @property
    def exceeded(self) -> bool:
        """This message is over the limit."""
        return self.count > self.limit

    @property
    def first_over(self) -> bool:
        """This message is the first one over the limit in the window (the one that alerts)."""
        return self.count == self.limit + 1


def window_start(now: dt.datetime, window: int) -> dt.datetime:
    """The start of the ``window``-second window holding ``now`` (aligned to the epoch, UTC)."""
    seconds = int(now.timestamp()) // window * window
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


async def _bump(session, scope: str, start: dt.datetime) -> int:
    result = await session.execute(
        update(RelayRateCounter).where(RelayRateCounter.scope == scope, RelayRateCounter.window_start == start)
        .values(count=RelayRateCounter.count + 1).returning(RelayRateCounter.count))
    value = result.scalar_one_or_none()
    if value is not None:
        return value
    try:
        async with session.begin_nested():
            await session.execute(insert(RelayRateCounter).values(scope=scope, window_start=start, count=1))
        return 1
    except IntegrityError:
        # Another worker started the window between our UPDATE and INSERT.
        result = await session.execute(
            update(RelayRateCounter).where(RelayRateCounter.scope == scope, RelayRateCounter.window_start == start)
            .values(count=RelayRateCounter.count + 1).returning(RelayRateCounter.count))
        return result.scalar_one()


async def count_message(store: Store, *, sender: str, org_id: int, sender_limit: int, org_limit: int,
                        window: int, now: dt.datetime | None = None) -> list[RateCount]:
    """Count one outbound message for its sender and its organization (committed before return).

    Args:
        sender: the envelope sender, lower-cased here (``""`` for ``<>``: counted as ``sender:<>``).
        org_id: the organization relaying.
        sender_limit, org_limit: messages allowed per window.
        window: the window length in seconds.

    Returns:
        the two counters, sender first.

    Raises:
        SQLAlchemyError: the database is unavailable (the caller defers the message).
    """
    start = window_start(now or utcnow(), window)
    sender_scope = f"sender:{(sender or '<>').lower()}"[:400]
    org_scope = f"org:{org_id}"
    async with store.session() as session:
        sender_count = await _bump(session, sender_scope, start)
        org_count = await _bump(session, org_scope, start)
        if org_count == 1:
            # The organization's first message of a window: forget windows that ended a day ago
            # (once per organization and window, so the table stays small without a timer).
            await session.execute(delete(RelayRateCounter).where(
                RelayRateCounter.window_start < start - dt.timedelta(seconds=max(window, 86400))))
        await session.commit()
    return [RateCount(sender_scope, sender_count, sender_limit, start),
            RateCount(org_scope, org_count, org_limit, start)]
