"""Who is acting: the actor every service call carries, its role and its organization.

Roles (issue 6): ``admin`` may do everything; ``org-admin`` may see and change
only the domains, users and log entries of their own organization (anything
else is "not found", so other tenants' names do not leak); ``user`` may only
use the Message Center.
"""

from __future__ import annotations

import datetime as dt
import getpass
from dataclasses import dataclass
from enum import StrEnum

from mxguard.errors import PermissionDenied


class Role(StrEnum):
    ADMIN = "admin"
    ORG_ADMIN = "org-admin"
    USER = "user"


@dataclass(frozen=True)
class Actor:
    """The subject of a service call.

    Attributes:
        name: what the audit log shows: ``user:<email>``, ``apikey:<prefix>``,
            ``cli:<unix user>`` or ``system``.
        role: a :class:`Role` value.
        org_id: the organization of an ``org-admin``/``user`` (``None`` for admins).
        org: that organization's name.
        user_id: the users-table id, when a person is acting.
        email: that person's login name.
    """

    name: str
    role: str = Role.ADMIN
    org_id: int | None = None
    org: str | None = None
    user_id: int | None = None
    email: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN

    def may_see_org(self, org_id: int | None) -> bool:
        """True when this actor may see objects owned by ``org_id``."""
        return self.is_admin or (self.role == Role.ORG_ADMIN and org_id is not None and org_id == self.org_id)

    def scope(self, query, org_column):
        """``query`` limited to this actor's organization (``org_column == org_id``), unchanged for an admin.

        The one place list queries apply tenancy, the query-side twin of :meth:`may_see_org`.
        """
        return query if self.is_admin else query.where(org_column == self.org_id)

    def require_admin(self) -> None:
        """Raises PermissionDenied unless the actor is an admin."""
        if not self.is_admin:
            raise PermissionDenied("this needs the admin role")

    def require_console(self) -> None:
        """Raises PermissionDenied unless the actor is an admin or org-admin."""
        if self.role not in (Role.ADMIN, Role.ORG_ADMIN):
            raise PermissionDenied("this needs the admin or org-admin role")

    @classmethod
    def cli(cls) -> "Actor":
        """The operator at the command line: full rights, named after the Unix user."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
        return cls(f"cli:{user}", Role.ADMIN)


#: Internal callers (the gateway itself, the demo's set-up).
SYSTEM = Actor("system", Role.ADMIN)


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite returns naive datetimes; everything is stored in UTC, so attach UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)
