"""``serve --workers 2``: the front door's connection limits hold for the whole gateway.

Before, each worker process had its own counter, so a client could hold N x the
configured connections. The gateway runs as an operator runs it (``mxguard serve``,
JSON log on stderr, limits from ``MXGUARD_*``); the clients are real sockets and
smtplib on loopback, and ``/proc`` tells which worker holds each connection.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.gateway import init_data_dir
from tests.support.peers import free_port, stop_process, wait_until
from tests.support.processlog import json_lines, wait_for_line

MXGUARD = str(Path(sys.executable).with_name("mxguard"))


class TwoWorkers:
    """``mxguard serve --workers 2`` on a free loopback port with the given ``[smtp]`` limits."""

    def __init__(self, data_dir: Path, log_file: Path, max_connections: int, per_client: int):
        self.port = free_port()
        self.log_file = log_file
        env = {**os.environ, "MXGUARD_SMTP__MAX_CONNECTIONS": str(max_connections),
               "MXGUARD_SMTP__MAX_CONNECTIONS_PER_CLIENT": str(per_client),
               "MXGUARD_LOG__FORMAT": "json", "MXGUARD_LOG__LEVEL": "info"}
        self.proc = subprocess.Popen([MXGUARD, "--data-dir", str(data_dir), "serve", "--no-web", "--workers", "2",
                                      "--smtp", f"127.0.0.1:{self.port}"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(log_file, "wb"))
        wait_until(lambda: len(self.workers()) == 2, 30, "two workers", log_file, self.proc)

    def workers(self) -> list[int]:
        return [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]

    def lines(self) -> list[dict]:
        return json_lines(self.log_file)

    def wait_for(self, predicate, timeout: float = 10) -> dict:
        return wait_for_line(self.log_file, predicate, timeout)

    def holder(self, client: socket.socket) -> int | None:
        """The pid of the worker that holds the gateway's end of ``client``'s connection."""
        ip, port = client.getsockname()[:2]
        remote = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
        local = f"0100007F:{self.port:04X}"
        inode = None
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                inode = fields[9]
        if inode is None:
            return None
        for pid in self.workers():
            try:
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    try:
                        if os.readlink(fd) == f"socket:[{inode}]":
                            return pid
                    except OSError:
                        continue
            except OSError:
                continue
        return None


def greeted(source: str, port: int) -> socket.socket:
    """A connection from ``source`` that got the ``220`` greeting (the gateway admitted it)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    greeting = sock.recv(200)
    assert greeting.startswith(b"220 "), greeting
    return sock


def hold_on_both(gw: TwoWorkers, count: int, sources: list[str]) -> dict[socket.socket, int]:
    """``count`` admitted connections (``sources`` in turn) that the two workers share, each at least one."""
    held: dict[socket.socket, int] = {}
    for attempt in range(200):
        if len(held) == count and len(set(held.values())) == 2:
            return held
        if len(held) == count:  # all on one worker so far: give one back and try again
            sock = next(iter(held))
            del held[sock]
            sock.close()
            time.sleep(0.2)  # the worker notices the close and releases the slot
        sock = greeted(sources[len(held) % len(sources)], gw.port)
        wait_until(lambda: gw.holder(sock) is not None, 5, "the connection's worker")
        held[sock] = gw.holder(sock)
    raise AssertionError(f"the connections did not spread over both workers: {held}")


def refused_with(port: int, source: str) -> tuple[int, bytes]:
    """smtplib's view of a connection that must be refused at the greeting."""
    with pytest.raises(smtplib.SMTPConnectError) as caught:
        smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=5)
    return caught.value.smtp_code, caught.value.smtp_error


def admitted_soon(port: int, source: str, timeout: float = 5) -> socket.socket:
    """A connection admitted once a release has reached the counter (the worker sees the close first)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        greeting = sock.recv(200)
        if greeting.startswith(b"220 "):
            return sock
        sock.close()
        assert time.monotonic() < deadline, greeting
        time.sleep(0.1)


@pytest.fixture
def gateway(tmp_path, request):
    max_connections, per_client = request.param
    init_data_dir(tmp_path / "data")
    gw = TwoWorkers(tmp_path / "data", tmp_path / "gateway.log", max_connections, per_client)
    yield gw
    stop_process(gw.proc, timeout=30)
    text = gw.log_file.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("gateway", [(4, 50)], indirect=True)
def test_max_connections_counts_across_workers(gateway):
    gw = gateway
    held = hold_on_both(gw, 4, ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"])
    code, text = refused_with(gw.port, "127.0.0.5")
    assert code == 421 and text.startswith(b"4.7.0 Too many connections, try again later"), (code, text)
    line = gw.wait_for(lambda r: r.get("limit") == "max_connections" and r.get("client") == "127.0.0.5")
    assert line["level"] == "warning" and line["worker"] in (0, 1)
    sock = next(iter(held))
    sock.close()
    del held[sock]
    held[admitted_soon(gw.port, "127.0.0.5")] = 0
    code, _ = refused_with(gw.port, "127.0.0.6")
    assert code == 421
    for sock in held:
        sock.close()


@pytest.mark.parametrize("gateway", [(50, 3)], indirect=True)
def test_max_connections_per_client_counts_across_workers(gateway):
    gw = gateway
    held = hold_on_both(gw, 3, ["127.0.0.1"])
    code, text = refused_with(gw.port, "127.0.0.1")
    assert code == 421 and text.startswith(b"4.7.0 Too many connections from your address"), (code, text)
    line = gw.wait_for(lambda r: r.get("limit") == "max_connections_per_client")
    assert line["client"] == "127.0.0.1" and line["level"] == "warning"
    other = greeted("127.0.0.2", gw.port)  # another address is not affected
    sock = next(iter(held))
    sock.close()
    del held[sock]
    held[admitted_soon(gw.port, "127.0.0.1")] = 0
    code, _ = refused_with(gw.port, "127.0.0.1")
    assert code == 421
    for sock in [*held, other]:
        sock.close()


@pytest.mark.parametrize("gateway", [(4, 50)], indirect=True)
def test_a_killed_workers_connections_stop_counting(gateway):
    """SIGKILL a worker that holds connections: its replacement starts with its slots cleared."""
    gw = gateway
    held = hold_on_both(gw, 4, ["127.0.0.1", "127.0.0.2"])
    code, _ = refused_with(gw.port, "127.0.0.3")
    assert code == 421
    victim = next(iter(held.values()))
    lost = [s for s, pid in held.items() if pid == victim]
    kept = [s for s, pid in held.items() if pid != victim]
    before = gw.workers()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in gw.workers() and len(gw.workers()) == 2, 30, "the replacement worker",
               gw.log_file, gw.proc)
    assert set(gw.workers()) != set(before)
    gw.wait_for(lambda r: r.get("event") == "worker died; restarting it")
    for sock in lost:  # the kernel closed them with the worker
        try:
            assert sock.recv(200) == b""
        except ConnectionResetError:
            pass
        sock.close()
    fresh = [admitted_soon(gw.port, "127.0.0.3", timeout=10) for _ in lost]
    code, text = refused_with(gw.port, "127.0.0.4")
    assert code == 421 and text.startswith(b"4.7.0 Too many connections"), (code, text)
    for sock in kept + fresh:
        sock.close()
