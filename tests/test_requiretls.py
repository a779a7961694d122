"""REQUIRETLS (RFC 8689): offered inside TLS only, and honoured at every hop the gateway makes.

A message whose MAIL carried REQUIRETLS goes only over TLS verified by PKIX
(the domain's ``verify`` mode, or MTA-STS/DANE) to a server that itself
offers REQUIRETLS; otherwise ``550 5.7.10`` in line, or a failed spool entry
(and a DSN) with ``5.7.10``. Real sinks on loopback, smtplib as the sender.
"""

from __future__ import annotations

import email
import smtplib
import socket
import ssl
import time
from email import policy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxguard.sink import ThreadedSink
from mxguard.spool import queue
from tests.conftest import FAST_SPOOL, _server_ctx
from tests.support.smtp import message


@pytest.fixture
def gateway_overrides():
    return dict(FAST_SPOOL)


def _client_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(port: int, rcpt: str, data: bytes, *, requiretls: bool = True) -> dict:
    """One REQUIRETLS transaction over STARTTLS; every reply recorded."""
    out: dict = {}
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.sender.test", timeout=30) as client:
        client.ehlo()
        out["ehlo_clear"] = client.esmtp_features.copy()
        client.starttls(context=_client_ctx())
        client.ehlo()
        out["ehlo_tls"] = client.esmtp_features.copy()
        out["mail"] = client.mail("alice@sender.test", ["REQUIRETLS"] if requiretls else [])
        out["rcpt"] = client.rcpt(rcpt)
        if out["rcpt"][0] == 250:
            out["data"] = client.data(data)
        else:
            client.rset()
    return out


def test_requiretls_is_offered_only_after_starttls(gateway):
    with smtplib.SMTP("127.0.0.1", gateway.port, local_hostname="client.sender.test", timeout=30) as client:
        client.ehlo()
        assert "requiretls" not in client.esmtp_features
        code, text = client.mail("alice@sender.test", ["REQUIRETLS"])
        assert (code, text.decode()[:5]) == (555, "5.5.4")
        client.starttls(context=_client_ctx())
        client.ehlo()
        assert "requiretls" in client.esmtp_features


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(spelling=st.sampled_from(["REQUIRETLS", "requiretls", "RequireTLS", "rEqUiReTlS"]),
       before=st.sampled_from(["", "BODY=8BITMIME ", "SIZE=100 "]))
def test_requiretls_in_clear_is_refused_however_spelt(gateway, spelling, before):
    """Any case, any place among the parameters: never accepted outside TLS (RFC 8689 4.1)."""
    with smtplib.SMTP("127.0.0.1", gateway.port, local_hostname="client.sender.test", timeout=30) as client:
        client.ehlo()
        code, text = client.docmd("MAIL", f"FROM:<alice@sender.test> {before}{spelling}")
        assert code == 555 and text.decode().startswith("5.5.4"), text
        assert client.docmd("MAIL", "FROM:<alice@sender.test>")[0] == 250  # the session goes on


def test_the_word_inside_a_quoted_local_part_is_not_the_parameter(gateway):
    with smtplib.SMTP("127.0.0.1", gateway.port, local_hostname="client.sender.test", timeout=30) as client:
        client.ehlo()
        code, text = client.docmd("MAIL", 'FROM:<"a REQUIRETLS b"@sender.test>')
        assert code != 555, text


def test_verified_route_offering_requiretls_gets_it(gateway, add_domain, ca_file, downstream_cert):
    with ThreadedSink(tls_context=_server_ctx(downstream_cert), offer_requiretls=True) as sink:
        add_domain("example.com", [sink.address], downstream_tls="verify", tls_ca_file=str(ca_file))
        out = _send(gateway.port, "bob@example.com", message(to="bob@example.com"))
        assert out["mail"][0] == 250 and out["rcpt"][0] == 250 and out["data"][0] == 250, out
        assert sink.wait_for(1, timeout=5)
        got = sink.messages[0]
        assert got.tls and "REQUIRETLS" in got.mail_options


@pytest.mark.parametrize("case", ["no-requiretls-downstream", "unverified-tls"])
def test_in_line_refusal_is_550_5_7_10_and_nothing_is_sent(gateway, add_domain, ca_file, downstream_cert, case):
    offer = case == "unverified-tls"
    with ThreadedSink(tls_context=_server_ctx(downstream_cert), offer_requiretls=offer) as sink:
        mode = {"downstream_tls": "verify", "tls_ca_file": str(ca_file)} if offer is False else \
            {"downstream_tls": "opportunistic"}  # TLS, but the chain is not checked
        add_domain("example.com", [sink.address], **mode)
        out = _send(gateway.port, "bob@example.com", message(to="bob@example.com"))
        code, text = out["rcpt"]
        assert code == 550 and text.decode().startswith("5.7.10"), out
        # Without REQUIRETLS the same route takes the message: the refusal is REQUIRETLS's.
        plain = _send(gateway.port, "bob@example.com", message(to="bob@example.com"), requiretls=False)
        assert plain["data"][0] == 250
        assert sink.wait_for(1, timeout=5) and len(sink.messages) == 1
        assert "REQUIRETLS" not in sink.messages[0].mail_options
    record = [r for r in gateway.records if "5.7.10" in str(r.results)]
    assert record, "the refusal is in the message log"


def test_spooled_requiretls_message_is_never_sent_without_it(gateway, add_domain, ca_file, downstream_cert):
    """Down at RCPT, held; back without REQUIRETLS: failed with 5.7.10, the message not sent."""
    port = _free_port()
    add_domain("example.com", [f"127.0.0.1:{port}"], downstream_tls="verify", tls_ca_file=str(ca_file))
    out = _send(gateway.port, "bob@example.com", message(to="bob@example.com", subject="hold me"))
    assert out["rcpt"][0] == 250 and out["data"][0] == 250
    held = gateway.run(queue.list_entries(gateway.store))
    assert len(held) == 1 and held[0].requiretls
    with ThreadedSink(port=port, tls_context=_server_ctx(downstream_cert)) as sink:
        deadline = time.monotonic() + 10
        entry = None
        while time.monotonic() < deadline:
            entry, _ = gateway.run(queue.get_entry(gateway.store, held[0].id))
            if entry.status != "queued":
                break
            time.sleep(0.1)
        assert entry is not None and entry.status == "failed", entry.status
        assert "5.7.10" in entry.last_reply
        assert sink.messages == []


def test_spooled_requiretls_message_goes_with_it(gateway, add_domain, ca_file, downstream_cert):
    port = _free_port()
    add_domain("example.com", [f"127.0.0.1:{port}"], downstream_tls="verify", tls_ca_file=str(ca_file))
    out = _send(gateway.port, "bob@example.com", message(to="bob@example.com", subject="hold me too"))
    assert out["data"][0] == 250
    with ThreadedSink(port=port, tls_context=_server_ctx(downstream_cert), offer_requiretls=True) as sink:
        assert sink.wait_for(1, timeout=10)
        got = sink.messages[0]
        assert got.tls and "REQUIRETLS" in got.mail_options
        parsed = email.message_from_bytes(got.data, policy=policy.default)
        assert parsed["Subject"] == "hold me too"


@pytest.mark.parametrize("offer", [False, True])
def test_a_released_requiretls_message_keeps_its_requirement(gateway, add_domain, ca_file, downstream_cert,
                                                             data_dir, offer):
    """Held as junk while the route offered REQUIRETLS, released by the operator after the server
    changed: the release is a hop too (RFC 8689 4.2), refused with 5.7.10 unless still offered."""
    from mxguard.quarantine.store import list_quarantine
    from tests.support import mail
    from tests.test_cli_filters import mx
    port = _free_port()
    add_domain("example.com", [f"127.0.0.1:{port}"], downstream_tls="verify", tls_ca_file=str(ca_file))
    with ThreadedSink(port=port, tls_context=_server_ctx(downstream_cert), offer_requiretls=True):
        out = _send(gateway.port, "bob@example.com", mail.crlf(mail.gtube()))
        assert out["data"][0] == 250, out
    rows = gateway.run(list_quarantine(gateway.store))
    assert len(rows) == 1 and rows[0].requiretls
    with ThreadedSink(port=port, tls_context=_server_ctx(downstream_cert), offer_requiretls=offer) as sink:
        released = mx(data_dir, "quarantine", "release", rows[0].id)
        if offer:
            assert released.returncode == 0, released.stderr
            assert sink.wait_for(1, timeout=5) and "REQUIRETLS" in sink.messages[0].mail_options
        else:
            assert released.returncode != 0 and "5.7.10" in released.stdout + released.stderr, released
            assert sink.messages == []


@pytest.mark.parametrize("header, requiretls, delivered", [
    (b"TLS-Required: No\r\n", False, True),
    (b"tls-required:   no  \r\n", False, True),
    (b"", False, False),
    (b"TLS-Required: Yes\r\n", False, False),
    (b"TLS-Required: No\r\n", True, False),  # REQUIRETLS wins: the header is ignored (RFC 8689 5)
])
def test_tls_required_no_relaxes_only_the_published_policy(gateway, add_domain, plain_sink, header, requiretls,
                                                            delivered):
    """A ``dane-only`` route to a server given as an address has no usable TLSA: nothing goes, unless
    the sender said ``TLS-Required: No``; then STARTTLS when offered (here: none) and plain SMTP."""
    add_domain("example.com", [plain_sink.address], downstream_tls="dane-only")
    entry = queue.NewSpoolEntry(txn_id="TLSNO", domain="example.com", mail_from="a@sender.test",
                                recipients=["bob@example.com"], message=header + message(to="bob@example.com"),
                                requiretls=requiretls, due_now=True)
    gateway.run(queue.enqueue(gateway.store, [entry], gateway.gateway.keyring.get(), gateway.settings.spool))
    if delivered:
        assert plain_sink.wait_for(1, timeout=5)
    else:
        time.sleep(1.5)  # several retry rounds (FAST_SPOOL)
        assert plain_sink.messages == []
        (held,) = gateway.run(queue.list_entries(gateway.store))
        assert "4.7.5" in held.last_reply or "5.7.10" in held.last_reply, held.last_reply


def test_an_administrators_required_mode_is_not_relaxed_by_the_header(gateway, add_domain, plain_sink):
    add_domain("example.com", [plain_sink.address], downstream_tls="required")
    entry = queue.NewSpoolEntry(txn_id="TLSNO2", domain="example.com", mail_from="a@sender.test",
                                recipients=["bob@example.com"],
                                message=b"TLS-Required: No\r\n" + message(to="bob@example.com"), due_now=True)
    gateway.run(queue.enqueue(gateway.store, [entry], gateway.gateway.keyring.get(), gateway.settings.spool))
    time.sleep(1.5)
    assert plain_sink.messages == []
