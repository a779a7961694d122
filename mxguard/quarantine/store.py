"""The quarantine store: one sealed row per held recipient copy.

Service functions (the CLI now, the Message Center later, call these and
nothing else):

* :func:`quarantine_message` seals and stores one recipient's copy;
* :func:`list_quarantine` lists held messages (newest first, no bodies);
* :func:`get_quarantined` returns a row and its opened bytes.

Bodies are sealed with AES-256-GCM (:class:`~mxguard.storage.sealing.Sealer`)
with ``b"quarantine:" + id`` as associated data, so a sealed body cannot be
swapped into another row.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from sqlalchemy import select

from mxguard.errors import NotFound
from mxguard.smtp.dispositions import HeldCopy  # noqa: F401 - the proxy builds them; re-exported here
from mxguard.storage.db import Store
from mxguard.storage.models import QuarantinedMessage, utcnow
from mxguard.storage.sealing import Sealer


def new_quarantine_id() -> str:
    """A random, unguessable id (the Message Center puts it in links)."""
    return "Q" + secrets.token_hex(12).upper()


def _associated(qid: str) -> bytes:
    return b"quarantine:" + qid.encode("ascii")


async def quarantine_many(store: Store, sealer: Sealer, *, txn_id: str, sender: str, subject: str,
                          copies: list[HeldCopy], verdict: dict[str, Any], score: float | None,
                          retention_days: int = 30) -> list[str]:
    """Seal and store several recipients' copies in one database transaction.

    Returns:
        the new quarantine ids, in the order of ``copies``.

    Raises:
        SQLAlchemyError: the database refused (nothing was stored).
    """
    now = utcnow()
    ids = []
    rows = []
    for copy in copies:
        qid = new_quarantine_id()
        key_id, blob = sealer.seal(copy.content, _associated(qid))
        rows.append(QuarantinedMessage(
            id=qid, created=now, txn_id=txn_id, recipient=copy.recipient[:500], sender=sender[:500],
            subject=subject[:500], reason=copy.reason, category=copy.category, score=score, verdict=verdict,
            size=len(copy.content), key_id=key_id, sealed=blob, requiretls=copy.requiretls,
            expires_at=now + dt.timedelta(days=retention_days)))
        ids.append(qid)
    async with store.session() as session:
        session.add_all(rows)
        await session.commit()
    return ids


async def quarantine_message(store: Store, sealer: Sealer, *, txn_id: str, recipient: str, sender: str,
                             subject: str, reason: str, category: str, content: bytes,
                             verdict: dict[str, Any], score: float | None = None,
                             retention_days: int = 30) -> str:
    """Seal and store one recipient's copy; returns its quarantine id.

    Args:
        content: the message as it would have been delivered (bytes).
        reason: one line, e.g. ``junk: builtin score 1000 >= 5``.
        category: ``virus``, ``junk`` or ``policy``.
        verdict: the verdict as plain data (kept with the row).
        retention_days: days until it expires.

    Raises:
        SQLAlchemyError: the database refused.
    """
    ids = await quarantine_many(store, sealer, txn_id=txn_id, sender=sender, subject=subject,
                                copies=[HeldCopy(recipient, reason, category, content)], verdict=verdict,
                                score=score, retention_days=retention_days)
    return ids[0]


async def list_quarantine(store: Store, *, recipient: str | None = None, limit: int = 100, offset: int = 0,
                          include_released: bool = False) -> list[QuarantinedMessage]:
    """Held messages, newest first (sealed bodies are not opened).

    Args:
        recipient: only this recipient (exact, case-insensitive).
        include_released: also rows already released or deleted.
    """
    q = select(QuarantinedMessage)
    if recipient:
        q = q.where(QuarantinedMessage.recipient.ilike(recipient.replace("\\", "\\\\").replace("%", "\\%")
                                                       .replace("_", "\\_"), escape="\\"))
    if not include_released:
        q = q.where(QuarantinedMessage.released_at.is_(None), QuarantinedMessage.deleted_at.is_(None))
    q = q.order_by(QuarantinedMessage.created.desc(), QuarantinedMessage.id).limit(max(1, min(limit, 10000)))
    q = q.offset(max(0, offset))
    async with store.session() as session:
        return list((await session.execute(q)).scalars().all())


async def get_quarantined(store: Store, sealer: Sealer, qid: str) -> tuple[QuarantinedMessage, bytes]:
    """A held message's row and its opened bytes.

    Raises:
        NotFound: no such id.
        SealingError: the key is gone or the blob was altered.
    """
    async with store.session() as session:
        row = await session.get(QuarantinedMessage, qid)
    if row is None:
        raise NotFound(f"quarantined message {qid} does not exist")
    return row, sealer.open(row.sealed, _associated(qid))


def row_as_dict(row: QuarantinedMessage) -> dict[str, Any]:
    """A quarantine row as plain data, without the sealed body (JSON output, API)."""
    data = {c.name: getattr(row, c.name) for c in QuarantinedMessage.__table__.columns if c.name != "sealed"}
    for key in ("created", "released_at", "deleted_at", "expires_at"):
        data[key] = data[key].isoformat() if data[key] else None
    return data
