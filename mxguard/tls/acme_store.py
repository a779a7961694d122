"""What ACME keeps in the database: HTTP-01 tokens being validated, and the names ACME issued.

Tokens live in the database (not in one process's memory) so that whichever
node the CA's validation request reaches can answer it, and so the CLI can
run an order while a gateway serves the challenge port.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from mxguard.storage.db import Store
from mxguard.storage.models import AcmeCertificate, AcmeChallenge, SniCertificate, utcnow

#: RFC 8555 8.3: the token is base64url (RFC 4648 5) without padding; anything else is never a token.
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,255}")
#: A token left behind by an aborted order stops being served after this.
TOKEN_LIFETIME = dt.timedelta(hours=1)


async def publish_token(store: Store, token: str, name: str, key_authorization: str) -> None:
    """Make the responder answer ``token`` for ``name`` (RFC 8555 8.3).

    Raises:
        ValueError: ``token`` is not base64url of 16..255 characters.
    """
    if not TOKEN_RE.fullmatch(token):
        raise ValueError(f"the CA sent a token that is not base64url: {token[:40]!r}")
    async with store.session() as session:
        await session.merge(AcmeChallenge(token=token, name=name, key_authorization=key_authorization,
                                          expires_at=utcnow() + TOKEN_LIFETIME))
        await session.commit()


async def withdraw_tokens(store: Store, tokens: list[str]) -> None:
    """Stop answering ``tokens`` (the order is over, whatever its outcome); expired ones go too."""
    async with store.session() as session:
        await session.execute(delete(AcmeChallenge).where(
            AcmeChallenge.token.in_(tokens) | (AcmeChallenge.expires_at < utcnow())))
        await session.commit()


async def key_authorization_for(store: Store, token: str, host: str) -> str | None:
    """The key authorization to serve for ``token`` requested with ``Host: host``, else ``None``.

    Args:
        token: the last path segment of ``/.well-known/acme-challenge/<token>``.
        host: the request's host name, lower-case, without port.
    """
    if not TOKEN_RE.fullmatch(token):
        return None
    async with store.session() as session:
        row = await session.get(AcmeChallenge, token)
    if row is None or row.expires_at < utcnow() or row.name != host:
        return None
    return row.key_authorization


async def record_issued(store: Store, names: list[str], directory_url: str, not_after: dt.datetime) -> None:
    """Remember that ``names[0]``'s SNI certificate came from ACME (so the gateway renews it)."""
    async with store.session() as session:
        await session.merge(AcmeCertificate(name=names[0], names=list(names), directory_url=directory_url,
                                            issued_at=utcnow(), not_after=not_after, last_attempt=None,
                                            last_error=None))
        await session.commit()


async def record_failure(store: Store, name: str, error: str) -> None:
    """Note a failed renewal of ``name`` (shown by ``tls acme status``)."""
    async with store.session() as session:
        await session.execute(update(AcmeCertificate).where(AcmeCertificate.name == name)
                              .values(last_error=error[:2000]))
        await session.commit()


@dataclass(frozen=True)
class AcmeEntry:
    """One name issued by ACME: its identifiers, the CA, and the stored certificate's expiry.

    ``stored_not_after`` is ``None`` when the SNI certificate was removed since (then it is not renewed).
    """

    name: str
    names: tuple[str, ...]
    directory_url: str
    issued_at: dt.datetime
    stored_not_after: dt.datetime | None
    last_attempt: dt.datetime | None
    last_error: str | None

    def days_left(self, now: dt.datetime | None = None) -> float | None:
        if self.stored_not_after is None:
            return None
        return (self.stored_not_after - (now or utcnow())).total_seconds() / 86400


async def list_entries(store: Store) -> list[AcmeEntry]:
    """Every name issued by ACME, by name, with the expiry of the certificate stored for it now."""
    q = (select(AcmeCertificate, SniCertificate.not_after)
         .outerjoin(SniCertificate, SniCertificate.name == AcmeCertificate.name).order_by(AcmeCertificate.name))
    async with store.session() as session:
        rows = (await session.execute(q)).all()
    return [AcmeEntry(r.name, tuple(r.names), r.directory_url, r.issued_at, not_after, r.last_attempt, r.last_error)
            for r, not_after in rows]


async def claim_renewal(store: Store, name: str, *, retry_after: dt.timedelta) -> bool:
    """Take the renewal of ``name`` for this node (conditional update: one node of several wins).

    Args:
        retry_after: an attempt started less than this long ago (here or on another node) blocks a new one.
    """
    now = utcnow()
    async with store.session() as session:
        result = await session.execute(
            update(AcmeCertificate).where(AcmeCertificate.name == name)
            .where((AcmeCertificate.last_attempt.is_(None)) | (AcmeCertificate.last_attempt < now - retry_after))
            .values(last_attempt=now))
        await session.commit()
    return result.rowcount == 1
