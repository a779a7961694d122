"""Each downstream TLS mode against real downstream servers; what the downstream side saw is checked."""

from __future__ import annotations

import time

import pytest

from mxguard.tls.certs import describe
from tests.support.smtp import send


def _deliver(gateway, rcpt="alice@example.com"):
    return send(gateway.port, [rcpt])


@pytest.mark.parametrize("mode", ["opportunistic", "required"])
def test_tls_offered_is_used(gateway, tls_sink, add_domain, mode):
    add_domain("example.com", [tls_sink.address], downstream_tls=mode)
    out = _deliver(gateway)
    assert out.data[0] == 250
    assert tls_sink.wait_for(1)
    assert tls_sink.messages[0].tls_version in ("TLSv1.2", "TLSv1.3")
    rec = gateway.wait_records(1)[-1]
    assert rec.downstream_tls is True and rec.downstream_verified is False
    assert rec.downstream_cipher


def test_verify_with_ca_file_delivers_verified(gateway, tls_sink, add_domain, ca_file, downstream_cert):
    from cryptography import x509
    add_domain("example.com", [tls_sink.address], downstream_tls="verify", tls_ca_file=str(ca_file))
    out = _deliver(gateway)
    assert out.data[0] == 250
    assert tls_sink.wait_for(1) and tls_sink.messages[0].tls
    rec = gateway.wait_records(1)[-1]
    assert rec.downstream_verified is True
    leaf = x509.load_pem_x509_certificate(downstream_cert.cert_chain_pems[0].bytes())
    assert rec.downstream[0]["cert_sha256"] == describe(leaf).sha256


def test_off_sends_in_clear_even_when_tls_is_offered(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address], downstream_tls="off")
    assert _deliver(gateway).data[0] == 250
    assert tls_sink.wait_for(1) and tls_sink.messages[0].tls_version is None
    assert gateway.wait_records(1)[-1].downstream_tls is False


def test_opportunistic_without_starttls_delivers_in_clear(gateway, plain_sink, add_domain):
    add_domain("example.com", [plain_sink.address], downstream_tls="opportunistic")
    assert _deliver(gateway).data[0] == 250
    assert plain_sink.wait_for(1) and plain_sink.messages[0].tls_version is None
    assert gateway.wait_records(1)[-1].downstream_tls is False


@pytest.mark.parametrize("mode", ["required", "verify"])
def test_mandatory_tls_without_starttls_defers_and_sends_nothing(gateway, plain_sink, add_domain, mode):
    add_domain("example.com", [plain_sink.address], downstream_tls=mode)
    out = _deliver(gateway)
    code, text = out.rcpt["alice@example.com"]
    assert code == 451 and text.startswith("4.7.")
    assert "TLS" in text
    time.sleep(0.3)
    assert plain_sink.messages == [], "nothing may be sent in clear"
    rec = gateway.wait_records(1)[-1]
    assert rec.disposition == "deferred"
    assert "STARTTLS not offered" in rec.downstream[0]["failure"]
    assert rec.downstream[0]["tls_rpt"] == {plain_sink.address: "starttls-not-supported"}  # RFC 8460 4.3


def test_required_accepts_a_self_signed_certificate(gateway, self_signed_sink, add_domain):
    add_domain("example.com", [self_signed_sink.address], downstream_tls="required")
    assert _deliver(gateway).data[0] == 250
    assert self_signed_sink.wait_for(1) and self_signed_sink.messages[0].tls


def test_verify_refuses_a_self_signed_certificate(gateway, self_signed_sink, add_domain):
    add_domain("example.com", [self_signed_sink.address], downstream_tls="verify")
    out = _deliver(gateway)
    code, text = out.rcpt["alice@example.com"]
    assert code == 451 and text.startswith("4.7.5")
    time.sleep(0.3)
    assert self_signed_sink.messages == []
    assert "certificate not verified" in gateway.wait_records(1)[-1].downstream[0]["failure"]
    assert gateway.wait_records(1)[-1].downstream[0]["tls_rpt"] == {self_signed_sink.address: "certificate-not-trusted"}


def test_verify_refuses_a_certificate_for_the_wrong_name(gateway, wrong_name_sink, add_domain, ca_file):
    add_domain("example.com", [wrong_name_sink.address], downstream_tls="verify", tls_ca_file=str(ca_file))
    out = _deliver(gateway)
    assert out.rcpt["alice@example.com"][0] == 451
    time.sleep(0.3)
    assert wrong_name_sink.messages == []
    failure = gateway.wait_records(1)[-1].downstream[0]["failure"]
    assert "certificate not verified" in failure and ("mismatch" in failure or "match" in failure)
    tls_rpt = gateway.wait_records(1)[-1].downstream[0]["tls_rpt"]
    assert tls_rpt == {wrong_name_sink.address: "certificate-host-mismatch"}


def test_verify_by_pinned_fingerprint(gateway, self_signed_sink, add_domain):
    from cryptography import x509
    fp = describe(x509.load_pem_x509_certificate(self_signed_sink.cert_pem)).sha256
    add_domain("example.com", [self_signed_sink.address], downstream_tls="verify",
               tls_fingerprint=":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper())
    assert _deliver(gateway).data[0] == 250
    assert self_signed_sink.wait_for(1) and self_signed_sink.messages[0].tls
    assert gateway.wait_records(1)[-1].downstream_verified is True


def test_verify_with_a_wrong_pin_defers(gateway, self_signed_sink, add_domain):
    add_domain("example.com", [self_signed_sink.address], downstream_tls="verify", tls_fingerprint="ab" * 32)
    out = _deliver(gateway)
    assert out.rcpt["alice@example.com"][0] == 451
    time.sleep(0.3)
    assert self_signed_sink.messages == []
    assert "fingerprint" in gateway.wait_records(1)[-1].downstream[0]["failure"]


def test_minimum_tls_version_1_3(gateway, add_domain, downstream_cert):
    import ssl

    from mxguard.sink import ThreadedSink
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    downstream_cert.configure_cert(ctx)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with ThreadedSink(tls_context=ctx) as old_sink:
        add_domain("example.com", [old_sink.address], downstream_tls="required", tls_min_version="1.3")
        out = _deliver(gateway)
        assert out.rcpt["alice@example.com"][0] == 451
        time.sleep(0.3)
        assert old_sink.messages == []


def test_a_policy_change_applies_to_the_next_transaction(gateway, plain_sink, add_domain):
    from mxguard.services.domains import update_domain
    add_domain("example.com", [plain_sink.address], downstream_tls="opportunistic")
    assert _deliver(gateway).data[0] == 250
    gateway.run(update_domain(gateway.store, "example.com", downstream_tls="required"))
    gateway.reload()
    assert _deliver(gateway).rcpt["alice@example.com"][0] == 451
    assert len(plain_sink.messages) == 1
