"""Run a real gateway (and real sinks) in a background thread, for tests that use blocking clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from mxguard.config import Settings, load_settings
from mxguard.gateway import Gateway
from mxguard.services.setup import initialize
from mxguard.storage.messagelog import LogRecord

T = TypeVar("T")


class LoopThread:
    """An event loop in a daemon thread; ``run(coro)`` executes a coroutine in it and waits."""

    def __init__(self, name: str = "test-loop"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def in_store(data_dir: Path, func: Any) -> Any:
    """Run ``await func(store, settings)`` on the data dir's database (its own loop), close it, return the result."""
    from mxguard.storage.db import Store

    async def go():
        settings = load_settings(data_dir, environ={})
        store = Store(settings.effective_database_url)
        try:
            return await func(store, settings)
        finally:
            await store.close()
    return asyncio.run(go())


def init_data_dir(path: Path, hostname: str = "mx.gw.test", database_url: str | None = None) -> Settings:
    """An initialised data dir listening on a free loopback port."""
    asyncio.run(initialize(path, hostname=hostname, database_url=database_url, smtp_listen=["127.0.0.1:0"]))
    return load_settings(path, environ={})


class ThreadedGateway:
    """A :class:`Gateway` running in its own loop thread.

    Attributes:
        records: message-log records as they are produced (in-process observer).
    """

    def __init__(self, settings: Settings, *, web_listen: str | None = None, web_plain_http: bool = False,
                 submission_listen: list[str] | None = None, spool_worker: bool = True):
        if settings.filters.sender_auth and not settings.filters.dns_servers:
            # The sender checks would ask the system resolver: DNS must not leave the machine in tests.
            raise RuntimeError("test gateways must point filters.dns_servers at the loopback DNS server: "
                               "load_settings(..., environ=gateway_environ(loopback_dns))")
        self.settings = settings
        self.records: list[LogRecord] = []
        self.loop = LoopThread("gateway")
        self.gateway = Gateway(settings, smtp_listen=["127.0.0.1:0"], observers=[self.records.append],
                               web_listen=web_listen, web_plain_http=web_plain_http,
                               submission_listen=submission_listen, spool_worker=spool_worker)

    def add_domain(self, name: str, servers: list[str], **fields: Any) -> Any:
        """Add a served domain and apply it at once; returns its view."""
        from mxguard.services import domains as domain_service
        view = self.run(domain_service.add_domain(self.store, name, servers, **fields))
        self.reload()
        return view

    def start(self) -> "ThreadedGateway":
        self.loop.run(self.gateway.start())
        return self

    def stop(self) -> None:
        try:
            self.loop.run(self.gateway.stop())
        finally:
            self.loop.close()

    @property
    def port(self) -> int:
        return self.gateway.smtp_port

    @property
    def submission_port(self) -> int | None:
        """The submission listener's port (when started with ``submission_listen``)."""
        return self.gateway.submission_port

    @property
    def web_url(self) -> str:
        """The console's base URL without the trailing slash, e.g. ``https://127.0.0.1:40123``."""
        return self.gateway.web_url.rstrip("/")

    @property
    def store(self):
        return self.gateway.store

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine in the gateway's loop (for store and service calls)."""
        return self.loop.run(coro, timeout)

    def reload(self) -> None:
        """Apply configuration changes now instead of waiting for the poll."""
        self.run(self.gateway.directory.refresh_if_changed())

    def flush_log(self) -> None:
        self.run(self.gateway.message_log.flush())

    def wait_records(self, count: int, timeout: float = 10) -> list[LogRecord]:
        import time
        deadline = time.monotonic() + timeout
        while len(self.records) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.records
