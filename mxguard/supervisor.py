"""``serve --workers N``: several gateway processes sharing the listening sockets, so every core works.

``serve`` runs one per CPU by default (``[smtp] workers = 0``); ``--workers 1``
is a single process with no supervisor.

The parent binds the SMTP listeners once, then forks N workers that all accept
on them (the kernel hands each new connection to one waiting worker). Each
worker is a complete :class:`Gateway` with its own event loop, downstream
connection pool and batched message log, on the same database. Worker 0 also
runs the console and the spool delivery worker. The parent forwards SIGTERM and
SIGINT, and restarts a worker that dies unexpectedly (at most a few times a
minute, so a crash loop stops instead of spinning); if the parent itself is
killed, the kernel ends the workers too.

Front-door limits (``smtp.max_connections`` and ``smtp.max_connections_per_client``)
count for all workers together: the parent makes one shared
:class:`~mxguard.smtp.limits.ConnectionTable` before it forks, each worker writes
its own slots in it, and when a worker dies the parent zeroes that worker's
slots before starting its replacement (the dead worker's connections are gone
with it). Workers admitting at the same moment may overshoot a limit by at
most ``workers - 1`` connections (see the table's docstring).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

import structlog

from mxguard.config import Settings
from mxguard.errors import ConfigError, MxguardError
from mxguard.netaddr import format_host_port, parse_host_port
from mxguard.smtp.limits import ConnectionTable

log = structlog.get_logger("mxguard.supervisor")

#: A worker that dies is restarted, but not more often than this many times per minute.
MAX_RESTARTS_PER_MINUTE = 5

#: Seconds a worker has to stop after SIGTERM before it is killed: the gateway's
#: shutdown grace for transactions in progress (10 s) and its clean-up, with room to spare.
STOP_TIMEOUT = 60

_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a process gets when its parent dies (Linux)


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, a cgroup cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


def worker_count(setting: int, *, log_file: bool) -> int:
    """How many gateway processes ``serve`` runs for ``--workers``/``[smtp] workers``.

    Args:
        setting: the configured count; ``0`` (the default) means one per CPU
            (:func:`available_cpus`).
        log_file: a ``[log] file`` is set. Each process would rotate the file on
            its own, so ``0`` then means one process; an explicit count is kept.
    """
    if setting > 0:
        return setting
    return 1 if log_file else available_cpus()


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker if the supervisor dies (``kill -9``, a crash): no orphan
    keeps serving on the shared sockets. Linux ``prctl``; elsewhere nothing happens."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the call
        os._exit(1)



def bind_listeners(endpoints: list[str], backlog: int = 1024, *, key: str = "smtp.listen",
                   default_port: int = 25) -> list[socket.socket]:
    """Bind and listen on every ``HOST:PORT`` (port 0 picks a free one, shared by all workers).

    Raises:
        ConfigError: an endpoint cannot be bound; the message names ``key`` (``smtp.listen``).
    """
    socks = []
    for endpoint in endpoints:
        host, port = parse_host_port(endpoint, default_port=default_port, allow_zero=True)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=backlog)
        except OSError as exc:
            for s in socks:
                s.close()
            raise ConfigError(f"{key}: cannot listen on {endpoint}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        socks.append(sock)
    return socks


def _run_worker(index: int, settings: Settings, socks: list[socket.socket], web_listen: str | None,
                web_plain_http: bool, submission_socks: list[socket.socket] | None = None,
                table: ConnectionTable | None = None) -> int:
    from mxguard.gateway import Gateway

    structlog.contextvars.bind_contextvars(worker=index)
    gateway = Gateway(settings, smtp_sockets=socks, submission_sockets=submission_socks or [],
                      web_listen=web_listen if index == 0 else None,
                      web_plain_http=web_plain_http, spool_worker=index == 0,
                      acme_http=index == 0, connection_table=table, worker_index=index)
    try:
        asyncio.run(gateway.run_forever())
    except MxguardError as exc:
        print(f"error: worker {index}: {exc}", file=sys.stderr)
        return 2
    return 0


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _spawn(index: int, settings: Settings, socks: list[socket.socket], web_listen: str | None,
           web_plain_http: bool, submission_socks: list[socket.socket] | None = None,
           table: ConnectionTable | None = None) -> int:
    """Fork one worker; the caller holds SIGTERM/SIGINT blocked (see ``run_workers``).

    Between ``fork`` and the worker's own handlers a stop signal would otherwise reach
    the supervisor's ``forward`` in the child, which sends it on and keeps running: the
    worker would never stop. Blocked, it stays pending in the supervisor and is
    forwarded once the new worker is in ``children``.
    """
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker
        _die_with_parent(parent)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        code = 1
        try:
            code = _run_worker(index, settings, socks, web_listen, web_plain_http, submission_socks, table)
        finally:
            os._exit(code)
    return pid


def run_workers(settings: Settings, workers: int, smtp_listen: list[str] | None, web_listen: str | None,
                web_plain_http: bool) -> int:
    """Run ``workers`` gateway processes until SIGTERM/SIGINT; returns the exit status.

    Raises:
        ConfigError: a listener cannot be bound.
    """
    socks = bind_listeners(smtp_listen or settings.smtp.listen)
    try:
        submission_socks = bind_listeners(settings.smtp.submission_listen, key="smtp.submission_listen",
                                          default_port=587)
    except ConfigError:
        for sock in socks:
            sock.close()
        raise
    for sock in socks:
        log.info("listening", smtp=format_host_port(*sock.getsockname()[:2]), workers=workers,
                 hostname=settings.hostname)
    for sock in submission_socks:
        log.info("listening", submission=format_host_port(*sock.getsockname()[:2]), workers=workers)
    table = ConnectionTable(workers)  # before the forks: every worker maps the same memory
    children: dict[int, int] = {}
    stopping = False
    restarts: list[float] = []

    def spawn(index: int) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            children[_spawn(index, settings, socks, web_listen, web_plain_http, submission_socks, table)] = index
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    killed = False

    def kill_stragglers(_signum, _frame) -> None:
        # A worker that has not stopped long after SIGTERM is hung; a service stop must end.
        nonlocal killed
        killed = bool(children)
        for pid, index in children.items():
            log.error("worker did not stop after SIGTERM; killing it", worker=index, pid=pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def forward(signum, _frame) -> None:
        nonlocal stopping
        if not stopping:
            signal.signal(signal.SIGALRM, kill_stragglers)
            signal.alarm(STOP_TIMEOUT)
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(workers):
        if stopping:
            break  # a stop signal came during the start: a worker forked after it would not get it
        spawn(index)
    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            status = status or (code if code > 0 else 0)
            continue
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if code == 2 or len(restarts) > MAX_RESTARTS_PER_MINUTE:
            # A configuration error will not go away by itself; a crash loop is stopped.
            log.error("worker failed; stopping", worker=index, exit=code)
            status = code or 1
            forward(signal.SIGTERM, None)
            continue
        log.error("worker died; restarting it", worker=index, exit=code)
        table.clear(index)  # its connections died with it; the replacement starts from zero
        spawn(index)
    signal.alarm(0)
    for sock in socks + submission_socks:
        sock.close()
    return status or (1 if killed else 0)
