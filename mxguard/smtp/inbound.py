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
import functools
import re
import ssl

import structlog
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, TLSSetupException
from aiosmtpd.smtp import syntax as command_syntax
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError

from mxguard.config import SmtpSettings
from mxguard.smtp import data_reader, limits, submission, syntax
from mxguard.smtp.data_reader import DataReader, Outcome
from mxguard.smtp.proxy import ClientInfo, ProxyContext, ProxySession
from mxguard.smtp.replies import BAD_SEQUENCE, TOO_MANY_RECIPIENTS, Reply, with_enhanced_code
from mxguard.tls.buffers import shrink_tls_read_buffer
from mxguard.tls.client_certs import PeerCertificate, peer_certificate

log = structlog.get_logger("mxguard.inbound")

INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error; nothing was delivered, try again later")

#: Refusals aiosmtpd words itself (by the start of its text), as mxguard's replies.
#: (The DATA phase's own, size and line length, are ``InboundSMTP.smtp_DATA``'s.)
_LIBRARY_REFUSALS: list[tuple[str, Reply]] = [
    ("502 5.5.1 Too many unrecognized commands", limits.TOO_MANY_UNRECOGNIZED),
    ("552 Error: message size exceeds fixed maximum", limits.MESSAGE_TOO_BIG),  # MAIL ... SIZE=n
    ("500 Command line too long", limits.COMMAND_TOO_LONG),
]


def _peer_ip(session: Session | None) -> str | None:
    peer = session.peer if session else None
    return str(peer[0]) if isinstance(peer, tuple) else (str(peer) if peer else None)


#: The REQUIRETLS MAIL parameter (RFC 8689 4.1), a word of its own among the parameters.
_REQUIRETLS_PARAM = re.compile(r"(?i)(?<=\s)REQUIRETLS(?=\s|$)")
REQUIRETLS_WITHOUT_TLS = Reply(555, "5.5.4", "REQUIRETLS is offered only after STARTTLS (RFC 8689 4.1)")


def _ehlo_lines(lines: list[str], tls: bool = False, auth: bool = False) -> list[str]:
    """aiosmtpd's EHLO reply as this gateway offers it: no HELP; AUTH (RFC 4954) only inside TLS
    and only when ``auth`` (relay credentials exist, or this is the submission listener); and
    PIPELINING (RFC 2920) and ENHANCEDSTATUSCODES (RFC 2034) added; REQUIRETLS (RFC 8689)
    inside TLS only."""
    if len(lines) < 2 or not lines[0].startswith("250"):
        return lines  # a syntax error, not the extension list
    hidden = ("HELP",) if tls and auth else ("AUTH", "HELP")
    keep = [line[4:] for line in lines if not line[4:].upper().startswith(hidden)]
    keep += ["PIPELINING", "ENHANCEDSTATUSCODES"] + (["REQUIRETLS"] if tls else [])
    return [f"250-{item}" for item in keep[:-1]] + [f"250 {keep[-1]}"]


@functools.lru_cache(maxsize=8192)
def parse_path(arg: str) -> tuple[str | None, str | None]:
    """``(address, rest)`` of a MAIL/RCPT argument, ``(None, None)`` when it does not parse.

    Args:
        arg: the text after ``FROM:``/``TO:`` (``"<user@example.org> SIZE=100"``), non-empty.

    The stdlib's RFC 5322 parser reads it (about 35 microseconds per address
    here); the result depends on the text alone, so it is remembered for the
    addresses that recur: an MX's recipients are its own users, and a sender
    writes to it again and again. Bounded (8,192 entries, least recently used
    go first), so a flood of distinct addresses costs the parse and no more.
    """
    try:
        if arg.lstrip().startswith("<"):
            address, rest = get_angle_addr(arg)
        else:
            address, rest = get_addr_spec(arg)
    except HeaderParseError:
        return None, None
    return address.addr_spec, rest


class CommandLineReader(asyncio.StreamReader):
    """aiosmtpd's stream reader, with command lines that end in a bare LF refused.

    aiosmtpd reads a command line up to LF and message data up to CRLF; a
    command line that ends in LF alone is answered ``500 5.5.2``
    (:data:`~mxguard.smtp.syntax.BARE_LF_COMMAND`) by ``on_bare_lf`` and the
    next line is read in its place, so the line never runs as a command.
    """

    on_bare_lf = None  # async callable(line: bytes); set by InboundSMTP
    _draining = False

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        while True:
            try:
                line = await super().readuntil(separator)
            except asyncio.LimitOverrunError:
                self._draining = True  # aiosmtpd reads the rest of the long line, then refuses it
                raise
            if self._draining:
                self._draining = False
                return line
            if separator != b"\n" or line.endswith(b"\r\n") or self.on_bare_lf is None:
                return line
            await self.on_bare_lf(line)

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of the buffered bytes.

        The DATA reader (:mod:`mxguard.smtp.data_reader`) reads in chunks; the
        bytes of a chunk after the end of the message are the client's next
        commands (RFC 2920 pipelining) and are read from here as usual. (The
        buffer is the StreamReader's own, which aiosmtpd also clears itself at
        STARTTLS.)
        """
        self._buffer[:0] = data


class InboundSMTP(SMTP):
    """aiosmtpd's SMTP protocol with enhanced status codes and an attached proxy session.

    Args:
        handler: the :class:`InboundHandler`.
        proxy_ctx: shared gateway context for the proxy session.
        limits_: the front door's limits (``[smtp]`` settings).
        counter: open connections, shared by every session of the gateway.
        **kwargs: passed to :class:`aiosmtpd.smtp.SMTP`.
    """

    def __init__(self, handler: "InboundHandler", proxy_ctx: ProxyContext, limits_: SmtpSettings,
                 counter: limits.ConnectionCounter, *, tls_context=None, submission_port: bool = False,
                 max_auth_failures: int = 3, **kwargs):
        # The context is set after aiosmtpd's set-up, which would otherwise re-check its
        # verify mode on every connection (slow enum conversions); ours asks for a client
        # certificate only while partner rules need one (see mxguard.tls.contexts).
        super().__init__(handler, **kwargs)
        self.tls_context = tls_context
        self.proxy = ProxySession(proxy_ctx)
        self.limits = limits_
        self.counter = counter
        self._greeting_sent = False
        # Positive EHLO/HELO replies carry no enhanced codes (RFC 2034 3); their refusals do,
        # like every other 4xx/5xx of this gateway.
        self._plain_replies = False
        self._batch: list[str] | None = None
        self._proxy_closed = False
        self._refused = False
        self._client_key: str | None = None
        self._session_timer: asyncio.TimerHandle | None = None
        self.junk_commands = 0
        #: The current MAIL command carried REQUIRETLS (RFC 8689).
        self.requiretls = False
        self.errors_in_a_row = 0
        self.closing = False
        #: True while mxguard itself is working on a command (downstream dialogue, filters):
        #: the idle timeout is the client's, not ours.
        self.working = False
        #: True while the message data is being received (see ``_timeout_cb``).
        self.receiving_data = False
        #: The last message data held a bare CR or LF (found while it was read).
        self.data_bare_line_ends = False
        self._gone = False
        #: The MAIL/RCPT being handled, and why its path was refused (see ``_getaddr``).
        self._path_verb: str | None = None
        self._path_problem: str | None = None
        #: Its path was followed by parameters, after HELO rather than EHLO (see ``push``).
        self._params_after_helo = False
        #: The client certificate of this TLS session, parsed once: ``(ssl object, certificate)``.
        self._peer_cert: tuple[object, PeerCertificate | None] | None = None
        #: This connection came to a submission listener (RFC 6409): relaying needs AUTH or a certificate.
        self.submission_port = submission_port
        #: The grant SMTP AUTH gave this TLS session (:class:`~mxguard.relay.access.RelayGrant`).
        self.auth_grant = None
        self.auth_failures = 0
        self.max_auth_failures = max_auth_failures
        self._credentials: tuple[str, object] | None = None

    # RFC 4954 defines no LOGIN prompts; clients and servers by custom send "Username:" and
    # "Password:" (aiosmtpd's own are "User Name" and "Password" with a NUL byte after them).
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    _dir_names: list[str] | None = None

    def __dir__(self) -> list[str]:
        # aiosmtpd scans dir(self) and inspect.getmembers(self) on every new connection only
        # to find its smtp_* and auth_* methods; listing just those (once per class) keeps a
        # connection's set-up cheap. Everything else about the object is unchanged.
        cls = type(self)
        if cls._dir_names is None:
            cls._dir_names = [n for n in super().__dir__() if n.startswith(("smtp_", "auth_"))]
        return cls._dir_names

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The address in a MAIL/RCPT argument and the rest (the parameters).

        Same contract as aiosmtpd's: ``("", "")`` for no argument, ``(None, None)``
        when the address does not parse (RFC 5321 4.1.2 via the stdlib's RFC 5322
        parser). Written here without aiosmtpd's per-call class definition, which
        was a measurable cost on every MAIL and RCPT.
        """
        if not arg:
            return "", ""
        # The RFC 5321 path form first (the mailbox parser below forgives spaces and comments);
        # control characters and bad UTF-8 are named as such, whoever refuses them.
        control = syntax.argument_problem(arg)
        problem = syntax.path_problem(arg)
        self._path_problem = control or problem  # push() words aiosmtpd's refusal with it
        if problem is not None:
            return None, None
        addr, rest = parse_path(arg)
        if addr is None or (self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit):
            return None, None
        # aiosmtpd answers parameters after HELO with its syntax error; push() words it 555.
        self._params_after_helo = bool(rest and rest.strip()) and not (self.session and self.session.extended_smtp)
        return addr, rest

    async def push(self, status) -> None:  # noqa: D401 - aiosmtpd API
        if status is None or self.transport is None or self.transport.is_closing():
            return  # the connection is going away: nobody would read it
        if isinstance(status, bytes):
            status = status.decode("utf-8", "replace")
        if self._path_verb is not None and self._params_after_helo and status.startswith("501 Syntax: "):
            # The path was good and parameters followed it after HELO: no service extension is
            # in force, so they are not recognized (RFC 5321 3.3, 4.1.1.11; RFC 1869 4.2).
            self._params_after_helo = False
            status = str(syntax.params_without_ehlo(self._path_verb))
        elif self._path_verb is not None and status.startswith("553 5.1.3 Error: malformed address"):
            # RFC 5321 4.1.2 path syntax: 501 with the sender's or the recipient's code (RFC 3463).
            problem, self._path_problem = self._path_problem, None
            if self._path_verb == "MAIL":
                status = str(syntax.bad_sender(problem) if problem else syntax.malformed_sender())
            elif problem:
                status = str(syntax.bad_recipient(problem))
        for prefix, reply in _LIBRARY_REFUSALS if status[:1] == "5" else ():
            if status.startswith(prefix):
                # A limit aiosmtpd enforces: our code and text, and a log line naming the limit.
                # (After too many unknown commands aiosmtpd closes, which RFC 5321 3.8 announces with 421.)
                log.warning("limit reached", limit=limits.limit_name(reply), client=_peer_ip(self.session),
                            reply=reply.one_line())
                status = str(reply)
                break
        if self._greeting_sent and (not self._plain_replies or status[:1] in "45"):
            status = with_enhanced_code(status)
        self._greeting_sent = True
        if self._batch is not None:
            self._batch.append(status)  # the lines of one multi-line reply leave in one write
            return
        await super().push(status)
        code = status[:1]
        if code == "5":
            self.errors_in_a_row += 1
            if self.errors_in_a_row >= self.limits.hard_error_limit and not self.closing:
                await self.close_with(limits.TOO_MANY_ERRORS, "hard_error_limit")
        elif code in "23":
            self.errors_in_a_row = 0

    async def close_with(self, reply: Reply, limit: str) -> None:
        """Say ``reply`` (a 421) and close: a limit was reached. The process log names the limit."""
        if self.closing:
            return
        self.closing = True
        log.warning("limit reached; closing", limit=limit, client=_peer_ip(self.session), reply=reply.one_line())
        await self.proxy.abort(limit)
        try:
            await super().push(str(reply))
        except (ConnectionError, RuntimeError):
            pass
        if self.transport is not None:
            self.transport.close()

    def count_junk(self) -> bool:
        """Count a command outside a transaction; True when the junk limit is reached."""
        if self.proxy.tx is not None:
            return False
        self.junk_commands += 1
        return self.junk_commands > self.limits.junk_command_limit

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The reader aiosmtpd made for this connection, with bare-LF command lines refused
        # (the same object: aiosmtpd keeps using it across STARTTLS).
        reader.__class__ = CommandLineReader
        reader.on_bare_lf = self._bare_lf
        super()._cb_client_connected(reader, writer)

    async def _bare_lf(self, line: bytes) -> None:
        """A command line ended by a bare LF: refused, logged and counted (``bare_lf``)."""
        log.warning("command line with a bare LF refused", client=_peer_ip(self.session),
                    reply=syntax.BARE_LF_COMMAND.one_line())
        count = self.proxy.ctx.on_refusal
        if count is not None:
            count("bare_lf")
        await self.push(str(syntax.BARE_LF_COMMAND))

    @command_syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        self._path_verb, self._path_problem, self._params_after_helo = "MAIL", None, False
        self.requiretls = False
        # Only among the parameters after the path: a quoted local part may hold the word too.
        path, closing, params = (arg or "").rpartition(">")
        extended = self.session is not None and self.session.extended_smtp
        # After HELO, REQUIRETLS is a parameter like any other: not in force, so 555 (see push).
        if closing and extended and _REQUIRETLS_PARAM.search(params):
            # RFC 8689 4.1: REQUIRETLS is offered only after STARTTLS; aiosmtpd would not know it.
            if self._tls_protocol is None:
                await self.push(str(REQUIRETLS_WITHOUT_TLS))
                return
            arg = path + closing + _REQUIRETLS_PARAM.sub("", params)
            self.requiretls = True
        try:
            await super().smtp_MAIL(arg)
        finally:
            self._path_verb = self._path_problem = None
            self._params_after_helo = False

    @command_syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self._path_verb, self._path_problem, self._params_after_helo = "RCPT", None, False
        try:
            await super().smtp_RCPT(arg)
        finally:
            self._path_verb = self._path_problem = None
            self._params_after_helo = False

    @command_syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if self.count_junk():
            return await self.close_with(limits.TOO_MANY_COMMANDS, "junk_command_limit")
        await super().smtp_NOOP(arg)

    @command_syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if self.count_junk():
            return await self.close_with(limits.TOO_MANY_COMMANDS, "junk_command_limit")
        await super().smtp_RSET(arg)

    @command_syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        if self.count_junk():
            return await self.close_with(limits.TOO_MANY_COMMANDS, "junk_command_limit")
        await super().smtp_HELP(arg)

    async def _refuse_helo(self, hostname: str | None) -> bool:
        problem = syntax.argument_problem(hostname) if hostname else None
        if problem is not None:
            await self.push(str(syntax.bad_helo(problem)))
            return True
        return False

    @command_syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if self.count_junk():
            return await self.close_with(limits.TOO_MANY_COMMANDS, "junk_command_limit")
        if await self._refuse_helo(hostname):
            return
        if hostname:
            await self.proxy.abort("EHLO")  # EHLO resets the session (RFC 5321 4.1.4)
        self._plain_replies = True
        self._batch = []
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False
            lines, self._batch = self._batch, None
            if lines:
                await SMTP.push(self, "\r\n".join(_ehlo_lines(lines, tls=self._tls_protocol is not None,
                                                                auth=self.offers_auth)))
                if lines[-1].startswith("2"):
                    self.errors_in_a_row = 0

    @command_syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if self.count_junk():
            return await self.close_with(limits.TOO_MANY_COMMANDS, "junk_command_limit")
        if await self._refuse_helo(hostname):
            return
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    @command_syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            # RFC 3207 4.2: no STARTTLS inside TLS; aiosmtpd would start a second handshake.
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)
        shrink_tls_read_buffer(self._tls_protocol)

    @property
    def offers_auth(self) -> bool:
        """AUTH is available: on the submission listener, or on any listener once some organization
        has a relay credential (it is still offered inside TLS only)."""
        relay = self.proxy.ctx.relay
        return relay is not None and self.proxy.ctx.outbound is not None and (
            self.submission_port or relay.has_credentials)

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.offers_auth:
            # An MX takes mail for its domains; without relay credentials it is not a submission server.
            await self.push("502 5.5.1 AUTH not available on this server")
            return
        if self.session is not None and self.session.extended_smtp and self._tls_protocol is None:
            # RFC 4954 section 4 and 6: PLAIN and LOGIN only inside TLS.
            log.info("AUTH refused before STARTTLS", client=_peer_ip(self.session))
            self._count_relay_refusal("auth_required")
            await self.push(str(submission.ENCRYPTION_REQUIRED))
            return
        if self.proxy.tx is not None:
            # RFC 4954 section 4: AUTH is not permitted during a mail transaction.
            await self.push("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        await super().smtp_AUTH(arg)

    def _authenticate(self, mechanism: str, auth_data) -> AuthResult:
        # aiosmtpd decoded the SASL exchange (RFC 4616 PLAIN, LOGIN); the check itself is
        # asynchronous (argon2 in a worker thread), so the credentials are only kept here
        # and judged in _judge_credentials.
        self._credentials = (mechanism, auth_data)
        return AuthResult(success=False, handled=True)

    async def auth_PLAIN(self, _, args: list[str]) -> AuthResult:
        self._credentials = None
        return await self._judge_credentials(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _, args: list[str]) -> AuthResult:
        self._credentials = None
        return await self._judge_credentials(await super().auth_LOGIN(_, args))

    async def _judge_credentials(self, result: AuthResult) -> AuthResult:
        credentials, self._credentials = self._credentials, None
        if credentials is None:
            # aiosmtpd already answered (bad base64, "*" cancel): one reply per command.
            return AuthResult(success=False, handled=True)
        mechanism, data = credentials
        try:
            username = bytes(data.login).decode("utf-8")
            password = bytes(data.password).decode("utf-8")
        except (UnicodeDecodeError, AttributeError, TypeError):
            username, password = None, None
        self.working = True
        try:
            grant = await self.proxy.ctx.relay.authenticate(username, password) if username is not None else None
        finally:
            self.working = False
        client = _peer_ip(self.session)
        if grant is not None:
            self.auth_grant = grant
            log.info("relay AUTH succeeded", client=client, mechanism=mechanism, user=username, org=grant.org)
            return AuthResult(success=True, auth_data=username, message=str(submission.AUTH_OK))
        self.auth_failures += 1
        log.warning("relay AUTH failed", client=client, mechanism=mechanism, user=(username or "?")[:100],
                    failures=self.auth_failures, reply=submission.AUTH_FAILED.one_line())
        self._count_relay_refusal("auth_failed")
        if self.auth_failures >= self.max_auth_failures:
            await self.push(str(submission.AUTH_FAILED))
            await self.close_with(submission.TOO_MANY_AUTH_FAILURES, "max_auth_failures")
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=str(submission.AUTH_FAILED))

    def _count_relay_refusal(self, reason: str) -> None:
        count = self.proxy.ctx.on_relay_refusal
        if count is not None:
            count(reason)

    def relay_grant(self, info: ClientInfo):
        """Who this session may relay for, right now: client certificate, then AUTH, then source network.

        ``None`` when nobody is registered for it (or the gateway does not relay).
        """
        relay = self.proxy.ctx.relay
        if relay is None or self.proxy.ctx.outbound is None:
            return None
        grant = relay.by_certificate(info.cert) if info.cert is not None else None
        return grant or self.auth_grant or relay.by_network(info.ip)

    async def smtp_VRFY(self, arg: str) -> None:
        if self.count_junk():
            return await self.close_with(limits.TOO_MANY_COMMANDS, "junk_command_limit")
        await self.push("502 5.5.1 VRFY command is disabled")

    async def smtp_EXPN(self, arg: str) -> None:
        await self.push("502 5.5.1 EXPN command is disabled")

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # Failed handshakes are routine on an MX (scanners, clients with only old
            # protocols): one line, no trace. aiosmtpd closes the connection itself.
            cause = error.__cause__
            log.info("STARTTLS handshake failed", client=_peer_ip(self.session),
                     reason=(getattr(cause, "reason", None) or type(cause).__name__) if cause else "unknown")
            return "421 4.7.0 TLS handshake failed"
        if isinstance(error, (asyncio.IncompleteReadError, ConnectionError)):
            # The client went away between two commands: routine, not an error. (It can reach
            # here when its EOF races our last reply and the cancellation aiosmtpd sends this
            # task is lost, e.g. by asyncio.wait_for on Python 3.11.) Close, and yield so that
            # connection_lost runs and ends this task; reading on would only fail again.
            if not self._gone:
                self._gone = True
                log.info("client disconnected", client=_peer_ip(self.session))
                if self.transport is not None:
                    self.transport.close()
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(0.05)  # a TLS transport takes a moment to close
            return "421 4.4.2 Connection closed"
        return await super().handle_exception(error)

    @command_syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA (RFC 5321 4.1.1.4): aiosmtpd's command, with the message data read in chunks.

        The checks before ``354`` and their replies are aiosmtpd's; the data is read by
        :mod:`mxguard.smtp.data_reader`, which decides as aiosmtpd's line-by-line reading
        does (end of data, dot-unstuffing, size and line limits) at a fraction of its cost.
        A refused transfer is read to its end, then answered ``552 5.3.4`` (size) or
        ``500 5.6.0`` (line length), and ends the downstream transaction too. The
        message stays bytes (the gateway runs aiosmtpd with ``decode_data=False``).
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        self.receiving_data = True  # until the data has ended (the timeout then is ours: see ``working``)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            data = DataReader(self.data_size_limit, self.line_length_limit)
            try:
                await data_reader.receive(self._reader, data, self._reader.unread)
            except asyncio.CancelledError:
                # The connection went away (or timed out) during DATA, as aiosmtpd handles it.
                log.info("connection lost during DATA", client=_peer_ip(self.session))
                self._writer.close()
                raise
        finally:
            self.receiving_data = False
        if data.outcome is not Outcome.OK:
            refusal = limits.LINE_TOO_LONG if data.outcome is Outcome.LINE_TOO_LONG else limits.MESSAGE_TOO_BIG
            log.warning("limit reached", limit=limits.limit_name(refusal), client=_peer_ip(self.session),
                        reply=refusal.one_line())
            self._set_post_data_state()
            await self.push(str(refusal))
            if self.proxy.tx is not None:
                # End the downstream transaction too, and leave a message-log record.
                await self.proxy.refuse(refusal, b"")
            return
        content = data.content()
        self.envelope.content = self.envelope.original_content = content
        self.data_bare_line_ends = data.bare_line_ends
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    #: The idle deadline (loop time, seconds) and the deadline the pending timer was set for.
    _idle_deadline = 0.0
    _idle_armed_for: float | None = None

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd moves its idle timer at every command: a new TimerHandle and heap entry each
        # time, a few per cent of a busy gateway's CPU. Here one timer runs per session and,
        # when it fires before a deadline a later command moved, sets itself again: the same
        # deadlines, without a timer per command.
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        handle = self._timeout_handle
        armed = self._idle_armed_for
        if armed is not None and armed <= deadline and handle is not None and not handle.cancelled():
            return
        if handle is not None:
            handle.cancel()
        self._idle_armed_for = deadline
        self._timeout_handle = self.loop.call_at(deadline, self._idle_timer)

    def _idle_timer(self) -> None:
        armed, self._idle_armed_for = self._idle_armed_for, None
        if armed is not None and self._idle_deadline > armed:  # a command came after it was set
            self._idle_armed_for = self._idle_deadline
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_timer)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        # aiosmtpd closes silently; RFC 5321 4.5.3.2 and 3.8 ask for a 421 first, and the log names the limit.
        if self.working:
            self._reset_timeout()  # the wait is ours (downstream, filters), not the client's
            return
        # aiosmtpd restarts this timer at each command only, so during DATA it bounds the
        # whole transfer: a sender trickling its message is cut too.
        reply = limits.DATA_TIMEOUT if self.receiving_data else limits.IDLE_TIMEOUT
        self.loop.create_task(self.close_with(reply, "command_timeout"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgraded = self.transport is not None and self._original_transport is not None
        if not upgraded:
            peer = transport.get_extra_info("peername")
            client = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            refusal = self.counter.admit(client)
            if refusal is not None:
                # Refuse before the greeting (RFC 5321 3.1: 421 instead of 220), and log it.
                self._refused = True
                log.warning("limit reached; connection refused", limit=limits.limit_name(refusal), client=client,
                            reply=refusal.one_line())
                transport.write(str(refusal).encode() + b"\r\n")
                transport.close()
                return
            self._client_key = client
            self._session_timer = self.loop.call_later(self.limits.max_session_time, self._session_expired)
        super().connection_made(transport)
        if not upgraded and self._handler_coroutine is not None:
            self._handler_coroutine.add_done_callback(self._handler_done)
        if upgraded:
            # RFC 3207 4.2: STARTTLS resets the SMTP state (an AUTH identity too); end any transaction.
            self.auth_grant = None
            self.loop.create_task(self.proxy.abort("STARTTLS"))

    def _session_expired(self) -> None:
        if self.working:
            # Let our own work on the current command finish (bounded by the downstream and
            # filter timeouts): closing now would cut a delivery in half.
            self._session_timer = self.loop.call_later(1.0, self._session_expired)
            return
        self.loop.create_task(self.close_with(limits.SESSION_TOO_LONG, "max_session_time"))

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._client_key is not None:
            self.counter.release(self._client_key)
            self._client_key = None
        if self._session_timer is not None:
            self._session_timer.cancel()
        super().connection_lost(error)
        if not self._proxy_closed:
            self._proxy_closed = True
            task = self.loop.create_task(self.proxy.close())
            closing = self.proxy.ctx.closing
            closing.add(task)
            task.add_done_callback(closing.discard)
        if self._handler_coroutine is not None and self._handler_coroutine.done():
            self._drop_self_references()

    def _handler_done(self, _task: asyncio.Task) -> None:
        if self.transport is None:  # the connection is gone too (aiosmtpd clears it in connection_lost)
            self._drop_self_references()

    def _drop_self_references(self) -> None:
        """Forget what refers back to this object, once the session and its task have ended.

        aiosmtpd's dispatch tables hold bound methods of the protocol, and its
        session task (ended by a ``CancelledError`` whose traceback holds the
        task's frames) is kept on it: reference cycles, about a hundred objects
        per connection, that only the garbage collector would free. Its passes
        over them cost CPU and showed in the latency's 99th percentile
        (issue 17); dropping the references lets each connection be freed as
        soon as it ends.
        """
        self._smtp_methods = {}
        self._auth_methods = {}
        self._client_connected_cb = None  # a bound method of this object (asyncio's StreamReaderProtocol)
        reader = getattr(self, "_reader", None)
        if isinstance(reader, CommandLineReader):
            reader.on_bare_lf = None
        self._reader = self._writer = None  # the writer refers to this protocol
        self._handler_coroutine = None
        self._timeout_handle = None
        self._session_timer = None

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
            if self._peer_cert is None or self._peer_cert[0] is not sslobj:
                self._peer_cert = (sslobj, peer_certificate(sslobj.getpeercert(binary_form=True)))
            info.cert = self._peer_cert[1]
        return info


class InboundHandler:
    """The policy of the front door, phase by phase.

    Args:
        max_recipients: recipients per transaction before ``452 4.5.3``.
    """

    def __init__(self, max_recipients: int = 100):
        self.max_recipients = max_recipients
        self._dir_names = [n for n in super().__dir__() if n.startswith("handle_")]

    def __dir__(self) -> list[str]:
        # aiosmtpd looks up the handler's handle_* hooks (and auth_* methods) on every new
        # connection; listing only those keeps that cheap.
        return self._dir_names

    async def handle_HELO(self, server: InboundSMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        session.host_name = hostname
        await server.proxy.abort("HELO")
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: InboundSMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if server.proxy.transactions >= server.limits.max_messages_per_connection:
            await server.close_with(limits.TOO_MANY_MESSAGES, "max_messages_per_connection")
            return str(limits.TOO_MANY_MESSAGES)
        sender = "" if address == "<>" else address
        smtputf8 = "SMTPUTF8" in mail_options
        problem = syntax.argument_problem(sender)
        if problem is not None:
            return str(syntax.bad_sender(problem))
        if not smtputf8 and not sender.isascii():
            return "553 5.6.7 Non-ASCII address requires SMTPUTF8 (RFC 6531)"
        client = server.client_info()
        client.relay = server.relay_grant(client)
        refusal = submission.refusal_at_mail(server, client, sender)
        if refusal is not None:
            return str(server.proxy.refuse_sender(client, sender, refusal))
        partners = server.proxy.ctx.partners
        if partners is not None and server._tls_protocol is None:
            refusal = partners.starttls_first(sender)
            if refusal is not None:
                return str(server.proxy.refuse_sender(client, sender, refusal))
        server.proxy.begin(client, sender, mail_options, requiretls=server.requiretls)
        server.junk_commands = 0
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: InboundSMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        tx = server.proxy.tx
        if tx is None:
            return str(BAD_SEQUENCE)
        if tx.attempts >= self.max_recipients:
            log.warning("limit reached", limit="max_recipients", client=tx.client.ip, txn=tx.txn_id,
                        reply=TOO_MANY_RECIPIENTS.one_line())
            return str(TOO_MANY_RECIPIENTS)
        problem = syntax.argument_problem(address)
        if problem is not None:
            return str(syntax.bad_recipient(problem))
        if not tx.smtputf8 and not address.isascii():
            return "553 5.6.7 Non-ASCII address requires SMTPUTF8 (RFC 6531)"
        if "@" not in address:
            # RFC 5321 4.1.1.3 allows a bare <Postmaster>, but a gateway for many
            # domains cannot tell whose; anything else without a domain is bad syntax.
            if address.lower() == "postmaster":
                return "550 5.1.1 Use postmaster@<domain>: this gateway serves several domains"
            return "501 5.1.3 Bad recipient address syntax: a domain is required"
        if syntax.source_routed(address):
            return str(syntax.source_routing(address))
        server.working = True
        try:
            reply = await server.proxy.add_recipient(address)
        except Exception:  # noqa: BLE001 - the sender gets a 4xx, the log gets the trace
            log.exception("RCPT failed", rcpt=address)
            return str(INTERNAL_ERROR)
        finally:
            server.working = False
        if reply.is_positive:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return str(reply)

    async def handle_DATA(self, server: InboundSMTP, session: Session, envelope: Envelope) -> str:
        server.receiving_data = False
        if server.proxy.tx is None:
            return str(BAD_SEQUENCE)
        refusal, content = limits.check_message(envelope.original_content, server.limits,
                                                bare_line_ends=server.data_bare_line_ends)
        server.working = True
        try:
            if refusal is not None:
                log.warning("message refused by a limit", limit=limits.limit_name(refusal),
                            client=server.proxy.tx.client.ip, txn=server.proxy.tx.txn_id, reply=refusal.one_line())
                return str(await server.proxy.refuse(refusal, content))
            try:
                reply = await server.proxy.finish(content)
            except Exception:  # noqa: BLE001 - see handle_RCPT
                log.exception("DATA failed")
                await server.proxy.abort("internal error")
                return str(INTERNAL_ERROR)
            return str(reply)
        finally:
            server.working = False

    async def handle_RSET(self, server: InboundSMTP, session: Session, envelope: Envelope) -> str:
        await server.proxy.abort("RSET")
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: InboundSMTP, session: Session, envelope: Envelope) -> str:
        await server.proxy.abort("QUIT")
        return "221 2.0.0 Bye"

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error", error=repr(error)[:300], exc_info=error)
        return str(INTERNAL_ERROR)
