"""A transaction that ends while the downstream server still owes a reply (the sender left,
or a session limit closed it, while the server thought about a RCPT).

Two things must hold. The connection is never reused: the late reply would be read as the
answer to the next session's command, and a recipient the server refuses would be accepted
(or a message relayed under another envelope). And the transaction still leaves a record
naming the recipient, as every decision does.

The downstream server here is a scripted one on loopback that offers PIPELINING, answers a
RCPT for ``slow-...`` only after a delay and refuses ``nobody@``.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxguard.config import DownstreamSettings
from mxguard.smtp.delivery import DownstreamConnection
from mxguard.smtp.pool import ConnectionPool
from mxguard.smtp.routing import Route
from mxguard.tls.policy import DownstreamTls
from tests.support.smtp import Raw, message, send

SLOW_REPLY = 0.8  # seconds the server takes to answer a RCPT for slow-...


class _Session(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        try:
            self._dialogue()
        finally:
            with self.server.lock:
                self.server.ended += 1

    def _dialogue(self) -> None:
        server = self.server
        with server.lock:
            server.connections += 1
        self.wfile.write(b"220 scripted.test ESMTP\r\n")
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                time.sleep(server.ehlo_delay)
                self.wfile.write(b"250-scripted.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"MAIL":
                self.wfile.write(b"250 2.1.0 sender ok\r\n")
            elif verb == b"RCPT":
                address = line[8:].strip().strip(b"<>").lower()
                if address.startswith(b"slow-"):
                    time.sleep(SLOW_REPLY)
                if address.startswith(b"nobody@"):
                    self.wfile.write(b"550 5.1.1 no such user here\r\n")
                else:
                    self.wfile.write(b"250 2.1.5 recipient ok\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go ahead\r\n")
                body = []
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    body.append(chunk)
                with server.lock:
                    server.messages.append(b"".join(body))
                self.wfile.write(b"250 2.0.0 queued\r\n")
            elif verb == b"RSET" or verb == b"NOOP":
                self.wfile.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 2.0.0 bye\r\n")
                return
            else:
                self.wfile.write(b"502 5.5.2 what\r\n")


class ScriptedDownstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Session)
        self.lock = threading.Lock()
        self.connections = 0
        self.ended = 0
        self.ehlo_delay = 0.0
        self.messages: list[bytes] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture(scope="module")
def scripted():
    server = ScriptedDownstream()
    yield server
    server.stop()


def _leave_during_rcpt(port: int, address: str, wait: float, how: str) -> None:
    raw = Raw(port)
    assert raw.cmd("EHLO client.sender.test").startswith("250")
    assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
    raw.send(f"RCPT TO:<{address}>\r\n".encode())
    time.sleep(wait)
    if how == "reset":  # an RST, as a crashed client or a middlebox leaves it
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(wait=st.floats(min_value=0.05, max_value=SLOW_REPLY * 0.6), how=st.sampled_from(["close", "reset"]),
       second=st.lists(st.sampled_from(["nobody@example.com", "bob@example.com"]), min_size=1, max_size=3))
def test_a_reply_still_due_when_the_sender_left_is_never_read_by_the_next_session(gateway, add_domain, scripted,
                                                                                  wait, how, second):
    try:
        add_domain("example.com", [scripted.address])
    except Exception:  # noqa: BLE001 - added by an earlier example of this test
        pass
    slow = f"slow-{time.monotonic_ns()}@example.com"
    before = len(gateway.records)
    _leave_during_rcpt(gateway.port, slow, wait, how)
    # At once, while the server still thinks about the first RCPT: a session that would reuse
    # the first one's connection, were it parked for reuse.
    out = send(gateway.port, second, message(to=second[0]), starttls=False)
    for rcpt in second:
        expected = 550 if rcpt.startswith("nobody@") else 250
        assert out.rcpt[rcpt][0] == expected, (rcpt, out.rcpt)
    if "bob@example.com" in second:
        assert out.data is not None and out.data[0] == 250, out.data
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [r for r in gateway.records[before:] if slow in r.rcpt_to]
        if left:
            break
        time.sleep(0.05)
    assert left, "the transaction the sender left during RCPT left no record"
    assert left[0].disposition == "aborted", left[0]
    assert "before the downstream server answered RCPT" in str(left[0].results), left[0].results


def _connection(server: ScriptedDownstream) -> DownstreamConnection:
    route = Route(servers=(("127.0.0.1", server.server_address[1]),), tls=DownstreamTls.OFF)
    return DownstreamConnection(route, DownstreamSettings(command_timeout=10, connect_timeout=5), "gw.test")


def _wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_connection_whose_reply_is_still_due_is_never_parked_nor_handed_out(scripted):
    """asyncio.wait_for can swallow a cancel (Python 3.11): the session's task then still waits
    on the connection that the ended session hands back. The pool must close it, not park it."""
    async def run():
        pool = ConnectionPool()
        conn = _connection(scripted)
        await conn.open()
        waiting = asyncio.create_task(conn.envelope("a@sender.test", [f"slow-{time.monotonic_ns()}@example.com"]))
        await asyncio.sleep(0.2)  # the group is sent; its RCPT reply is due in SLOW_REPLY
        assert conn.busy
        pool.release(conn)
        parked = pool.acquire(conn.route)
        outcome = await asyncio.gather(waiting, return_exceptions=True)
        return parked, conn.is_connected, outcome[0]
    parked, connected, outcome = asyncio.run(run())
    assert parked is None and not connected
    assert isinstance(outcome, Exception), outcome  # that task's own reply is lost with the connection


def test_a_cancel_while_the_connection_is_opened_closes_it(scripted):
    ended = scripted.ended
    scripted.ehlo_delay = 1.0
    try:
        async def run():
            conn = _connection(scripted)
            opening = asyncio.create_task(conn.open())
            await asyncio.sleep(0.3)  # connected, EHLO sent, its reply not yet come
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
            return conn
        conn = asyncio.run(run())
        assert not conn.is_connected
        assert _wait_until(lambda: scripted.ended > ended, 5), "the half-open connection was left open"
    finally:
        scripted.ehlo_delay = 0.0


def test_a_sender_that_leaves_while_the_route_connects_is_logged_without_a_made_up_attempt(
        gateway, add_domain, scripted):
    """TLS-RPT counts the record's downstream attempts: one still connecting is none."""
    try:
        add_domain("example.com", [scripted.address])
    except Exception:  # noqa: BLE001 - added by another test of this module
        pass
    scripted.ehlo_delay = 1.0
    try:
        address = f"early-{time.monotonic_ns()}@example.com"
        before = len(gateway.records)
        _leave_during_rcpt(gateway.port, address, 0.3, "close")
        assert _wait_until(lambda: any(address in r.rcpt_to for r in gateway.records[before:]), 10)
        record = next(r for r in gateway.records[before:] if address in r.rcpt_to)
        assert record.disposition == "aborted"
        assert all(item.get("host") or item.get("failure") or item.get("error") for item in record.downstream), \
            record.downstream
    finally:
        scripted.ehlo_delay = 0.0
