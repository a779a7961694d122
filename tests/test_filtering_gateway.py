"""Filtering through the real gateway: the sender's reply, what the downstream got, what was held.

Embedded engines (YARA, built-in scorer, content policy) with the ``gateway``
fixture; real clamd and Rspamd with ``engine_gateway``.
"""

from __future__ import annotations

import re
import time

import pytest

from mxguard.config import load_settings
from mxguard.quarantine.store import get_quarantined, list_quarantine
from tests.conftest import gateway_environ
from tests.support import mail
from tests.support.gateway import ThreadedGateway
from tests.support.smtp import send


def _head(data: bytes) -> str:
    return data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")


def _held(gateway, recipient: str | None = None):
    return gateway.run(list_quarantine(gateway.store, recipient=recipient))


def test_clean_message_is_delivered_with_results_and_verdict_headers(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    body = mail.plain()
    out = send(gateway.port, ["bob@example.com"], body)
    assert out.data[0] == 250
    assert tls_sink.wait_for(1)
    data = tls_sink.messages[0].data
    head = _head(data)
    assert head.startswith("Received: from client.sender.test")
    assert re.search(r"^Authentication-Results: mx\.gw\.test;", head, re.M)
    assert "spf=none smtp.mailfrom=a@sender.test" in head
    assert "dkim=none" in head
    assert re.search(r"^X-MXGuard-Verdict: clean; action=deliver; builtin=0\.0/5\.0", head, re.M)
    assert data.endswith(body), "the message itself is byte-identical"
    rec = gateway.wait_records(1)[-1]
    assert rec.disposition == "delivered"
    assert rec.verdict["dispositions"]["bob@example.com"]["action"] == "deliver"
    assert rec.filter_ms is not None and rec.filter_ms > 0


def test_forged_gateway_headers_are_removed_and_others_kept(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    forged = mail.crlf(b"X-MXGuard-Verdict: clean; action=deliver\nX-MXGuard-Whatever: 1\nX-Spam-Flag: NO\n"
                       b"Authentication-Results: MX.GW.TEST;\n spf=pass smtp.mailfrom=ceo@example.com\n"
                       b"Authentication-Results: mx.gw.test.; dkim=pass header.d=trailing-dot.test\n"
                       b"Authentication-Results: (ours) \"mx.gw.test\"; dmarc=pass header.from=quoted.test\n"
                       b"Authentication-Results: other.example; dkim=pass header.d=x.test\n") + mail.plain()
    out = send(gateway.port, ["bob@example.com"], forged)
    assert out.data[0] == 250 and tls_sink.wait_for(1)
    data = tls_sink.messages[0].data
    head = _head(data)
    assert head.count("X-MXGuard-Verdict:") == 1 and "X-MXGuard-Whatever" not in head
    assert "X-Spam-Flag" not in head
    assert "spf=pass smtp.mailfrom=ceo@example.com" not in head, "a result forged in our name is removed"
    assert "trailing-dot.test" not in head and "quoted.test" not in head, "also with a trailing dot or quotes"
    assert "Authentication-Results: other.example; dkim=pass header.d=x.test" in head
    assert data.endswith(mail.plain()), "the body and the other fields are unchanged"


def test_eicar_is_refused_with_554_naming_the_threat(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    out = send(gateway.port, ["bob@example.com"], mail.eicar_variants()["base64"])
    code, text = out.data
    assert code == 554 and text.startswith("5.7.1") and "EICAR-Test-File" in text
    rec = gateway.wait_records(1)[-1]
    assert rec.disposition == "rejected" and rec.final_code == 554
    assert rec.verdict["viruses"][0]["name"] == "EICAR-Test-File"
    time.sleep(0.2)
    assert tls_sink.messages == [], "nothing of the message reached the downstream server"
    # The downstream transaction was reset; the session can send the next message.
    out = send(gateway.port, ["bob@example.com"], mail.plain())
    assert out.data[0] == 250 and tls_sink.wait_for(1)


def test_gtube_is_quarantined_not_rejected_by_default(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    body = mail.gtube()
    out = send(gateway.port, ["bob@example.com"], body)
    assert out.data[0] == 250 and out.data[1].startswith("2.0.0")
    time.sleep(0.2)
    assert tls_sink.messages == []
    rec = gateway.wait_records(1)[-1]
    assert rec.disposition == "quarantined"
    held = _held(gateway, "bob@example.com")
    assert len(held) == 1
    row, content = gateway.run(get_quarantined(gateway.store, gateway.gateway.keyring.get(), held[0].id))
    assert row.category == "junk" and row.score == 1000.0 and "builtin" in row.reason
    assert row.subject == "GTUBE test" and row.sender == "a@sender.test" and row.txn_id == rec.txn_id
    assert content.endswith(body) and b"X-MXGuard-Verdict: junk; action=quarantine" in content
    assert row.sealed != content and mail.GTUBE not in row.sealed, "stored sealed, not in clear"


def test_tag_threshold_delivers_with_flag_and_subject_tag(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address], junk_tag="1.5", junk_quarantine="50")
    # No Date and no Message-ID: 2.0 points with the built-in rules.
    body = mail.crlf(b"From: alice@sender.test\nTo: bob@example.com\nSubject: Cheap offer\n\nBuy now.\n")
    out = send(gateway.port, ["bob@example.com"], body)
    assert out.data[0] == 250 and tls_sink.wait_for(1)
    data = tls_sink.messages[0].data
    head = _head(data)
    assert "X-Spam-Flag: YES" in head
    assert "\r\nSubject: [SPAM] Cheap offer\r\n" in data.decode()
    assert "X-MXGuard-Verdict: junk; action=tag" in head
    assert data.endswith(b"\r\n\r\nBuy now.\r\n"), "the body is untouched"
    assert gateway.wait_records(1)[-1].disposition == "delivered"


def test_recipients_with_different_settings_get_their_own_copies(gateway, tls_sink, add_domain):
    """One route, two domains: one quarantines GTUBE, the other tags it; the downstream sees one copy."""
    add_domain("example.com", [tls_sink.address])
    add_domain("example.org", [tls_sink.address], junk_tag="1", junk_quarantine="5000")
    out = send(gateway.port, ["bob@example.com", "carol@example.org", "dave@example.org"], mail.gtube())
    assert out.data[0] == 250
    assert tls_sink.wait_for(1)
    time.sleep(0.2)
    assert len(tls_sink.messages) == 1
    got = tls_sink.messages[0]
    assert got.rcpt_tos == ["carol@example.org", "dave@example.org"], "the held recipient is not in the envelope"
    assert b"X-Spam-Flag: YES" in got.data and b"Subject: [SPAM] GTUBE test" in got.data
    assert tls_sink.connections == 1, "RSET and a new MAIL/RCPT on the same connection"
    held = _held(gateway)
    assert [h.recipient for h in held] == ["bob@example.com"]
    rec = gateway.wait_records(1)[-1]
    by_rcpt = {r["rcpt"]: r["disposition"] for r in rec.results}
    assert by_rcpt == {"bob@example.com": "quarantined", "carol@example.org": "delivered",
                       "dave@example.org": "delivered"}
    assert rec.disposition == "partial"


def test_mixed_reject_and_deliver_holds_the_rejected_copy(gateway, tls_sink, plain_sink, add_domain):
    """example.com refuses executables (default rules), example.net allows them: after DATA one
    reply must serve both, so example.com's copy is held with reason 'reject (mixed transaction)'."""
    add_domain("example.com", [tls_sink.address])
    add_domain("example.net", [plain_sink.address], attachment_rules="[]")
    body = mail.with_attachment(b"@echo off\r\necho hi\r\n", "setup.bat")
    out = send(gateway.port, ["bob@example.com", "carol@example.net"], body)
    assert out.data[0] == 250
    assert plain_sink.wait_for(1)
    assert plain_sink.messages[0].rcpt_tos == ["carol@example.net"]
    time.sleep(0.2)
    assert tls_sink.messages == []
    held = _held(gateway)
    assert len(held) == 1 and held[0].recipient == "bob@example.com"
    assert held[0].reason.startswith("reject (mixed transaction): policy: executable-extension")


def test_all_recipients_refused_by_policy_get_550(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    body = mail.with_attachment(mail.FAKE_PE, "invoice.pdf", "application", "pdf")
    out = send(gateway.port, ["bob@example.com", "carol@example.com"], body)
    code, text = out.data
    # YARA names the renamed executable a threat; that is a virus verdict (554).
    assert code == 554 and text.startswith("5.7.1") and "Disguised-Executable" in text
    body = mail.with_attachment(b"MZ-not-really", "report.scr")
    out = send(gateway.port, ["bob@example.com"], body)
    code, text = out.data
    assert code == 550 and text.startswith("5.7.1") and "executable-extension" in text


def test_virus_action_quarantine_holds_instead_of_refusing(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address], virus_action="quarantine")
    out = send(gateway.port, ["bob@example.com"], mail.eicar_variants()["zip"])
    assert out.data[0] == 250
    held = _held(gateway)
    assert len(held) == 1 and held[0].category == "virus" and "EICAR" in held[0].reason


def test_same_filtering_with_and_without_tls(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    plain_out = send(gateway.port, ["bob@example.com"], mail.eicar_variants()["plain attachment"], starttls=False)
    tls_out = send(gateway.port, ["bob@example.com"], mail.eicar_variants()["plain attachment"], starttls=True)
    assert plain_out.tls is None and tls_out.tls is not None
    for out in (plain_out, tls_out):
        assert out.data[0] == 554 and "EICAR-Test-File" in out.data[1]


# -- real engines ------------------------------------------------------------------------------

@pytest.fixture
def engine_gateway(tmp_path, loopback_dns, clamd, rspamd):
    """A gateway whose virus engine is clamd and whose junk engine is Rspamd (short timeouts)."""
    from tests.support.gateway import init_data_dir
    init_data_dir(tmp_path / "data")
    env = gateway_environ(loopback_dns, MXGUARD_FILTERS__VIRUS_ENGINES="clamd",
                          MXGUARD_FILTERS__JUNK_ENGINES="rspamd", MXGUARD_FILTERS__CLAMD_ADDRESS=clamd.address,
                          MXGUARD_FILTERS__RSPAMD_URL=rspamd.url, MXGUARD_FILTERS__TIMEOUT="5")
    gw = ThreadedGateway(load_settings(tmp_path / "data", environ=env)).start()
    yield gw
    gw.stop()


@pytest.mark.parametrize("variant", list(mail.eicar_variants()))
def test_clamd_refuses_eicar_in_every_encoding(engine_gateway, tls_sink, variant):
    engine_gateway.add_domain("example.com", [tls_sink.address])
    out = send(engine_gateway.port, ["bob@example.com"], mail.eicar_variants()[variant])
    code, text = out.data
    assert code == 554 and text.startswith("5.7.1") and "Eicar" in text, (variant, out.data)
    rec = engine_gateway.wait_records(1)[-1]
    assert rec.verdict["viruses"][0]["engine"] == "clamd"


def test_clamd_refuses_the_clamav_test_mail(engine_gateway, tls_sink, corpus_dir):
    engine_gateway.add_domain("example.com", [tls_sink.address])
    out = send(engine_gateway.port, ["bob@example.com"], (corpus_dir / "clamav" / "clam.exe.mbox.base64.eml").read_bytes())
    assert out.data[0] == 554 and "ClamAV-Test-File" in out.data[1]


def test_rspamd_verdicts_through_the_gateway(engine_gateway, tls_sink, corpus_dir):
    engine_gateway.add_domain("example.com", [tls_sink.address])
    out = send(engine_gateway.port, ["bob@example.com"], mail.gtube())
    assert out.data[0] == 250
    out = send(engine_gateway.port, ["bob@example.com"], (corpus_dir / "spamassassin" / "sample-spam.eml").read_bytes())
    assert out.data[0] == 250
    ham = (corpus_dir / "spamassassin" / "sample-nonspam.eml").read_bytes()
    out = send(engine_gateway.port, ["bob@example.com"], ham)
    assert out.data[0] == 250
    assert tls_sink.wait_for(1)
    time.sleep(0.2)
    assert len(tls_sink.messages) == 1, "only the ham was delivered"
    assert tls_sink.messages[0].data.endswith(mail.crlf(ham))
    held = _held(engine_gateway)
    assert len(held) == 2 and all("rspamd" in h.reason for h in held)
    assert {h.subject for h in held} >= {"GTUBE test"}


def test_engine_down_defers_and_the_retry_after_it_is_back_is_delivered(engine_gateway, tls_sink, clamd):
    engine_gateway.add_domain("example.com", [tls_sink.address])
    body = mail.plain(subject="Retry me")
    clamd.stop()
    try:
        out = send(engine_gateway.port, ["bob@example.com"], body)
        assert out.data[0] == 451 and out.data[1].startswith("4.3.0"), out.data
        rec = engine_gateway.wait_records(1)[-1]
        assert rec.disposition == "deferred"
        assert rec.verdict["errors"][0]["engine"] == "clamd"
        time.sleep(0.2)
        assert tls_sink.messages == [], "never delivered unscanned"
    finally:
        clamd.start()
    out = send(engine_gateway.port, ["bob@example.com"], body)  # the sender retries
    assert out.data[0] == 250
    assert tls_sink.wait_for(1) and tls_sink.messages[0].data.endswith(body)


def test_engine_down_with_tag_delivers_marked_unscanned(engine_gateway, tls_sink, clamd):
    engine_gateway.add_domain("example.com", [tls_sink.address], engine_failure="tag")
    clamd.stop()
    try:
        out = send(engine_gateway.port, ["bob@example.com"], mail.plain())
    finally:
        clamd.start()
    assert out.data[0] == 250 and tls_sink.wait_for(1)
    head = _head(tls_sink.messages[0].data)
    assert "X-MXGuard-Verdict: unscanned; action=deliver" in head and "unscanned=clamd" in head


def test_spamd_quarantines_the_sample_spam(tmp_path, loopback_dns, spamd, tls_sink, corpus_dir):
    from tests.support.gateway import init_data_dir
    init_data_dir(tmp_path / "data")
    env = gateway_environ(loopback_dns, MXGUARD_FILTERS__JUNK_ENGINES="spamd",
                          MXGUARD_FILTERS__SPAMD_ADDRESS=spamd.address)
    gw = ThreadedGateway(load_settings(tmp_path / "data", environ=env)).start()
    try:
        gw.add_domain("example.com", [tls_sink.address])
        assert send(gw.port, ["bob@example.com"], (corpus_dir / "spamassassin" / "sample-spam.eml").read_bytes()
                    ).data[0] == 250
        ham = (corpus_dir / "spamassassin" / "sample-nonspam.eml").read_bytes()
        assert send(gw.port, ["bob@example.com"], ham).data[0] == 250
        assert tls_sink.wait_for(1)
        time.sleep(0.2)
        assert len(tls_sink.messages) == 1 and tls_sink.messages[0].data.endswith(mail.crlf(ham))
        held = gw.run(list_quarantine(gw.store))
        assert len(held) == 1 and "spamd" in held[0].reason
    finally:
        gw.stop()
