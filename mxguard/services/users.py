"""Console users: accounts, argon2 passwords, login with lockout and rate limiting, sessions.

Passwords are hashed with argon2id (RFC 9106) by argon2-cffi. A login is
refused without checking the password when the client address made too many
failed attempts recently (rate limit) or the account is locked after
``max_failures`` consecutive failures (lockout, OWASP ASVS 2.2.1). Sessions
live in the database; the browser holds a random token whose SHA-256 is the
row's key, so a copy of the database does not give working sessions.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from mxguard.errors import AlreadyExists, MxguardError, NotFound, PermissionDenied, ValidationFailed
from mxguard.services import audit, passwords
from mxguard.services.access import SYSTEM, Actor, Role, as_utc
from mxguard.services.orgs import org_id_for
from mxguard.services.tenancy import check_user_address
from mxguard.storage.db import Store
from mxguard.storage.models import LoginAttempt, User, WebSession, utcnow

_hasher = passwords.HASHER  # the one hasher (tests make hashes with it)


_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z0-9-]{2,63}$")
MIN_PASSWORD_LENGTH = 12


@dataclass(frozen=True)
class UserView:
    id: int
    email: str
    role: str
    org: str | None
    org_id: int | None
    locked_until: dt.datetime | None
    last_login_at: dt.datetime | None
    created_at: dt.datetime
    #: The password is a generated one-time password; the console asks for a new one.
    must_change_password: bool = False

    def actor(self, via: str = "user") -> Actor:
        """The :class:`Actor` for calls this user makes (``via`` is ``user`` or ``apikey:<prefix>``)."""
        name = f"user:{self.email}" if via == "user" else f"{via} ({self.email})"
        return Actor(name, self.role, self.org_id, self.org, self.id, self.email)


def _view(row: User) -> UserView:
    return UserView(row.id, row.email, row.role, row.org.name if row.org else None, row.org_id,
                    as_utc(row.locked_until), as_utc(row.last_login_at), as_utc(row.created_at),
                    bool(row.must_change_password))


@dataclass(frozen=True)
class LoginPolicy:
    """Lockout and rate-limit numbers (settings ``web.*``).

    Attributes:
        max_failures: consecutive wrong passwords before the account locks.
        lockout_seconds: how long it stays locked.
        ip_max_failures: failed attempts one client address may make per window.
        ip_window_seconds: that window.
    """

    max_failures: int = 5
    lockout_seconds: float = 900
    ip_max_failures: int = 20
    ip_window_seconds: float = 300


class LoginRefused(MxguardError):
    """Login failed. ``reason`` is ``invalid``, ``locked`` or ``rate_limited``;
    ``retry_after`` is in seconds (for ``locked`` and ``rate_limited``)."""

    def __init__(self, reason: str, retry_after: int = 0):
        messages = {"invalid": "Wrong e-mail address or password.",
                    "locked": "This account is locked after repeated failed logins; try again later.",
                    "rate_limited": "Too many failed logins from your address; try again later."}
        super().__init__(messages[reason])
        self.reason = reason
        self.retry_after = retry_after


def normalize_email(email: str) -> str:
    """Trimmed, lower-cased address. Raises ValidationFailed (field ``email``)."""
    value = (email or "").strip().lower()
    if not _EMAIL.match(value):
        raise ValidationFailed("email", f"{email!r} is not an e-mail address")
    return value


def check_password(password: str) -> None:
    """Raises ValidationFailed (field ``password``) when shorter than 12 characters (NIST SP 800-63B asks ≥ 8)."""
    if len(password or "") < MIN_PASSWORD_LENGTH:
        raise ValidationFailed("password", f"must be at least {MIN_PASSWORD_LENGTH} characters")


def generate_password() -> str:
    """A one-time password of about 128 bits, URL-safe characters."""
    return secrets.token_urlsafe(16)


async def _user_row(session, email: str) -> User | None:
    return (await session.execute(select(User).where(User.email == email))).scalar_one_or_none()


async def add_user(store: Store, email: str, role: str, *, org: str | None = None, password: str | None = None,
                   actor: Actor = SYSTEM) -> tuple[UserView, str | None]:
    """Create a user.

    Args:
        email: the login name.
        role: ``admin``, ``org-admin`` or ``user``.
        org: organization name; required for ``org-admin`` and ``user``, refused for ``admin``.
        password: the password; ``None`` generates a one-time password that is returned.
        actor: admins may add anyone; org-admins only ``org-admin``/``user`` of their organization.

    Returns:
        ``(user, generated password or None)``.

    Raises:
        ValidationFailed: a bad value; field ``email`` also when the address belongs to
            another organization's domain (:func:`mxguard.services.tenancy.check_user_address`).
        AlreadyExists, PermissionDenied.
    """
    actor.require_console()
    email = normalize_email(email)
    try:
        role = Role(role).value
    except ValueError:
        raise ValidationFailed("role", f"{role!r} is not one of: admin, org-admin, user") from None
    if role == Role.ADMIN and org:
        raise ValidationFailed("org", "an admin belongs to no organization")
    if role != Role.ADMIN and not org:
        raise ValidationFailed("org", f"a {role} needs an organization (--org)")
    generated = None
    if password is None:
        password = generated = generate_password()
    check_password(password)
    async with store.session() as session:
        org_id = await org_id_for(session, org) if org else None
        if not actor.is_admin and (role == Role.ADMIN or org_id != actor.org_id):
            raise PermissionDenied("an org-admin may only add org-admins and users of their own organization")
        await check_user_address(store, session, actor, email, role, org_id, org)
        row = User(email=email, password_hash=passwords.hash_password(password), role=role, org_id=org_id, failed_logins=0,
                   must_change_password=generated is not None)
        session.add(row)
        try:
            await session.flush()
        except IntegrityError:
            raise AlreadyExists(f"user {email} exists already") from None
        audit.record(session, actor, "user.add", email, org_id=org_id,
                     after={"email": email, "role": role, "org": org})
        await session.commit()
        row = await _user_row(session, email)
        return _view(row), generated


async def set_password(store: Store, email: str, password: str | None = None, *,
                       actor: Actor = SYSTEM) -> str | None:
    """Set (or generate, when ``None``) a user's password; unlocks the account and ends its sessions.

    Returns:
        the generated password, or ``None``.

    Raises:
        NotFound, ValidationFailed.
    """
    email = normalize_email(email)
    generated = None
    if password is None:
        password = generated = generate_password()
    check_password(password)
    async with store.session() as session:
        row = await _user_row(session, email)
        if row is None or not (actor.may_see_org(row.org_id) or actor.user_id == row.id):
            raise NotFound(f"user {email} does not exist")
        row.password_hash = passwords.hash_password(password)
        row.must_change_password = generated is not None
        row.failed_logins = 0
        row.locked_until = None
        await session.execute(delete(WebSession).where(WebSession.user_id == row.id))
        audit.record(session, actor, "user.password", email, org_id=row.org_id)
        await session.commit()
    return generated


async def change_own_password(store: Store, user_id: int, current: str, new: str, *,
                              keep_session_token: str | None = None) -> None:
    """A signed-in user replaces their password (after a one-time password, or at will).

    Other sessions of the user end; the one named by ``keep_session_token`` stays.

    Raises:
        ValidationFailed: ``current_password`` is wrong, or ``new_password`` is too short
            or the same as the current one.
    """
    async with store.session() as session:
        row = await session.get(User, user_id)
        if row is None:
            raise NotFound("user does not exist")
        if not _verify(row.password_hash, current):
            raise ValidationFailed("current_password", "is not your current password")
        try:
            check_password(new)
        except ValidationFailed as exc:
            raise ValidationFailed("new_password", exc.message) from None
        if new == current:
            raise ValidationFailed("new_password", "must differ from the current password")
        row.password_hash = passwords.hash_password(new)
        row.must_change_password = False
        keep = _token_hash(keep_session_token) if keep_session_token else ""
        await session.execute(delete(WebSession).where(WebSession.user_id == row.id,
                                                       WebSession.token_hash != keep))
        audit.record(session, Actor(f"user:{row.email}", row.role, row.org_id), "user.password", row.email,
                     org_id=row.org_id)
        await session.commit()


async def list_users(store: Store, *, actor: Actor = SYSTEM) -> list[UserView]:
    """Users the actor may see, by e-mail address."""
    actor.require_console()
    q = actor.scope(select(User).order_by(User.email), User.org_id)
    async with store.session() as session:
        return [_view(r) for r in (await session.execute(q)).scalars().all()]


async def get_user(store: Store, email: str, *, actor: Actor = SYSTEM) -> UserView:
    """One user. Raises NotFound (also for another organization's user)."""
    email = normalize_email(email)
    async with store.session() as session:
        row = await _user_row(session, email)
    if row is None or not (actor.may_see_org(row.org_id) or actor.user_id == row.id):
        raise NotFound(f"user {email} does not exist")
    return _view(row)


async def authenticate(store: Store, email: str, password: str, client_ip: str,
                       policy: LoginPolicy = LoginPolicy()) -> UserView:
    """Check a login.

    Raises:
        LoginRefused: ``rate_limited`` (the client address failed too often in
            the window; the password is not checked), ``locked`` (the account is
            locked; even the right password is refused), or ``invalid``.
    """
    now = utcnow()
    email = (email or "").strip().lower()
    async with store.session() as session:
        window_start = now - dt.timedelta(seconds=policy.ip_window_seconds)
        recent_failures = (await session.execute(
            select(func.count()).select_from(LoginAttempt).where(
                LoginAttempt.client_ip == client_ip, LoginAttempt.ts >= window_start,
                LoginAttempt.success.is_(False)))).scalar_one()
        if recent_failures >= policy.ip_max_failures:
            raise LoginRefused("rate_limited", int(policy.ip_window_seconds))
        # Keep the attempts table small: a day is far more than any window.
        await session.execute(delete(LoginAttempt).where(LoginAttempt.ts < now - dt.timedelta(days=1)))
        row = await _user_row(session, email)
        refused: LoginRefused | None = None
        if row is None:
            _verify(None, password)  # as long as a real check
            refused = await _unknown_account_refusal(session, email, now, policy)
        elif row.locked_until is not None and as_utc(row.locked_until) > now:
            refused = LoginRefused("locked", int((as_utc(row.locked_until) - now).total_seconds()) + 1)
        elif not _verify(row.password_hash, password):
            row.failed_logins += 1
            refused = LoginRefused("invalid")
            if row.failed_logins >= policy.max_failures:
                row.locked_until = now + dt.timedelta(seconds=policy.lockout_seconds)
                row.failed_logins = 0
                audit.record(session, Actor(f"login from {client_ip}"), "user.locked", email, org_id=row.org_id,
                             after={"locked_until": row.locked_until.isoformat()})
                refused = LoginRefused("locked", int(policy.lockout_seconds))
        session.add(LoginAttempt(ts=now, email=email[:320], client_ip=client_ip, success=refused is None))
        if refused is None:
            row.failed_logins = 0
            row.locked_until = None
            row.last_login_at = now
            if passwords.needs_rehash(row.password_hash):
                row.password_hash = passwords.hash_password(password)
        await session.commit()
        if refused is not None:
            raise refused
        return _view(row)


async def _unknown_account_refusal(session, email: str, now: dt.datetime, policy: LoginPolicy) -> LoginRefused:
    """The refusal for an address with no account, shaped like a real account's.

    A lockout answered only for existing accounts would tell an attacker which
    addresses have one (OWASP ASVS 2.2.1 / 3.2.x account enumeration), so an
    unknown address "locks" as well: after ``max_failures`` failed attempts
    within ``lockout_seconds`` it gets ``locked`` until the oldest of them ages out.
    """
    since = now - dt.timedelta(seconds=policy.lockout_seconds)
    failures = (await session.execute(
        select(LoginAttempt.ts).where(LoginAttempt.email == email[:320], LoginAttempt.ts >= since,
                                      LoginAttempt.success.is_(False))
        .order_by(LoginAttempt.ts.desc()).limit(policy.max_failures))).scalars().all()
    if len(failures) + 1 < policy.max_failures:
        return LoginRefused("invalid")
    oldest = as_utc(failures[-1]) if len(failures) >= policy.max_failures else now
    return LoginRefused("locked", max(1, int((oldest - since).total_seconds()) + 1))


def _verify(password_hash: str | None, password: str) -> bool:
    return passwords.verify_password(password_hash, password)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


@dataclass(frozen=True)
class SessionInfo:
    """A live console session: its user and its CSRF token."""

    user: UserView
    csrf_token: str


async def create_session(store: Store, user: UserView, client_ip: str, lifetime_seconds: float) -> tuple[str, str]:
    """Start a console session (a new token every login: no session fixation).

    Returns:
        ``(session token for the cookie, CSRF token for the forms)``.
    """
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = utcnow()
    async with store.session() as session:
        # Expired sessions of anyone go now; they are useless and bounded this way.
        await session.execute(delete(WebSession).where(WebSession.expires_at < now))
        session.add(WebSession(token_hash=_token_hash(token), user_id=user.id, csrf_token=csrf, client_ip=client_ip,
                               created_at=now, last_seen_at=now,
                               expires_at=now + dt.timedelta(seconds=lifetime_seconds)))
        await session.commit()
    return token, csrf


async def session_for(store: Store, token: str | None, idle_seconds: float) -> SessionInfo | None:
    """The session for a cookie token, or ``None`` when unknown, expired or idle too long."""
    if not token or len(token) > 200:
        return None
    now = utcnow()
    async with store.session() as session:
        row = await session.get(WebSession, _token_hash(token))
        if row is None:
            return None
        if as_utc(row.expires_at) < now or as_utc(row.last_seen_at) < now - dt.timedelta(seconds=idle_seconds):
            await session.delete(row)
            await session.commit()
            return None
        user = await session.get(User, row.user_id)
        if user is None:
            return None
        if (now - as_utc(row.last_seen_at)).total_seconds() > 30:  # avoid a write per request
            row.last_seen_at = now
            await session.commit()
        return SessionInfo(_view(user), row.csrf_token)


async def end_session(store: Store, token: str | None) -> None:
    """Log out: forget the session (unknown tokens are ignored)."""
    if not token:
        return
    async with store.session() as session:
        await session.execute(delete(WebSession).where(WebSession.token_hash == _token_hash(token)))
        await session.commit()


__all__ = ["UserView", "LoginPolicy", "LoginRefused", "SessionInfo", "add_user", "set_password", "list_users",
           "get_user", "change_own_password", "authenticate", "create_session", "session_for", "end_session", "normalize_email",
           "NotFound"]
