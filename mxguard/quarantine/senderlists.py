"""Per-user allow and block lists, and the in-memory copy the SMTP side consults.

An entry is an address (``news@shop.example``) or a domain (``shop.example``,
which also covers its subdomains), matched against the envelope sender
(MAIL FROM). For one recipient:

* an **allow** match turns a junk quarantine, tag or reject into a delivery
  (never a virus, never a content-policy hit, never an engine failure);
* a **block** match holds the message (or refuses it when the domain's
  ``block_action`` is ``reject``), whatever the junk engines said.

An address entry beats a domain entry; between two of the same kind, block wins.

Changes bump the configuration generation, so every gateway process reloads
its :class:`SenderLists` along with its domain directory (about once a second,
at once in the process that made the change): the SMTP hot path does a
dictionary lookup per recipient, never a query.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import structlog
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from mxguard.errors import AlreadyExists, NotFound, ValidationFailed
from mxguard.services import audit
from mxguard.services.access import Actor
from mxguard.services.domains import bump_generation, normalize_domain_name
from mxguard.storage.db import Store
from mxguard.storage.models import Domain, SenderListEntry, User, utcnow

log = structlog.get_logger("mxguard.senderlists")

KINDS = ("allow", "block")


@dataclass(frozen=True)
class SenderListView:
    id: int
    kind: str
    pattern: str
    created_at: dt.datetime


def normalize_pattern(value: str) -> str:
    """An address (lower-cased) or a domain (IDNA, lower-cased); ``@domain`` is taken as the domain.

    Raises:
        ValidationFailed: field ``pattern``.
    """
    text = (value or "").strip().strip("<>").lower()
    if text.startswith("@"):
        text = text[1:]
    if "@" in text:
        local, _, domain = text.rpartition("@")
        if not local or len(local) > 64 or any(c.isspace() for c in local):
            raise ValidationFailed("pattern", f"{value!r} is not an e-mail address or a domain")
        try:
            domain = normalize_domain_name(domain)
        except ValidationFailed:
            raise ValidationFailed("pattern", f"{value!r} is not an e-mail address or a domain") from None
        return f"{local}@{domain}"
    try:
        return normalize_domain_name(text)
    except ValidationFailed:
        raise ValidationFailed("pattern", f"{value!r} is not an e-mail address or a domain") from None


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValidationFailed("kind", f"{kind!r} is not allow or block")
    return kind


async def list_entries(store: Store, user_id: int) -> list[SenderListView]:
    """A user's entries, allow first, then by pattern."""
    async with store.session() as session:
        rows = (await session.execute(select(SenderListEntry).where(SenderListEntry.user_id == user_id)
                                      .order_by(SenderListEntry.kind, SenderListEntry.pattern))).scalars().all()
    return [SenderListView(r.id, r.kind, r.pattern, r.created_at) for r in rows]


async def add_entry(store: Store, user_id: int, kind: str, pattern: str, *, actor: Actor) -> SenderListView:
    """Add an address or domain to a user's allow or block list (an existing entry changes kind).

    Raises:
        ValidationFailed: bad kind or pattern.
        NotFound: no such user.
        AlreadyExists: the same entry is there already.
    """
    kind = _kind(kind)
    pattern = normalize_pattern(pattern)
    async with store.session() as session:
        user = await session.get(User, user_id)
        if user is None:
            raise NotFound("user does not exist")
        row = (await session.execute(select(SenderListEntry).where(
            SenderListEntry.user_id == user_id, SenderListEntry.pattern == pattern))).scalar_one_or_none()
        if row is not None and row.kind == kind:
            raise AlreadyExists(f"{pattern} is on your {kind} list already")
        before = {"kind": row.kind, "pattern": pattern} if row is not None else None
        if row is None:
            row = SenderListEntry(user_id=user_id, kind=kind, pattern=pattern, created_at=utcnow())
            session.add(row)
        else:
            row.kind = kind
        try:
            await session.flush()
        except IntegrityError:
            raise AlreadyExists(f"{pattern} is on your list already") from None
        await bump_generation(session)
        audit.record(session, actor, f"senderlist.{kind}", user.email, org_id=user.org_id, before=before,
                     after={"kind": kind, "pattern": pattern})
        await session.commit()
        return SenderListView(row.id, row.kind, row.pattern, row.created_at)


async def remove_entry(store: Store, user_id: int, entry_id: int, *, actor: Actor) -> None:
    """Remove one of the user's entries. Raises NotFound (also for another user's entry)."""
    async with store.session() as session:
        row = await session.get(SenderListEntry, entry_id)
        if row is None or row.user_id != user_id:
            raise NotFound(f"list entry {entry_id} does not exist")
        user = await session.get(User, user_id)
        audit.record(session, actor, "senderlist.remove", user.email if user else str(user_id),
                     org_id=user.org_id if user else None, before={"kind": row.kind, "pattern": row.pattern})
        await session.execute(delete(SenderListEntry).where(SenderListEntry.id == entry_id))
        await bump_generation(session)
        await session.commit()


def _match(entries: dict[str, str], sender: str) -> str | None:
    """The kind of the best entry for ``sender`` (address beats domain; block beats allow)."""
    if not sender or "@" not in sender:
        return None
    address = sender.lower()
    if address in entries:
        return entries[address]
    domain = address.rpartition("@")[2].rstrip(".")
    labels = domain.split(".")
    for i in range(len(labels) - 1):
        kind = entries.get(".".join(labels[i:]))
        if kind is not None:
            return kind
    return None


class SenderLists:
    """Every user's allow/block entries in memory, by the user's address (the recipient).

    Args:
        store: the database. Call :meth:`load` (the gateway registers it with the
            domain directory, which reloads when the configuration generation moves).
    """

    def __init__(self, store: Store):
        self.store = store
        self._by_rcpt: dict[str, dict[str, str]] = {}

    async def load(self) -> None:
        """Read every entry now (raises SQLAlchemyError if the database is down)."""
        async with self.store.session() as session:
            rows = (await session.execute(select(User.email, User.org_id, SenderListEntry.kind, SenderListEntry.pattern)
                                          .join(User, User.id == SenderListEntry.user_id))).all()
            owners = dict((await session.execute(select(Domain.name, Domain.org_id))).all())
        by_rcpt: dict[str, dict[str, str]] = {}
        for email, org_id, kind, pattern in rows:
            # Only a user of the organization owning the address's domain decides for its mail
            # (an account from before the tenancy rules cannot steer another organization's mail).
            if org_id is not None and owners.get(email.rpartition("@")[2].rstrip(".").lower()) != org_id:
                continue
            entries = by_rcpt.setdefault(email.lower(), {})
            if entries.get(pattern) != "block":  # cannot happen (unique), but block wins
                entries[pattern] = kind
        self._by_rcpt = by_rcpt
        log.debug("sender lists loaded", users=len(by_rcpt), entries=len(rows))

    def lookup(self, recipient: str, sender: str) -> str | None:
        """``"allow"``, ``"block"`` or ``None`` for mail from ``sender`` to ``recipient``."""
        entries = self._by_rcpt.get(recipient.lower())
        if not entries:
            return None
        return _match(entries, sender)
