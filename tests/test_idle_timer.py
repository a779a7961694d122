"""The idle timeout counts from the client's last command (RFC 5321 4.5.3.2), with one timer per session.

The front door does not move a timer at every command: its single timer, when it fires
before a deadline that later commands moved, sets itself again. These tests pin the
deadlines that must come out of that: a client that keeps sending commands is never cut
for idleness, however long it goes on, and one that stops is cut one timeout after its
last command, not after its first.
"""

from __future__ import annotations

import time

import pytest

from tests.support.smtp import Raw

TIMEOUT = 1.5


@pytest.fixture
def gateway_overrides():
    return {"smtp.command_timeout": TIMEOUT}


@pytest.mark.parametrize("pace", [0.3, 0.7, 1.2])
def test_an_active_client_is_never_cut_and_an_idle_one_is_cut_one_timeout_after_its_last_command(gateway, pace):
    raw = Raw(gateway.port)
    try:
        assert raw.cmd("EHLO c.test").startswith("250")
        started = time.monotonic()
        while time.monotonic() - started < 2.5 * TIMEOUT:  # well past one timeout from the first command
            time.sleep(pace)
            assert raw.cmd("NOOP").startswith("250"), "cut while active"
        last = time.monotonic()
        reply = raw.reply(timeout=4 * TIMEOUT)
        waited = time.monotonic() - last
        assert reply.startswith("421 4.4.2 Idle timeout"), reply
        assert TIMEOUT - 0.2 < waited < TIMEOUT + 1.5, waited
        assert raw.closed(timeout=2)
    finally:
        raw.close()
