"""REST API keys: ``mxg_<prefix>_<secret>``, one user each, that user's role.

The key carries 256 random bits, so a fast hash (SHA-256) of the secret is
enough to store; a slow password hash would cost a CPU-heavy check on every
API request and protects nothing more for a secret this long. The prefix is
public: it names the key in lists and in the audit log.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select

from mxguard.errors import MxguardError, NotFound
from mxguard.services import audit
from mxguard.services.access import SYSTEM, Actor, as_utc
from mxguard.services.users import UserView, _view as _user_view, normalize_email
from mxguard.storage.db import Store
from mxguard.storage.models import ApiKey, User, utcnow

KEY_PREFIX = "mxg_"


class InvalidApiKey(MxguardError):
    """The key is malformed, unknown or revoked (HTTP 401)."""


@dataclass(frozen=True)
class ApiKeyView:
    prefix: str
    name: str
    user: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked: bool


def _view(row: ApiKey) -> ApiKeyView:
    return ApiKeyView(row.prefix, row.name, row.user.email, as_utc(row.created_at), as_utc(row.last_used_at),
                      row.revoked)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii", "replace")).hexdigest()


async def create_api_key(store: Store, email: str, *, name: str = "", actor: Actor = SYSTEM) -> tuple[str, ApiKeyView]:
    """Make a key for ``email``; the full key is returned once and never stored.

    Raises:
        NotFound: no such user (or one the actor may not see).
    """
    email = normalize_email(email)
    prefix = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    async with store.session() as session:
        user = (await session.execute(select(User).where(User.email == email))).scalar_one_or_none()
        if user is None or not (actor.may_see_org(user.org_id) or actor.user_id == user.id):
            raise NotFound(f"user {email} does not exist")
        row = ApiKey(prefix=prefix, secret_hash=_hash(secret), user_id=user.id, name=name[:100], revoked=False)
        session.add(row)
        audit.record(session, actor, "apikey.create", f"{prefix} ({email})", org_id=user.org_id,
                     after={"prefix": prefix, "user": email, "name": name[:100]})
        await session.commit()
        row = (await session.execute(select(ApiKey).where(ApiKey.prefix == prefix))).scalar_one()
        return f"{KEY_PREFIX}{prefix}_{secret}", _view(row)


async def authenticate_key(store: Store, key: str) -> tuple[UserView, str]:
    """The user behind an API key, and the key's prefix.

    Raises:
        InvalidApiKey: malformed, unknown, revoked, or wrong secret.
    """
    if not key or not key.startswith(KEY_PREFIX) or len(key) > 200:
        raise InvalidApiKey("invalid API key")
    prefix, _, secret = key[len(KEY_PREFIX):].partition("_")
    if not prefix or not secret:
        raise InvalidApiKey("invalid API key")
    async with store.session() as session:
        row = (await session.execute(select(ApiKey).where(ApiKey.prefix == prefix))).scalar_one_or_none()
        if row is None or row.revoked or not hmac.compare_digest(row.secret_hash, _hash(secret)):
            raise InvalidApiKey("invalid API key")
        now = utcnow()
        if row.last_used_at is None or (now - as_utc(row.last_used_at)).total_seconds() > 60:
            row.last_used_at = now
            await session.commit()
        return _user_view(row.user), prefix


async def list_api_keys(store: Store, *, actor: Actor = SYSTEM, email: str | None = None) -> list[ApiKeyView]:
    """Keys the actor may see (admins: all; others: their organization's or their own)."""
    q = select(ApiKey).join(ApiKey.user).order_by(ApiKey.created_at)
    if email:
        q = q.where(User.email == normalize_email(email))
    async with store.session() as session:
        rows = (await session.execute(q)).scalars().all()
    return [_view(r) for r in rows if actor.may_see_org(r.user.org_id) or actor.user_id == r.user_id]


async def revoke_api_key(store: Store, prefix: str, *, actor: Actor = SYSTEM) -> ApiKeyView:
    """Revoke a key by its prefix. Raises NotFound."""
    async with store.session() as session:
        row = (await session.execute(select(ApiKey).where(ApiKey.prefix == prefix.strip()))).scalar_one_or_none()
        if row is None or not (actor.may_see_org(row.user.org_id) or actor.user_id == row.user_id):
            raise NotFound(f"API key {prefix} does not exist")
        row.revoked = True
        audit.record(session, actor, "apikey.revoke", f"{row.prefix} ({row.user.email})", org_id=row.user.org_id,
                     before={"revoked": False}, after={"revoked": True})
        await session.commit()
        return _view(row)
