"""Password hashing for the console's users and the relay's SMTP AUTH credentials: argon2id
(argon2-cffi's defaults, RFC 9106), one hasher and one way to verify for both."""

from __future__ import annotations

import functools
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

HASHER = PasswordHasher()


def hash_password(password: str) -> str:
    """The argon2id hash (a ``$argon2id$...`` string) of ``password``."""
    return HASHER.hash(password)


@functools.cache
def _dummy_hash() -> str:
    # Verified against for unknown names, so that the answer takes as long as for known ones.
    return HASHER.hash(secrets.token_urlsafe(16))


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when ``password`` matches ``password_hash``. ``None`` (an unknown user) costs the
    same as a real check and is False; a malformed hash is False, never an error.

    CPU-bound (tens of milliseconds): from the event loop, call it in a worker thread.
    """
    try:
        return HASHER.verify(password_hash or _dummy_hash(), password or "") and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """The hash was made with weaker parameters than the hasher's current ones."""
    return HASHER.check_needs_rehash(password_hash)
