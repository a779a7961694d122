"""A STARTTLS-stripping man in the middle between mxguard and the downstream server."""

from __future__ import annotations

import time

import pytest

from tests.support.mitm import StarttlsStripper
from tests.support.smtp import send


@pytest.mark.parametrize("mode", ["required", "verify"])
def test_stripped_starttls_defers_mandatory_domains(gateway, tls_sink, add_domain, ca_file, mode):
    with StarttlsStripper(("127.0.0.1", tls_sink.port)) as mitm:
        extra = {"tls_ca_file": str(ca_file)} if mode == "verify" else {}
        add_domain("example.com", [f"127.0.0.1:{mitm.port}"], downstream_tls=mode, on_unreachable="defer", **extra)
        out = send(gateway.port, ["alice@example.com"])
        code, text = out.rcpt["alice@example.com"]
        assert code == 451 and text.startswith("4.7.5")
        time.sleep(0.3)
        assert mitm.stripped >= 1
        assert tls_sink.messages == [], "nothing was sent in clear"
        rec = gateway.wait_records(1)[-1]
        assert "STARTTLS not offered" in rec.downstream[0]["failure"]


def test_stripped_starttls_with_opportunistic_delivers_in_clear_and_logs_it(gateway, tls_sink, add_domain):
    with StarttlsStripper(("127.0.0.1", tls_sink.port)) as mitm:
        add_domain("example.com", [f"127.0.0.1:{mitm.port}"], downstream_tls="opportunistic")
        assert send(gateway.port, ["alice@example.com"]).data[0] == 250
        assert tls_sink.wait_for(1)
        assert tls_sink.messages[0].tls_version is None
        rec = gateway.wait_records(1)[-1]
        assert rec.downstream_tls is False
        assert rec.downstream[0]["starttls_offered"] is False
