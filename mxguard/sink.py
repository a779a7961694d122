"""A small downstream mail server for the demo and the tests.

It plays the organization's own mail server: it accepts mail on loopback,
optionally offers (or requires) STARTTLS, refuses chosen recipients the way a
real server with recipient validation does, and records what it received and
how (TLS version and cipher), so a test can check what the downstream side
really saw.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException


@dataclass
class ReceivedMessage:
    """One message as the sink received it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls_version: str | None
    cipher: str | None
    peer: str
    helo: str
    mail_options: list[str] = field(default_factory=list)
    received_at: float = field(default_factory=time.time)

    @property
    def tls(self) -> bool:
        return self.tls_version is not None

    def meta(self) -> dict:
        d = asdict(self)
        d.pop("data")
        d["size"] = len(self.data)
        return d


class _SinkHandler:
    def __init__(self, sink: "DownstreamSink"):
        self.sink = sink

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.sink.offer_requiretls and session.ssl is not None and responses:
            # RFC 8689 4.1: offered inside TLS only.
            responses = responses[:-1] + [responses[-1].replace("250 ", "250-", 1), "250 REQUIRETLS"]
        return responses

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options):
        reply = self.sink.rcpt_replies.get(address.lower())
        if reply is None:
            local = address.split("@")[0].lower()
            if local.startswith("unknown") or local.startswith("nobody"):
                reply = "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope):
        if self.sink.data_reply:
            return self.sink.data_reply
        if self.sink.die_at_data:
            # A server that dies after receiving the data, before its reply: nothing is kept.
            server.transport.close()
            return "421 4.3.0 going away"
        if self.sink.reject_marker and self.sink.reject_marker in envelope.original_content:
            return "554 5.7.1 Message refused by the downstream content policy"
        sslobj = server.transport.get_extra_info("ssl_object") if server.transport else None
        cipher = sslobj.cipher() if sslobj else None
        msg = ReceivedMessage(
            mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos), data=envelope.original_content,
            tls_version=sslobj.version() if sslobj else None, cipher=cipher[0] if cipher else None,
            peer=str(session.peer[0]) if session.peer else "", helo=session.host_name or "",
            mail_options=list(envelope.mail_options))
        self.sink._store(msg)
        if self.sink.data_delay:
            # The message is taken; the reply is late (a crash here leaves the sender unsure).
            await asyncio.sleep(self.sink.data_delay)
        return f"250 2.0.0 Ok: queued as S{len(self.sink.messages):05d}"


class _HandshakeNoise(logging.Filter):
    """aiosmtpd logs a client's failed or aborted TLS handshake (a probe that refuses the
    certificate, say) with a full traceback; this sink says it in one warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (TLSSetupException, ConnectionResetError, ssl.SSLError)):
            record.msg, record.args = f"sink: TLS handshake with a client failed: {exc!r}"[:300], ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("mail.log").addFilter(_HandshakeNoise())


class _SinkSMTP(SMTP):
    """aiosmtpd, plus the REQUIRETLS MAIL parameter (RFC 8689) when the sink offers it."""

    def __init__(self, *args, offer_requiretls: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.offer_requiretls = offer_requiretls

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.offer_requiretls and arg and self.session.ssl is not None:
            words = arg.split()
            if any(w.upper() == "REQUIRETLS" for w in words[1:]):
                # aiosmtpd refuses parameters it does not know: it gets the rest, the envelope gets this.
                arg = " ".join(w for w in words if w.upper() != "REQUIRETLS")
                await super().smtp_MAIL(arg)
                if self.envelope.mail_from is not None:
                    self.envelope.mail_options.append("REQUIRETLS")
                return
        await super().smtp_MAIL(arg)


class DownstreamSink:
    """An SMTP server that records what it receives.

    Args:
        host: listen address (loopback).
        port: listen port, 0 for a free one (read ``port`` after start).
        tls_context: offer STARTTLS with this server context; ``None`` offers none.
        require_tls: refuse MAIL before STARTTLS (``530``).
        outdir: also write each message as ``NNNNN.eml`` plus ``NNNNN.json``.
        hostname: name in the greeting.
        offer_requiretls: offer REQUIRETLS (RFC 8689) after STARTTLS and take the MAIL parameter.
        offer_smtputf8: offer SMTPUTF8 (RFC 6531); ``False`` plays a server without it.

    Attributes:
        messages: received messages, in order.
        rcpt_replies: ``{address: reply}`` to refuse chosen recipients.
        data_reply: if set, every DATA gets this reply (e.g. ``"451 4.3.0 busy"``).
        reject_marker: a message containing these bytes gets ``554 5.7.1``.
        data_delay: seconds to wait between taking a message and replying 250.
        die_at_data: drop the connection at the end of DATA without keeping the message.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tls_context: ssl.SSLContext | None = None,
                 require_tls: bool = False, outdir: Path | None = None, hostname: str = "downstream.test",
                 offer_requiretls: bool = False, offer_smtputf8: bool = True):
        self.host = host
        self.offer_requiretls = offer_requiretls
        self.offer_smtputf8 = offer_smtputf8
        self.port = port
        self.tls_context = tls_context
        self.require_tls = require_tls
        self.outdir = outdir
        self.hostname = hostname
        self.messages: list[ReceivedMessage] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply: str | None = None
        self.reject_marker: bytes | None = None
        self.data_delay: float = 0.0
        self.die_at_data = False
        self.connections = 0
        self._protocols: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self._server: asyncio.base_events.Server | None = None
        self._lock = threading.Condition()

    def _store(self, msg: ReceivedMessage) -> None:
        with self._lock:
            self.messages.append(msg)
            n = len(self.messages)
            self._lock.notify_all()
        if self.outdir:
            self.outdir.mkdir(parents=True, exist_ok=True)
            (self.outdir / f"{n:05d}.eml").write_bytes(msg.data)
            (self.outdir / f"{n:05d}.json").write_text(json.dumps(msg.meta()))

    def _factory(self) -> SMTP:
        self.connections += 1
        protocol = _SinkSMTP(_SinkHandler(self), hostname=self.hostname, tls_context=self.tls_context,
                             offer_requiretls=self.offer_requiretls,
                             require_starttls=self.require_tls and self.tls_context is not None,
                             enable_SMTPUTF8=self.offer_smtputf8, data_size_limit=None, timeout=60,
                             loop=asyncio.get_running_loop())
        self._protocols.add(protocol)
        return protocol

    def _in_own_loop(self, coro) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError("await the coroutine instead when running in the sink's loop")
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def pause(self) -> None:
        """From another thread: stop listening and drop connections (the server goes down)."""
        self.drop_connections()
        self._in_own_loop(self.stop())

    def resume(self) -> None:
        """From another thread: listen again on the same port (the server comes back)."""
        self._in_own_loop(self.start())

    def drop_connections(self) -> None:
        """Close every open client connection (as a server's idle timeout would); thread-safe."""
        def drop() -> None:
            for protocol in list(self._protocols):
                if protocol.transport is not None:
                    protocol.transport.close()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            drop()
        else:
            self._loop.call_soon_threadsafe(drop)

    async def start(self) -> "DownstreamSink":
        """Listen in the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.get_running_loop().create_server(
            self._factory, host=self.host, port=self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and drop open connections."""
        if self._server is not None:
            self._server.close()
            if hasattr(self._server, "close_clients"):
                self._server.close_clients()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 3)
            except asyncio.TimeoutError:
                pass
            self._server = None

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Block until ``count`` messages arrived (thread-safe); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ThreadedSink:
    """Runs a :class:`DownstreamSink` in its own thread and event loop (for blocking callers).

    Usage::

        with ThreadedSink(tls_context=ctx) as sink:
            ...  # sink.port, sink.messages
    """

    def __init__(self, **kwargs):
        self.sink = DownstreamSink(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="downstream-sink", daemon=True)

    def start(self) -> DownstreamSink:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.sink.start(), self._loop).result(10)
        return self.sink

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sink.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> DownstreamSink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
