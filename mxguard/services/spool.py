"""The spool as operators see it: held messages per domain, retry now, delete — with tenancy and audit.

The CLI (``mxguard spool …``), the console's Spool page and ``/api/v1/spool``
all call these functions; :mod:`mxguard.spool.queue` is the storage layer
underneath. An admin sees every entry; an org-admin sees and acts only on the
entries of their organization's domains (any other entry is ``NotFound``, the
same as one that does not exist, so other tenants' mail does not leak); a plain
user gets ``PermissionDenied``. Retry and delete each write an audit entry:
who, which entry, its state before → after.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import select

from mxguard.config import Settings
from mxguard.errors import Conflict, NotFound, ValidationFailed
from mxguard.services import audit, status
from mxguard.services.access import Actor, as_utc
from mxguard.services.domains import list_domains, normalize_domain_name
from mxguard.spool import queue
from mxguard.storage.db import Store
from mxguard.storage.models import SPOOL_SESSIONS_KEY, Domain, SpoolAttempt, SpoolEntry, utcnow

log = structlog.get_logger("mxguard.spool")

#: Every entry status: ``queued`` (held), then ``delivered``, ``failed`` (refused with 5xx) or ``expired``;
#: ``held``: outbound mail over a relay rate limit, waiting for ``mxguard relay release`` (not retried).
STATUSES = ("queued", "delivered", "failed", "expired", "held")

#: Seconds the console and the API wait for "retry now" before answering; the
#: delivery goes on after that (a downstream may take minutes, RFC 5321 4.5.3.2).
RETRY_WAIT = 30.0

# Retries still running after the caller stopped waiting (a strong reference keeps them alive).
_background: set[asyncio.Task] = set()


# -- views ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecipientState:
    """One envelope recipient of a held message: ``status`` is pending, delivered or failed."""

    rcpt: str
    status: str
    reply: str


@dataclass(frozen=True)
class EntryView:
    """A spool entry without its (sealed) body.

    Attributes:
        kind: ``message`` (mail for a served domain) or ``dsn`` (a notification mxguard sends).
        domain: the served domain (for a DSN: the domain of the sender it goes back to).
        size: the held copy's size, bytes.
        status: one of :data:`STATUSES`.
        attempts: delivery attempts made from the spool (the first, in-line one is not counted).
        last_reply: the downstream server's last answer, per recipient.
        delivering: a worker holds the entry's lease (it may be delivering it right now).
        All times are timezone-aware UTC.
    """

    id: int
    kind: str
    txn_id: str
    domain: str
    mail_from: str
    subject: str
    size: int
    status: str
    attempts: int
    created_at: dt.datetime
    expires_at: dt.datetime
    next_attempt_at: dt.datetime
    last_attempt_at: dt.datetime | None
    completed_at: dt.datetime | None
    last_reply: str
    recipients: tuple[RecipientState, ...]
    #: The sealing key the held copy is sealed with (``keys rotate`` re-seals).
    key_id: str = ""
    delivering: bool = False
    #: The relaying organization of an outbound entry (``None``: the domain's organization).
    org_id: int | None = None

    @property
    def pending(self) -> list[str]:
        """Recipients not yet delivered or refused."""
        return [r.rcpt for r in self.recipients if r.status == "pending"]

    def age_seconds(self, now: dt.datetime | None = None) -> float:
        """Seconds since the message was accepted."""
        return max(0.0, ((now or utcnow()) - self.created_at).total_seconds())

    def audit_state(self) -> dict[str, Any]:
        """What the audit log keeps of the entry (no body, no subject)."""
        return {"domain": self.domain, "mail_from": self.mail_from, "status": self.status,
                "attempts": self.attempts, "next_attempt_at": self.next_attempt_at.isoformat(),
                "pending": self.pending, "last_reply": self.last_reply[:500]}


@dataclass(frozen=True)
class AttemptView:
    """One delivery attempt: when, which node, which server, with which TLS, and the answer.

    Attributes:
        server: ``host:port`` that answered, or the failed servers' errors.
        tls: STARTTLS was used; ``tls_version``/``cipher`` as negotiated.
        verified: the server's certificate was verified (chain and name, or pinned fingerprint).
        reply: one line per recipient, ``rcpt: code enhanced-code text``.
        results: ``{rcpt: reply code}``.
    """

    ts: dt.datetime
    node: str
    server: str | None
    tls: bool
    tls_version: str | None
    cipher: str | None
    verified: bool
    reply: str
    results: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DomainDepth:
    """Held messages of one domain: count, total bytes, the oldest one's age in seconds."""

    domain: str
    messages: int
    bytes: int
    oldest_age_seconds: float | None


@dataclass(frozen=True)
class SpoolStats:
    """The spool at a glance (only what the actor may see).

    Attributes:
        held: entries still queued.
        by_status: ``{status: count}`` over every status.
        by_domain: held messages per domain, by domain name.
        oldest_age_seconds: age of the oldest held message (``None``: nothing held).
    """

    held: int
    by_status: dict[str, int]
    by_domain: list[DomainDepth]
    oldest_age_seconds: float | None


@dataclass(frozen=True)
class RetryOutcome:
    """What "retry now" did to one entry.

    Attributes:
        attempted: this request made a delivery attempt; ``False``: another worker
            holds the entry (it is due now and delivered by that worker); ``None``:
            still in progress when the caller stopped waiting.
        entry: the entry's state afterwards (``None``: deleted meanwhile).
    """

    id: int
    attempted: bool | None
    entry: EntryView | None

    @property
    def in_progress(self) -> bool:
        return self.attempted is None


def entry_view(row: SpoolEntry, now: dt.datetime | None = None) -> EntryView:
    """An :class:`EntryView` of a loaded row."""
    now = now or utcnow()
    lease = as_utc(row.lease_until)
    return EntryView(
        id=row.id, kind=row.kind, txn_id=row.txn_id, domain=row.domain, mail_from=row.mail_from,
        subject=row.subject, size=row.size, status=row.status, attempts=row.attempts,
        created_at=as_utc(row.created_at), expires_at=as_utc(row.expires_at),
        next_attempt_at=as_utc(row.next_attempt_at), last_attempt_at=as_utc(row.last_attempt_at),
        completed_at=as_utc(row.completed_at), last_reply=row.last_reply or "",
        recipients=tuple(RecipientState(r["rcpt"], r["status"], r.get("reply", "")) for r in row.recipients),
        key_id=row.key_id, delivering=lease is not None and lease > now and row.status == "queued",
        org_id=row.org_id)


def _attempt_view(row: SpoolAttempt) -> AttemptView:
    return AttemptView(ts=as_utc(row.ts), node=row.node, server=row.server, tls=bool(row.tls),
                       tls_version=row.tls_version, cipher=row.cipher, verified=bool(row.verified),
                       reply=row.reply or "",
                       # the reply codes only: the TLS-RPT sessions are kept beside them
                       results={k: v for k, v in (row.results or {}).items() if k != SPOOL_SESSIONS_KEY})


# -- tenancy ----------------------------------------------------------------------------------

async def _scope(store: Store, actor: Actor) -> queue.Scope | None:
    """``None`` for admins (every entry), else the actor's share: the entries of their
    organization's domains and the organization's own outbound entries (whatever the destination).

    Raises:
        PermissionDenied: a plain user.
    """
    actor.require_console()
    if actor.is_admin:
        return None
    return queue.Scope(frozenset(d.name for d in await list_domains(store, actor=actor)), actor.org_id)


def _domain_filter(domain: str | None, scope: queue.Scope | None) -> str | None:
    """A validated ``domain`` filter; an org-admin's filter must name one of their domains."""
    if not domain or not domain.strip():
        return None
    name = normalize_domain_name(domain)
    if scope is not None and name not in scope.domains:
        raise NotFound(f"domain {name} is not configured")
    return name


def _status_filter(value: str | None) -> str | None:
    if value in (None, "", "all"):
        return None
    if value not in STATUSES:
        raise ValidationFailed("status", f"{value!r} is not one of: {', '.join(STATUSES)}, all")
    return value


async def _org_ids(session, domains: Collection[str]) -> dict[str, int | None]:
    rows = await session.execute(select(Domain.name, Domain.org_id).where(Domain.name.in_(list(domains))))
    return dict(rows.all())


# -- reading ----------------------------------------------------------------------------------

async def list_entries(store: Store, actor: Actor, *, domain: str | None = None, status: str | None = "queued",
                       limit: int = 500) -> list[EntryView]:
    """Spool entries the actor may see, oldest first.

    Args:
        domain: only this domain.
        status: one of :data:`STATUSES`; ``None`` or ``"all"`` for every status.
        limit: at most this many (1–10000).

    Raises:
        PermissionDenied: a plain user.
        NotFound: an org-admin named another organization's domain.
        ValidationFailed: ``domain`` or ``status`` is malformed (the error names the field).
    """
    scope = await _scope(store, actor)
    rows = await queue.list_entries(store, domain=_domain_filter(domain, scope), status=_status_filter(status),
                                    limit=max(1, min(limit, 10000)), domains=scope)
    now = utcnow()
    return [entry_view(r, now) for r in rows]


#: Transaction IDs are 16 hex digits (``mxguard.smtp.proxy.new_txn_id``); a shorter number is a spool ID.
_TXN_ID_LENGTH = 16


async def resolve_entry_id(store: Store, actor: Actor, ref: str) -> int:
    """The spool entry ``ref`` names: its numeric ID, or the transaction ID the sender was given
    (``250 2.0.0 Ok: queued as 188F5B7225FC60D3``) when that transaction has exactly one entry.

    Args:
        ref: digits (fewer than 16) for a spool ID; anything else is a transaction ID
            (case-insensitive).

    Raises:
        NotFound: no entry the actor may see has that ID or transaction ID.
        ValidationFailed: (field ``ID``) the transaction has several entries (one per route);
            the message lists them, and one of their numeric IDs must be given.
        PermissionDenied: a plain user.
    """
    ref = (ref or "").strip()
    if ref.isascii() and ref.isdigit() and len(ref) < _TXN_ID_LENGTH:
        return int(ref)
    scope = await _scope(store, actor)
    rows = await queue.entries_of_transaction(store, ref, domains=scope) if ref else []
    if not rows:
        raise NotFound(f"no spool entry has the ID or transaction ID {ref!r}")
    if len(rows) > 1:
        listed = ", ".join(f"#{r.id} ({r.domain}: {', '.join(x.rcpt for x in entry_view(r).recipients)}; {r.status})"
                           for r in rows)
        raise ValidationFailed("ID", f"transaction {rows[0].txn_id} has {len(rows)} spool entries: {listed}; "
                                     "give one of their numeric IDs")
    return rows[0].id


async def get_entry(store: Store, actor: Actor, entry_id: int) -> tuple[EntryView, list[AttemptView]]:
    """One entry (any status) and every delivery attempt, oldest first.

    Raises:
        NotFound: no such entry, or not the actor's.
        PermissionDenied: a plain user.
    """
    scope = await _scope(store, actor)
    row, attempts = await queue.get_entry(store, entry_id, domains=scope)
    return entry_view(row), [_attempt_view(a) for a in attempts]


async def stats(store: Store, actor: Actor) -> SpoolStats:
    """Held messages, bytes and the oldest one's age per domain, and entries by status.

    Raises:
        PermissionDenied: a plain user.
    """
    data = await queue.stats(store, domains=await _scope(store, actor))
    return SpoolStats(held=data["held"], by_status=data["by_status"],
                      by_domain=[DomainDepth(**d) for d in data["by_domain"]],
                      oldest_age_seconds=data["oldest_age_seconds"])


async def depth(store: Store) -> dict[str, int]:
    """Held messages per domain, for every domain (the gateway's spool-depth provider)."""
    return {d["domain"]: d["messages"] for d in (await queue.stats(store))["by_domain"]}


async def visible_depth(store: Store, actor: Actor) -> dict[str, int] | None:
    """The registered spool-depth provider's figures, limited to the actor's domains.

    Returns:
        ``{domain: held messages}``; ``None`` when no spool is registered in this process.
    """
    figures = await status.spool_depth()
    scope = await _scope(store, actor)
    if figures is None or scope is None:
        return figures
    return {d: n for d, n in figures.items() if d in scope.domains}


# -- acting -----------------------------------------------------------------------------------

async def retry(store: Store, settings: Settings, actor: Actor, *, entry_id: int | None = None,
                domain: str | None = None, worker: Any = None, wait: float | None = None) -> list[RetryOutcome]:
    """Deliver held messages now, whatever their back-off: one entry, a domain's, or every held one
    the actor may see.

    The entries are claimed under the usual lease (so a message is never
    delivered twice) and delivered with the domain's current route and TLS
    policy. Entries another worker holds are made due now and left to it.

    Args:
        settings: bootstrap settings (spool, downstream, sealing key file).
        entry_id: only this entry; ``domain``: only this domain's; neither: all.
        worker: the running gateway's :class:`~mxguard.spool.worker.SpoolWorker`;
            ``None`` delivers in this process with a worker of its own (the CLI).
        wait: answer after at most this many seconds; the delivery and its audit
            entries complete in the background (``None``: wait until done).

    Returns:
        one outcome per entry, oldest first (empty when nothing is held).

    Raises:
        NotFound: the entry or domain does not exist or is not the actor's.
        Conflict: the entry is no longer held (delivered, failed or expired).
        PermissionDenied: a plain user.
    """
    scope = await _scope(store, actor)
    if entry_id is not None:
        row, _ = await queue.get_entry(store, entry_id, domains=scope)
        if row.status != "queued":
            raise Conflict(f"spool entry {entry_id} is {row.status}; only held messages can be retried")
        before = [row]
    else:
        before = await queue.list_entries(store, domain=_domain_filter(domain, scope), status="queued", limit=None,
                                          domains=scope)
    if not before:
        return []
    task = asyncio.ensure_future(_deliver_and_audit(store, settings, actor, [entry_view(r) for r in before], worker))
    _background.add(task)
    task.add_done_callback(_finished)
    # shield: a caller that goes away (a closed browser tab) does not cut a delivery short.
    try:
        return await asyncio.wait_for(asyncio.shield(task), wait)
    except asyncio.TimeoutError:
        now = utcnow()
        current = {r.id: entry_view(r, now) for r in await queue.get_entries(store, [e.id for e in before])}
        return [RetryOutcome(e.id, None, current.get(e.id)) for e in before]


def _finished(task: asyncio.Task) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        # Nobody may be waiting any more: the error goes to the log, the entries stay held.
        log.error("retry now failed", error=str(task.exception()).splitlines()[0][:300])


async def _deliver_and_audit(store: Store, settings: Settings, actor: Actor, before: list[EntryView],
                             worker: Any) -> list[RetryOutcome]:
    ids = [e.id for e in before]
    claimed = await _deliver(store, settings, ids, worker)
    # Whatever another worker holds is due now, so it goes on its next pass.
    await queue.make_due_now(store, ids=[i for i in ids if i not in claimed])
    now = utcnow()
    after = {r.id: entry_view(r, now) for r in await queue.get_entries(store, ids)}
    async with store.session() as session:
        orgs = await _org_ids(session, {e.domain for e in before})
        for e in before:
            new = after.get(e.id)
            audit.record(session, actor, "spool.retry", f"spool #{e.id} ({e.domain})",
                         org_id=e.org_id if e.org_id is not None else orgs.get(e.domain),
                         before=e.audit_state(), after=new.audit_state() if new else None)
        await session.commit()
    return [RetryOutcome(i, i in claimed, after.get(i)) for i in ids]


async def _deliver(store: Store, settings: Settings, ids: list[int], worker: Any) -> set[int]:
    """Claim and deliver ``ids``; returns the ids this call claimed (and so attempted)."""
    own = worker is None
    if worker is None:
        # Imported here: the worker pulls in DNS and SMTP client code the read-only views do not need.
        from mxguard.smtp.routing import DomainDirectory
        from mxguard.spool.worker import SpoolWorker
        from mxguard.storage.sealing import KeyRing
        directory = DomainDirectory(store)
        await directory.load()
        worker = SpoolWorker(store, settings, directory, KeyRing(settings.path(settings.sealing_key_file)))
    claimed: set[int] = set()
    remaining = list(ids)
    # Each pass claims at most a batch; bounded by the number of batches needed, plus one.
    for _ in range(len(ids) // max(1, settings.spool.batch) + 2):
        done = await worker.run_once(ids=remaining)
        if not done:
            break
        claimed.update(e.id for e in done)
        remaining = [i for i in remaining if i not in claimed]
        if not remaining:
            break
    if own:
        await worker.pool.close()  # connections kept for reuse by outbound deliveries
    return claimed


async def delete_entry(store: Store, actor: Actor, entry_id: int) -> EntryView:
    """Remove an entry for good: it is never delivered and no DSN is sent.

    Raises:
        NotFound: no such entry, or not the actor's.
        Conflict: a worker is delivering it at this moment (try again shortly).
        PermissionDenied: a plain user.
    """
    scope = await _scope(store, actor)
    removed: list[EntryView] = []

    async def record(session, row: SpoolEntry) -> None:
        view = entry_view(row)
        removed.append(view)
        orgs = await _org_ids(session, [view.domain])
        audit.record(session, actor, "spool.delete", f"spool #{view.id} ({view.domain})",
                     org_id=view.org_id if view.org_id is not None else orgs.get(view.domain), before={**view.audit_state(), "size": view.size})

    await queue.delete_entry(store, entry_id, domains=scope, before_commit=record)
    return removed[0]
