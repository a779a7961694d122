"""Message-log access for the console and the API, scoped by tenancy.

An admin sees every transaction; an org-admin sees transactions with a
recipient in one of their organization's domains, and the outbound ones
(relayed for the organization) whose sender is in one of them; a plain user sees none here
(the Message Center is their view).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select

from mxguard.errors import NotFound, ValidationFailed
from mxguard.services.access import Actor
from mxguard.services.domains import list_domains
from mxguard.storage import messagelog
from mxguard.storage.db import Store
from mxguard.storage.models import MessageLogEntry

DISPOSITIONS = ("delivered", "rejected", "deferred", "quarantined", "spooled", "partial", "aborted", "released",
                "tls-report", "held")
#: The message log's directions: mail from the internet, and mail relayed for an organization.
DIRECTIONS = ("inbound", "outbound")


async def visible_domains(store: Store, actor: Actor) -> list[str] | None:
    """``None`` for admins (no restriction), else the actor's domain names."""
    actor.require_console()
    if actor.is_admin:
        return None
    return [d.name for d in await list_domains(store, actor=actor)]


async def search_messages(store: Store, actor: Actor, *, sender: str | None = None, recipient: str | None = None,
                          subject: str | None = None, client_ip: str | None = None, disposition: str | None = None,
                          tls: bool | None = None, since: dt.datetime | None = None, until: dt.datetime | None = None,
                          limit: int = 100, offset: int = 0, direction: str | None = None) -> list[MessageLogEntry]:
    """Search (see :func:`mxguard.storage.messagelog.search`), restricted to what ``actor`` may see.

    Args:
        direction: ``inbound``, ``outbound`` or ``None``/``""`` for both.

    Raises:
        PermissionDenied: a plain user.
        ValidationFailed: (``direction``) another value.
    """
    if direction and direction not in DIRECTIONS:
        raise ValidationFailed("direction", f"{direction!r} is not one of: {', '.join(DIRECTIONS)}")
    domains = await visible_domains(store, actor)
    return await messagelog.search(store, sender=sender, recipient=recipient, subject=subject, client_ip=client_ip,
                                   disposition=disposition, tls=tls, since=since, until=until, limit=limit,
                                   offset=offset, recipient_domains=domains, direction=direction or None)


async def get_message(store: Store, actor: Actor, entry_id: int) -> MessageLogEntry:
    """One message-log record by id.

    Raises:
        NotFound: no such record, or not visible to ``actor``.
    """
    domains = await visible_domains(store, actor)
    q = select(MessageLogEntry).where(MessageLogEntry.id == entry_id)
    if domains is not None:
        q = q.where(messagelog.recipient_domain_clause(domains))
    async with store.session() as session:
        row = (await session.execute(q)).scalar_one_or_none()
    if row is None:
        raise NotFound(f"message-log record {entry_id} does not exist")
    return row


def as_dict(entry: MessageLogEntry) -> dict[str, Any]:
    """Every field the log keeps, as plain data."""
    return messagelog.entry_as_dict(entry)
