"""``mxguard demo``: the built-in messages and the shared corpus through a real gateway."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from mxguard.demo import DemoEnvironment, corpus_messages, identical_apart_from_added_headers, run_demo


async def test_demo_shows_every_behaviour():
    buf = io.StringIO()
    status = await run_demo(console=Console(file=buf, width=200))
    text = buf.getvalue()
    assert status == 0, text
    assert "250 2.0.0 Ok: queued as" in text
    assert "550 5.1.1" in text and "550 5.7.1 Relay access denied" in text
    assert "451 4.7.5" in text
    assert "TLSv1.3 verified" in text
    # The branch server was down: held in the spool, then delivered over TLS when it came back.
    assert "branch server down (spool)" in text and "held for delivery" in text
    assert "#1 delivered" in text and "The branch server received the spooled message over TLSv1.3" in text


async def test_corpus_arrives_byte_for_byte_over_tls(corpus_dir):
    async with DemoEnvironment() as env:
        messages = corpus_messages(corpus_dir)
        assert len(messages) >= 40
        results = [await env.send(m) for m in messages]
        arrived = list(env.sink_tls.messages)
        for res in results:
            assert res.record is not None, res.message.label
            assert res.record.disposition == "delivered", (res.message.label, res.record.final_reply)
            got = arrived.pop(0)
            assert got.tls_version in ("TLSv1.2", "TLSv1.3")
            assert identical_apart_from_added_headers(res.message.content, got.data), res.message.label
            assert res.record.inbound_tls and res.record.downstream_verified
        assert arrived == []


def test_identity_check_detects_changes():
    original = b"Subject: x\n\nbody\n"
    ok = b"Received: from a\r\n\tby b; date\r\nSubject: x\r\n\r\nbody\r\n"
    assert identical_apart_from_added_headers(original, ok)
    assert not identical_apart_from_added_headers(original, ok.replace(b"body", b"b0dy"))
    assert not identical_apart_from_added_headers(original, b"X-Other: 1\r\n" + ok)


def test_demo_command_runs_as_documented():
    proc = subprocess.run([str(Path(sys.executable).with_name("mxguard")), "demo"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "What happened to each recipient" in proc.stdout
    assert "Traceback" not in proc.stderr
