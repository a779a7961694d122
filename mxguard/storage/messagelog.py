"""The message log: one record per SMTP transaction, written in batches off the reply path.

The SMTP session hands a finished record to :class:`MessageLogWriter`, which
returns at once; a background task inserts queued records every
``flush_interval`` seconds in one transaction. If the database is unavailable
the records wait in memory (bounded) and are written when it is back.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
from dataclasses import dataclass, field, fields
from typing import Any

import structlog
from sqlalchemy import and_, false, insert, or_, select

from mxguard.storage.db import SQLAlchemyError, Store, storable
from mxguard.storage.models import MessageLogEntry

log = structlog.get_logger("mxguard.messagelog")

@dataclass
class RecipientResult:
    """One envelope recipient's outcome."""

    rcpt: str
    code: int
    enhanced: str
    text: str
    #: delivered | rejected | deferred | quarantined | spooled | discarded
    disposition: str
    route: str | None = None


@dataclass
class LogRecord:
    """A transaction's record; field meanings match :class:`MessageLogEntry`."""

    txn_id: str
    ts: dt.datetime
    client_ip: str
    client_port: int = 0
    node: str = ""
    helo: str = ""
    inbound_tls: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_bits: int | None = None
    mail_from: str = ""
    rcpt_to: str = ""
    size: int = 0
    subject: str = ""
    message_id: str = ""
    downstream_host: str | None = None
    downstream_tls: bool | None = None
    downstream_tls_version: str | None = None
    downstream_cipher: str | None = None
    downstream_verified: bool | None = None
    downstream: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    verdict: dict[str, Any] = field(default_factory=dict)
    disposition: str = "aborted"
    final_code: int | None = None
    final_reply: str = ""
    accept_ms: float | None = None
    connect_ms: float | None = None
    tls_ms: float | None = None
    filter_ms: float | None = None
    relay_ms: float | None = None
    total_ms: float | None = None
    client_cert_subject: str | None = None
    client_cert_sha256: str | None = None
    #: ``inbound`` or ``outbound`` (relayed for an organization).
    direction: str = "inbound"

    def as_row(self) -> dict[str, Any]:
        """The row to insert: strings bounded to their columns; the JSON columns made storable.

        The engine makes every bound string storable (:func:`mxguard.storage.db.storable`);
        strings nested in the JSON columns are serialised before that, so they are
        cleaned here (copy-on-write: nothing is copied when nothing needs it).
        """
        # A shallow copy: the nested lists and dicts are plain data already, and
        # dataclasses.asdict's deep copy was a measurable cost per message.
        row = {name: getattr(self, name) for name in _RECORD_FIELDS}
        for name in ("downstream", "results", "verdict"):
            row[name] = storable(row[name])
        row["subject"] = row["subject"][:500]
        row["message_id"] = row["message_id"][:500]
        row["mail_from"] = row["mail_from"][:500]
        row["helo"] = row["helo"][:250]
        if row["client_cert_subject"] is not None:
            row["client_cert_subject"] = row["client_cert_subject"][:1000]
        return row


_RECORD_FIELDS = tuple(f.name for f in fields(LogRecord))


def overall_disposition(results: list[RecipientResult]) -> str:
    """The transaction's disposition: the recipients' common one, else ``partial``."""
    kinds = {r.disposition for r in results}
    if not kinds:
        return "aborted"
    return kinds.pop() if len(kinds) == 1 else "partial"


_INSERT = insert(MessageLogEntry.__table__)


class MessageLogWriter:
    """Batches message-log inserts.

    Args:
        store: the database.
        flush_interval: seconds between batch writes.
        max_pending: records kept in memory while the database is down; beyond
            it the oldest are dropped (and a warning says how many).
    """

    def __init__(self, store: Store, flush_interval: float = 0.2, max_pending: int = 200_000):
        self.store = store
        self.flush_interval = flush_interval
        self.pending: collections.deque[LogRecord] = collections.deque()
        self.max_pending = max_pending
        self.dropped = 0
        self.written = 0
        #: Records the database refused on their own (while it answered otherwise): logged and dropped.
        self.refused = 0
        self._task: asyncio.Task | None = None
        self._flush_lock = asyncio.Lock()

    def submit(self, record: LogRecord) -> None:
        """Queue a record (never blocks, never raises)."""
        if len(self.pending) >= self.max_pending:
            self.pending.popleft()
            self.dropped += 1
        self.pending.append(record)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="message-log-writer")

    async def _run(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.flush_interval if not failures else min(5.0, 0.5 * 2 ** failures))
            try:
                await self.flush()
                failures = 0
            except (SQLAlchemyError, OSError) as exc:
                failures = min(failures + 1, 4)
                log.warning("message log write failed; will retry", pending=len(self.pending),
                            error=str(exc).splitlines()[0][:200])
            except Exception:  # noqa: BLE001 - this task must outlive any one bad batch
                failures = min(failures + 1, 4)
                log.exception("message log write failed; will retry", pending=len(self.pending))

    async def flush(self) -> int:
        """Write everything queued now; returns the number written.

        Raises:
            SQLAlchemyError: the database refused; the records stay queued.
        """
        async with self._flush_lock:
            written = 0
            while self.pending:
                batch = [self.pending[i] for i in range(min(1000, len(self.pending)))]
                try:
                    await self._insert(batch)
                except Exception:  # noqa: BLE001 - one record may be at fault, or the database
                    written += await self._one_by_one(len(batch))
                    continue
                for _ in batch:
                    self.pending.popleft()
                written += len(batch)
            self.written += written
            if self.dropped:
                log.error("message log records dropped while the database was unavailable", count=self.dropped)
                self.dropped = 0
            return written

    async def _insert(self, records: list[LogRecord]) -> None:
        # Core executemany: no ORM unit of work for a plain append-only table.
        async with self.store.engine.begin() as conn:
            await conn.execute(_INSERT, [r.as_row() for r in records])

    async def _one_by_one(self, count: int) -> int:
        """Write the first ``count`` queued records singly after their batch failed.

        A record the database refuses while it answers ``SELECT 1`` is at
        fault itself: it is logged and dropped, so it cannot hold back every
        record after it. When the database does not answer, this raises and
        the rest stays queued.

        Raises:
            SQLAlchemyError, OSError: the database is unavailable.
        """
        written = 0
        for _ in range(count):
            record = self.pending[0]
            try:
                await self._insert([record])
                written += 1
            except Exception as exc:  # noqa: BLE001 - decided by the probe below
                await self.store.ping()
                self.refused += 1
                log.error("message log record refused by the database; dropped", txn=record.txn_id,
                          error=(str(exc).splitlines() or [type(exc).__name__])[0][:200])
            self.pending.popleft()
        return written

    async def stop(self) -> None:
        """Stop the background task and write what is left (best effort)."""
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await self.flush()
        except (SQLAlchemyError, OSError) as exc:
            log.error("message log records lost at shutdown", count=len(self.pending), error=str(exc)[:200])


def entry_as_dict(entry: MessageLogEntry) -> dict[str, Any]:
    """A message-log row as plain data (for JSON output and the API)."""
    data = {c.name: getattr(entry, c.name) for c in MessageLogEntry.__table__.columns}
    data["ts"] = entry.ts.isoformat() if entry.ts else None
    return data


async def recent(store: Store, last: int = 20) -> list[MessageLogEntry]:
    """The newest ``last`` records, oldest first."""
    async with store.session() as session:
        rows = (await session.execute(
            select(MessageLogEntry).order_by(MessageLogEntry.id.desc()).limit(last))).scalars().all()
    return list(reversed(rows))


async def search(store: Store, *, sender: str | None = None, recipient: str | None = None,
                 subject: str | None = None, client_ip: str | None = None, disposition: str | None = None,
                 tls: bool | None = None, since: dt.datetime | None = None, until: dt.datetime | None = None,
                 txn_id: str | None = None, limit: int = 100, offset: int = 0,
                 recipient_domains: list[str] | None = None, direction: str | None = None) -> list[MessageLogEntry]:
    """Search the message log; text filters match substrings (case-insensitive). Newest first.

    ``recipient_domains`` (when not ``None``) keeps only transactions with a
    recipient in one of those domains, or outbound ones whose sender is in one
    of them (an org-admin's view). ``direction``: ``inbound`` or ``outbound``
    (``None``: both). All values are bound parameters, never spliced into SQL.
    """
    q = select(MessageLogEntry)
    if recipient_domains is not None:
        q = q.where(recipient_domain_clause(recipient_domains))
    if direction:
        q = q.where(MessageLogEntry.direction == direction)
    if sender:
        q = q.where(MessageLogEntry.mail_from.ilike(f"%{_escape_like(sender)}%", escape="\\"))
    if recipient:
        q = q.where(MessageLogEntry.rcpt_to.ilike(f"%{_escape_like(recipient)}%", escape="\\"))
    if subject:
        q = q.where(MessageLogEntry.subject.ilike(f"%{_escape_like(subject)}%", escape="\\"))
    if client_ip:
        q = q.where(MessageLogEntry.client_ip == client_ip)
    if disposition:
        q = q.where(MessageLogEntry.disposition == disposition)
    if tls is not None:
        q = q.where(MessageLogEntry.inbound_tls.is_(tls))
    if since:
        q = q.where(MessageLogEntry.ts >= since)
    if until:
        q = q.where(MessageLogEntry.ts <= until)
    if txn_id:
        q = q.where(or_(MessageLogEntry.txn_id == txn_id))
    q = q.order_by(MessageLogEntry.id.desc()).limit(max(1, min(limit, 1000))).offset(max(0, offset))
    async with store.session() as session:
        return list((await session.execute(q)).scalars().all())


def recipient_domain_clause(domains: list[str]):
    """SQL condition: some envelope recipient (``rcpt_to``, space separated) is in one of ``domains``,
    or the transaction is outbound (relayed for an organization) and its sender is in one of them."""
    if not domains:
        return false()
    clauses = []
    for d in domains:
        d = _escape_like(d)
        clauses.append(MessageLogEntry.rcpt_to.ilike(f"%@{d}", escape="\\"))
        clauses.append(MessageLogEntry.rcpt_to.ilike(f"%@{d} %", escape="\\"))
        clauses.append(and_(MessageLogEntry.direction == "outbound",
                            MessageLogEntry.mail_from.ilike(f"%@{d}", escape="\\")))
    return or_(*clauses)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
