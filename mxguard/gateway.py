"""Wires the store, the SMTP front door, downstream delivery and background workers into one process."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field

import structlog

from mxguard.config import Settings
from mxguard.errors import ConfigError
from mxguard.filtering.pipeline import FilterPipeline
from mxguard.netaddr import parse_host_port
from mxguard.quarantine.store import quarantine_many
from mxguard.smtp.inbound import InboundHandler, InboundSMTP
from mxguard.smtp.proxy import ProxyContext
from mxguard.smtp.routing import DomainDirectory
from mxguard.storage.db import Store
from mxguard.storage.messagelog import MessageLogWriter
from mxguard.storage.sealing import Sealer
from mxguard.tls.certs import load_chain
from mxguard.tls.contexts import server_context

log = structlog.get_logger("mxguard.gateway")


def _subject(content: bytes) -> str:
    from mxguard.smtp.headers import summarize
    return summarize(content)[0]


@dataclass
class Listener:
    host: str
    port: int
    server: asyncio.base_events.Server | None = None


@dataclass
class Gateway:
    """One gateway process.

    Args:
        settings: bootstrap settings (see :mod:`mxguard.config`).
        smtp_listen: overrides ``settings.smtp.listen`` (``["127.0.0.1:0"]`` picks a free port).
    """

    settings: Settings
    smtp_listen: list[str] | None = None
    store: Store | None = None
    listeners: list[Listener] = field(default_factory=list)
    observers: list = field(default_factory=list)

    async def start(self) -> None:
        """Open the database (migrating it), load TLS and domains, and listen.

        Raises:
            ConfigError: a setting, the certificate or the database is unusable.
        """
        s = self.settings
        load_chain(s.path(s.tls.cert_file), s.path(s.tls.key_file))
        self.tls_context = server_context(s.path(s.tls.cert_file), s.path(s.tls.key_file),
                                          min_version=s.tls.min_version)
        self.sealer = Sealer.from_file(s.path(s.sealing_key_file))
        self.filters = FilterPipeline.from_settings(s)
        self.store = Store(s.effective_database_url)
        await self.store.migrate()
        self.directory = DomainDirectory(self.store)
        await self.directory.load()
        self.directory.start()
        self.message_log = MessageLogWriter(self.store, s.log.flush_interval)
        self.message_log.start()
        self.proxy_ctx = ProxyContext(settings=s, directory=self.directory, message_log=self.message_log,
                                      observers=self.observers, filters=self.filters, hold=self._hold)
        self.handler = InboundHandler(max_recipients=s.smtp.max_recipients)
        for endpoint in self.smtp_listen or s.smtp.listen:
            host, port = parse_host_port(endpoint, default_port=25, allow_zero=True)
            listener = Listener(host, port)
            try:
                listener.server = await asyncio.get_running_loop().create_server(
                    self._protocol_factory, host=host, port=port, reuse_address=True)
            except OSError as exc:
                await self.stop()
                raise ConfigError(f"smtp.listen: cannot listen on {endpoint}: {exc.strerror or exc}") from None
            sock = listener.server.sockets[0]
            listener.port = sock.getsockname()[1]
            self.listeners.append(listener)
            log.info("listening", smtp=f"{host}:{listener.port}", hostname=s.hostname)

    async def _hold(self, *, tx, copies, verdict, score) -> list[str]:
        """The proxy's quarantine hook: seal and store held copies (raises when the database refuses)."""
        return await quarantine_many(self.store, self.sealer, txn_id=tx.txn_id, sender=tx.mail_from,
                                     subject=_subject(copies[0].content), copies=copies, verdict=verdict,
                                     score=score, retention_days=self.settings.filters.quarantine_days)

    def _protocol_factory(self) -> InboundSMTP:
        s = self.settings
        return InboundSMTP(
            self.handler, self.proxy_ctx,
            hostname=s.hostname,
            ident=s.smtp.banner,
            tls_context=self.tls_context,
            require_starttls=False,  # per-domain policy decides at RCPT (530 5.7.0)
            data_size_limit=s.smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=s.smtp.command_timeout,
            loop=asyncio.get_running_loop(),
        )

    @property
    def smtp_port(self) -> int:
        """The first listener's port (useful with port 0)."""
        return self.listeners[0].port

    async def stop(self) -> None:
        """Stop listening, close sessions' downstream connections, flush the log, close the database."""
        for listener in self.listeners:
            if listener.server is not None:
                listener.server.close()
        for listener in self.listeners:
            if listener.server is not None:
                try:
                    await asyncio.wait_for(listener.server.wait_closed(), 5)
                except asyncio.TimeoutError:
                    pass
        self.listeners.clear()
        if getattr(self, "directory", None):
            await self.directory.stop()
        if getattr(self, "message_log", None):
            await self.message_log.stop()
        if getattr(self, "filters", None):
            await self.filters.close()
            self.filters = None
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def run_forever(self) -> None:
        """``start``, then wait for SIGTERM/SIGINT, then ``stop``."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        await self.stop()
