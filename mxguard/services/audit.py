"""The audit log: every change, with who made it and the state before and after.

Service functions call :func:`record` inside the transaction that makes the
change, so the change and its audit entry commit together or not at all.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select

from mxguard.services.access import Actor, as_utc
from mxguard.storage.db import Store
from mxguard.storage.models import AuditEntry, utcnow


def _plain(value: Any) -> Any:
    # JSON columns need plain data: dataclass dicts may hold tuples or datetimes.
    return None if value is None else json.loads(json.dumps(value, default=str))


def record(session, actor: Actor, action: str, target: str, *, org_id: int | None = None,
           before: dict[str, Any] | None = None, after: dict[str, Any] | None = None) -> None:
    """Add an audit entry to ``session`` (committed with the caller's change).

    Args:
        session: the open SQLAlchemy session of the change.
        actor: who made the change.
        action: dotted verb, e.g. ``domain.update``.
        target: what was changed, e.g. the domain name.
        org_id: the organization the target belongs to (org-admins see these entries).
        before, after: the target's state (``None`` for creation / deletion).
    """
    session.add(AuditEntry(ts=utcnow(), actor=actor.name, action=action, target=target, org_id=org_id,
                           before=_plain(before), after=_plain(after)))


@dataclass(frozen=True)
class AuditView:
    """One audit entry; ``changes`` maps each changed key to ``(before, after)``."""

    id: int
    ts: dt.datetime
    actor: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    @property
    def changes(self) -> dict[str, tuple[Any, Any]]:
        before, after = self.before or {}, self.after or {}
        keys = list(dict.fromkeys([*before, *after]))
        return {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}


async def list_entries(store: Store, actor: Actor, *, limit: int = 100, offset: int = 0,
                       action: str | None = None, target: str | None = None) -> list[AuditView]:
    """Newest first. Admins see everything; an org-admin sees entries of their organization
    and their own actions.

    Raises:
        PermissionDenied: the actor is a plain user.
    """
    actor.require_console()
    q = select(AuditEntry)
    if not actor.is_admin:
        q = q.where(or_(AuditEntry.org_id == actor.org_id, AuditEntry.actor == actor.name))
    if action:
        q = q.where(AuditEntry.action == action)
    if target:
        q = q.where(AuditEntry.target == target)
    q = q.order_by(AuditEntry.id.desc()).limit(max(1, min(limit, 1000))).offset(max(0, offset))
    async with store.session() as session:
        rows = (await session.execute(q)).scalars().all()
    return [AuditView(r.id, as_utc(r.ts), r.actor, r.action, r.target, r.before, r.after) for r in rows]
