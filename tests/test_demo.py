"""``mxguard demo``: the built-in messages and the shared corpus through a real gateway."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from mxguard.demo import (DemoEnvironment, corpus_messages, default_messages, identical_apart_from_added_headers,
                          results_view, run_demo)

#: What the gateway does with each corpus file sent over SMTP. The binary files
#: are not messages: sent as DATA, their line ends are normalised (so the zip
#: no longer opens) and they read as header-less junk or a bare executable.
CORPUS_THROUGH_GATEWAY = {
    "SOURCES.md": "quarantined",
    "clamav/clam.exe.bin": "rejected",
    "clamav/clam.exe.mbox.base64.eml": "rejected",
    "clamav/clam.zip": "quarantined",
    "cpython/msg_19.eml": "quarantined",
    "mail-parser/mail_test_1.eml": "rejected",
    "mail-parser/mail_test_16.eml": "quarantined",
    "spamassassin/sample-spam.eml": "quarantined",
}



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
    assert "virus: EICAR-Test-File" in text and "junk: builtin score" in text
    # Outbound: the organization's server relays one message (AUTH); it is delivered by MX, DKIM-signed,
    # and the signature verifies against the record in the demo DNS.
    assert re.search(r"Outbound: Example Corp's server relayed alice@example.com -> partner@partner.test through "
                     r"the gateway \(AUTH as relay@example.com over TLSv1\.[23]\): 250 2\.0\.0 .*\(relayed\)", text), text
    assert re.search(r"Outbound: delivered by MX to mx.partner.test over TLSv1\.[23], DKIM-signed d=example.com "
                     r"s=demo: signature verified against the DNS record", text), text


async def test_demo_outbound_message_is_signed_and_only_authenticated_clients_relay():
    """The demo's outbound leg for real: without AUTH the same message is refused (550 5.7.1); with
    it, the destination sink gets one message whose signature verifies, and a tampered copy does not."""
    import smtplib
    from mxguard.demo import OUTBOUND_RCPT, OUTBOUND_SENDER, _outbound
    async with DemoEnvironment() as env:
        def stranger() -> int:
            with smtplib.SMTP("127.0.0.1", env.gateway.smtp_port, timeout=30) as c:
                c.starttls(context=env.client_tls_context())
                c.ehlo("mail.example.com")
                c.mail(OUTBOUND_SENDER)
                return c.rcpt(OUTBOUND_RCPT)[0]
        import asyncio
        assert await asyncio.to_thread(stranger) == 550
        assert await _outbound(env, Console(file=io.StringIO(), width=200))
        [got] = env.sink_partner.messages
        assert got.rcpt_tos == [OUTBOUND_RCPT] and got.tls
        assert not await asyncio.to_thread(env.dkim_verified, got.data.replace(b"(outbound)", b"(0utbound)"))


async def test_default_messages_show_each_verdict():
    async with DemoEnvironment() as env:
        results = {m.label: await env.send(m) for m in default_messages(env.dns.sign)}
    got = {label: (r.record.disposition, r.final[0] if r.final else None) for label, r in results.items()}
    assert got["plain text, DKIM-signed"] == ("delivered", 250)
    assert got["virus (EICAR test file)"] == ("rejected", 554)
    assert got["junk (GTUBE test string)"] == ("quarantined", 250)
    assert got["blocked attachment (.exe in a zip)"] == ("rejected", 550)
    assert got["HTML + PDF, two routes"] == ("delivered", 250)
    # On an 80-column terminal the results are listed, and no word is cut in half.
    narrow = Console(file=io.StringIO(), width=80, record=True)
    narrow.print(results_view(list(results.values()), "What happened to each recipient", 80))
    lines = narrow.export_text().splitlines()
    assert lines and max(len(line) for line in lines) <= 80
    words = {w for line in lines for w in re.findall(r"[\w@.\-]*\w", line)}
    for word in ("quarantined", "rejected", "delivered", "alice@example.com", "EICAR-Test-File", "verified",
                 "Relay", "TLSv1.3", "downstream"):
        assert word in words, (word, lines)
    wide = Console(file=io.StringIO(), width=200, record=True)
    wide.print(results_view(list(results.values()), "What happened to each recipient", 200))
    wide_words = {w for line in wide.export_text().splitlines() for w in re.findall(r"[\w@.\-]*\w", line)}
    assert {w for w in wide_words if w.isalpha() and len(w) > 3} - words <= {"message", "recipient", "inbound",
                                                                          "verdict", "sender", "disposition"}
    signed = results["plain text, DKIM-signed"].record.verdict["auth"]
    assert (signed["spf"], signed["dkim_result"], signed["dmarc"]) == ("pass", "pass", "pass")
    assert "EICAR-Test-File" in results["virus (EICAR test file)"].final[1]


async def test_corpus_run_states_every_disposition(corpus_dir):
    async with DemoEnvironment() as env:
        results = [await env.send(m) for m in corpus_messages(corpus_dir)]
        arrived = list(env.sink_tls.messages)
    for res in results:
        expected = CORPUS_THROUGH_GATEWAY.get(res.message.label, "delivered")
        assert res.record is not None and res.record.disposition == expected, res.message.label
        if expected == "delivered":
            got = arrived.pop(0)
            assert got.tls and identical_apart_from_added_headers(res.message.content, got.data), res.message.label
    assert arrived == []
    assert len(results) >= 40


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
