"""``mxguard demo``: the built-in messages and the corpus run, with the filters' verdicts."""

from __future__ import annotations

import io

from rich.console import Console

from mxguard.demo import DemoEnvironment, corpus_messages, default_messages, identical_apart_from_added_headers, run_demo

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


async def test_default_messages_show_each_verdict():
    async with DemoEnvironment() as env:
        results = {m.label: await env.send(m) for m in default_messages(env.dns.sign)}
    got = {label: (r.record.disposition, r.final[0] if r.final else None) for label, r in results.items()}
    assert got["plain text, DKIM-signed"] == ("delivered", 250)
    assert got["virus (EICAR test file)"] == ("rejected", 554)
    assert got["junk (GTUBE test string)"] == ("quarantined", 250)
    assert got["blocked attachment (.exe in a zip)"] == ("rejected", 550)
    assert got["HTML + PDF, two routes"] == ("delivered", 250)
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


async def test_run_demo_exit_status_and_table(corpus_dir):
    out = io.StringIO()
    assert await run_demo(console=Console(file=out, width=220)) == 0
    text = out.getvalue()
    assert "verdict" in text and "virus: EICAR-Test-File" in text and "junk: builtin score" in text
    out = io.StringIO()
    assert await run_demo(corpus=corpus_dir, console=Console(file=out, width=220)) == 0
    assert "the filters held or refused 8" in out.getvalue()
