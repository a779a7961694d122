"""Real MTAs on both sides: swaks and Postfix as senders, Postfix as the downstream server."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

from pathlib import Path

import pytest

from tests.support.postfix import PostfixInstance


def swaks(port: int, to: str, *extra: str) -> subprocess.CompletedProcess:
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed; run scripts/install-peers.sh as root")
    return subprocess.run(["swaks", "-s", "127.0.0.1", "-p", str(port), "-f", "sender@sender.test", "-t", to,
                           "--h-Subject", "swaks test", "--body", "Hello from swaks", "--timeout", "20", *extra],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("tls", [True, False])
def test_swaks_sender(gateway, tls_sink, add_domain, tls):
    add_domain("example.com", [tls_sink.address], downstream_tls="required")
    proc = swaks(gateway.port, "alice@example.com", *(["-tls"] if tls else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if tls:
        assert "TLS started with cipher TLSv1." in proc.stdout
    assert ("<~  250 2.0.0 Ok: queued as" if tls else "<-  250 2.0.0 Ok: queued as") in proc.stdout
    assert tls_sink.wait_for(1)
    received = tls_sink.messages[0].data
    assert (b"with ESMTPS" if tls else b"with ESMTP id") in received
    assert tls_sink.messages[0].tls, "the downstream hop is TLS whatever the sender did"


def test_swaks_quit_after_rcpt_relay_denied(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    proc = swaks(gateway.port, "someone@notours.test", "-tls")
    assert "<~* 550 5.7.1 Relay access denied" in proc.stdout, proc.stdout
    assert proc.returncode != 0


def test_swaks_verifies_the_gateway_certificate(gateway, tls_sink, add_domain, data_dir):
    add_domain("example.com", [tls_sink.address])
    proc = swaks(gateway.port, "alice@example.com", "-tls", "--tls-verify", "--tls-ca-path",
                 str(data_dir / "tls" / "cert.pem"), "--tls-sni", "mx.gw.test", "--quit-after", "tls")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def postfix_sender(gateway):
    """A private Postfix that relays everything to the gateway and insists on TLS for that hop."""
    pf = PostfixInstance(Path(tempfile.mkdtemp(prefix="mxguard-pf-")), f"127.0.0.1:{gateway.port}",
                         smtp_tls_level="encrypt").start()
    yield pf
    pf.stop()


def test_postfix_relays_through_the_gateway_over_tls(gateway, tls_sink, add_domain, postfix_sender, ca_file):
    add_domain("example.com", [tls_sink.address], downstream_tls="verify", tls_ca_file=str(ca_file))
    proc = swaks(postfix_sender.port, "alice@example.com")
    assert proc.returncode == 0, proc.stdout
    assert tls_sink.wait_for(1, timeout=30), postfix_sender.log_text()[-2000:]
    log = postfix_sender.wait_log("status=sent")
    assert "TLS connection established to 127.0.0.1" in log
    assert "status=sent (250 2.0.0 Ok: queued as S00001)" in log
    msg = tls_sink.messages[0]
    assert msg.tls and msg.mail_from == "sender@sender.test"
    assert b"from relay.postfix.test ([127.0.0.1])" in msg.data and b"with ESMTPS" in msg.data
    rec = gateway.wait_records(1)[-1]
    assert rec.helo == "relay.postfix.test" and rec.inbound_tls and rec.downstream_verified


def test_postfix_gets_real_time_recipient_validation(gateway, tls_sink, add_domain, postfix_sender):
    add_domain("example.com", [tls_sink.address])
    swaks(postfix_sender.port, "unknown-user@example.com")
    log = postfix_sender.wait_log("status=bounced")
    assert "550 5.1.1" in log and "User unknown" in log


@pytest.fixture
def postfix_downstream(tls_sink, downstream_cert, tmp_path):
    """A real Postfix as the organization's mail server, offering STARTTLS and relaying to the sink."""
    cert, key = tmp_path / "pf-cert.pem", tmp_path / "pf-key.pem"
    downstream_cert.private_key_and_cert_chain_pem.write_to_path(str(cert))
    downstream_cert.private_key_pem.write_to_path(str(key))
    pf = PostfixInstance(Path(tempfile.mkdtemp(prefix="mxguard-pfd-")), tls_sink.address,
                         cert_file=cert, key_file=key, smtp_tls_level="may",
                         extra={"relay_domains": "example.com"}).start()
    yield pf
    pf.stop()


def test_gateway_delivers_to_postfix_over_verified_tls(gateway, tls_sink, add_domain, postfix_downstream, ca_file):
    add_domain("example.com", [f"127.0.0.1:{postfix_downstream.port}"], downstream_tls="verify",
               tls_ca_file=str(ca_file))
    from tests.support.smtp import send
    out = send(gateway.port, ["alice@example.com"])
    assert out.data[0] == 250 and "queued as" in out.data[1], out.data
    log = postfix_downstream.wait_log("status=sent")
    assert "TLS connection established from" in log
    assert tls_sink.wait_for(1, timeout=30)
    assert b"by mx.gw.test (mxguard)" in tls_sink.messages[0].data
    rec = gateway.wait_records(1)[-1]
    assert rec.downstream_verified and rec.downstream_tls_version in ("TLSv1.2", "TLSv1.3")
