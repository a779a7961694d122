"""The gateway's own messages — quarantine summaries, notifications, alerts — and how they travel.

They are built with the stdlib ``email`` package and sent with
:func:`~mxguard.smtp.delivery.deliver_once`, the one delivery path:

* to an address of a **served domain**: that domain's current route and
  downstream TLS policy (``required``/``verify`` means TLS or nothing);
* to any **other address** (an operator's mailbox elsewhere): ``dsn.relay``
  when set, else the domain's MX hosts (RFC 5321 section 5.1), with
  opportunistic TLS.

The envelope sender is the null reverse-path (RFC 5321 section 4.5.5) and
every message carries ``Auto-Submitted: auto-generated`` (RFC 3834), so no
auto-responder answers it and no bounce loops back. Each one leaves a
message-log record (client ``mxguard``), so an operator can see that it went
out and with which TLS.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import structlog

from mxguard.config import Settings
from mxguard.errors import NotFound
from mxguard.services.domains import get_domain
from mxguard.smtp.delivery import ConnectionInfo, DownstreamLost, RouteFailure, attempt_item, deliver_once
from mxguard.smtp.headers import summarize
from mxguard.smtp.replies import Reply
from mxguard.smtp.routing import Route, external_route
from mxguard.storage.db import Store
from mxguard.storage.messagelog import LogRecord
from mxguard.storage.models import MessageLogEntry, utcnow

log = structlog.get_logger("mxguard.own_mail")


@dataclass(frozen=True)
class SendResult:
    """How one of the gateway's own messages went.

    Attributes:
        recipient: the envelope recipient.
        reply: the downstream's final reply (or why it could not be sent).
        connection: the connection's TLS details, when one was made.
    """

    recipient: str
    reply: Reply
    connection: ConnectionInfo | None

    @property
    def delivered(self) -> bool:
        return self.reply.is_positive


async def route_for(store: Store, settings: Settings, address: str) -> Route | None:
    """The route mail to ``address`` takes (see the module docstring); ``None`` when there is none
    (a null MX, a domain that does not exist)."""
    domain = address.rpartition("@")[2].rstrip(".").lower()
    try:
        return Route.for_domain(await get_domain(store, domain))
    except NotFound:
        pass
    return await external_route(domain, relay=settings.dsn.relay, nameservers=settings.filters.dns_servers)


async def _served_domain(store: Store, address: str) -> str | None:
    """The served domain ``address`` is in (its TLS-RPT policy domain), else ``None``."""
    domain = address.rpartition("@")[2].rstrip(".").lower()
    try:
        return (await get_domain(store, domain)).name
    except NotFound:
        return None


async def send_own_message(store: Store, settings: Settings, recipient: str, message: bytes, *,
                           kind: str) -> SendResult:
    """Send one of the gateway's own messages to one recipient now, and log it.

    Args:
        recipient: the envelope recipient.
        message: RFC 5322 bytes (CRLF line ends).
        kind: what it is (``summary``, ``virus-notification``, ``alert``), for the log.

    Returns:
        the outcome; never raises for network problems (they are in ``reply``).
    """
    route = await route_for(store, settings, recipient)
    info: ConnectionInfo | None = None
    failure: RouteFailure | None = None
    if route is None:
        reply = Reply(550, "5.1.2", f"No route to {recipient.rpartition('@')[2]}")
    else:
        try:
            info, results = await deliver_once(route, settings.downstream, settings.hostname, "", [recipient], message,
                                               body="8BITMIME" if any(b > 127 for b in message) else None)
            reply = results[recipient]
        except RouteFailure as refused:
            failure, reply = refused, refused.reply
        except DownstreamLost as exc:
            reply = Reply(451, "4.4.2", f"Connection lost: {exc}"[:200])
    # The session as every delivery records it (TLS, policy source, RFC 8460 result types); mail to
    # a served domain also counts in that domain's TLS-RPT report.
    sessions = [attempt_item(await _served_domain(store, recipient), info, failure)] if route is not None else []
    subject, message_id = summarize(message)
    where = f"{info.host}:{info.port}" if info else None
    disposition = "delivered" if reply.is_positive else ("deferred" if reply.is_transient else "rejected")
    record = LogRecord(
        txn_id=f"{kind[:12]}-{dt.datetime.now(dt.timezone.utc):%H%M%S%f}"[:32], ts=utcnow(), node=settings.hostname,
        client_ip="mxguard", mail_from="", rcpt_to=recipient, size=len(message), subject=subject,
        message_id=message_id, downstream_host=where, downstream_tls=info.tls if info else None,
        downstream_tls_version=info.tls_version if info else None, downstream_cipher=info.cipher if info else None,
        downstream_verified=info.verified if info else None, downstream=sessions,
        results=[{"rcpt": recipient, "code": reply.code, "enhanced": reply.enhanced, "text": reply.text,
                  "disposition": disposition, "route": where}],
        verdict={"own_message": kind}, disposition=disposition, final_code=reply.code,
        final_reply=f"{kind}: {reply.one_line()}")
    try:
        async with store.session() as session:
            session.add(MessageLogEntry(**record.as_row()))
            await session.commit()
    except Exception as exc:  # noqa: BLE001 - the message went (or not); a log failure must not hide that
        log.warning("own message not logged", kind=kind, error=repr(exc)[:200])
    log.info("own message sent" if reply.is_positive else "own message not delivered", kind=kind, rcpt=recipient,
             reply=reply.one_line(), tls=info.describe_tls() if info else None)
    return SendResult(recipient, reply, info)
