"""The front door: EHLO, relay control, inbound TLS policy, limits and reply codes (real smtplib client)."""

from __future__ import annotations

import datetime as dt
import email.utils

import smtplib
import socket
import ssl
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.smtp import ENHANCED, message, send


def _dialogue(port: int, lines: list[bytes], *, read_greeting: bool = True, timeout: float = 5) -> bytes:
    """Send raw bytes (pipelined in one write) and return everything the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if read_greeting:
            sock.recv(4096)
        sock.sendall(b"".join(lines))
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
            if b"221 " in data:
                break
        return data


def test_ehlo_offers_the_required_extensions(gateway):
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
        code, banner = c.docmd("NOOP")
        c.ehlo("client.test")
        for ext in ("starttls", "size", "8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes"):
            assert c.has_extn(ext), ext
        assert not c.has_extn("auth")
        assert int(c.esmtp_features["size"]) == gateway.settings.smtp.max_message_size
        c.starttls(context=_insecure())
        c.ehlo("client.test")
        assert not c.has_extn("starttls"), "STARTTLS must not be offered twice (RFC 3207)"
        assert not c.has_extn("auth"), "an MX does not offer AUTH"
        code, text = c.docmd("STARTTLS")
        assert (code, text[:6]) == (503, b"5.5.1 "), "no second handshake inside TLS (RFC 3207 4.2)"
        assert c.noop()[0] == 250, "the TLS session goes on"


def test_help_lists_the_commands_a_client_may_use(gateway):
    """HELP names every command the front door takes, not only the three it did not override."""
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
        c.ehlo("client.test")
        code, text = c.docmd("HELP")
        assert code == 250 and text.startswith(b"2.0.0 Supported commands:"), text
        listed = set(text.decode().split(":", 1)[1].split())
        assert {"DATA", "EHLO", "HELO", "HELP", "MAIL", "NOOP", "QUIT", "RCPT", "RSET", "STARTTLS"} <= listed, listed
        assert not listed & {"VRFY", "EXPN"}, "not offered on an MX"
        code, text = c.docmd("HELP", "RSET")
        assert (code, text) == (250, b"2.0.0 Syntax: RSET")


def test_ehlo_and_helo_refusals_carry_enhanced_codes(gateway):
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
        for verb in ("EHLO", "HELO"):
            code, text = c.docmd(verb)
            assert code == 501 and text.startswith(b"5.5."), (verb, code, text)
        code, text = c.docmd("EHLO", "client.test")
        assert code == 250 and not text.startswith(b"2."), "positive EHLO replies stay plain (RFC 2034 3)"


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_unknown_domain_is_relay_denied_and_nothing_is_delivered(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    out = send(gateway.port, ["victim@elsewhere.test"])
    code, text = out.rcpt["victim@elsewhere.test"]
    assert code == 550 and text.startswith("5.7.1")
    assert tls_sink.connections == 0, "no downstream connection for a relay attempt"
    records = gateway.wait_records(1)
    assert records[-1].disposition == "rejected"
    assert records[-1].results[0]["code"] == 550


def test_address_literal_and_subdomain_are_not_served(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    out = send(gateway.port, ["user@[127.0.0.1]", "user@sub.example.com", "user@example.com."])
    assert out.rcpt["user@[127.0.0.1]"][0] == 550
    assert out.rcpt["user@sub.example.com"][0] == 550
    code, text = out.rcpt["user@example.com."]  # RFC 5321 4.1.2: no trailing dot in a Domain
    assert code == 553 and text.startswith("5.1.3")


def test_inbound_required_refuses_without_starttls(gateway, tls_sink, add_domain):
    add_domain("secure.example", [tls_sink.address], inbound_tls="required")
    out = send(gateway.port, ["user@secure.example"], starttls=False)
    code, text = out.rcpt["user@secure.example"]
    assert code == 530 and text.startswith("5.7.0")
    assert tls_sink.connections == 0
    out = send(gateway.port, ["user@secure.example"], starttls=True)
    assert out.data[0] == 250
    assert tls_sink.wait_for(1)


def test_downstream_replies_are_passed_through(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    tls_sink.rcpt_replies["busy@example.com"] = "452 4.2.2 Mailbox full"
    out = send(gateway.port, ["alice@example.com", "unknown@example.com", "busy@example.com"])
    assert out.rcpt["alice@example.com"] == (250, "2.1.5 Ok")
    code, text = out.rcpt["unknown@example.com"]
    assert code == 550 and text.startswith("5.1.1") and "User unknown" in text
    assert out.rcpt["busy@example.com"] == (452, "4.2.2 Mailbox full")
    assert out.data[0] == 250 and "queued as S00001" in out.data[1], "the final reply is the downstream's own"
    assert tls_sink.wait_for(1)
    assert tls_sink.messages[0].rcpt_tos == ["alice@example.com"]


def test_downstream_4xx_after_data_is_passed_to_the_sender(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address], on_unreachable="defer")
    tls_sink.data_reply = "451 4.3.0 Try again later"
    out = send(gateway.port, ["alice@example.com"])
    assert out.data == (451, "4.3.0 Try again later")
    assert gateway.wait_records(1)[-1].disposition == "deferred"


def test_delivered_message_carries_received_with_tls_details(gateway, tls_sink, add_domain, gateway_client_ctx):
    add_domain("example.com", [tls_sink.address])
    body = message(subject="trace")
    out = send(gateway.port, ["alice@example.com"], body, ctx=gateway_client_ctx)
    assert out.tls in ("TLSv1.3", "TLSv1.2")
    assert tls_sink.wait_for(1)
    data = tls_sink.messages[0].data
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("Received: from client.sender.test ([127.0.0.1])")
    assert "by mx.gw.test (mxguard)" in head
    assert "with ESMTPS id " in head
    assert f"(using {out.tls} with cipher" in head
    assert "for <alice@example.com>;" in head
    # RFC 5322 3.3: the date says UTC ("+0000"), not "zone unknown" ("-0000"), and parses.
    date = head.split("for <alice@example.com>;", 1)[1].split("\r\n")[0].strip()
    assert date.endswith(" +0000"), date
    assert email.utils.parsedate_to_datetime(date).utcoffset() == dt.timedelta(0)
    assert data.endswith(body), "the message itself is unchanged"


def test_a_tls_session_reads_with_a_small_buffer_and_large_mail_arrives_intact(gateway, tls_sink, add_domain,
                                                                              gateway_client_ctx):
    """asyncio's 256 KiB TLS read buffer per connection is cut to TLS_READ_BUFFER (idle-session memory)."""
    from mxguard.tls.buffers import TLS_READ_BUFFER

    add_domain("example.com", [tls_sink.address])
    big = message(subject="big over TLS", body=("0123456789abcdef" * 4 + "\n") * 9000)  # ~600 KB
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as c:
        c.ehlo("client.test")
        c.starttls(context=gateway_client_ctx)
        c.ehlo("client.test")
        buffers = [len(s._tls_protocol._ssl_buffer) for s in list(gateway.gateway.sessions) if s._tls_protocol]
        assert buffers == [TLS_READ_BUFFER], buffers
        c.sendmail("a@sender.test", ["bob@example.com"], big)
    assert tls_sink.wait_for(1)
    assert tls_sink.messages[0].data.endswith(big), "the message went through unchanged"
    # The downstream TLS connection (kept in the connection cache) reads with the same buffer.
    deadline = time.monotonic() + 5  # parked when the inbound session has ended
    while not (cached := [conn for conns in list(gateway.gateway.pool._idle.values()) for _, conn in conns]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    sizes = [len(c.client.transport._ssl_protocol._ssl_buffer) for c in cached]
    assert sizes == [TLS_READ_BUFFER], sizes


def test_plain_session_gets_esmtp_received(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    send(gateway.port, ["alice@example.com"], starttls=False)
    assert tls_sink.wait_for(1)
    head = tls_sink.messages[0].data.split(b"\r\n\r\n", 1)[0].decode()
    assert "with ESMTP id" in head and "using TLS" not in head


def test_message_over_size_is_refused_with_552(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    limit = gateway.settings.smtp.max_message_size
    out = send(gateway.port, ["alice@example.com"], mail_options=[f"SIZE={limit + 1}"])
    assert out.mail[0] == 552 and out.mail[1].startswith("5.3.4")
    big = message(body=("x" * 900 + "\n") * (limit // 900 + 10))
    out = send(gateway.port, ["alice@example.com"], big)
    assert out.data[0] == 552 and out.data[1].startswith("5.3.4")
    time.sleep(0.3)
    assert tls_sink.messages == [], "nothing of an oversized message is delivered"


def test_line_over_998_octets_is_refused(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    out = send(gateway.port, ["alice@example.com"], message(body="y" * 1200 + "\n"))
    assert out.data[0] == 500 and ENHANCED.match(out.data[1]), out.data
    time.sleep(0.3)
    assert tls_sink.messages == []


def test_too_many_recipients_get_452(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    limit = gateway.settings.smtp.max_recipients
    rcpts = [f"u{i}@example.com" for i in range(limit + 3)]
    out = send(gateway.port, rcpts)
    codes = [out.rcpt[r][0] for r in rcpts]
    assert codes[:limit] == [250] * limit
    assert all(c == 452 for c in codes[limit:])
    assert out.rcpt[rcpts[-1]][1].startswith("4.5.3")
    assert out.data[0] == 250
    assert tls_sink.wait_for(1) and len(tls_sink.messages[0].rcpt_tos) == limit


def test_bad_address_syntax_and_sequence_errors_have_enhanced_codes(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    answer = _dialogue(gateway.port, [
        b"EHLO c.test\r\n", b"RCPT TO:<a@example.com>\r\n", b"MAIL FROM:<bad address@@>\r\n",
        b"MAIL FROM:<>\r\n", b"MAIL FROM:<x@y.test>\r\n", b"RCPT TO:<no-at-sign>\r\n", b"DATA\r\n",
        b"VRFY root\r\n", b"AUTH PLAIN AGFiYwBkZWY=\r\n", b"BOGUS\r\n", b"QUIT\r\n"])
    lines = [ln for ln in answer.decode().split("\r\n") if ln]
    replies = [ln for ln in lines if not ln.startswith("250-")]
    # Every reply after EHLO carries an enhanced status code (RFC 2034).
    for line in replies[1:]:
        assert ENHANCED.match(line[4:]), line
    codes = [int(line[:3]) for line in replies]
    assert codes[0] == 250  # EHLO
    assert codes[1] == 503  # RCPT before MAIL
    assert codes[2] in (501, 553)  # malformed sender
    assert codes[3] == 250  # null reverse-path is valid (bounces)
    assert codes[4] == 503  # nested MAIL
    assert codes[5] in (501, 553)  # malformed recipient
    assert codes[6] == 503  # DATA without recipients
    assert codes[7] == 502 and codes[8] == 502  # VRFY, AUTH disabled
    assert codes[9] == 500
    assert codes[10] == 221


def test_pipelined_transaction(gateway, tls_sink, add_domain):
    """RFC 2920: a client may send MAIL, RCPT..., DATA in one write; replies come in order."""
    add_domain("example.com", [tls_sink.address])
    body = message(subject="pipelined").replace(b"\r\n.", b"\r\n..")
    answer = _dialogue(gateway.port, [
        b"EHLO c.test\r\n", b"MAIL FROM:<a@sender.test>\r\n", b"RCPT TO:<alice@example.com>\r\n",
        b"RCPT TO:<unknown@example.com>\r\n", b"RCPT TO:<bob@example.com>\r\n", b"DATA\r\n",
        body, b".\r\n", b"MAIL FROM:<b@sender.test>\r\n", b"RCPT TO:<carol@example.com>\r\n", b"DATA\r\n",
        body, b".\r\n", b"QUIT\r\n"])
    codes = [int(ln[:3]) for ln in answer.decode().split("\r\n") if ln and not ln.startswith("250-")]
    assert codes == [250, 250, 250, 550, 250, 354, 250, 250, 250, 354, 250, 221]
    assert tls_sink.wait_for(2)
    assert tls_sink.messages[0].rcpt_tos == ["alice@example.com", "bob@example.com"]
    assert tls_sink.messages[1].rcpt_tos == ["carol@example.com"]
    # One downstream connection for the session, reused for the second transaction.
    assert tls_sink.connections == 1


def test_starttls_resets_the_session(gateway, tls_sink, add_domain):
    """After STARTTLS the client must EHLO again; an earlier MAIL is forgotten (RFC 3207 4.2)."""
    add_domain("example.com", [tls_sink.address])
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
        c.ehlo()
        c.starttls(context=_insecure())
        code, _ = c.rcpt("alice@example.com")
        assert code == 503


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_no_tls_before_1_2_is_offered(gateway):
    ctx = _insecure()
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
        c.ehlo()
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            c.starttls(context=ctx)


def test_tls12_uses_forward_secret_aead_cipher(gateway):
    ctx = _insecure()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
        c.ehlo()
        c.starttls(context=ctx)
        name, version, bits = c.sock.cipher()
        assert version == "TLSv1.2"
        assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name), name


def test_cbc_only_client_cannot_negotiate(gateway):
    ctx = _insecure()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA:AES256-SHA")
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
        c.ehlo()
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            c.starttls(context=ctx)


def test_smtputf8_transaction(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    body = message(subject="utf8").replace(b"Hello.", "Grüße aus München.".encode())
    out = send(gateway.port, ["jörg@example.com"], body, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    assert out.rcpt["jörg@example.com"][0] == 250
    assert out.data[0] == 250
    assert tls_sink.wait_for(1)
    msg = tls_sink.messages[0]
    assert msg.rcpt_tos == ["jörg@example.com"]
    assert "SMTPUTF8" in msg.mail_options
    assert b"with UTF8SMTPS" in msg.data


def test_non_ascii_address_without_smtputf8_is_refused(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    answer = _dialogue(gateway.port, ["EHLO c\r\nMAIL FROM:<jörg@sender.test>\r\nQUIT\r\n".encode()])
    lines = [ln for ln in answer.decode().split("\r\n") if ln and not ln.startswith("250-")]
    assert lines[1].startswith("553 5.6.7"), lines


# -- parameters after HELO (RFC 5321 3.3, 4.1.1.11; RFC 1869 4.2) ------------------------------

_MAIL_PARAMS = st.lists(st.sampled_from(["SIZE=100", "BODY=8BITMIME", "BODY=7BIT", "SMTPUTF8", "REQUIRETLS",
                                         "FOO=bar", "SIZE=abc", "RET=HDRS", "ENVID=x"]), min_size=1, max_size=3)
_RCPT_PARAMS = st.lists(st.sampled_from(["NOTIFY=NEVER", "ORCPT=rfc822;a@example.com", "FOO=bar", "X"]),
                        min_size=1, max_size=3)


def test_mail_and_rcpt_parameters_after_helo_get_555(gateway, tls_sink, add_domain):
    """After HELO no service extension is in force: any MAIL or RCPT parameter is not recognized
    (555 5.5.4), the same command without parameters is taken, and after EHLO the known ones are."""
    add_domain("example.com", [tls_sink.address])
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
        assert c.helo("client.test")[0] == 250

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(mail=_MAIL_PARAMS, rcpt=_RCPT_PARAMS)
        def check(mail, rcpt):
            code, text = c.docmd("MAIL", "FROM:<a@b.test> " + " ".join(mail))
            assert code == 555 and text.decode().startswith("5.5.4 MAIL FROM parameters not recognized"), text
            assert c.docmd("MAIL", "FROM:<a@b.test>")[0] == 250
            code, text = c.docmd("RCPT", "TO:<alice@example.com> " + " ".join(rcpt))
            assert code == 555 and text.decode().startswith("5.5.4 RCPT TO parameters not recognized"), text
            assert c.rset()[0] == 250

        check()
        # A bad path is still a bad path, whatever follows it.
        assert c.docmd("MAIL", "FROM:<a b@b.test> SIZE=100")[0] == 501
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
        c.ehlo("client.test")
        assert c.docmd("MAIL", "FROM:<a@b.test> SIZE=100 BODY=8BITMIME")[0] == 250
        assert c.docmd("RCPT", "TO:<alice@example.com> FOO=bar")[0] == 555


def test_requiretls_after_helo_inside_tls_is_not_in_force(gateway, tls_sink, add_domain):
    """REQUIRETLS is a service extension (RFC 8689): after STARTTLS and HELO (not EHLO) it is a
    parameter like any other, 555 5.5.4, not a message quietly marked REQUIRETLS."""
    add_domain("example.com", [tls_sink.address])
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
        c.starttls(context=ctx)
        assert c.helo("client.test")[0] == 250
        code, text = c.docmd("MAIL", "FROM:<a@b.test> REQUIRETLS")
        assert code == 555 and b"after HELO" in text, text
        c.ehlo("client.test")
        assert c.docmd("MAIL", "FROM:<a@b.test> REQUIRETLS")[0] == 250
