"""Downstream delivery: one SMTP client connection to a route, with the route's TLS policy.

Used by the in-line proxy (one connection per route per inbound session) and by
the spool worker (one connection per attempt). The rules:

* Servers of a route are tried in order (failover); a server that refuses the
  connection, times out, greets with 4xx/5xx, or cannot give the TLS the
  policy demands, is skipped for the next one. An outbound route (to an
  internet destination) lists its MX hosts' addresses, IPv6 and IPv4, already
  resolved (:attr:`Route.addresses <mxguard.smtp.routing.Route.addresses>`):
  each address is such a server, the host's name deciding TLSA, MTA-STS and
  the certificate name.
* ``off``: never STARTTLS. ``opportunistic``: STARTTLS when offered; if it is
  not offered or the handshake fails, plain SMTP on a fresh connection
  (RFC 3207 section 4.1; Postfix ``may``). ``required``: STARTTLS or the
  server is skipped — nothing is sent in clear. ``verify``: ``required`` plus
  chain and host name verification, or a pinned SHA-256 fingerprint.
* A server whose greeting or EHLO reply names this gateway's own host name is
  this gateway (a route pointed back at it): skipped as a mail loop, and a
  route with nothing but such servers fails permanently with ``554 5.4.6``
  (RFC 3463: routing loop detected; Postfix: "mail for X loops back to
  myself"), never spooled or retried.
* After STARTTLS, EHLO is sent again and what was learnt before is forgotten
  (RFC 3207 section 4.2); bytes a server sends between its 220 and the
  handshake are discarded (aiosmtplib does this: STARTTLS injection defence).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import structlog
from aiosmtplib import errors as smtperr
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH, SMTPProtocol

from mxguard.config import DownstreamSettings
from mxguard.smtp.limits import has_bare_line_ends, normalize_line_ends
from mxguard.smtp.replies import Reply
from mxguard.smtp.routing import Route
from mxguard.tls.buffers import shrink_tls_read_buffer
from mxguard.errors import ConfigError
from mxguard.tls.certs import describe_der, peer_chain_der
from mxguard.tls.contexts import client_context
from mxguard.tls.policy import DownstreamTls
from mxguard.tls.resolver import PolicyRefusal, ServerPolicy, resolve_server_policy, sts_fetcher

log = structlog.get_logger("mxguard.delivery")


@dataclass
class ConnectionInfo:
    """What happened when connecting to a downstream server; goes to the message log."""

    host: str
    port: int
    tls: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    bits: int | None = None
    #: True when the chain and name verified, or the pinned fingerprint matched.
    verified: bool = False
    cert_sha256: str | None = None
    cert_subject: str | None = None
    starttls_offered: bool = False
    #: opportunistic only: the handshake failed and mail went in clear.
    tls_fallback: str | None = None
    connect_ms: float = 0.0
    tls_ms: float = 0.0
    #: What decided the TLS policy: ``setting`` (the domain's mode) or ``dane`` (TLSA records).
    policy: str = "setting"
    #: With DANE: the TLSA record the certificate matched (``3 1 1 ab12...``).
    tlsa: str | None = None
    #: Delivered, but a failure TLS-RPT reports (RFC 8460 4.3 result type): see
    #: :attr:`mxguard.tls.resolver.ServerPolicy.report_failure`; ``report_policy`` is its source.
    report_failure: str | None = None
    report_policy: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))  # every field is a plain value: no deep copy needed

    def describe_tls(self) -> str:
        if not self.tls:
            return "none" + (f" ({self.tls_fallback})" if self.tls_fallback else "")
        checked = (" DANE-verified" if self.policy == "dane" else " verified") if self.verified else ""
        return f"{self.tls_version} {self.cipher}{checked}"


@dataclass
class RouteFailure(Exception):
    """No server of the route could be used.

    Attributes:
        reply: what the sender is told (``451 4.4.1`` unreachable, ``451 4.7.5``
            TLS not obtainable under the policy).
        tls_related: True when at least one server was reachable but TLS
            policy could not be met (nothing was sent in clear).
        attempts: one line per server tried, for the log.
    """

    reply: Reply
    tls_related: bool = False
    attempts: list[str] = field(default_factory=list)
    #: ``{"host:port": result type}`` for servers skipped for a TLS reason (RFC 8460 section 4.3).
    tls_results: dict[str, str] = field(default_factory=dict)
    #: ``{"host:port": policy source}`` of those servers (``setting``, ``dane``, ``mta-sts``...), so a
    #: report files each failure under the policy that demanded TLS (RFC 8460 section 4.4 policy-type).
    tls_policies: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.reply.one_line()} [{'; '.join(self.attempts)}]"


def attempt_item(policy_domain: str | None, info: ConnectionInfo | None,
                 failure: RouteFailure | None) -> dict[str, Any]:
    """One delivery session as the message log (``downstream``) and the spool (``spool_attempts``) keep it.

    TLS-RPT (RFC 8460 section 4) counts these: a connection's TLS fields when one was used, else
    the route failure with, per server skipped for a TLS reason, its result type (``tls_rpt``) and
    the policy source that demanded TLS (``tls_rpt_policy``).

    Args:
        policy_domain: the served domain the mail was for (the report's policy-domain); ``None``
            for mail that belongs to no served domain's report.
        info: the connection used, if any.
        failure: why no server could be used, if so (then ``info`` is ignored).
    """
    item: dict[str, Any] = {"domain": policy_domain} if policy_domain else {}
    if failure is not None:
        item["failure"] = str(failure)
        if failure.tls_results:
            item["tls_rpt"] = dict(failure.tls_results)
            item["tls_rpt_policy"] = dict(failure.tls_policies)
    elif info is not None:
        item.update(info.as_dict())
    return item


class DownstreamLost(Exception):
    """The downstream connection broke or timed out in the middle of a dialogue."""


class _ServerSkipped(Exception):
    def __init__(self, note: str, tls_related: bool = False, result_type: str | None = None, *,
                 loop: bool = False):
        super().__init__(note)
        self.note = note
        self.tls_related = tls_related
        #: The server is this gateway itself (its greeting or EHLO reply names our host name).
        self.loop = loop
        #: RFC 8460 section 4.3 result type of a TLS failure (for TLS-RPT).
        self.result_type = result_type
        #: The policy source in force when the server was skipped (set by ``_open_one``).
        self.policy: str | None = None


def _names_host(reply_text: str, hostname: str) -> bool:
    """True when a greeting or EHLO reply's text starts with ``hostname`` (RFC 5321 4.1.1.1, 4.2:
    the first word of a 220 greeting or of an EHLO reply's first line is the server's domain).

    Compared without case and a trailing dot; an empty ``hostname`` names nobody.
    """
    words = reply_text.split(None, 1)
    own = hostname.strip().rstrip(".").lower()
    return bool(own and words) and words[0].rstrip(".").lower() == own


def _stamp(path: str | None) -> int:
    """A file's modification time in ns (0: none or unreadable): a new CRL gets a new context."""
    try:
        return os.stat(path).st_mtime_ns if path else 0
    except OSError:
        return 0


def _certificate_result_type(exc: ssl.SSLCertVerificationError) -> str:
    """RFC 8460 section 4.3 result type for a failed certificate check (OpenSSL's verify code)."""
    code = getattr(exc, "verify_code", None)
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        return "certificate-host-mismatch"
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return "certificate-expired"
    return "certificate-not-trusted"


def data_stream(message: bytes) -> bytes:
    """What goes on the wire after ``DATA`` for ``message`` (RFC 5321 4.5.2, 2.3.8).

    Every line ends in CRLF (a bare CR or LF becomes CRLF, and a last line
    without one gets one), a line that starts with a dot gets a second dot
    (transparency), and the end-of-data line ``.CRLF`` follows. The same
    bytes as aiosmtplib's own ``DATA`` (two regular-expression passes over
    the message), made with byte searches: for a 100 KiB message about a
    third of the CPU time.

    Args:
        message: the message, any line ends.
    """
    if has_bare_line_ends(message):
        message = normalize_line_ends(message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed[:1] == b".":
        return b"." + stuffed + b".\r\n"
    return stuffed + b".\r\n"


# The library's private members the subclass below relies on; without any of them it is not installed.
_PROTOCOL_MEMBERS = ("_command_lock", "_response_pending", "_read_response_from_buffer", "_response_waiter",
                     "_buffer")


class _DataStreamProtocol(SMTPProtocol):
    """aiosmtplib's client protocol with ``DATA`` sending :func:`data_stream`'s bytes, and command groups.

    The dialogue is the library's: ``DATA``, a ``354``, the message and the
    final reply, under the protocol's command lock, each write marking a
    reply as expected. :meth:`execute_group` adds what the library lacks,
    RFC 2920 command groups. Installed on a connection by :func:`_fast_data`
    only when the protocol has the members this relies on; otherwise the
    library's own ``DATA`` runs and commands go one at a time.
    """

    async def execute_data_command(self, message: bytes, timeout: float | None = None):
        if self._command_lock is None:
            raise smtperr.SMTPServerDisconnected("Server not connected")
        stream = data_stream(message)
        async with self._command_lock:
            self._response_pending = True
            self.write(b"DATA\r\n")
            start = await self.read_response(timeout=timeout)
            if start.code != 354:
                raise smtperr.SMTPDataError(start.code, start.message)
            self._response_pending = True
            self.write(stream)
            response = await self.read_response(timeout=timeout)
            if response.code != 250:
                raise smtperr.SMTPDataError(response.code, response.message)
        return response

    async def execute_group(self, lines: list[bytes], timeout: float | None = None) -> list:
        """Send ``lines`` (whole commands, each ending in CRLF) in one write, then read one reply each.

        RFC 2920 section 3.1: a client may send MAIL and RCPT commands as a
        group to a server that offers PIPELINING, and read the replies in
        order afterwards. One write and, usually, one read instead of one
        round trip per command. Replies that came in the same read as an
        earlier one, or in reads before this task resumed (:meth:`data_received`),
        wait in the protocol's buffer and are parsed from there.

        Raises:
            SMTPServerDisconnected, SMTPReadTimeoutError, SMTPResponseException:
                as for the library's own commands.
        """
        if self._command_lock is None:
            raise smtperr.SMTPServerDisconnected("Server not connected")
        responses: list = []
        async with self._command_lock:
            self._response_pending = True
            self.write(b"".join(lines))
            try:
                for index in range(len(lines)):
                    self._group_replies_due = len(lines) - index - 1
                    # Replies that came before this task ran again wait in the buffer (data_received).
                    response = self._read_response_from_buffer() if responses else None
                    if response is None:
                        self._response_pending = True
                        response = await self.read_response(timeout=timeout)
                    responses.append(response)
            finally:
                self._group_replies_due = 0
        return responses

    #: Replies of the current command group still due after the one being awaited.
    _group_replies_due = 0

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if self._group_replies_due and waiter is not None and waiter.done():
            # A later reply of the group came before this task picked up the parsed one: between
            # the reply's future completing and the task resuming the loop turns twice, and a read
            # in between (a TLS record or a segment of its own) is one the library would drop,
            # leaving the task to wait for a reply already received. Keep it for the next read.
            if len(self._buffer) + len(data) <= MAX_RESPONSE_LENGTH * (self._group_replies_due + 1):
                self._buffer.extend(data)
            elif self.transport is not None:
                # Beyond that bound (a hostile server): close rather than frame later bytes wrongly;
                # the next read then finds the connection lost.
                self._buffer.clear()
                self.transport.close()
            return
        super().data_received(data)


def _header_section(message: bytes) -> bytes:
    """The header section of ``message``: up to the first empty line (any line ends), or all of it."""
    ends = [i for i in (message.find(b"\r\n\r\n"), message.find(b"\n\n")) if i >= 0]
    return message[:min(ends)] if ends else message


def _fast_data(client: aiosmtplib.SMTP) -> None:
    """Let ``client`` send message data with :class:`_DataStreamProtocol` (same bytes, less CPU)."""
    protocol = client.protocol
    if type(protocol) is SMTPProtocol and all(hasattr(protocol, name) for name in _PROTOCOL_MEMBERS):
        protocol.__class__ = _DataStreamProtocol


def _ssl_object(client: aiosmtplib.SMTP) -> ssl.SSLObject | None:
    try:
        return client.get_transport_info("ssl_object")
    except smtperr.SMTPServerDisconnected:
        return None


class DownstreamConnection:
    """An open SMTP client connection to one server of a route.

    Args:
        route: the route to deliver to.
        settings: timeouts.
        local_hostname: the name mxguard gives in EHLO (the gateway's hostname).

    Call :meth:`open` first; it raises :class:`RouteFailure`. The dialogue
    methods return :class:`Reply` objects (a refusal is a reply, not an
    exception) and raise :class:`DownstreamLost` when the connection breaks.
    """

    def __init__(self, route: Route, settings: DownstreamSettings, local_hostname: str):
        self.route = route
        self.settings = settings
        self.local_hostname = local_hostname
        self.client: aiosmtplib.SMTP | None = None
        self.info: ConnectionInfo | None = None
        self.in_transaction = False
        self.used = 0  # transactions completed on this connection
        self._exchanges = 0  # commands sent whose replies are still due (see busy)
        self.opened_at = 0.0  # monotonic seconds, set when open() succeeds
        self._decided_source: str | None = None  # policy source of the server being tried
        #: The open transaction asked for SMTPUTF8 but goes without it (RFC 6531 3.4): the
        #: server lacks it and the sender address is ASCII; recipients and header are checked.
        self.utf8_downgraded = False

    # -- connecting -----------------------------------------------------------------

    async def open(self) -> ConnectionInfo:
        """Connect to the first usable server of the route under its TLS policy.

        Raises:
            RouteFailure: no server could be used.
        """
        attempts: list[str] = []
        tls_related = False
        tls_results: dict[str, str] = {}
        tls_policies: dict[str, str] = {}
        loops = 0
        targets = self.route.addresses or tuple((host, port, None) for host, port in self.route.servers)
        for host, port, address in targets:
            try:
                try:
                    self.info = await self._open_one(host, port, address)
                except asyncio.CancelledError:
                    self._drop()  # nobody holds this half-open connection yet: close it, never leak it
                    raise
                self.opened_at = time.monotonic()
                if attempts:
                    log.info("downstream failover", route=self.route.describe(), used=f"{host}:{port}", skipped=attempts)
                return self.info
            except _ServerSkipped as skip:
                where = f" [{address}]" if address and address != host else ""
                attempts.append(f"{host}:{port}{where}: {skip.note}")
                loops += skip.loop
                tls_related = tls_related or skip.tls_related
                if skip.result_type:
                    tls_results[f"{host}:{port}"] = skip.result_type
                    tls_policies[f"{host}:{port}"] = skip.policy or "setting"
                await self._discard()
        if loops and loops == len(targets):
            # Every server is this gateway: retrying cannot help, and each retry would loop again.
            log.error("mail loops back to myself", route=self.route.describe(), hostname=self.local_hostname)
            raise RouteFailure(Reply(554, "5.4.6", f"Mail for {self.route.describe()} loops back to myself "
                                                   f"({self.local_hostname})"), False, attempts)
        if tls_related:
            reply = Reply(451, "4.7.5", "TLS to the downstream server is required by policy but could not "
                                        "be established; nothing was sent, try again later")
        else:
            reply = Reply(451, "4.4.1", "Downstream server unreachable, try again later")
        raise RouteFailure(reply, tls_related, attempts, tls_results, tls_policies)

    async def _open_one(self, host: str, port: int, address: str | None = None) -> ConnectionInfo:
        self._decided_source = None
        try:
            return await self._open_one_policy(host, port, address)
        except _ServerSkipped as skip:
            skip.policy = self._decided_source or self._refusing_source
            raise

    @property
    def _refusing_source(self) -> str:
        # A refusal before a policy was decided comes from the source the route's mode consults.
        if self.route.tls is DownstreamTls.MTA_STS:
            return "mta-sts"
        return "dane" if self.route.tls.uses_dane else "setting"

    async def _open_one_policy(self, host: str, port: int, address: str | None = None) -> ConnectionInfo:
        try:
            d = self.settings
            policy = await resolve_server_policy(
                self.route.tls, host, port, dns_servers=d.dns_servers, timeout=d.dns_timeout,
                policy_domain=self.route.policy_domain,
                sts=sts_fetcher(d.dns_servers, d.dns_timeout, d.mta_sts_ca_file, d.mta_sts_port),
                relaxed=self.route.relaxed, address=address, sts_fallback=self.route.sts_fallback)
        except PolicyRefusal as refusal:
            log.warning("TLS policy refuses the server", server=f"{host}:{port}", reason=refusal.reason,
                        result_type=refusal.result_type)
            self._decided_source = refusal.policy
            raise _ServerSkipped(refusal.reason, tls_related=True, result_type=refusal.result_type) from None
        mode = policy.mode
        self._decided_source = policy.source
        info = ConnectionInfo(host=host, port=port, policy=policy.source, report_failure=policy.report_failure,
                              report_policy=policy.report_policy)
        await self._connect_and_ehlo(host, port, info, address=policy.connect_host)
        if mode is DownstreamTls.OFF:
            return info
        info.starttls_offered = self.client.supports_extension("starttls")
        if not info.starttls_offered:
            if policy.mandatory:
                raise _ServerSkipped("STARTTLS not offered", tls_related=True, result_type="starttls-not-supported")
            return info
        started = time.perf_counter()
        try:
            await self._starttls(host, info, policy)
        except _ServerSkipped as skip:
            if policy.mandatory:
                raise
            # Opportunistic: the handshake failed; deliver in clear on a new connection.
            log.warning("opportunistic TLS failed; delivering in clear", server=f"{host}:{port}", reason=skip.note)
            await self._discard()
            fallback = ConnectionInfo(host=host, port=port, starttls_offered=True, tls_fallback=skip.note,
                                      policy=policy.source, report_failure=policy.report_failure,
                                      report_policy=policy.report_policy)
            await self._connect_and_ehlo(host, port, fallback, address=policy.connect_host)
            return fallback
        info.tls_ms = (time.perf_counter() - started) * 1000
        return info

    async def _connect_and_ehlo(self, host: str, port: int, info: ConnectionInfo, *, address: str | None = None) -> None:
        started = time.perf_counter()
        self.client = aiosmtplib.SMTP(hostname=address or host, port=port, local_hostname=self.local_hostname,
                                      timeout=self.settings.command_timeout, start_tls=False, use_tls=False)
        try:
            greeting = await self.client.connect(timeout=self.settings.connect_timeout)
        except smtperr.SMTPConnectResponseError as exc:
            raise _ServerSkipped(f"greeting {exc.code} {exc.message[:80]}") from None
        except (smtperr.SMTPException, OSError, asyncio.TimeoutError) as exc:
            raise _ServerSkipped(f"connect failed: {_reason(exc)}") from None
        self._check_loop(host, port, greeting.message)
        _fast_data(self.client)
        self._check_loop(host, port, (await self._ehlo()).message)
        info.connect_ms = (time.perf_counter() - started) * 1000

    def _check_loop(self, host: str, port: int, reply_text: str) -> None:
        """Skip a server that names itself with our host name: it is this gateway (a mail loop)."""
        if _names_host(reply_text, self.local_hostname):
            log.error("downstream server is this gateway: mail loop", server=f"{host}:{port}",
                      route=self.route.describe(), reply=reply_text[:120])
            raise _ServerSkipped(f"loops back to myself ({reply_text[:80]!r})", loop=True)

    async def _ehlo(self) -> "aiosmtplib.SMTPResponse":
        try:
            try:
                return await self.client.ehlo()
            except smtperr.SMTPHeloError:
                return await self.client.helo()
        except smtperr.SMTPResponseException as exc:
            raise _ServerSkipped(f"EHLO/HELO refused: {exc.code}") from None
        except (smtperr.SMTPException, OSError, asyncio.TimeoutError) as exc:
            raise _ServerSkipped(f"EHLO failed: {_reason(exc)}") from None

    async def _starttls(self, host: str, info: ConnectionInfo, policy: ServerPolicy) -> None:
        route = self.route
        pinned = bool(route.fingerprint) and policy.verify_pkix
        # DANE checks the certificate against TLSA below, not against a CA (RFC 7672 section 3.1).
        crl = route.crl_file if policy.verify_pkix and not pinned else None
        try:
            ctx = client_context(DownstreamTls.VERIFY if policy.verify_pkix else DownstreamTls.REQUIRED,
                                 route.ca_file, route.min_version, pinned, crl, _stamp(crl))
        except ConfigError as exc:  # a CA or CRL file gone since it was configured: nothing is sent
            raise _ServerSkipped(str(exc), tls_related=True, result_type="validation-failure") from None
        try:
            await self.client.starttls(server_hostname=host, tls_context=ctx,
                                       timeout=self.settings.connect_timeout)
        except smtperr.SMTPResponseException as exc:
            raise _ServerSkipped(f"STARTTLS refused: {exc.code} {exc.message[:80]}", tls_related=True,
                                 result_type="starttls-not-supported") from None
        except ssl.SSLCertVerificationError as exc:
            raise _ServerSkipped(f"certificate not verified: {exc.verify_message}", tls_related=True,
                                 result_type=_certificate_result_type(exc)) from None
        except (ssl.SSLError, smtperr.SMTPException, OSError, asyncio.TimeoutError) as exc:
            raise _ServerSkipped(f"TLS handshake failed: {_reason(exc)}", tls_related=True,
                                 result_type="validation-failure") from None
        sslobj = _ssl_object(self.client)
        if sslobj is None:
            raise _ServerSkipped("connection lost after STARTTLS", tls_related=True)
        shrink_tls_read_buffer(getattr(self.client.transport, "_ssl_protocol", None))
        der = sslobj.getpeercert(binary_form=True)
        cert = describe_der(der) if der else None
        info.tls = True
        info.tls_version = sslobj.version()
        cipher = sslobj.cipher()
        info.cipher, info.bits = (cipher[0], cipher[2]) if cipher else (None, None)
        info.cert_sha256 = cert.sha256 if cert else None
        info.cert_subject = cert.subject if cert else None
        try:
            tlsa = policy.check_certificate(peer_chain_der(sslobj))
        except PolicyRefusal as refusal:
            log.warning("TLS policy refuses the server", server=f"{host}:{info.port}", reason=refusal.reason,
                        result_type=refusal.result_type)
            raise _ServerSkipped(refusal.reason, tls_related=True, result_type=refusal.result_type) from None
        if tlsa is not None:
            info.verified = True
            info.tlsa = tlsa
        if policy.verify_pkix:
            if pinned:
                if not cert or cert.sha256 != route.fingerprint:
                    raise _ServerSkipped("certificate fingerprint does not match the pinned one", tls_related=True,
                                         result_type="validation-failure")
            info.verified = True
        await self._ehlo()  # RFC 3207 4.2: forget what was learnt in clear

    async def _discard(self) -> None:
        self._drop()

    def _drop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def abandon(self) -> None:
        """Close at once: a command's reply is or was still due to a task that stopped waiting
        (the sender left, a session limit closed it, shut-down). The reply may still come and
        would be read as the answer to the next command sent here, so the connection is never
        reused (:class:`mxguard.smtp.pool.ConnectionPool` calls this for a :attr:`busy` one)."""
        self._drop()
        self.in_transaction = False

    @property
    def busy(self) -> bool:
        """True while a command sent here waits for its reply."""
        return self._exchanges > 0

    @contextlib.contextmanager
    def _reply_due(self):
        """Around sending a command and awaiting its reply: :attr:`busy` meanwhile, and a cancel
        (the waiting task stopped) abandons the connection, since the reply may still come."""
        self._exchanges += 1
        try:
            yield
        except asyncio.CancelledError:
            self.abandon()
            raise
        finally:
            self._exchanges -= 1

    # -- the dialogue ---------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self.client is not None and self.client.is_connected

    def supports(self, extension: str) -> bool:
        return self.client is not None and self.client.supports_extension(extension)

    async def _command(self, *args: bytes, timeout: float | None = None) -> Reply:
        if self.client is None:
            raise DownstreamLost("not connected")
        with self._reply_due():
            try:
                response = await self.client.execute_command(*args, timeout=timeout or self.settings.command_timeout)
            except (smtperr.SMTPException, OSError, asyncio.TimeoutError) as exc:
                raise await self._lost(exc) from None
        return Reply.from_downstream(response.code, response.message)

    async def _lost(self, exc: BaseException) -> DownstreamLost:
        """Drop the connection after ``exc`` and say why: a malformed reply or a broken connection."""
        await self._discard()
        if isinstance(exc, smtperr.SMTPResponseException):
            return DownstreamLost(f"bad reply: {exc.message[:80]}")
        return DownstreamLost(_reason(exc))

    def requiretls_refusal(self) -> Reply | None:
        """Why a REQUIRETLS message may not go on this connection (RFC 8689 4.2.1), or ``None``."""
        info = self.info
        if info is None or not info.tls or not info.verified:
            return Reply(550, "5.7.10", "REQUIRETLS: the connection to the downstream server is not TLS verified "
                                        "by DANE or PKIX (RFC 8689)")
        if not self.supports("requiretls"):
            return Reply(550, "5.7.10", "REQUIRETLS: the downstream server does not offer REQUIRETLS (RFC 8689)")
        return None

    async def mail(self, sender: str, *, size: int | None = None, body: str | None = None,
                   smtputf8: bool = False, requiretls: bool = False) -> Reply:
        """Send ``MAIL FROM``; ESMTP parameters only where the server offers them.

        Args:
            sender: envelope sender, ``""`` for the null reverse-path.
            size: message size in bytes (RFC 1870), if known.
            body: ``"8BITMIME"`` or ``"7BIT"`` (RFC 6152).
            smtputf8: the transaction needs SMTPUTF8 (RFC 6531).
            requiretls: the sender asked for REQUIRETLS (RFC 8689 4.2.1): the connection must be TLS
                verified by DANE or PKIX and the server must offer REQUIRETLS, else ``550 5.7.10``
                without sending anything (nothing is sent to the server then).

        Raises:
            DownstreamLost: the connection broke.
        """
        refusal = self._refuse_mail(sender, smtputf8, requiretls)
        if refusal is not None:
            return refusal
        reply = await self._command(b"MAIL", *self._mail_args(sender, size, body,
                                                               smtputf8 and not self.utf8_downgraded, requiretls))
        self.in_transaction = reply.is_positive
        return reply

    def _mail_args(self, sender: str, size: int | None, body: str | None, smtputf8: bool,
                   requiretls: bool) -> list[bytes]:
        args = [b"FROM:<" + sender.encode("utf-8", "surrogateescape") + b">"]
        if size and self.supports("size"):
            args.append(b"SIZE=%d" % size)
        if body == "8BITMIME" and self.supports("8bitmime"):
            args.append(b"BODY=8BITMIME")
        if smtputf8:
            args.append(b"SMTPUTF8")
        if requiretls:
            args.append(b"REQUIRETLS")
        return args

    def pipelines(self) -> bool:
        """True when commands may be sent as a group: the server offers PIPELINING (RFC 2920) and the
        connection has the protocol that reads grouped replies."""
        return (self.client is not None and isinstance(self.client.protocol, _DataStreamProtocol)
                and self.client.supports_extension("pipelining"))

    async def envelope(self, sender: str, recipients: list[str], *, size: int | None = None,
                       body: str | None = None, smtputf8: bool = False,
                       requiretls: bool = False) -> tuple[Reply, dict[str, Reply]]:
        """``MAIL FROM`` and a ``RCPT TO`` per recipient: one group when the server offers PIPELINING.

        RFC 2920 section 3.1 lets MAIL and RCPT go in one group; the replies
        come back in order. Without PIPELINING the commands go one at a time
        and no RCPT is sent after a refused MAIL.

        Args:
            sender, size, body, smtputf8, requiretls: as for :meth:`mail`.
            recipients: envelope recipients, in order.

        Returns:
            ``(MAIL reply, {recipient: RCPT reply})``; the dict is empty when MAIL was refused
            (a grouped RCPT's reply to a refused MAIL means nothing and is dropped).

        Raises:
            DownstreamLost: the connection broke or a reply was malformed or late.
        """
        if not recipients or not self.pipelines():
            mail = await self.mail(sender, size=size, body=body, smtputf8=smtputf8, requiretls=requiretls)
            replies: dict[str, Reply] = {}
            if mail.is_positive:
                for rcpt in recipients:
                    replies[rcpt] = await self.rcpt(rcpt)
            return mail, replies
        refusal = self._refuse_mail(sender, smtputf8, requiretls)
        if refusal is not None:
            return refusal, {}
        refused = {rcpt: r for rcpt in recipients if (r := self._utf8_refusal(rcpt)) is not None}
        sent = [rcpt for rcpt in recipients if rcpt not in refused]
        lines = [b" ".join([b"MAIL", *self._mail_args(sender, size, body, smtputf8 and not self.utf8_downgraded,
                                                         requiretls)]) + b"\r\n"]
        lines += [b"RCPT TO:<" + rcpt.encode("utf-8", "surrogateescape") + b">\r\n" for rcpt in sent]
        with self._reply_due():
            try:
                responses = await self.client.protocol.execute_group(lines, timeout=self.settings.command_timeout)
            except (smtperr.SMTPException, OSError, asyncio.TimeoutError) as exc:
                raise await self._lost(exc) from None
        mail = Reply.from_downstream(responses[0].code, responses[0].message)
        self.in_transaction = mail.is_positive
        if not mail.is_positive:
            return mail, {}
        replies = {rcpt: Reply.from_downstream(r.code, r.message) for rcpt, r in zip(sent, responses[1:])}
        return mail, {rcpt: refused.get(rcpt) or replies[rcpt] for rcpt in recipients}

    def _refuse_mail(self, sender: str, smtputf8: bool, requiretls: bool) -> Reply | None:
        """Why MAIL may not be sent (``None``: it may); sets :attr:`utf8_downgraded`.

        RFC 6531 3.4: a client SHOULD NOT ask for SMTPUTF8 when neither the
        envelope nor the message needs it. So a sender's SMTPUTF8 is dropped
        for a server without it while what is known so far is ASCII, as
        Postfix does; a non-ASCII recipient or header is refused later with
        ``5.6.7``.
        """
        self.utf8_downgraded = False
        if smtputf8 and not self.supports("smtputf8"):
            if not sender.isascii():
                return Reply(553, "5.6.7", "The downstream server does not support SMTPUTF8 (RFC 6531), "
                                           "which this sender address needs")
            self.utf8_downgraded = True
        if requiretls:
            return self.requiretls_refusal()
        return None

    def _utf8_refusal(self, recipient: str) -> Reply | None:
        if self.utf8_downgraded and not recipient.isascii():
            return Reply(553, "5.6.7", "The downstream server does not support SMTPUTF8 (RFC 6531), "
                                       "which this recipient address needs")
        return None

    async def rcpt(self, recipient: str) -> Reply:
        """Send ``RCPT TO`` (a non-ASCII address on a downgraded transaction is refused, ``553 5.6.7``).

        Raises:
            DownstreamLost: the connection broke.
        """
        refusal = self._utf8_refusal(recipient)
        if refusal is not None:
            return refusal
        return await self._command(b"RCPT", b"TO:<" + recipient.encode("utf-8", "surrogateescape") + b">")

    async def data(self, message: bytes) -> Reply:
        """Send ``DATA`` and the message; return the final reply.

        Lone CR/LF become CRLF and lines are dot-stuffed (RFC 5321 4.5.2, see
        :func:`data_stream`), so what leaves is canonical whatever came in.

        Raises:
            DownstreamLost: the connection broke or timed out; the message may
                or may not have been taken (the caller treats it as not taken).
        """
        if self.client is None:
            raise DownstreamLost("not connected")
        if self.utf8_downgraded and not _header_section(message).isascii():
            await self.rset()
            return Reply(550, "5.6.7", "The message header needs SMTPUTF8 (RFC 6531, 6532), which the downstream "
                                       "server does not support")
        try:
            with self._reply_due():
                response = await self.client.data(message, timeout=self.settings.data_timeout)
            reply = Reply.from_downstream(response.code, response.message)
        except smtperr.SMTPDataError as exc:
            reply = Reply.from_downstream(exc.code, exc.message)
        except (smtperr.SMTPException, OSError, asyncio.TimeoutError) as exc:
            raise await self._lost(exc) from None
        finally:
            self.in_transaction = False
        self.used += 1
        return reply

    async def rset(self) -> None:
        """Abort the open transaction, if any (errors close the connection)."""
        if not self.in_transaction or self.client is None:
            return
        self.in_transaction = False
        try:
            reply = await self._command(b"RSET")
        except DownstreamLost:
            return
        if not reply.is_positive:
            await self._discard()

    async def reset(self) -> bool:
        """Send ``RSET`` before reusing a connection for another message (RFC 5321 section 4.1.1.5).

        Returns:
            True when the server took it; otherwise the connection is closed.
        """
        try:
            reply = await self._command(b"RSET")
        except DownstreamLost:
            return False
        self.in_transaction = False
        if not reply.is_positive:
            await self._discard()
        return reply.is_positive

    async def resend_envelope(self, sender: str, recipients: list[str], *, size: int | None = None,
                              body: str | None = None, smtputf8: bool = False,
                              requiretls: bool = False) -> tuple[Reply, dict[str, Reply]]:
        """Start a new transaction for a subset of recipients: ``RSET`` (if one is open), ``MAIL``, ``RCPT``s.

        Used when the filters split one inbound transaction into copies with
        different headers (or drop recipients whose copy is held): each copy
        needs its own downstream transaction before ``DATA``.

        Returns:
            ``(MAIL reply, {recipient: RCPT reply})``, as for :meth:`envelope`.

        Raises:
            DownstreamLost: the connection broke.
        """
        if self.in_transaction:
            await self.rset()
            if not self.is_connected:
                raise DownstreamLost("connection closed after RSET")
        return await self.envelope(sender, recipients, size=size, body=body, smtputf8=smtputf8,
                                   requiretls=requiretls)

    async def close(self) -> None:
        """Say QUIT (briefly) and close."""
        client, self.client = self.client, None
        if client is None or not client.is_connected:
            return
        try:
            await client.execute_command(b"QUIT", timeout=2.0)
        except (smtperr.SMTPException, OSError, asyncio.TimeoutError):
            pass
        finally:
            client.close()


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:160]


async def deliver_once(route: Route, settings: DownstreamSettings, local_hostname: str, sender: str,
                       recipients: list[str], message: bytes, *, body: str | None = None,
                       smtputf8: bool = False, requiretls: bool = False) -> tuple[ConnectionInfo, dict[str, Reply]]:
    """Open a connection, send one transaction, close. Used by the spool and notifications.

    ``requiretls``: as for :meth:`DownstreamConnection.mail` (RFC 8689).

    Returns:
        ``(connection info, {recipient: reply})``; a recipient refused at RCPT
        has its RCPT reply, the others share the final reply (or the MAIL reply
        if MAIL was refused).

    Raises:
        RouteFailure: no server of the route could be used under its TLS policy.
        DownstreamLost: the connection broke mid-transaction.
    """
    conn = DownstreamConnection(route, settings, local_hostname)
    info = await conn.open()
    try:
        return info, await send_transaction(conn, sender, recipients, message, body=body, smtputf8=smtputf8,
                                            requiretls=requiretls)
    finally:
        await conn.close()


async def send_transaction(conn: DownstreamConnection, sender: str, recipients: list[str], message: bytes, *,
                           body: str | None = None, smtputf8: bool = False,
                           requiretls: bool = False) -> dict[str, Reply]:
    """One transaction (``MAIL``, ``RCPT``s, ``DATA``) on an open connection, which stays open.

    MAIL and the RCPTs go as one group where the server offers PIPELINING (RFC 2920).

    Returns:
        ``{recipient: reply}``: a recipient refused at RCPT has its RCPT reply, the others share
        the final reply (or the MAIL reply if MAIL was refused).

    Raises:
        DownstreamLost: the connection broke mid-transaction.
    """
    mail, results = await conn.envelope(sender, recipients, size=len(message), body=body, smtputf8=smtputf8,
                                        requiretls=requiretls)
    if not mail.is_positive:
        return {r: mail for r in recipients}
    accepted = [rcpt for rcpt in recipients if results[rcpt].is_positive]
    if not accepted:
        await conn.rset()
        return results
    final = await conn.data(message)
    for rcpt in accepted:
        results[rcpt] = final
    return results
