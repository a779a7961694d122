"""What recipients and administrators do with held mail: list, view, deliver, delete, "not junk", purge.

Every function takes the acting :class:`~mxguard.services.access.Actor`:

* a ``user`` sees only messages addressed to their own address;
* an ``org-admin`` sees messages to any address of their organization's domains;
* an ``admin`` sees everything.

A message outside the actor's view is :class:`~mxguard.errors.NotFound` —
the same answer as an id that does not exist, so ids of other people's
messages reveal nothing.

**Deliver** (release) sends the stored copy — the message exactly as it would
have been delivered, trace and verdict headers included — through
:func:`~mxguard.smtp.delivery.deliver_once` on the recipient domain's
*current* route and downstream TLS policy, so a ``required``/``verify`` domain
gets it over TLS or not at all. The row is claimed first with a conditional
update (``released_at IS NULL``), so two clicks, two links or two nodes cannot
deliver it twice; a failed delivery gives the claim back. Each release leaves
a message-log record (disposition ``released``) and an audit entry.

A copy held while a virus engine could not scan it (its stored verdict lists
``yara`` or ``clamd`` among the failed engines: held before that case was
deferred instead, or under ``engine_failure = tag``) is scanned again with the
configured virus engines before it is sent. If an engine still cannot scan it,
or a virus is found, nothing is sent and it stays held (:class:`ReleaseFailed`,
``451 4.3.0`` or ``554 5.7.1``); a virus found makes it a ``virus`` copy, which
only administrators can release. Nothing marked unscanned leaves unscanned.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import structlog
from sqlalchemy import delete, func, or_, select, update

from mxguard.config import Settings
from mxguard.errors import MxguardError, NotFound, PermissionDenied, ValidationFailed
from mxguard.services import audit
from mxguard.services.access import SYSTEM, Actor, Role
from mxguard.services.domains import get_domain, list_domains
from mxguard.smtp.delivery import ConnectionInfo, DownstreamLost, RouteFailure, attempt_item, deliver_once
from mxguard.smtp.replies import Reply
from mxguard.smtp.routing import Route, route_for_message
from mxguard.storage.db import Store
from mxguard.storage.messagelog import LogRecord
from mxguard.storage.models import Domain, MessageLogEntry, QuarantinedMessage, User, utcnow
from mxguard.storage.sealing import Sealer
from mxguard.quarantine.store import _associated

log = structlog.get_logger("mxguard.quarantine")

SORTS = {"date": QuarantinedMessage.created, "sender": QuarantinedMessage.sender,
         "subject": QuarantinedMessage.subject, "score": QuarantinedMessage.score,
         "recipient": QuarantinedMessage.recipient, "reason": QuarantinedMessage.reason}


class AlreadyHandled(MxguardError):
    """The message was delivered or deleted already (nothing is sent twice)."""


class ReleaseFailed(MxguardError):
    """The downstream server did not take the released message; it stays in the quarantine.

    Attributes:
        reply: the reply (or the route failure's reply) that says why.
    """

    def __init__(self, reply: Reply, detail: str = ""):
        super().__init__(f"The message could not be delivered now ({reply.one_line()}); it stays in the "
                         "quarantine, try again later." + (f" [{detail}]" if detail else ""))
        self.reply = reply


@dataclass(frozen=True)
class ReleaseResult:
    """A delivered release: the downstream's reply and how the connection went (TLS)."""

    qid: str
    recipient: str
    reply: Reply
    connection: ConnectionInfo


def recipient_domain(address: str) -> str:
    return address.rpartition("@")[2].rstrip(".").lower()


async def _scope_clause(store: Store, actor: Actor):
    """The SQL condition for the rows ``actor`` may see (``None``: all)."""
    if actor.is_admin:
        return None
    if actor.role == Role.ORG_ADMIN:
        domains = [d.name for d in await list_domains(store, actor=actor)]
        if not domains:
            return QuarantinedMessage.id.is_(None)
        return or_(*(func.lower(QuarantinedMessage.recipient).like(f"%@{d}") for d in domains))
    if actor.email:
        if actor.org_id is not None:
            # A user sees mail to their address only while its domain is their organization's:
            # an address in another organization's domain reads nothing (see services.tenancy).
            async with store.session() as session:
                owner = (await session.execute(select(Domain.org_id).where(
                    Domain.name == recipient_domain(actor.email)))).scalar_one_or_none()
            if owner != actor.org_id:
                return QuarantinedMessage.id.is_(None)
        return func.lower(QuarantinedMessage.recipient) == actor.email.lower()
    return QuarantinedMessage.id.is_(None)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def search(store: Store, actor: Actor, *, text: str = "", sort: str = "date", descending: bool = True,
                 category: str = "", limit: int = 100, offset: int = 0,
                 include_handled: bool = False) -> list[QuarantinedMessage]:
    """Held messages the actor may see (bodies stay sealed).

    Args:
        text: matches sender, subject or recipient (substring, case-insensitive).
        sort: one of :data:`SORTS` (``date`` by default); ``descending`` for newest/highest first.
        category: ``junk``, ``virus`` or ``policy`` (empty: all).
        include_handled: also delivered and deleted messages.

    Raises:
        ValidationFailed: unknown ``sort``.
    """
    if sort not in SORTS:
        raise ValidationFailed("sort", f"must be one of {', '.join(SORTS)}")
    q = select(QuarantinedMessage)
    scope = await _scope_clause(store, actor)
    if scope is not None:
        q = q.where(scope)
    if not include_handled:
        q = q.where(QuarantinedMessage.released_at.is_(None), QuarantinedMessage.deleted_at.is_(None))
    if text.strip():
        like = f"%{_escape_like(text.strip())}%"
        q = q.where(or_(QuarantinedMessage.sender.ilike(like, escape="\\"),
                        QuarantinedMessage.subject.ilike(like, escape="\\"),
                        QuarantinedMessage.recipient.ilike(like, escape="\\")))
    if category:
        q = q.where(QuarantinedMessage.category == category)
    column = SORTS[sort]
    order = column.desc() if descending else column.asc()
    q = q.order_by(order, QuarantinedMessage.created.desc(), QuarantinedMessage.id)
    q = q.limit(max(1, min(limit, 1000))).offset(max(0, offset))
    async with store.session() as session:
        return list((await session.execute(q)).scalars().all())


async def get_visible(store: Store, actor: Actor, qid: str) -> QuarantinedMessage:
    """One held message the actor may see.

    Raises:
        NotFound: no such id, or not the actor's to see.
    """
    q = select(QuarantinedMessage).where(QuarantinedMessage.id == (qid or "")[:40])
    scope = await _scope_clause(store, actor)
    if scope is not None:
        q = q.where(scope)
    async with store.session() as session:
        row = (await session.execute(q)).scalar_one_or_none()
    if row is None:
        raise NotFound(f"quarantined message {qid} does not exist")
    return row


async def resolve_id(store: Store, actor: Actor, ref: str) -> str:
    """The quarantine ID ``ref`` names: a quarantine ID (``Q...``), or the transaction ID the sender
    was given (``250 2.0.0 Ok: accepted as 188F5B7225FC60D3``) when that transaction left exactly one
    quarantined copy the actor may see.

    Args:
        ref: a quarantine ID, or a transaction ID (case-insensitive).

    Raises:
        NotFound: nothing the actor may see has that ID or transaction ID.
        ValidationFailed: (field ``ID``) the transaction left several copies (one per recipient);
            the message lists them, and one of their quarantine IDs must be given.
    """
    ref = (ref or "").strip()[:40]
    scope = await _scope_clause(store, actor)
    q = select(QuarantinedMessage).where(or_(QuarantinedMessage.id == ref,
                                             QuarantinedMessage.txn_id.in_({ref, ref.upper()})))
    if scope is not None:
        q = q.where(scope)
    async with store.session() as session:
        rows = list((await session.execute(q.order_by(QuarantinedMessage.created, QuarantinedMessage.id)))
                    .scalars().all())
    exact = [r for r in rows if r.id == ref]
    if exact:
        return exact[0].id
    if not rows:
        raise NotFound(f"no quarantined message has the ID or transaction ID {ref!r}")
    if len(rows) > 1:
        listed = ", ".join(f"{r.id} ({r.recipient}; {_state(r)})" for r in rows)
        raise ValidationFailed("ID", f"transaction {rows[0].txn_id} has {len(rows)} quarantined copies: {listed}; "
                                     "give one of their quarantine IDs")
    return rows[0].id


def _state(row: QuarantinedMessage) -> str:
    return "released" if row.released_at else "deleted" if row.deleted_at else "held"


async def open_visible(store: Store, sealer: Sealer, actor: Actor, qid: str) -> tuple[QuarantinedMessage, bytes]:
    """A held message's row and opened bytes (deleted ones are gone).

    Raises:
        NotFound: not visible, or deleted.
        SealingError: the key is gone or the stored blob was altered.
    """
    row = await get_visible(store, actor, qid)
    if row.deleted_at is not None:
        raise NotFound(f"quarantined message {qid} was deleted")
    return row, sealer.open(row.sealed, _associated(row.id))


async def _org_id_of(session, recipient: str) -> int | None:
    return (await session.execute(select(Domain.org_id).where(Domain.name == recipient_domain(recipient)))
            ).scalar_one_or_none()


async def delete_message(store: Store, actor: Actor, qid: str) -> None:
    """Delete a held message (its sealed body is erased now; the row goes at expiry).

    Raises:
        NotFound: not visible. AlreadyHandled: delivered or deleted already.
    """
    row = await get_visible(store, actor, qid)
    async with store.session() as session:
        result = await session.execute(
            update(QuarantinedMessage).where(QuarantinedMessage.id == row.id, QuarantinedMessage.deleted_at.is_(None),
                                             QuarantinedMessage.released_at.is_(None))
            .values(deleted_at=utcnow(), sealed=b""))
        if result.rowcount != 1:
            raise AlreadyHandled("This message was delivered or deleted already.")
        audit.record(session, actor, "quarantine.delete", row.id, org_id=await _org_id_of(session, row.recipient),
                     before={"recipient": row.recipient, "sender": row.sender, "subject": row.subject})
        await session.commit()


def _may_release(actor: Actor, row: QuarantinedMessage) -> None:
    # A virus is released only by an administrator of the organization (or the gateway's).
    if row.category == "virus" and actor.role not in (Role.ADMIN, Role.ORG_ADMIN):
        raise PermissionDenied("a message held for a virus can only be released by an administrator")


async def release(store: Store, sealer: Sealer, settings: Settings, qid: str, *, actor: Actor,
                  via: str = "message-center") -> ReleaseResult:
    """Deliver a held message to its recipient through the normal delivery path (see the module docstring).

    Args:
        sealer: opens the stored copy.
        settings: ``downstream`` timeouts (seconds) and the gateway's ``hostname`` (EHLO).
        actor: who releases (their view decides visibility).
        via: how (``message-center``, ``link``, ``cli``, ``not-junk``), for the logs.

    Raises:
        NotFound: not visible, or the recipient's domain is no longer served.
        PermissionDenied: a user releasing a virus.
        AlreadyHandled: delivered or deleted already (nothing is sent).
        ReleaseFailed: the downstream server did not take it (it stays held).
        SealingError: the stored copy cannot be opened.
    """
    row = await get_visible(store, actor, qid)
    _may_release(actor, row)
    content = sealer.open(row.sealed, _associated(row.id)) if row.deleted_at is None and row.sealed else None
    if content is not None:
        await _rescan_unscanned(store, settings, row, content)
    domain = await get_domain(store, recipient_domain(row.recipient))
    claimed_at = utcnow()
    async with store.session() as session:
        claim = await session.execute(
            update(QuarantinedMessage).where(QuarantinedMessage.id == row.id, QuarantinedMessage.released_at.is_(None),
                                             QuarantinedMessage.deleted_at.is_(None))
            .values(released_at=claimed_at))
        await session.commit()
    if claim.rowcount != 1 or content is None:
        raise AlreadyHandled("This message was delivered or deleted already; it is not sent again.")
    route = route_for_message(Route.for_domain(domain), content, requiretls=row.requiretls)
    info: ConnectionInfo | None = None
    failure: RouteFailure | None = None
    try:
        info, results = await deliver_once(
            route, settings.downstream, settings.hostname, row.sender, [row.recipient], content,
            body="8BITMIME" if any(b > 127 for b in content) else None,
            smtputf8=not (row.sender + row.recipient).isascii(), requiretls=row.requiretls)
        reply = results[row.recipient]
        detail = ""
    except RouteFailure as refused:
        failure = refused
        reply, detail = refused.reply, "; ".join(refused.attempts)
    except DownstreamLost as exc:
        reply, detail = Reply(451, "4.4.2", "Connection lost during delivery"), str(exc)
    session_item = attempt_item(domain.name, info, failure)  # the release's session, for TLS-RPT
    if not reply.is_positive:
        async with store.session() as session:
            await session.execute(update(QuarantinedMessage).where(QuarantinedMessage.id == row.id)
                                  .values(released_at=None))
            record = _log_record(settings, row, actor, via, reply, info, "deferred", session_item)
            session.add(MessageLogEntry(**record.as_row()))
            await session.commit()
        log.warning("release failed; message stays held", qid=row.id, reply=reply.one_line(), detail=detail[:300])
        raise ReleaseFailed(reply, detail[:200])
    async with store.session() as session:
        record = _log_record(settings, row, actor, via, reply, info, "released", session_item)
        session.add(MessageLogEntry(**record.as_row()))
        audit.record(session, actor, "quarantine.release", row.id, org_id=await _org_id_of(session, row.recipient),
                     after={"recipient": row.recipient, "sender": row.sender, "subject": row.subject, "via": via,
                            "reply": reply.one_line(), "tls": info.describe_tls() if info else None})
        await session.commit()
    log.info("released from quarantine", qid=row.id, rcpt=row.recipient, via=via, actor=actor.name,
             tls=info.describe_tls() if info else None, reply=reply.one_line())
    return ReleaseResult(row.id, row.recipient, reply, info)


async def _rescan_unscanned(store: Store, settings: Settings, row: QuarantinedMessage, content: bytes) -> None:
    """Scan a held copy again with the virus engines when its verdict says one of them failed.

    Returns when the copy may go (nothing to rescan, or the rescan is clean: the stored
    verdict then records it).

    Raises:
        ReleaseFailed: ``451 4.3.0`` when a virus engine still cannot scan it;
            ``554 5.7.1`` when a virus is found (the row becomes a ``virus`` copy).
    """
    from mxguard.filtering.pipeline import FilterPipeline, build_engines
    from mxguard.filtering.verdict import VIRUS_ENGINES

    stored = dict(row.verdict or {})
    errors = [e for e in stored.get("errors") or [] if isinstance(e, dict)]
    failed = sorted({str(e.get("engine")) for e in errors} & VIRUS_ENGINES)
    if not failed:
        return
    engines = [e for e in build_engines(settings.filters) if e.name in VIRUS_ENGINES]
    pipeline = FilterPipeline(engines, None, settings.filters)
    try:
        verdict = await pipeline.scan(content, check_sender=False)
    finally:
        await pipeline.close()
    if verdict.virus_unscanned:
        still = ", ".join(verdict.virus_unscanned)
        log.warning("release refused: the held copy still cannot be scanned", qid=row.id, engines=still,
                    errors=[f"{e.engine}: {e.reason}" for e in verdict.errors])
        raise ReleaseFailed(Reply(451, "4.3.0", f"Not scanned: {still} unavailable; nothing was sent"),
                            f"held while {', '.join(failed)} could not scan it")
    stored["errors"] = [e for e in errors if e.get("engine") not in VIRUS_ENGINES]
    stored["rescanned"] = {"engines": [e.name for e in engines], "viruses": [dict(vars(v)) for v in verdict.viruses]}
    values: dict = {"verdict": stored}
    if verdict.viruses:
        names = ", ".join(verdict.virus_names[:3])
        stored["viruses"] = list(stored.get("viruses") or []) + [dict(vars(v)) for v in verdict.viruses]
        values.update(category="virus", reason=f"virus: {names} (found when scanned again for release)")
    async with store.session() as session:
        await session.execute(update(QuarantinedMessage).where(QuarantinedMessage.id == row.id).values(**values))
        await session.commit()
    if verdict.viruses:
        log.warning("release refused: virus found when scanned again", qid=row.id, viruses=verdict.virus_names)
        raise ReleaseFailed(Reply(554, "5.7.1", f"Virus found when scanned again: {names}; nothing was sent"))
    log.info("held copy scanned again before release", qid=row.id, engines=[e.name for e in engines],
             previously_failed=failed)


def _log_record(settings: Settings, row: QuarantinedMessage, actor: Actor, via: str, reply: Reply,
                info: ConnectionInfo | None, disposition: str, session_item: dict) -> LogRecord:
    """The message-log record of a release attempt (``released`` or ``deferred``)."""
    route = f"{info.host}:{info.port}" if info else None
    return LogRecord(
        txn_id=row.txn_id, ts=utcnow(), node=settings.hostname, client_ip="quarantine", mail_from=row.sender,
        rcpt_to=row.recipient, size=row.size, subject=row.subject, downstream_host=route,
        downstream_tls=info.tls if info else None, downstream_tls_version=info.tls_version if info else None,
        downstream_cipher=info.cipher if info else None, downstream_verified=info.verified if info else None,
        downstream=[session_item] if session_item.keys() - {"domain"} else [],
        results=[{"rcpt": row.recipient, "code": reply.code, "enhanced": reply.enhanced, "text": reply.text,
                  "disposition": disposition, "route": route}],
        verdict={"quarantine_id": row.id, "released_by": actor.name, "via": via},
        disposition=disposition, final_code=reply.code,
        final_reply=f"release of {row.id} ({via}): {reply.one_line()}")


async def ensure_recipient_user(store: Store, address: str) -> User | None:
    """The ``user`` account of a recipient address, created when missing.

    Recipients of a domain that belongs to an organization become users of that
    organization (role ``user``, an unusable random password: they sign in with
    links until an administrator sets one). ``None`` when the address's domain
    is not served or has no organization.
    """
    from mxguard.services.users import add_user, normalize_email

    try:
        email = normalize_email(address)
    except ValidationFailed:
        return None
    async with store.session() as session:
        existing = (await session.execute(select(User).where(User.email == email))).scalar_one_or_none()
        if existing is not None:
            return existing
        domain = (await session.execute(select(Domain).where(Domain.name == recipient_domain(email)))
                  ).unique().scalar_one_or_none()
    if domain is None or domain.org is None:
        return None
    try:
        await add_user(store, email, Role.USER, org=domain.org.name, actor=SYSTEM)
    except MxguardError:
        pass  # made by a concurrent request: fine
    async with store.session() as session:
        user = (await session.execute(select(User).where(User.email == email))).scalar_one_or_none()
        if user is not None and user.must_change_password:
            user.must_change_password = False  # nobody knows this password: nothing to change
            await session.commit()
        return user


async def not_junk(store: Store, sealer: Sealer, settings: Settings, qid: str, *,
                   actor: Actor) -> tuple[str, ReleaseResult | None]:
    """"Not junk": put the message's sender on the recipient's allow list, then deliver the message.

    Returns:
        ``(the allow-list pattern, the release result or None when it was delivered already)``.

    Raises:
        NotFound, PermissionDenied, ValidationFailed (a null sender cannot be allowed), ReleaseFailed.
    """
    from mxguard.quarantine.senderlists import add_entry, normalize_pattern
    from mxguard.errors import AlreadyExists

    row = await get_visible(store, actor, qid)
    _may_release(actor, row)
    if not row.sender:
        raise ValidationFailed("sender", "the message has no sender address (a bounce); it cannot be allowed")
    pattern = normalize_pattern(row.sender)
    user = await ensure_recipient_user(store, row.recipient)
    if user is None:
        raise NotFound(f"{row.recipient} has no Message Center account (its domain has no organization)")
    try:
        await add_entry(store, user.id, "allow", pattern, actor=actor)
    except AlreadyExists:
        pass
    try:
        result = await release(store, sealer, settings, qid, actor=actor, via="not-junk")
    except AlreadyHandled:
        result = None
    return pattern, result


async def mark_summarized(store: Store, ids: list[str], when: dt.datetime) -> None:
    """Record that a summary listed these messages (they are not "new" any more)."""
    if not ids:
        return
    async with store.session() as session:
        await session.execute(update(QuarantinedMessage).where(QuarantinedMessage.id.in_(ids))
                              .values(summarized_at=when))
        await session.commit()


async def purge_expired(store: Store, now: dt.datetime | None = None) -> int:
    """Delete held messages past their ``expires_at`` (sealed bodies and all); returns how many."""
    from mxguard.quarantine.links import purge_used

    now = now or utcnow()
    async with store.session() as session:
        result = await session.execute(delete(QuarantinedMessage).where(QuarantinedMessage.expires_at < now))
        await session.commit()
    count = result.rowcount or 0
    await purge_used(store, now)
    if count:
        log.info("expired quarantined messages purged", count=count)
    return count
