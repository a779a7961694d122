"""Per-organization quarantine and notification settings: the message-links switch and the alerts.

They live on the organization row. Admins change any organization's,
org-admins their own (another tenant's is ``NotFound``); each change is in the
audit log. Domains without an organization use :data:`DEFAULTS` (links on,
virus notifications off, alerts on but only to the gateway's ``notify.admin_address``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select

from mxguard.errors import NotFound, ValidationFailed
from mxguard.services import audit
from mxguard.services.access import SYSTEM, Actor
from mxguard.services.users import normalize_email
from mxguard.storage.db import Store
from mxguard.storage.models import Domain, Organization

#: The switches, each a boolean on the organization row (virus notifications default off, the rest on).
SWITCHES = ("message_links", "notify_virus_recipient", "notify_virus_admin", "notify_route_down",
            "notify_cert_expiry", "notify_engine_down")


@dataclass(frozen=True)
class OrgSettings:
    """One organization's quarantine and notification settings.

    Attributes:
        org: the organization's name (``None`` for domains without one).
        org_id: its id.
        message_links: summaries carry deliver/view links and the Message Center offers "view".
        notify_virus_recipient: tell the recipient when a virus addressed to them was stopped.
        notify_virus_admin: tell ``alert_address`` the same.
        notify_route_down: alert when a route of the organization has spooled for ``route_down_minutes``.
        notify_cert_expiry: alert when the gateway's certificate, one it presents by SNI, or a downstream
            server's expires soon.
        notify_engine_down: alert when a filtering engine does not answer.
        alert_address: where the organization's alerts go (``None``: nowhere).
        route_down_minutes: minutes of spooling before a route-down alert.
    """

    org: str | None = None
    org_id: int | None = None
    message_links: bool = True
    notify_virus_recipient: bool = False
    notify_virus_admin: bool = False
    notify_route_down: bool = True
    notify_cert_expiry: bool = True
    notify_engine_down: bool = True
    alert_address: str | None = None
    route_down_minutes: int = 30

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS = OrgSettings()


def _view(row: Organization) -> OrgSettings:
    return OrgSettings(row.name, row.id, *(bool(getattr(row, s)) for s in SWITCHES), row.alert_address,
                       row.route_down_minutes or 30)


def parse_switch(field: str, value: Any) -> bool:
    """``on/off``, ``true/false``, ``yes/no``, ``1/0`` (or a bool). Raises ValidationFailed naming ``field``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ValidationFailed(field, f"{value!r} is not on or off")


def _validate(changes: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if value is None:
            continue
        if key in SWITCHES:
            out[key] = parse_switch(key, value)
        elif key == "alert_address":
            out[key] = normalize_email(value) if str(value).strip() else None
        elif key == "route_down_minutes":
            try:
                minutes = int(str(value).strip())
            except ValueError:
                raise ValidationFailed(key, f"{value!r} is not a whole number of minutes") from None
            if not 1 <= minutes <= 7 * 24 * 60:
                raise ValidationFailed(key, "must be between 1 and 10080 minutes")
            out[key] = minutes
        else:
            raise ValidationFailed(key, "unknown organization setting")
    return out


async def _row(session, name: str, actor: Actor) -> Organization:
    actor.require_console()
    row = (await session.execute(select(Organization).where(Organization.name == (name or "").strip()))
           ).scalar_one_or_none()
    if row is None or not actor.may_see_org(row.id):
        raise NotFound(f"organization {(name or '').strip()!r} does not exist")
    return row


async def get_settings(store: Store, name: str, *, actor: Actor = SYSTEM) -> OrgSettings:
    """One organization's settings. Raises NotFound (also another tenant's), PermissionDenied (a plain user)."""
    async with store.session() as session:
        return _view(await _row(session, name, actor))


async def list_settings(store: Store, *, actor: Actor = SYSTEM) -> list[OrgSettings]:
    """The settings of every organization the actor may see, by name."""
    actor.require_console()
    q = actor.scope(select(Organization).order_by(Organization.name), Organization.id)
    async with store.session() as session:
        return [_view(r) for r in (await session.execute(q)).scalars().all()]


async def update_settings(store: Store, name: str, *, actor: Actor = SYSTEM, **changes: Any) -> OrgSettings:
    """Change an organization's settings (``None`` values are left as they are).

    Args:
        changes: any of :data:`SWITCHES` (bool or ``on``/``off``), ``alert_address``
            (``""`` clears it), ``route_down_minutes`` (1-10080).

    Raises:
        NotFound, PermissionDenied, ValidationFailed (naming the field).
    """
    values = _validate(changes)
    async with store.session() as session:
        row = await _row(session, name, actor)
        before = _view(row)
        for key, value in values.items():
            setattr(row, key, value)
        await session.flush()
        after = _view(row)
        if after != before:
            audit.record(session, actor, "org.settings", row.name, org_id=row.id, before=before.as_dict(),
                         after=after.as_dict())
        await session.commit()
        return after


async def settings_for_domain(store: Store, domain: str) -> OrgSettings:
    """The settings that apply to mail of ``domain`` (its organization's, else :data:`DEFAULTS`)."""
    async with store.session() as session:
        row = (await session.execute(select(Organization).join(Domain, Domain.org_id == Organization.id)
                                     .where(Domain.name == domain.lower()))).scalar_one_or_none()
    return _view(row) if row is not None else DEFAULTS


async def settings_by_domain(store: Store) -> dict[str, OrgSettings]:
    """``{domain name: settings}`` for every served domain (one query; for background checks)."""
    async with store.session() as session:
        rows = (await session.execute(select(Domain.name, Organization).outerjoin(
            Organization, Domain.org_id == Organization.id))).all()
    return {name: (_view(org) if org is not None else DEFAULTS) for name, org in rows}
