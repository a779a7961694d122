"""Signed, expiring, single-use links: Message Center sign-in, and a summary's deliver / view links.

A link token is ``itsdangerous``'s URL-safe timed serialization of
``{"p": purpose, "s": subject, "j": token id}``, signed (HMAC-SHA1 over a key
derived from the secret in ``quarantine.link_key_file``) and stamped with its
issue time. :meth:`LinkSigner.load` refuses a token that was altered (one byte
changed breaks the signature), is older than its lifetime, or was made for
another purpose; :func:`consume` records the token id in ``used_tokens`` so it
works once (the primary key makes a second use fail on every node).

Purposes: ``signin`` (subject: an e-mail address), ``deliver`` and ``view``
(subject: a quarantine id), and ``frame`` (subject: a quarantine id; the
short-lived, reusable capability a view page gives its sandboxed frame).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadData, SignatureExpired, TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError

from mxguard.errors import ConfigError, MxguardError
from mxguard.storage.db import Store
from mxguard.storage.models import UsedToken, utcnow
from mxguard.storage.sealing import ensure_secret_file

PURPOSES = ("signin", "deliver", "view", "frame")
SINGLE_USE = ("signin", "deliver", "view")
#: Seconds a view page's frame capability lasts.
FRAME_LIFETIME = 600


class InvalidLink(MxguardError):
    """A link that cannot be used. ``reason`` is ``invalid`` (altered, cut off, or for something else),
    ``expired`` or ``used``; the message says so in words for the page."""

    MESSAGES = {
        "invalid": "This link is not valid: it may have been cut off or altered. Sign in to the Message Center "
                   "instead.",
        "expired": "This link has expired. Sign in to the Message Center, or wait for the next summary.",
        "used": "This link has already been used; each link works once. Sign in to the Message Center instead.",
    }

    def __init__(self, reason: str):
        super().__init__(self.MESSAGES[reason])
        self.reason = reason


@dataclass(frozen=True)
class LinkClaim:
    """What a valid token says.

    Attributes:
        purpose: one of :data:`PURPOSES`.
        subject: an e-mail address (``signin``) or a quarantine id.
        token_id: unique per token (recorded when used).
        issued_at: when it was made (UTC).
    """

    purpose: str
    subject: str
    token_id: str
    issued_at: dt.datetime


def ensure_link_key(path: Path) -> None:
    """Create the link-signing secret (256 random bits, hex, mode 0600) unless it exists.

    Raises:
        OSError: the file cannot be written.
    """
    ensure_secret_file(path)


def _fixed_clock(timestamp: int) -> type[TimestampSigner]:
    class Signer(TimestampSigner):
        def get_timestamp(self) -> int:
            return timestamp
    return Signer


class LinkSigner:
    """Makes and checks link tokens.

    Args:
        secret: the signing secret (bytes; at least 32).
    """

    SALT = "mxguard-quarantine-link"

    def __init__(self, secret: bytes):
        if len(secret) < 32:
            raise ConfigError("quarantine.link_key_file: the secret must be at least 32 bytes")
        self.secret = secret
        self._serializer = URLSafeTimedSerializer(secret, salt=self.SALT)

    @classmethod
    def from_file(cls, path: Path) -> "LinkSigner":
        """Load the secret file.

        Raises:
            ConfigError: missing, readable by group or others, or too short.
        """
        try:
            data = path.read_bytes().strip()
        except FileNotFoundError:
            raise ConfigError(f"quarantine.link_key_file: {path} does not exist; run 'mxguard init'") from None
        if os.name == "posix" and path.stat().st_mode & 0o077:
            raise ConfigError(f"quarantine.link_key_file: {path} must not be readable by group or others (chmod 600)")
        return cls(data)

    def make(self, purpose: str, subject: str, *, issued_at: float | None = None) -> str:
        """A new token for ``purpose`` about ``subject``.

        Args:
            issued_at: Unix time to stamp (default: now; tests make old tokens with it).
        """
        if purpose not in PURPOSES:
            raise ValueError(f"unknown link purpose {purpose!r}")
        payload = {"p": purpose, "s": subject, "j": secrets.token_urlsafe(16)}
        if issued_at is None:
            return self._serializer.dumps(payload)
        serializer = URLSafeTimedSerializer(self.secret, salt=self.SALT, signer=_fixed_clock(int(issued_at)))
        return serializer.dumps(payload)

    def load(self, token: str, purpose: str, max_age: float) -> LinkClaim:
        """Check a token's signature, age (seconds) and purpose.

        Raises:
            InvalidLink: ``invalid`` or ``expired`` (``used`` is :func:`consume`'s).
        """
        if not token or len(token) > 1000:
            raise InvalidLink("invalid")
        try:
            payload, stamp = self._serializer.loads(token, max_age=max_age, return_timestamp=True)
        except SignatureExpired:
            raise InvalidLink("expired") from None
        except BadData:
            raise InvalidLink("invalid") from None
        if not isinstance(payload, dict) or payload.get("p") != purpose or not isinstance(payload.get("s"), str) \
                or not isinstance(payload.get("j"), str):
            raise InvalidLink("invalid")
        return LinkClaim(purpose, payload["s"], payload["j"], stamp)

    def purpose_of(self, token: str) -> str:
        """The purpose a correctly signed token names (its age is not checked here).

        Raises:
            InvalidLink: ``invalid``.
        """
        try:
            payload = self._serializer.loads(token)
        except BadData:
            raise InvalidLink("invalid") from None
        if not isinstance(payload, dict) or payload.get("p") not in PURPOSES:
            raise InvalidLink("invalid")
        return payload["p"]


async def consume(store: Store, claim: LinkClaim, lifetime: float) -> None:
    """Record that ``claim``'s token has been used.

    Raises:
        InvalidLink: ``used`` — it was used before (on any node).
    """
    expires = claim.issued_at + dt.timedelta(seconds=lifetime)
    async with store.session() as session:
        session.add(UsedToken(token_id=claim.token_id, purpose=claim.purpose, used_at=utcnow(), expires_at=expires))
        try:
            await session.commit()
        except IntegrityError:
            raise InvalidLink("used") from None


async def unconsume(store: Store, claim: LinkClaim) -> None:
    """Make a consumed token usable again (its action failed for a passing reason, e.g. the server was down)."""
    async with store.session() as session:
        await session.execute(delete(UsedToken).where(UsedToken.token_id == claim.token_id))
        await session.commit()


async def purge_used(store: Store, now: dt.datetime | None = None) -> int:
    """Forget used tokens that have expired anyway; returns how many."""
    async with store.session() as session:
        result = await session.execute(delete(UsedToken).where(UsedToken.expires_at < (now or utcnow())))
        await session.commit()
        return result.rowcount or 0


async def is_used(store: Store, claim: LinkClaim) -> bool:
    """True when ``claim``'s token was used already (a link page says so before asking to confirm)."""
    async with store.session() as session:
        return await session.get(UsedToken, claim.token_id) is not None
