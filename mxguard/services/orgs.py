"""Organizations: the tenants that own domains and users."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from mxguard.errors import AlreadyExists, NotFound, ValidationFailed
from mxguard.services import audit
from mxguard.services.access import SYSTEM, Actor, as_utc
from mxguard.storage.db import Store
from mxguard.storage.models import Organization

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._&'-]{0,99}$")


@dataclass(frozen=True)
class OrgView:
    id: int
    name: str
    created_at: dt.datetime


def _view(row: Organization) -> OrgView:
    return OrgView(row.id, row.name, as_utc(row.created_at))


def normalize_org_name(name: str) -> str:
    """Trimmed name, 1–100 characters: letters, digits, space and ``. _ & ' -``.

    Raises:
        ValidationFailed: field ``name``.
    """
    value = " ".join((name or "").split())
    if not _NAME.match(value):
        raise ValidationFailed("name", "an organization name is 1-100 letters, digits, spaces or . _ & ' -, "
                                       "starting with a letter or digit")
    return value


async def org_id_for(session, name: str, *, field: str = "org") -> int:
    """The id of the organization called ``name`` (inside an open session).

    Raises:
        ValidationFailed: no such organization (named after ``field``, for forms and the API).
    """
    row = (await session.execute(select(Organization).where(Organization.name == name.strip()))).scalar_one_or_none()
    if row is None:
        raise ValidationFailed(field, f"no organization called {name.strip()!r}")
    return row.id


async def add_org(store: Store, name: str, *, actor: Actor = SYSTEM) -> OrgView:
    """Create an organization (admins only).

    Raises:
        PermissionDenied, ValidationFailed, AlreadyExists.
    """
    actor.require_admin()
    value = normalize_org_name(name)
    async with store.session() as session:
        row = Organization(name=value)
        session.add(row)
        try:
            await session.flush()
        except IntegrityError:
            raise AlreadyExists(f"organization {value!r} exists already") from None
        audit.record(session, actor, "org.add", value, org_id=row.id, after={"name": value})
        await session.commit()
        return _view(row)


async def list_orgs(store: Store, *, actor: Actor = SYSTEM) -> list[OrgView]:
    """Every organization (admins) or the actor's own (org-admins), by name."""
    q = actor.scope(select(Organization).order_by(Organization.name), Organization.id)
    async with store.session() as session:
        return [_view(r) for r in (await session.execute(q)).scalars().all()]


async def get_org(store: Store, name: str, *, actor: Actor = SYSTEM) -> OrgView:
    """One organization. Raises NotFound (also for another tenant's organization)."""
    async with store.session() as session:
        row = (await session.execute(select(Organization).where(Organization.name == name.strip()))
               ).scalar_one_or_none()
    if row is None or not actor.may_see_org(row.id):
        raise NotFound(f"organization {name.strip()!r} does not exist")
    return _view(row)
