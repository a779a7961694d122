"""Hostile bytes and arguments through the real gateway: refused with the right code, or filtered and
delivered carrying the verdict, never a crash, never delivered unscanned, and the dialogue stays in step.

Covers the issue's "bad bytes" (NUL, 8-bit headers without SMTPUTF8, invalid UTF-8 with SMTPUTF8,
broken base64 / quoted-printable), reply and command injection through the envelope and the HELO
name, the limits aiosmtpd enforces for us (message size, line length) and what they leave behind,
and the message log holding up to strings no database column stores.
"""

from __future__ import annotations

import base64
import datetime as dt
import quopri
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxguard.config import load_settings
from mxguard.quarantine.store import get_quarantined, list_quarantine
from mxguard.services import domains as domain_service
from mxguard.smtp.inbound import InboundHandler
from mxguard.storage.messagelog import LogRecord, MessageLogWriter, recent
from tests.conftest import gateway_environ
from tests.support import mail
from tests.support.clamd import EICAR
from tests.support.gateway import ThreadedGateway, init_data_dir
from tests.support.smtp import Raw, message, send

VERDICT = re.compile(rb"^X-MXGuard-Verdict: ([a-z]+); action=([a-z]+)", re.M)


@pytest.fixture
def gateway_overrides():
    return {"smtp.max_message_size": 64 * 1024, "smtp.command_timeout": 2.0}


@pytest.fixture
def crashes(monkeypatch):
    """Exceptions that reached aiosmtpd's handler (each would be a 451 and a stack trace in the log)."""
    seen: list[str] = []
    original = InboundHandler.handle_exception

    async def spy(self, error):
        seen.append(repr(error))
        return await original(self, error)

    monkeypatch.setattr(InboundHandler, "handle_exception", spy)
    return seen


# -- bad bytes in the message: filtered, delivered with the verdict, or refused -------------------

def _mime(cte: bytes, payload: bytes, subject: bytes = b"attachment") -> bytes:
    return (b"From: Alice <alice@sender.test>\r\nTo: bob@example.com\r\nSubject: " + subject + b"\r\n"
            b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bad-" + cte + b"@sender.test>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
            b"--b\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n"
            b"Content-Disposition: attachment; filename=\"data.bin\"\r\n"
            b"Content-Transfer-Encoding: " + cte + b"\r\n\r\n" + payload + b"\r\n--b--\r\n")


def _deep(depth: int) -> bytes:
    opening = b"".join(b"Content-Type: multipart/mixed; boundary=\"n%d\"\r\n\r\n--n%d\r\n" % (i, i)
                       for i in range(depth))
    closing = b"".join(b"\r\n--n%d--\r\n" % i for i in reversed(range(depth)))
    return b"From: a@sender.test\r\nSubject: nested\r\nMIME-Version: 1.0\r\n" + opening + b"\r\nx\r\n" + closing


#: name -> (message, MAIL parameters). Each is delivered, carrying the verdict header.
DELIVERED = {
    "NUL in the body and the Subject": (
        b"From: a@sender.test\r\nTo: bob@example.com\r\nSubject: nul\x00here\r\n\r\nbefore\x00after\r\n\x00\r\n", []),
    "8-bit headers without SMTPUTF8 or 8BITMIME": (
        b"From: \xe9milie <a@sender.test>\r\nTo: bob@example.com\r\nSubject: r\xe9sum\xe9 \xff\xfe\r\n\r\n"
        b"body\r\n", []),
    "invalid UTF-8 in headers with SMTPUTF8": (
        b"From: \xc3\x28 <a@sender.test>\r\nTo: bob@example.com\r\nSubject: \xf0\x28\x8c\xbc \xed\xa0\x80\r\n\r\n"
        b"body \xc3\x28\r\n", ["SMTPUTF8", "BODY=8BITMIME"]),
    "broken base64": (_mime(b"base64", b"SGVsbG8gd29ybGQ!!!*\r\nAAA=BBB\r\n===\r\n\xff\r\n"), []),
    "broken quoted-printable": (_mime(b"quoted-printable", b"caf=E9 =ZZ =\r\n=0 =\r\nend="), []),
    "unknown transfer encoding and charset": (
        b"From: a@sender.test\r\nSubject: =?x-klingon?q?qapla=27?= =?utf-8?b?////?=\r\n"
        b"Content-Type: text/plain; charset=x-klingon\r\nContent-Transfer-Encoding: x-rot13\r\n\r\nuryyb\r\n", []),
}

#: name -> (message, MAIL parameters, reply code, text in the reply). Refused, nothing delivered.
REFUSED = {
    "EICAR in broken base64": (
        _mime(b"base64", base64.b64encode(EICAR)[:24] + b"!*\r\n" + base64.b64encode(EICAR)[24:] + b"==="), [],
        554, "EICAR"),
    "EICAR in broken quoted-printable": (
        _mime(b"quoted-printable", quopri.encodestring(EICAR) + b"\r\n=ZZ=\r\n="), [], 554, "EICAR"),
    "EICAR after NUL bytes": (_mime(b"7bit", b"\x00" * 100 + EICAR + b"\x00"), [], 554, "EICAR"),
    "MIME nested 1000 deep": (_deep(1000), [], 550, "unreadable-mime"),
    "MIME nested 60 deep": (_deep(60), [], 550, "mime-depth"),
    "600 MIME parts": (b"From: a@sender.test\r\nContent-Type: multipart/mixed; boundary=m\r\n\r\n"
                       + b"--m\r\nContent-Type: text/plain\r\n\r\np\r\n" * 600 + b"--m--\r\n", [], 550, "mime-parts"),
}


@pytest.fixture(scope="module")
def _engine_env(clamd, rspamd):
    return {"MXGUARD_FILTERS__VIRUS_ENGINES": "yara,clamd", "MXGUARD_FILTERS__JUNK_ENGINES": "builtin,rspamd",
            "MXGUARD_FILTERS__CLAMD_ADDRESS": clamd.address, "MXGUARD_FILTERS__RSPAMD_URL": rspamd.url,
            "MXGUARD_FILTERS__TIMEOUT": "20"}


@pytest.fixture(params=["embedded", "clamd+rspamd"])
def filtering_gateway(request, tmp_path, loopback_dns, tls_sink):
    """A gateway with the embedded engines, and one with real clamd and Rspamd as well; example.com served."""
    env = {} if request.param == "embedded" else request.getfixturevalue("_engine_env")
    init_data_dir(tmp_path / "data")
    gw = ThreadedGateway(load_settings(tmp_path / "data", environ=gateway_environ(loopback_dns, **env))).start()
    gw.run(domain_service.add_domain(gw.store, "example.com", [tls_sink.address]))
    gw.reload()
    yield gw
    gw.stop()


@pytest.mark.parametrize("name", list(DELIVERED))
def test_bad_bytes_are_filtered_and_delivered_with_the_verdict(filtering_gateway, tls_sink, crashes, name):
    body, options = DELIVERED[name]
    gw = filtering_gateway
    out = send(gw.port, ["bob@example.com"], body, mail_options=options)
    assert out.data[0] == 250, (name, out.data)
    record = gw.wait_records(1)[-1]
    assert not record.verdict.get("errors"), "every engine answered"
    if record.disposition == "quarantined":
        # A junk engine may dislike the damage (Rspamd scores broken UTF-8): then it is held, scanned.
        held = gw.run(list_quarantine(gw.store))
        assert len(held) == 1 and held[0].txn_id == record.txn_id
        _, got = gw.run(get_quarantined(gw.store, gw.gateway.keyring.get(), held[0].id))
        time.sleep(0.2)
        assert tls_sink.messages == []
    else:
        assert record.disposition == "delivered" and tls_sink.wait_for(1)
        got = tls_sink.messages[0].data
    verdict = VERDICT.search(got)
    assert verdict and verdict.group(2) in (b"deliver", b"tag", b"quarantine"), "scanned, and the copy says so"
    assert got.endswith(mail.crlf(body)), "the message itself is kept byte for byte"
    gw.flush_log()
    stored = gw.run(recent(gw.store, 1))[0]
    assert stored.txn_id == record.txn_id and "\x00" not in stored.subject
    assert crashes == []


@pytest.mark.parametrize("name", list(REFUSED))
def test_dangerous_or_unreadable_messages_are_refused(filtering_gateway, tls_sink, crashes, name):
    body, options, code, word = REFUSED[name]
    out = send(filtering_gateway.port, ["bob@example.com"], body, mail_options=options)
    assert out.data[0] == code and out.data[1].startswith("5.7.1") and word.lower() in out.data[1].lower(), out.data
    time.sleep(0.2)
    assert tls_sink.messages == [], "nothing of it reached the downstream server"
    assert filtering_gateway.wait_records(1)[-1].disposition == "rejected"
    assert crashes == []


# -- the envelope and HELO: no control characters, no bad UTF-8, no source routing ---------------

@pytest.mark.parametrize("arg", ["a\rb@sender.test", "a\x00@sender.test", "a@send\x1ber.test", "a\x7f@sender.test"],
                         ids=["CR", "NUL", "ESC", "DEL"])
def test_control_characters_in_the_sender_are_refused(gateway, tls_sink, add_domain, crashes, arg):
    add_domain("example.com", [tls_sink.address])
    raw = Raw(gateway.port)
    raw.cmd("EHLO c.test")
    assert raw.cmd(f"MAIL FROM:<{arg}>").startswith("501 5.1.7 Bad sender address syntax: control characters")
    assert raw.cmd("RCPT TO:<alice@example.com>").startswith("503"), "no transaction was opened"
    assert raw.cmd("NOOP").startswith("250 2.0.0")
    raw.close()
    assert crashes == []


@pytest.mark.parametrize("arg", ["a\rRSET@example.com", "a\x00b@example.com", "x@example.com\x00", "b\x0c@example.com"],
                         ids=["CR", "NUL", "NUL-in-domain", "FF"])
def test_control_characters_in_a_recipient_never_reach_the_downstream_dialogue(gateway, tls_sink, add_domain,
                                                                                crashes, arg):
    add_domain("example.com", [tls_sink.address])
    raw = Raw(gateway.port)
    raw.cmd("EHLO c.test")
    raw.cmd("MAIL FROM:<a@sender.test>")
    assert raw.cmd(f"RCPT TO:<{arg}>").startswith("501 5.1.3 Bad recipient address syntax: control characters")
    assert raw.cmd("RCPT TO:<alice@example.com>").startswith("250"), "the transaction goes on"
    assert raw.cmd("DATA").startswith("354")
    raw.send(message(subject="after the bad one") + b".\r\n")
    assert raw.reply().startswith("250")
    raw.close()
    assert tls_sink.wait_for(1)
    assert tls_sink.messages[0].rcpt_tos == ["alice@example.com"]
    assert crashes == [], "a refused argument is not an internal error (451)"


def test_bare_lf_command_lines_are_refused_and_only_canonical_commands_go_downstream(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    raw = Raw(gateway.port)
    raw.cmd("EHLO c.test")
    # RFC 5321 2.3.8: the LF alone does not end a command line; that line is refused (500 5.5.2)
    # and the CRLF line after it is read on its own.
    raw.send(b"MAIL FROM:<a@sender.test>\nRCPT TO:<alice@example.com>\r\n")
    first, second = raw.reply(), raw.reply()
    assert first.startswith("500 5.5.2") and second.startswith("503"), (first, second)
    assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250 2.1.0")
    assert raw.cmd("RCPT TO:<alice@example.com>").startswith("250")
    raw.send(b"RCPT TO:<bob@example.com\n>\r\n")
    first, second = raw.reply(), raw.reply()
    assert first.startswith("500 5.5.2") and second.startswith("500 5.5.2"), (first, second)
    raw.cmd("DATA")
    raw.send(message() + b".\r\n")
    assert raw.reply().startswith("250")
    raw.close()
    assert tls_sink.wait_for(1)
    assert tls_sink.messages[0].rcpt_tos == ["alice@example.com"], "only clean addresses"


@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
@pytest.mark.parametrize("name", ["a\rX-Injected: yes", "a\x00b", "host\x1b[31m"], ids=["CR", "NUL", "ESC"])
def test_control_characters_in_the_helo_name_are_refused(gateway, verb, name):
    raw = Raw(gateway.port)
    assert raw.cmd(f"{verb} {name}").startswith("501 5.5.4 Invalid HELO/EHLO name: control characters")
    assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("503"), "the refused greeting did not count"
    assert raw.cmd(f"{verb} client.test").startswith("250")
    raw.close()


def test_odd_helo_names_are_made_safe_in_received(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    raw = Raw(gateway.port)
    raw.cmd("EHLO <script>(evil);by=x")
    raw.cmd("MAIL FROM:<a@sender.test>")
    raw.cmd("RCPT TO:<alice@example.com>")
    raw.cmd("DATA")
    raw.send(message() + b".\r\n")
    assert raw.reply().startswith("250")
    raw.close()
    assert tls_sink.wait_for(1)
    received = tls_sink.messages[0].data.split(b"\r\n\tby ", 1)[0]
    assert received == b"Received: from ?script??evil??by?x ([127.0.0.1])", received
    assert gateway.wait_records(1)[-1].helo == "<script>(evil);by=x", "the log keeps what was said"


@pytest.mark.parametrize("rcpt", ['"x@acme.test y"@example.com', "user%elsewhere.test@example.com",
                                  "elsewhere.test!user@example.com"], ids=["quoted-at", "percent", "bang"])
def test_sender_specified_routing_is_refused(gateway, tls_sink, add_domain, rcpt):
    add_domain("example.com", [tls_sink.address])
    raw = Raw(gateway.port)
    raw.cmd("EHLO c.test")
    raw.cmd("MAIL FROM:<a@sender.test>")
    assert raw.cmd(f"RCPT TO:<{rcpt}>").startswith("550 5.7.1 Sender-specified routing")
    raw.close()
    time.sleep(0.2)
    assert tls_sink.connections == 0, "the downstream server never heard of it"


def test_invalid_utf8_in_the_envelope_with_smtputf8_is_refused(gateway, tls_sink, add_domain, crashes):
    add_domain("example.com", [tls_sink.address])
    raw = Raw(gateway.port)
    raw.cmd("EHLO c.test")
    raw.send(b"MAIL FROM:<\xff\xfe@sender.test> SMTPUTF8\r\n")
    assert raw.reply() == "501 5.1.7 Bad sender address syntax: not valid UTF-8"
    raw.send(b"MAIL FROM:<\xc3\xa9milie@sender.test> SMTPUTF8\r\n")
    assert raw.reply().startswith("250"), "valid UTF-8 is fine with SMTPUTF8"
    raw.send(b"RCPT TO:<\xc3\x28@example.com>\r\n")
    assert raw.reply() == "501 5.1.3 Bad recipient address syntax: not valid UTF-8"
    raw.send(b"RCPT TO:<j\xc3\xbcrgen@example.com>\r\n")
    assert raw.reply().startswith("250")
    raw.cmd("DATA")
    raw.send(message() + b".\r\n")
    assert raw.reply().startswith("250")
    raw.close()
    assert tls_sink.wait_for(1)
    got = tls_sink.messages[0]
    assert got.mail_from == "émilie@sender.test" and got.rcpt_tos == ["jürgen@example.com"]
    assert "SMTPUTF8" in got.mail_options
    gateway.flush_log()
    assert gateway.run(recent(gateway.store, 1))[0].mail_from == "émilie@sender.test"
    assert crashes == []


# -- limits aiosmtpd enforces: the right code, and the session goes on ----------------------------

def _transaction(raw: Raw, rcpt: str = "alice@example.com") -> None:
    assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
    assert raw.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
    assert raw.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>", "no enhanced code on 354 (RFC 2034)"


@pytest.mark.parametrize("content, reply", [
    (b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 70, "552 5.3.4 Message size exceeds fixed maximum"),
    (b"Subject: long line\r\n\r\n" + b"y" * 5000 + b"\r\n", "500 5.6.0 Line too long"),
], ids=["size", "line-length"])
def test_refused_data_ends_the_transaction_downstream_too(gateway, tls_sink, add_domain, content, reply):
    add_domain("example.com", [tls_sink.address])
    raw = Raw(gateway.port)
    raw.cmd("EHLO c.test")
    _transaction(raw)
    raw.send(content + b".\r\n")
    assert raw.reply().startswith(reply)
    # The downstream transaction was reset: the next message on the same session goes through.
    _transaction(raw)
    raw.send(message(subject="next one") + b".\r\n")
    assert raw.reply().startswith("250 2.0.0")
    raw.close()
    assert tls_sink.wait_for(1) and len(tls_sink.messages) == 1
    refused, delivered = gateway.wait_records(2)[:2]
    assert (refused.disposition, refused.final_code) == ("rejected", int(reply[:3]))
    assert delivered.disposition == "delivered"


def test_size_parameter_over_the_limit_is_refused_at_mail(gateway):
    raw = Raw(gateway.port)
    assert "250-SIZE 65536" in raw.cmd("EHLO c.test")
    assert raw.cmd("MAIL FROM:<a@sender.test> SIZE=70000") == (
        "552 5.3.4 Message size exceeds fixed maximum message size")
    assert raw.cmd("MAIL FROM:<a@sender.test> SIZE=60000").startswith("250")
    raw.close()


def test_command_line_too_long(gateway):
    raw = Raw(gateway.port)
    raw.cmd("EHLO c.test")
    assert raw.cmd("NOOP " + "z" * 3000).startswith("500 5.5.2 Command line too long")
    assert raw.cmd("NOOP").startswith("250")
    raw.close()


def test_slow_downstream_is_not_an_idle_client(gateway, tls_sink, add_domain):
    """The idle timeout (2 s here) counts the client's silence, not the time mxguard waits downstream."""
    add_domain("example.com", [tls_sink.address])
    tls_sink.data_delay = 3.0
    out = send(gateway.port, ["alice@example.com"], message(subject="slow downstream"))
    assert out.data[0] == 250, out.data
    assert len(tls_sink.messages) == 1 and gateway.wait_records(1)[-1].disposition == "delivered"


def test_dot_transparency_both_ways(gateway, tls_sink, add_domain):
    """RFC 5321 4.5.2: lines starting with a dot arrive as sent; what goes downstream is stuffed again."""
    add_domain("example.com", [tls_sink.address])
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n.hidden\r\n...\r\n. \r\nend\r\n"
    raw = Raw(gateway.port)
    raw.cmd("EHLO c.test")
    _transaction(raw)
    stuffed = b"".join(b"." + line if line.startswith(b".") else line for line in body.splitlines(keepends=True))
    raw.send(stuffed + b".\r\n")
    assert raw.reply().startswith("250")
    raw.close()
    assert tls_sink.wait_for(1)
    assert tls_sink.messages[0].data.endswith(body)


# -- the message log holds up to strings no database stores ----------------------------------------

async def test_message_log_stores_hostile_strings_and_drops_only_a_refused_record(store):
    now = dt.datetime.now(dt.timezone.utc)
    writer = MessageLogWriter(store)
    writer.submit(LogRecord(txn_id="NUL", ts=now, client_ip="192.0.2.1", subject="a\x00b", helo="h\udcff",
                            mail_from="x\x00@y.test", results=[{"rcpt": "r\udcfe@example.com", "text": "\x00"}],
                            verdict={"attachments": [{"filename": "\udcff\x00.exe"}]}))
    writer.submit(LogRecord(txn_id="OK", ts=now, client_ip="192.0.2.1", subject="fine"))
    too_long = LogRecord(txn_id="X" * 100, ts=now, client_ip="192.0.2.1", subject="refused")
    if store.is_sqlite:
        too_long.ts = "not a time"  # SQLite refuses what PostgreSQL's varchar(32) refuses there
    writer.submit(too_long)
    writer.submit(LogRecord(txn_id="AFTER", ts=now, client_ip="192.0.2.1", subject="after the refused one"))
    assert await writer.flush() == 3
    assert writer.refused == 1 and not writer.pending
    rows = {r.txn_id: r for r in await recent(store, 10)}
    assert sorted(rows) == ["AFTER", "NUL", "OK"]
    assert rows["NUL"].subject == "a\ufffdb" and rows["NUL"].helo == "h\ufffd"
    assert rows["NUL"].verdict["attachments"][0]["filename"] == "\ufffd\ufffd.exe"


_ATOM = st.text(alphabet="abcxyz019.-", min_size=1, max_size=6).filter(lambda a: a[0] not in ".-" and ".." not in a
                                                                      and not a.endswith("."))
_FORM_WORDS = {"@": '"user@host"@domain', "%": "user%host@domain", "!": "host!user@domain"}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(atoms=st.lists(_ATOM, min_size=2, max_size=4), chars=st.lists(st.sampled_from("%!@"), min_size=1, max_size=3))
def test_source_routing_reply_names_the_form_that_was_refused(gateway, atoms, chars):
    """Each routing form in a local part (percent hack, bang path, an @ in a quoted local part) is
    refused with 550 5.7.1 (before any relay check), and the reply names exactly the forms the
    address holds."""
    local = atoms[0] + "".join(c + a for c, a in zip(chars, atoms[1:]))
    used = {c for c in chars[:len(atoms) - 1]}
    rcpt = (f'"{local}"' if "@" in used else local) + "@example.com"
    raw = Raw(gateway.port)
    try:
        raw.cmd("EHLO c.test")
        raw.cmd("MAIL FROM:<a@sender.test>")
        reply = raw.cmd(f"RCPT TO:<{rcpt}>")
    finally:
        raw.close()
    assert reply.startswith("550 5.7.1 Sender-specified routing is not accepted: "), (rcpt, reply)
    for ch, words in _FORM_WORDS.items():
        assert (words in reply) == (ch in used), (rcpt, reply)


@pytest.mark.parametrize("rcpt, named", [("u%h@example.org", "the percent hack (user%host@domain)"),
                                         ("h!u@example.org", "a bang path (host!user@domain)")])
def test_percent_hack_and_bang_path_replies_name_them(gateway, rcpt, named):
    raw = Raw(gateway.port)
    raw.cmd("EHLO c.test")
    raw.cmd("MAIL FROM:<a@sender.test>")
    reply = raw.cmd(f"RCPT TO:<{rcpt}>")
    raw.close()
    assert reply == f"550 5.7.1 Sender-specified routing is not accepted: {named} (RFC 5321 3.6.1)", reply
    assert "user@elsewhere@domain" not in reply
