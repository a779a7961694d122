"""Background work of ``mxguard serve`` for the quarantine: summaries, retention, alerts.

Four loops, each with its own interval (settings ``quarantine.*`` and
``notify.*``), each surviving a database outage (it logs and tries again at
the next tick):

* due quarantine summaries (:func:`mxguard.quarantine.summary.run_due`);
* purge of expired quarantined messages and used link tokens;
* route and engine checks (:meth:`mxguard.notify.Notifier.check_routes`, ``check_engines``);
* certificate checks (:meth:`mxguard.notify.Notifier.check_certificates`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from mxguard.config import Settings
from mxguard.notify import Notifier
from mxguard.quarantine.links import LinkSigner
from mxguard.quarantine.service import purge_expired
from mxguard.quarantine.summary import run_due
from mxguard.storage.db import Store

log = structlog.get_logger("mxguard.jobs")


class QuarantineJobs:
    """Runs the loops until :meth:`stop`.

    Args:
        store, settings: the gateway's.
        signer: makes summary links.
        notifier: runs the alert checks.
        web_url: returns the console's URL (or ``None``), for links.
    """

    def __init__(self, store: Store, settings: Settings, signer: LinkSigner, notifier: Notifier,
                 web_url: Callable[[], str | None]):
        self.store = store
        self.settings = settings
        self.signer = signer
        self.notifier = notifier
        self.web_url = web_url
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        q, n = self.settings.quarantine, self.settings.notify
        self._tasks = [
            asyncio.create_task(self._every(q.summary_check_interval, "summaries", self._summaries), name="summaries"),
            asyncio.create_task(self._every(q.purge_interval, "purge", lambda: purge_expired(self.store)),
                                name="quarantine-purge"),
            asyncio.create_task(self._every(n.check_interval, "route and engine checks", self._checks), name="alerts"),
            # Certificates: the first check after a while, not in the middle of start-up traffic.
            asyncio.create_task(self._every(n.cert_check_interval, "certificate checks",
                                            self.notifier.check_certificates, first=min(n.cert_check_interval, 600.0)),
                                name="cert-alerts"),
        ]

    async def _summaries(self) -> None:
        await run_due(self.store, self.settings, self.signer, web_url=self.web_url())

    async def _checks(self) -> None:
        await self.notifier.check_routes()
        await self.notifier.check_engines()

    async def _every(self, seconds: float, what: str, job: Callable[[], Awaitable[object]],
                     first: float | None = None) -> None:
        await asyncio.sleep(min(seconds, 5.0) if first is None else first)  # let the gateway finish starting
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed round is retried at the next tick
                log.warning("background job failed; retrying later", job=what, error=repr(exc)[:300])
            await asyncio.sleep(seconds)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        await self.notifier.drain()
