"""A background check that runs every N seconds inside the gateway's event loop.

Used by the jobs that wake up on a timer (TLS-RPT reports, ACME renewal): one
task, a first run shortly after start-up, errors logged and retried at the next
check, and a stop that cancels and waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("mxguard.periodic")


class PeriodicCheck:
    """Run ``check()`` every ``interval`` seconds until :meth:`stop`.

    Args:
        name: the task's name, and what the warning on a failed run says.
        interval: seconds between runs; the first run comes after ``min(60, interval)``
            (start-up settles first).
        check: the coroutine function to run; an exception is logged and the next run
            tries again (cancellation passes through).
    """

    def __init__(self, name: str, interval: float, check: Callable[[], Awaitable[object]]):
        self.name = name
        self.interval = interval
        self.check = check
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def _loop(self) -> None:
        await asyncio.sleep(min(60.0, self.interval))
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a database or network hiccup: tried again next time
                log.warning("periodic check failed", check=self.name, error=repr(exc)[:300])
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
