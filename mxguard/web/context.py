"""What the web application shares with the gateway process it runs in."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mxguard.config import Settings
from mxguard.metrics import GatewayMetrics
from mxguard.services.users import LoginPolicy
from mxguard.storage.db import Store


@dataclass
class WebContext:
    """The shared service context handed to :func:`mxguard.web.app.create_app`.

    Attributes:
        settings: bootstrap settings (``web.*``, ``tls.*``, hostname, timeouts).
        store: the database.
        metrics: the gateway's metrics (``/metrics``); ``None`` outside a gateway.
        refresh_directory: re-reads the domain table in this process, so a change
            made in the console applies to the next SMTP transaction.
        reload_certificate: makes the gateway use the certificate files now on disk.
        spool_worker: the gateway's :class:`~mxguard.spool.worker.SpoolWorker`, which
            "retry now" uses; ``None`` (another process runs it, or no gateway)
            delivers in the request's process with a worker of its own.
    """

    settings: Settings
    store: Store
    metrics: GatewayMetrics | None = None
    refresh_directory: Callable[[], Awaitable[Any]] | None = None
    reload_certificate: Callable[[], None] | None = None
    spool_worker: Any | None = None
    #: Sealing keys (opening quarantined messages), the link signer, and the console's URL
    #: (for links); the Message Center needs them.
    keyring: Any = None
    links: Any = None
    public_url: Callable[[], str | None] | None = None

    @property
    def login_policy(self) -> LoginPolicy:
        w = self.settings.web
        return LoginPolicy(max_failures=w.login_max_failures, lockout_seconds=w.lockout_seconds,
                           ip_max_failures=w.login_ip_max_failures, ip_window_seconds=w.login_ip_window)

    async def config_changed(self) -> None:
        """Apply a configuration change to this process's SMTP side now."""
        if self.refresh_directory is not None:
            await self.refresh_directory()
