"""Every limit answers with its code and leaves a process-log line that names it.

The gateway runs as ``mxguard serve`` (a separate process, JSON log lines on
stderr, low limits from ``MXGUARD_*`` variables), the way an operator runs it;
each limit is reached once and the test then looks for its line in the log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mxguard.sink import ThreadedSink
from tests.support.gateway import init_data_dir
from tests.support.peers import free_port, stop_process, wait_until
from tests.support.smtp import Raw, message
from tests.support.processlog import json_lines, wait_for_line

MXGUARD = str(Path(sys.executable).with_name("mxguard"))
LIMITS = {
    "MXGUARD_SMTP__MAX_CONNECTIONS": "6", "MXGUARD_SMTP__MAX_CONNECTIONS_PER_CLIENT": "3",
    "MXGUARD_SMTP__MAX_MESSAGES_PER_CONNECTION": "2", "MXGUARD_SMTP__JUNK_COMMAND_LIMIT": "8",
    "MXGUARD_SMTP__HARD_ERROR_LIMIT": "6", "MXGUARD_SMTP__MAX_RECIPIENTS": "3",
    "MXGUARD_SMTP__MAX_MESSAGE_SIZE": "20000", "MXGUARD_SMTP__MAX_HEADER_SIZE": "2048",
    "MXGUARD_SMTP__MAX_HEADER_FIELDS": "30", "MXGUARD_SMTP__MAX_RECEIVED_HEADERS": "5",
    "MXGUARD_SMTP__COMMAND_TIMEOUT": "1.5", "MXGUARD_SMTP__MAX_SESSION_TIME": "4",
    "MXGUARD_FILTERS__MAX_MIME_PARTS": "20", "MXGUARD_FILTERS__MAX_MIME_DEPTH": "4",
    "MXGUARD_LOG__FORMAT": "json", "MXGUARD_LOG__LEVEL": "info",
}


class ServedGateway:
    """``mxguard serve`` on a free port with :data:`LIMITS`; ``lines()`` are its JSON log records."""

    def __init__(self, data_dir: Path, log_file: Path):
        self.port = free_port()
        self.log_file = log_file
        env = {**os.environ, **LIMITS}
        self.proc = subprocess.Popen([MXGUARD, "--data-dir", str(data_dir), "serve", "--no-web", "--smtp",
                                      f"127.0.0.1:{self.port}"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(log_file, "wb"))
        wait_until(self._listening, 30, "mxguard serve", log_file, self.proc)

    def _listening(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            return s.recv(100).startswith(b"220")

    def lines(self) -> list[dict]:
        return json_lines(self.log_file)

    def wait_for(self, predicate, timeout: float = 5) -> dict:
        return wait_for_line(self.log_file, predicate, timeout)

    def limit_line(self, limit: str) -> dict:
        return self.wait_for(lambda r: r.get("limit") == limit and r.get("level") == "warning")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("limits")
    init_data_dir(base / "data")
    with ThreadedSink() as sink:
        subprocess.run([MXGUARD, "--data-dir", str(base / "data"), "domain", "add", "example.com", "--server",
                        sink.address], check=True, capture_output=True)
        gw = ServedGateway(base / "data", base / "gateway.log")
        yield gw, sink
        stop_process(gw.proc)
    text = (base / "gateway.log").read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    errors = [r for r in gw.lines() if r.get("level") in ("error", "critical") or r["event"] == "(not JSON)"]
    assert not errors, "hostile clients are routine: no error lines, no stack traces"


def _raw(port: int, source: str = "127.0.0.1") -> Raw:
    raw = Raw.__new__(Raw)
    raw.sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    raw.buf = b""
    raw.greeting = raw.reply()
    return raw


def _open(gw, rcpts=("alice@example.com",)) -> Raw:
    raw = _raw(gw.port)
    raw.cmd("EHLO c.test")
    assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
    for rcpt in rcpts:
        raw.cmd(f"RCPT TO:<{rcpt}>")
    return raw


def _data(raw: Raw, content: bytes) -> str:
    assert raw.cmd("DATA").startswith("354")
    raw.send(content + b".\r\n")
    return raw.reply()


def test_connections_per_client_and_in_all(served):
    gw, _ = served
    mine = [_raw(gw.port) for _ in range(3)]
    extra = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    assert extra.recv(200).startswith(b"421 4.7.0 Too many connections from your address")
    assert gw.limit_line("max_connections_per_client")["client"] == "127.0.0.1"
    others = [_raw(gw.port, "127.0.0.2") for _ in range(3)]  # another client address, same loopback
    third = socket.create_connection(("127.0.0.1", gw.port), timeout=5, source_address=("127.0.0.3", 0))
    assert third.recv(200).startswith(b"421 4.7.0 Too many connections, try again later")
    assert gw.limit_line("max_connections")["client"] == "127.0.0.3"
    for s in mine + others:
        s.close()
    extra.close()
    third.close()
    time.sleep(0.3)


@pytest.mark.parametrize("command, limit, reply", [
    ("NOOP", "junk_command_limit", "421 4.7.0 Too many commands without mail"),
    ("XJUNK", "unrecognized_commands", "421 4.7.0 Too many unrecognized commands"),
    ("RCPT TO:<a@example.com>", "hard_error_limit", "421 4.7.0 Too many errors"),
])
def test_command_limits_close_the_session(served, command, limit, reply):
    gw, _ = served
    raw = _raw(gw.port)
    replies = []
    for _ in range(12):
        try:
            replies.append(raw.cmd(command))
        except ConnectionError:
            break
        if replies[-1].startswith("421"):
            break
    assert replies[-1].startswith(reply), replies
    assert raw.closed()
    assert gw.limit_line(limit)["reply"].startswith(reply)


def test_recipients_per_message(served):
    gw, _ = served
    raw = _open(gw, rcpts=[f"r{i}@example.com" for i in range(3)])
    assert raw.cmd("RCPT TO:<r3@example.com>").startswith("452 4.5.3 Too many recipients")
    raw.close()
    assert gw.limit_line("max_recipients")["reply"].startswith("452 4.5.3")


@pytest.mark.parametrize("content, limit, reply", [
    (b"Subject: big\r\n\r\n" + (b"x" * 900 + b"\r\n") * 30, "max_message_size", "552 5.3.4"),
    (b"Subject: wide\r\n\r\n" + b"y" * 1200 + b"\r\n", "line_length", "500 5.6.0"),
    (b"X-Filler: " + b"f" * 900 + b"\r\n" + (b"X-Filler: " + b"f" * 900 + b"\r\n") * 2 + message(),
     "max_header_size", "552 5.3.4"),
    (b"X-F: 1\r\n" * 31 + message(), "max_header_fields", "552 5.3.4"),
    (b"Received: from a by b; Sun, 29 Nov 2026 10:00:00 +0000\r\n" * 6 + message(), "max_received_headers",
     "554 5.4.6"),
    (b"Subject: bare\r\n\r\nline\nline\r\n", "bare_line_endings", "554 5.6.0"),
], ids=["size", "line", "header-size", "header-fields", "received", "bare-lf"])
def test_message_limits(served, content, limit, reply):
    gw, sink = served
    before = len(sink.messages)
    raw = _open(gw)
    assert _data(raw, content).startswith(reply)
    raw.close()
    assert gw.limit_line(limit)["reply"].startswith(reply)
    time.sleep(0.2)
    assert len(sink.messages) == before


def test_size_parameter(served):
    gw, _ = served
    before = sum(r.get("limit") == "max_message_size" for r in gw.lines())
    raw = _raw(gw.port)
    raw.cmd("EHLO c.test")
    assert raw.cmd("MAIL FROM:<a@sender.test> SIZE=30000").startswith("552 5.3.4")
    raw.close()
    gw.wait_for(lambda r: sum(x.get("limit") == "max_message_size" for x in gw.lines()) > before)


def test_command_line_length(served):
    gw, _ = served
    raw = _raw(gw.port)
    assert raw.cmd("HELO " + "h" * 2000).startswith("500 5.5.2 Command line too long")
    raw.close()
    assert gw.limit_line("command_line_length")


@pytest.mark.parametrize("parts, depth, rule", [(25, 1, "mime-parts"), (2, 6, "mime-depth")])
def test_mime_structure_limits(served, parts, depth, rule):
    gw, _ = served
    inner = b"".join(b"--p\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(parts)) + b"--p--\r\n"
    body = b"Content-Type: multipart/mixed; boundary=p\r\n\r\n" + inner
    for level in range(depth - 1):
        body = (b"Content-Type: multipart/mixed; boundary=d%d\r\n\r\n--d%d\r\n" % (level, level) + body
                + b"\r\n--d%d--\r\n" % level)
    raw = _open(gw)
    reply = _data(raw, b"From: a@sender.test\r\nSubject: structure\r\nMIME-Version: 1.0\r\n" + body)
    raw.close()
    assert reply.startswith("550 5.7.1") and rule in reply, reply
    line = gw.wait_for(lambda r: r.get("event") == "message refused by the filters" and rule in r.get("reply", ""))
    assert line["level"] == "info"


def test_messages_per_connection(served):
    gw, sink = served
    raw = _raw(gw.port)
    raw.cmd("EHLO c.test")
    for i in range(2):
        raw.cmd("MAIL FROM:<a@sender.test>")
        raw.cmd("RCPT TO:<alice@example.com>")
        assert _data(raw, message(subject=f"n{i}")).startswith("250")
    assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("421 4.7.0 Too many messages")
    assert raw.closed()
    assert gw.limit_line("max_messages_per_connection")


def test_idle_and_total_session_time(served):
    gw, _ = served
    idle = _raw(gw.port)
    idle.cmd("EHLO c.test")
    assert idle.reply(timeout=5).startswith("421 4.4.2 Idle timeout")
    assert gw.limit_line("command_timeout")["reply"].startswith("421 4.4.2")
    busy = _raw(gw.port)
    started = time.monotonic()
    reply = ""
    busy.cmd("EHLO c.test")
    while time.monotonic() - started < 8:  # a slow sender that is never idle long enough to be cut
        try:
            reply = busy.cmd("MAIL FROM:<a@sender.test>")
            if not reply.startswith("421"):
                reply = busy.cmd("RSET")
        except ConnectionError as exc:
            reply = str(exc)
        if "421" in reply:
            break
        time.sleep(0.5)
    assert "421 4.4.2 Session time limit" in reply and 3.5 < time.monotonic() - started < 6
    assert gw.limit_line("max_session_time")


def test_a_sender_trickling_its_message_is_cut(served):
    """Slowloris in DATA: a line every 0.4 s is never idle, but the data must arrive within the timeout."""
    gw, sink = served
    before = len(sink.messages)
    raw = _open(gw)
    assert raw.cmd("DATA").startswith("354")
    started = time.monotonic()
    reply = ""
    while time.monotonic() - started < 6:
        try:
            raw.send(b"X-Slow: header line\r\n")
            raw.sock.settimeout(0.4)
            reply = raw.reply(timeout=0.4)
            break
        except ConnectionError as exc:  # closed: the reply, if any, is in the message
            reply = str(exc).removeprefix("closed: ")
            break
        except TimeoutError:
            continue
    assert reply.startswith("421 4.4.2 Message data too slow"), reply
    assert 1.2 < time.monotonic() - started < 3
    line = gw.wait_for(lambda r: r.get("limit") == "command_timeout" and "too slow" in r.get("reply", ""))
    assert line["level"] == "warning"
    aborted = gw.wait_for(lambda r: r.get("event") == "transaction" and r.get("reply") == "(ended by command_timeout)")
    assert aborted["disposition"] == "aborted"
    time.sleep(0.2)
    assert len(sink.messages) == before

