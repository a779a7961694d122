"""The front door: aiosmtpd speaks SMTP, this module decides.

:class:`InboundSMTP` is aiosmtpd's protocol with three changes: every reply
carries an enhanced status code (RFC 2034/3463), AUTH/VRFY/EXPN are not
offered on an MX, and the per-connection :class:`ProxySession` lives on the
protocol object (aiosmtpd replaces its ``Session`` after STARTTLS).

:class:`InboundHandler` holds the policy, one ``handle_<VERB>`` coroutine per
phase, the way aiosmtpd intends: the protocol stays in the library.
"""

from __future__ import annotations

import asyncio
import ssl

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from mxguard.smtp.proxy import ClientInfo, ProxyContext, ProxySession
from mxguard.smtp.replies import BAD_SEQUENCE, TOO_MANY_RECIPIENTS, Reply, with_enhanced_code

log = structlog.get_logger("mxguard.inbound")

INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error; nothing was delivered, try again later")


class InboundSMTP(SMTP):
    """aiosmtpd's SMTP protocol with enhanced status codes and an attached proxy session.

    Args:
        handler: the :class:`InboundHandler`.
        proxy_ctx: shared gateway context for the proxy session.
        **kwargs: passed to :class:`aiosmtpd.smtp.SMTP`.
    """

    def __init__(self, handler: "InboundHandler", proxy_ctx: ProxyContext, **kwargs):
        super().__init__(handler, **kwargs)
        self.proxy = ProxySession(proxy_ctx)
        self._greeting_sent = False
        self._plain_replies = False  # EHLO/HELO replies carry no enhanced codes (RFC 2034)
        self._proxy_closed = False

    async def push(self, status) -> None:  # noqa: D401 - aiosmtpd API
        if isinstance(status, bytes):
            status = status.decode("utf-8", "replace")
        if self._greeting_sent and not self._plain_replies:
            status = with_enhanced_code(status)
        self._greeting_sent = True
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    async def smtp_AUTH(self, arg: str) -> None:
        # An MX takes mail for its domains; it is not a submission server.
        await self.push("502 5.5.1 AUTH not available on this server")

    async def smtp_VRFY(self, arg: str) -> None:
        await self.push("502 5.5.1 VRFY command is disabled")

    async def smtp_EXPN(self, arg: str) -> None:
        await self.push("502 5.5.1 EXPN command is disabled")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgraded = self.transport is not None and self._original_transport is not None
        super().connection_made(transport)
        if upgraded:
            # RFC 3207 4.2: STARTTLS resets the SMTP state; end any transaction.
            self.loop.create_task(self.proxy.abort("STARTTLS"))

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if not self._proxy_closed:
            self._proxy_closed = True
            task = self.loop.create_task(self.proxy.close())
            closing = self.proxy.ctx.closing
            closing.add(task)
            task.add_done_callback(closing.discard)

    @property
    def busy(self) -> bool:
        """True while a transaction is open (between MAIL and its end)."""
        return self.proxy.tx is not None

    async def shutdown(self) -> None:
        """Tell an idle client the service is going away (RFC 5321 3.8) and close."""
        if self.transport is None:
            return
        try:
            await asyncio.wait_for(self.push("421 4.3.2 Service shutting down, try again later"), 1)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass
        if self.transport is not None:
            self.transport.close()

    def client_info(self) -> ClientInfo:
        """Who is connected, and with which TLS, right now."""
        peer = self.session.peer if self.session else None
        ip, port = (peer[0], peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else (str(peer), 0)
        info = ClientInfo(ip=str(ip), port=int(port), helo=self.session.host_name or "" if self.session else "")
        sslobj: ssl.SSLObject | None = self.transport.get_extra_info("ssl_object") if self.transport else None
        if sslobj is not None:
            info.tls_version = sslobj.version()
            cipher = sslobj.cipher()
            if cipher:
                info.cipher, info.bits = cipher[0], cipher[2]
        return info


class InboundHandler:
    """The policy of the front door, phase by phase.

    Args:
        max_recipients: recipients per transaction before ``452 4.5.3``.
    """

    def __init__(self, max_recipients: int = 100):
        self.max_recipients = max_recipients

    async def handle_EHLO(self, server: InboundSMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        await server.proxy.abort("EHLO")
        keep = [r[4:] for r in responses if not r[4:].upper().startswith(("AUTH", "HELP"))]
        keep += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        return [f"250-{item}" for item in keep[:-1]] + [f"250 {keep[-1]}"]

    async def handle_HELO(self, server: InboundSMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        session.host_name = hostname
        await server.proxy.abort("HELO")
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: InboundSMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        sender = "" if address == "<>" else address
        smtputf8 = "SMTPUTF8" in mail_options
        if not smtputf8 and not sender.isascii():
            return "553 5.6.7 Non-ASCII address requires SMTPUTF8 (RFC 6531)"
        server.proxy.begin(server.client_info(), sender, mail_options)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: InboundSMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        tx = server.proxy.tx
        if tx is None:
            return str(BAD_SEQUENCE)
        if tx.attempts >= self.max_recipients:
            return str(TOO_MANY_RECIPIENTS)
        if not tx.smtputf8 and not address.isascii():
            return "553 5.6.7 Non-ASCII address requires SMTPUTF8 (RFC 6531)"
        if "@" not in address:
            # RFC 5321 4.1.1.3 allows a bare <Postmaster>, but a gateway for many
            # domains cannot tell whose; anything else without a domain is bad syntax.
            if address.lower() == "postmaster":
                return "550 5.1.1 Use postmaster@<domain>: this gateway serves several domains"
            return "501 5.1.3 Bad recipient address syntax: a domain is required"
        try:
            reply = await server.proxy.add_recipient(address)
        except Exception:  # noqa: BLE001 - the sender gets a 4xx, the log gets the trace
            log.exception("RCPT failed", rcpt=address)
            return str(INTERNAL_ERROR)
        if reply.is_positive:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return str(reply)

    async def handle_DATA(self, server: InboundSMTP, session: Session, envelope: Envelope) -> str:
        if server.proxy.tx is None:
            return str(BAD_SEQUENCE)
        try:
            reply = await server.proxy.finish(envelope.original_content)
        except Exception:  # noqa: BLE001 - see handle_RCPT
            log.exception("DATA failed")
            await server.proxy.abort("internal error")
            return str(INTERNAL_ERROR)
        return str(reply)

    async def handle_RSET(self, server: InboundSMTP, session: Session, envelope: Envelope) -> str:
        await server.proxy.abort("RSET")
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: InboundSMTP, session: Session, envelope: Envelope) -> str:
        await server.proxy.abort("QUIT")
        return "221 2.0.0 Bye"

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error", error=repr(error)[:300], exc_info=error)
        return str(INTERNAL_ERROR)
