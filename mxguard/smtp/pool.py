"""A per-route cache of idle downstream connections, shared by every inbound session of a process.

The same idea as Postfix's SMTP connection cache (``smtp_connection_cache_*``):
when an inbound session ends, its downstream connection, which sits between
transactions, is parked here instead of being closed, and the next session
for that route takes it — no new TCP connection, greeting, EHLO and TLS
handshake per message. A parked connection is used only while it is young and
has been idle briefly; one that the server dropped meanwhile is noticed at
``MAIL`` and replaced (the proxy retries once on a fresh connection).

The pool is keyed by :class:`Route`, which includes the TLS policy, so a policy
change never reuses a connection made under the old one.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque

import structlog

from mxguard.smtp.delivery import DownstreamConnection
from mxguard.smtp.routing import Route

log = structlog.get_logger("mxguard.pool")


class ConnectionPool:
    """Idle downstream connections by route.

    Args:
        max_idle_per_route: connections kept per route; more are closed.
        idle_timeout: seconds a parked connection may wait before it is closed.
        max_age: seconds after which a connection is not reused (it is closed instead).
    """

    def __init__(self, max_idle_per_route: int = 16, idle_timeout: float = 5.0, max_age: float = 300.0):
        self.max_idle_per_route = max_idle_per_route
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self._idle: dict[Route, deque[tuple[float, DownstreamConnection]]] = defaultdict(deque)
        self._reaper: asyncio.Task | None = None
        self.hits = 0
        self.misses = 0

    def acquire(self, route: Route) -> DownstreamConnection | None:
        """The most recently parked usable connection for ``route``, or ``None``."""
        queue = self._idle.get(route)
        now = time.monotonic()
        while queue:
            parked_at, conn = queue.pop()  # newest first: the least likely to have timed out
            if conn.busy:  # still some task's (see release): never handed to another
                conn.abandon()
                continue
            if (conn.is_connected and not conn.in_transaction and now - parked_at < self.idle_timeout
                    and now - conn.opened_at < self.max_age):
                self.hits += 1
                return conn
            self._close_later(conn)
        self.misses += 1
        return None

    def release(self, conn: DownstreamConnection) -> None:
        """Park a connection that is between transactions, or close it."""
        if conn.busy:
            # A reply is still due to a task that was not stopped (asyncio.wait_for can swallow a
            # cancel): the connection is that task's, and a late reply would reach the next user.
            conn.abandon()
            return
        queue = self._idle[conn.route]
        if (not conn.is_connected or conn.in_transaction or len(queue) >= self.max_idle_per_route
                or time.monotonic() - conn.opened_at >= self.max_age):
            self._close_later(conn)
            return
        queue.append((time.monotonic(), conn))
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    def _close_later(self, conn: DownstreamConnection) -> None:
        asyncio.get_running_loop().create_task(conn.close())

    async def _reap(self) -> None:
        """Close parked connections that waited longer than ``idle_timeout``."""
        while any(self._idle.values()):
            await asyncio.sleep(min(1.0, self.idle_timeout / 2))
            cutoff = time.monotonic() - self.idle_timeout
            for route, queue in list(self._idle.items()):
                while queue and queue[0][0] < cutoff:
                    _, conn = queue.popleft()
                    await conn.close()
                # close() may have swapped the table meanwhile, acquire() emptied it: only this queue goes.
                if not queue and self._idle.get(route) is queue:
                    del self._idle[route]

    @property
    def idle(self) -> int:
        """Connections parked right now."""
        return sum(len(q) for q in self._idle.values())

    async def close(self) -> None:
        """Close every parked connection (shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
        idle, self._idle = self._idle, defaultdict(deque)
        await asyncio.gather(*(conn.close() for q in idle.values() for _, conn in q), return_exceptions=True)
