"""Wires the store, the SMTP front door, downstream delivery and background workers into one process."""

from __future__ import annotations

import asyncio
import functools
import signal
import time
import weakref
from dataclasses import dataclass, field

import structlog

from mxguard.config import Settings
from mxguard.errors import ConfigError
from mxguard.metrics import GatewayMetrics
from mxguard.filtering.pipeline import FilterPipeline
from mxguard.filtering.sender_auth import SenderAuth
from mxguard.netaddr import format_host_port, parse_host_port
from mxguard.notify import Notifier
from mxguard.quarantine.jobs import QuarantineJobs
from mxguard.quarantine.links import LinkSigner, ensure_link_key
from mxguard.quarantine.senderlists import SenderLists
from mxguard.quarantine.store import quarantine_many
from mxguard.relay.accept import OutboundAcceptor
from mxguard.relay.access import RelayAccess
from mxguard.services import hosted_sts
from mxguard.services import spool as spool_service
from mxguard.services import status
from mxguard.services.sni_certificates import SniContexts
from mxguard.smtp.inbound import InboundHandler, InboundSMTP
from mxguard.smtp.limits import ConnectionCounter, ConnectionTable
from mxguard.smtp.pool import ConnectionPool
from mxguard.smtp.proxy import ProxyContext
from mxguard.smtp.routing import DomainDirectory
from mxguard.smtp.tlsrpt_inbox import ReportInbox
from mxguard.storage.db import Store
from mxguard.spool.accept import StoreSpooler
from mxguard.spool.worker import SpoolWorker
from mxguard.storage.messagelog import MessageLogWriter
from mxguard.storage.sealing import KeyRing
from mxguard.tls.acme_renewal import AcmeRenewal
from mxguard.tls.buffers import small_tls_read_buffers
from mxguard.tls.certs import load_chain
from mxguard.tls.reporting import DailyTlsReports
from mxguard.smtp.partners import PartnerRules
from mxguard.tls.contexts import ReloadableServerContext

log = structlog.get_logger("mxguard.gateway")


def _subject(content: bytes) -> str:
    from mxguard.smtp.headers import summarize
    return summarize(content)[0]


@dataclass
class Listener:
    host: str
    port: int
    server: asyncio.base_events.Server | None = None
    #: A submission listener (``smtp.submission_listen``, RFC 6409): relaying needs AUTH or a certificate.
    submission: bool = False


@dataclass
class Gateway:
    """One gateway process.

    Args:
        settings: bootstrap settings (see :mod:`mxguard.config`).
        smtp_listen: overrides ``settings.smtp.listen`` (``["127.0.0.1:0"]`` picks a free port).
        web_listen: ``HOST:PORT`` of the Administration Console and REST API;
            ``None`` runs no console (``mxguard serve`` passes ``web.listen``).
        web_plain_http: serve the console over plain HTTP (behind a TLS-terminating proxy only).
    """

    settings: Settings
    smtp_listen: list[str] | None = None
    store: Store | None = None
    listeners: list[Listener] = field(default_factory=list)
    observers: list = field(default_factory=list)
    #: Seconds a transaction in progress may take to finish at shutdown.
    shutdown_grace: float = 10.0
    #: Run the spool delivery worker in this process (on SQLite only one process per data dir does).
    spool_worker: bool = True
    #: Listening sockets bound by a supervisor (``serve --workers``); used instead of ``smtp_listen``.
    smtp_sockets: list | None = None
    #: Overrides ``settings.smtp.submission_listen`` (``["127.0.0.1:0"]`` picks a free port).
    submission_listen: list[str] | None = None
    #: Submission sockets bound by a supervisor; used instead of ``submission_listen``.
    submission_sockets: list | None = None
    web_listen: str | None = None
    web_plain_http: bool = False
    web: object | None = None
    #: Serve the ACME HTTP-01 responder (``acme.http_listen``) in this process when ACME is on
    #: (``serve --workers``: the first worker only, as with the console).
    acme_http: bool = True
    acme_responder: object | None = None
    #: Connection counts shared with the other workers of ``serve --workers N`` (made by the
    #: supervisor before it forks); ``None``: this process counts alone.
    connection_table: ConnectionTable | None = None
    #: This process's slot in ``connection_table`` (its worker index).
    worker_index: int = 0

    async def start(self) -> None:
        """Open the database (migrating it), load TLS and domains, and listen.

        Raises:
            ConfigError: a setting, the certificate or the database is unusable.
        """
        s = self.settings
        small_tls_read_buffers()  # idle-session memory (issue 17)
        load_chain(s.path(s.tls.cert_file), s.path(s.tls.key_file))
        extra = None
        if s.tls.extra_cert_file or s.tls.extra_key_file:
            extra = (s.path(s.tls.extra_cert_file), s.path(s.tls.extra_key_file))
            load_chain(*extra, keys=("tls.extra_cert_file", "tls.extra_key_file"))
        self.tls = ReloadableServerContext(s.path(s.tls.cert_file), s.path(s.tls.key_file),
                                           min_version=s.tls.min_version, extra=extra)
        self.tls_context = self.tls.context
        self.smtp_tls_context = self.tls.smtp_context
        self.metrics = GatewayMetrics()
        self.observers.append(self.metrics.observe)
        self.filters = FilterPipeline.from_settings(s)
        self.store = Store(s.effective_database_url)
        await self.store.migrate()
        self.keyring = KeyRing(s.path(s.sealing_key_file))
        # Hosted MTA-STS: a changed mx list changes the policies, so their ids (and the records to publish).
        await hosted_sts.renew_changed_ids(self.store, s.mx_hosts)
        self.directory = DomainDirectory(self.store)
        # The recipients' allow/block lists and the SNI certificates follow the configuration
        # generation with the domains.
        self.sender_lists = SenderLists(self.store)
        self.directory.listeners.append(self.sender_lists.load)
        self.sni = SniContexts(self.store, self.keyring, self.tls, min_version=s.tls.min_version)
        self.directory.listeners.append(self.sni.load)
        # Client certificates are requested while partner rules or relay entries need one.
        self._client_cas: dict[str, tuple[list[str], list[str]]] = {"partners": ([], []), "relay": ([], [])}
        self.partners = PartnerRules(self.store, on_client_cas=functools.partial(self._set_client_cas, "partners"))
        self.directory.listeners.append(self.partners.load)
        self.relay_access = RelayAccess(self.store, trust_dir=s.data_dir / "tls",
                                        on_client_cas=functools.partial(self._set_client_cas, "relay"))
        self.directory.listeners.append(self.relay_access.load)
        await self.directory.load()
        self.directory.start()
        self.message_log = MessageLogWriter(self.store, s.log.flush_interval)
        self.message_log.start()
        ensure_link_key(s.path(s.quarantine.link_key_file))
        self.links = LinkSigner.from_file(s.path(s.quarantine.link_key_file))
        self.notifier = Notifier(self.store, s, self.filters)
        self.spooler = StoreSpooler(self.store, self.keyring, s)
        d = s.downstream
        self.pool = ConnectionPool(d.pool_max_idle, d.pool_idle_timeout, d.pool_max_age) if d.pool_max_idle else None
        self.outbound = OutboundAcceptor(self.store, self.keyring, s, self.filters, self._domain_view,
                                         on_rate_exceeded=self.notifier.relay_rate_exceeded)
        self.proxy_ctx = ProxyContext(settings=s, directory=self.directory, message_log=self.message_log,
                                      pool=self.pool,
                                      observers=self.observers, spooler=self.spooler, filters=self.filters,
                                      hold=self._hold, sender_lists=self.sender_lists,
                                      on_virus=self.notifier.virus_found, on_refusal=self.metrics.smtp_refusal,
                                      partners=self.partners, relay=self.relay_access, outbound=self.outbound,
                                      on_relay_refusal=self.metrics.relay_refusal,
                                      report_inbox=ReportInbox(self.store, s.tls_reports.ingest_local_part,
                                                               self._report_dkim_checker())
                                      if s.tls_reports.ingest else None)
        self.worker: SpoolWorker | None = None
        self.jobs: QuarantineJobs | None = None
        self.tls_reports: DailyTlsReports | None = None
        self.acme_renewal: AcmeRenewal | None = None
        self._lock_waiter: asyncio.Task | None = None
        if self.spool_worker:
            if self._claim_worker_lock():
                self._start_workers()
            else:
                # Another process on this data dir has the spool worker; take over if it stops.
                self._lock_waiter = asyncio.create_task(self._wait_for_worker_lock(), name="spool-lock-waiter")
        # Held messages per domain for the dashboard and /metrics (every node sees the shared spool).
        self._spool_depth = functools.partial(spool_service.depth, self.store)
        status.register_spool_depth(self._spool_depth)
        self.handler = InboundHandler(max_recipients=s.smtp.max_recipients)
        self.sessions: weakref.WeakSet[InboundSMTP] = weakref.WeakSet()
        self.connections = (ConnectionCounter(s.smtp) if self.connection_table is None
                            else self.connection_table.counter(self.worker_index, s.smtp))
        if self.smtp_sockets:
            for sock in self.smtp_sockets:
                host, port = sock.getsockname()[:2]
                listener = Listener(host, port)
                listener.server = await asyncio.get_running_loop().create_server(self._protocol_factory, sock=sock)
                self.listeners.append(listener)
        for endpoint in ([] if self.smtp_sockets else self.smtp_listen or s.smtp.listen):
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
            log.info("listening", smtp=format_host_port(host, listener.port), hostname=s.hostname)
        await self._start_submission()
        if self.web_listen:
            try:
                await self._start_web()
            except ConfigError:
                await self.stop()
                raise
        if s.acme.directory_url and self.acme_http:
            from mxguard.web.acme_http01 import responder_server
            self.acme_responder = responder_server(self.store, s.acme.http_listen)
            try:
                await self.acme_responder.start()
            except ConfigError:
                self.acme_responder = None
                await self.stop()
                raise
        if self._lock_waiter is not None:
            # Said only once start-up has succeeded: a failed start prints only its reason.
            log.info("another process runs the spool worker for this data dir; waiting to take over")

    async def _start_submission(self) -> None:
        """Listen on the submission endpoints (``smtp.submission_listen``, or the supervisor's sockets).

        Raises:
            ConfigError: an endpoint cannot be bound (the message names ``smtp.submission_listen``).
        """
        loop = asyncio.get_running_loop()
        factory = functools.partial(self._protocol_factory, submission=True)
        if self.submission_sockets is not None:
            for sock in self.submission_sockets:
                host, port = sock.getsockname()[:2]
                listener = Listener(host, port, submission=True)
                listener.server = await loop.create_server(factory, sock=sock)
                self.listeners.append(listener)
            return
        endpoints = self.settings.smtp.submission_listen if self.submission_listen is None else self.submission_listen
        for endpoint in endpoints:
            host, port = parse_host_port(endpoint, default_port=587, allow_zero=True)
            listener = Listener(host, port, submission=True)
            try:
                listener.server = await loop.create_server(factory, host=host, port=port, reuse_address=True)
            except OSError as exc:
                await self.stop()
                raise ConfigError(f"smtp.submission_listen: cannot listen on {endpoint}: "
                                  f"{exc.strerror or exc}") from None
            listener.port = listener.server.sockets[0].getsockname()[1]
            self.listeners.append(listener)
            log.info("listening", submission=format_host_port(host, listener.port), hostname=self.settings.hostname)

    def _set_client_cas(self, source: str, files: list[str], pems: list[str] = ()) -> None:
        """Partner rules (CA files and stored PEM bundles) and relay entries (a CA bundle file)
        each name client CAs; the TLS context trusts them all."""
        self._client_cas[source] = (list(files), list(pems))
        groups = self._client_cas.values()
        self.tls.set_client_cas(sorted({f for files_, _ in groups for f in files_}),
                                sorted({p for _, pems_ in groups for p in pems_}))

    def _domain_view(self, name: str):
        """The served domain's settings (the outbound filters use the sender domain's), or ``None``."""
        found = self.directory.lookup(f"postmaster@{name}")
        return found[0] if found else None

    @property
    def submission_port(self) -> int | None:
        """The first submission listener's port, if there is one."""
        return next((listener.port for listener in self.listeners if listener.submission), None)

    async def _start_web(self) -> None:
        from mxguard.web.app import create_app
        from mxguard.web.context import WebContext
        from mxguard.web.server import WebServer

        ctx = WebContext(settings=self.settings, store=self.store, metrics=self.metrics,
                         refresh_directory=self.directory.refresh_if_changed,
                         reload_certificate=self.reload_certificate, spool_worker=self.worker,
                         keyring=self.keyring, links=self.links, public_url=lambda: self.web_url)
        self.web = WebServer(create_app(ctx), self.web_listen, None if self.web_plain_http else self.tls_context)
        await self.web.start()

    def reload_certificate(self) -> None:
        """Use the certificate and key now in ``tls.cert_file``/``tls.key_file`` for new handshakes
        (STARTTLS and HTTPS); sessions already open keep theirs.

        Raises:
            ConfigError: the files are unusable; the old certificate stays in use.
        """
        s = self.settings
        cert, key = s.path(s.tls.cert_file), s.path(s.tls.key_file)
        load_chain(cert, key)
        self.tls.reload(cert, key)
        log.info("certificate reloaded", cert=str(cert))

    @property
    def web_url(self) -> str | None:
        """The console's URL, when it runs."""
        return self.web.url if self.web is not None else None

    def _report_dkim_checker(self) -> SenderAuth:
        """The filters' sender checks (their resolver and key cache), or, with those off, one
        for DKIM on mailed TLS-RPT reports only."""
        if self.filters is not None and self.filters.sender_auth is not None:
            return self.filters.sender_auth
        f = self.settings.filters
        return SenderAuth(f.dns_servers, f.dns_timeout, self.settings.hostname, body_length=f.dkim_body_length)

    async def _hold(self, *, tx, copies, verdict, score) -> list[str]:
        """The proxy's quarantine hook: seal and store held copies (raises when the database refuses)."""
        return await quarantine_many(self.store, self.keyring.get(), txn_id=tx.txn_id, sender=tx.mail_from,
                                     subject=_subject(copies[0].content), copies=copies, verdict=verdict,
                                     score=score, retention_days=self.settings.filters.quarantine_days)

    def _start_workers(self) -> None:
        s = self.settings
        self.worker = SpoolWorker(self.store, s, self.directory, self.keyring, self.message_log,
                                  resolver_nameservers=s.filters.dns_servers)
        self.worker.start()
        # Summaries, retention and alerts: one process per data dir (SQLite), every node (PostgreSQL:
        # due summaries and alerts are claimed with conditional updates).
        self.jobs = QuarantineJobs(self.store, s, self.links, self.notifier, lambda: self.web_url)
        self.jobs.start()
        self.tls_reports = DailyTlsReports(self.store, s)
        self.tls_reports.start()
        self.acme_renewal = AcmeRenewal(s, self.store, self.keyring)
        self.acme_renewal.start()

    async def _wait_for_worker_lock(self, interval: float = 5.0) -> None:
        """Retry the spool-worker lock; when the process holding it is gone, run the workers here."""
        while True:
            await asyncio.sleep(interval)
            if self._claim_worker_lock():
                log.info("the spool worker's process is gone; this process runs the spool worker now")
                self._start_workers()
                return

    def _claim_worker_lock(self) -> bool:
        """On SQLite only one process per data dir runs the spool worker (an flock decides)."""
        if not self.store.is_sqlite:
            return True  # PostgreSQL: row leases with SKIP LOCKED let every node work
        import fcntl
        self._worker_lock = open(self.settings.data_dir / "spool-worker.lock", "a")
        try:
            fcntl.flock(self._worker_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._worker_lock.close()
            return False
        return True

    def _protocol_factory(self, submission: bool = False) -> InboundSMTP:
        s = self.settings
        protocol = InboundSMTP(
            self.handler, self.proxy_ctx, s.smtp, self.connections,
            submission_port=submission, max_auth_failures=s.relay.max_auth_failures,
            hostname=s.hostname,
            ident=s.smtp.banner,
            tls_context=self.smtp_tls_context,
            require_starttls=False,  # per-domain policy decides at RCPT (530 5.7.0)
            data_size_limit=s.smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=s.smtp.command_timeout,
            loop=asyncio.get_running_loop(),
        )
        self.sessions.add(protocol)
        return protocol

    @property
    def smtp_port(self) -> int:
        """The first port-25 style listener's port (useful with port 0)."""
        return next((listener.port for listener in self.listeners if not listener.submission),
                    self.listeners[0].port)

    async def stop(self) -> None:
        """Stop listening, close sessions' downstream connections, flush the log, close the database."""
        if self.web is not None:
            await self.web.stop()
            self.web = None
        if self.acme_responder is not None:
            await self.acme_responder.stop()
            self.acme_responder = None
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
        await self._close_sessions()
        if getattr(self, "pool", None) is not None:
            await self.pool.close()
        if getattr(self, "_spool_depth", None):
            status.unregister_spool_depth(self._spool_depth)
        if getattr(self, "_lock_waiter", None) is not None:
            self._lock_waiter.cancel()
        if getattr(self, "tls_reports", None):
            await self.tls_reports.stop()
        if getattr(self, "acme_renewal", None):
            await self.acme_renewal.stop()
        if getattr(self, "jobs", None):
            await self.jobs.stop()
        elif getattr(self, "notifier", None):
            await self.notifier.drain()
        if getattr(self, "worker", None):
            await self.worker.stop()
        if getattr(self, "_worker_lock", None) and not self._worker_lock.closed:
            self._worker_lock.close()
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

    async def _close_sessions(self) -> None:
        """Let transactions in progress finish (up to ``shutdown_grace``), then close every session."""
        sessions = list(getattr(self, "sessions", ()))
        deadline = time.monotonic() + self.shutdown_grace
        while any(p.busy for p in sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for protocol in sessions:
            await protocol.shutdown()
        ctx = getattr(self, "proxy_ctx", None)
        for _ in range(3):  # closing a session may schedule its downstream clean-up
            await asyncio.sleep(0)
            if ctx is not None and ctx.closing:
                await asyncio.wait(list(ctx.closing), timeout=5)

    async def run_forever(self) -> None:
        """``start``, then wait for SIGTERM/SIGINT, then ``stop``.

        The handlers are in place before ``start``, so a signal during start-up is not
        lost: the gateway stops as soon as it is up.
        """
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("shutting down")
        await self.stop()
