"""The spool: accept-and-hold when the route is down, sealed at rest, delivered when it is back."""

from __future__ import annotations

import email
import socket
import sqlite3
import time
from email import policy

import pytest

from mxguard.sink import ThreadedSink
from mxguard.spool import queue
from tests.conftest import FAST_SPOOL
from tests.support.smtp import message, send


@pytest.fixture
def gateway_overrides():
    return dict(FAST_SPOOL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _held(gateway):
    return gateway.run(queue.list_entries(gateway.store))


def test_down_then_up_is_delivered_over_tls_byte_identical(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address], downstream_tls="required")
    tls_sink.pause()
    body = message(subject="held while down")
    out = send(gateway.port, ["alice@example.com", "bob@example.com"], body)
    assert out.rcpt["alice@example.com"] == (250, "2.1.5 Recipient ok; the downstream server is unavailable, "
                                                  "the message will be held and delivered later")
    assert out.data[0] == 250 and "held for delivery" in out.data[1]
    held = _held(gateway)
    assert len(held) == 1 and [r["rcpt"] for r in held[0].recipients] == ["alice@example.com", "bob@example.com"]
    assert gateway.wait_records(1)[-1].disposition == "spooled"
    time.sleep(1.0)  # a retry happens while it is still down
    assert gateway.run(queue.get_entry(gateway.store, held[0].id))[0].attempts >= 1
    tls_sink.resume()
    assert tls_sink.wait_for(1, timeout=5), "delivered within one retry interval"
    got = tls_sink.messages[0]
    assert got.tls and got.rcpt_tos == ["alice@example.com", "bob@example.com"]
    assert got.data.endswith(body) and got.data.startswith(b"Received: from client.sender.test")
    deadline = time.monotonic() + 5
    while _held(gateway) and time.monotonic() < deadline:
        time.sleep(0.05)
    entry, attempts = gateway.run(queue.get_entry(gateway.store, held[0].id))
    assert entry.status == "delivered"
    assert attempts[-1].tls and attempts[-1].server == tls_sink.address and attempts[-1].reply.count("250") == 2
    assert any("connect failed" in a.reply or "unreachable" in a.reply for a in attempts[:-1])


def test_required_tls_route_back_without_starttls_stays_held(gateway, add_domain):
    port = _free_port()
    add_domain("example.com", [f"127.0.0.1:{port}"], downstream_tls="required")
    out = send(gateway.port, ["alice@example.com"])
    assert out.data[0] == 250
    with ThreadedSink(port=port) as plain:  # comes back, but without STARTTLS
        time.sleep(2.0)
        assert plain.messages == [], "never sent in clear"
        held = _held(gateway)
        assert len(held) == 1 and held[0].attempts >= 2
        assert "4.7.5" in held[0].last_reply


def test_downstream_4xx_after_data_is_spooled(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    tls_sink.data_reply = "451 4.3.0 Queue full, try later"
    out = send(gateway.port, ["alice@example.com"])
    assert out.data[0] == 250
    assert gateway.wait_records(1)[-1].disposition == "spooled"
    tls_sink.data_reply = None
    assert tls_sink.wait_for(1, timeout=5)


def test_one_route_delivered_other_held(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    port = _free_port()
    add_domain("down.example", [f"127.0.0.1:{port}"])
    out = send(gateway.port, ["alice@example.com", "bob@down.example"])
    assert out.rcpt["bob@down.example"][0] == 250
    assert out.data[0] == 250
    rec = gateway.wait_records(1)[-1]
    assert rec.disposition == "partial"
    assert {r["rcpt"]: r["disposition"] for r in rec.results} == {"alice@example.com": "delivered",
                                                                 "bob@down.example": "spooled"}
    with ThreadedSink(port=port) as late:
        assert late.wait_for(1, timeout=5) and late.messages[0].rcpt_tos == ["bob@down.example"]


def test_defer_domain_keeps_451(gateway, add_domain):
    add_domain("example.com", [f"127.0.0.1:{_free_port()}"], on_unreachable="defer")
    out = send(gateway.port, ["alice@example.com"])
    assert out.rcpt["alice@example.com"][0] == 451
    assert _held(gateway) == []


def test_body_is_sealed_at_rest_and_a_wrong_key_is_a_clear_error(gateway, add_domain, data_dir):
    from mxguard.storage.sealing import Sealer, SealingError, create_key_file
    add_domain("example.com", [f"127.0.0.1:{_free_port()}"])
    marker = "PLAINTEXT-MARKER-7c1f2a"
    send(gateway.port, ["alice@example.com"], message(subject="sealing check", body=marker * 20))
    held = _held(gateway)
    assert held
    gateway.run(gateway.gateway.store.engine.dispose())
    raw = b""
    for name in ("mxguard.db", "mxguard.db-wal"):
        path = data_dir / name
        if path.exists():
            raw += path.read_bytes()
    assert marker.encode() not in raw, "the body must not be readable in the database file"
    conn = sqlite3.connect(data_dir / "mxguard.db")
    blob, key_id, txn = conn.execute("SELECT body, key_id, txn_id FROM spool").fetchone()
    conn.close()
    assert blob.startswith(b"MXS1") and marker.encode() not in blob
    assert Sealer.from_file(data_dir / "keys" / "sealing.keys").open(blob, queue.seal_context(txn)).count(
        marker.encode()) >= 20
    other = data_dir / "other.keys"
    create_key_file(other)
    with pytest.raises(SealingError, match="not in the key file"):
        Sealer.from_file(other).open(blob, queue.seal_context(txn))


def test_downstream_5xx_on_retry_gives_a_dsn_only_to_authenticated_senders(gateway, tls_sink, add_domain):
    """A DSN is a real multipart/report; a sender without SPF/DKIM alignment gets none."""
    from mxguard.config import load_settings  # noqa: F401
    with ThreadedSink() as dsn_sink:
        gateway.settings.dsn.relay = dsn_sink.address
        add_domain("example.com", [tls_sink.address])
        tls_sink.reject_marker = b"REFUSE-ME"
        aligned, forged = [queue.NewSpoolEntry(
            txn_id=f"T{i}", domain="example.com", mail_from=f"{who}@sender.test", recipients=["alice@example.com"],
            message=message(subject=f"REFUSE-ME {who}"), sender_aligned=(who == "good"), due_now=True)
            for i, who in enumerate(("good", "forged"))]
        gateway.run(queue.enqueue(gateway.store, [aligned, forged], gateway.gateway.keyring.get(),
                                  gateway.settings.spool))
        assert dsn_sink.wait_for(1, timeout=5)
        time.sleep(1.0)
        assert len(dsn_sink.messages) == 1, "no DSN to the forged sender"
        dsn = dsn_sink.messages[0]
        assert dsn.mail_from == "<>" and dsn.rcpt_tos == ["good@sender.test"]  # null reverse-path
        parsed = email.message_from_bytes(dsn.data, policy=policy.default)
        assert parsed.get_content_type() == "multipart/report"
        assert parsed.get_param("report-type") == "delivery-status"
        parts = list(parsed.iter_parts())
        assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status",
                                                         "text/rfc822-headers"]
        fields = [dict(b.items()) for b in parts[1].get_payload()]
        assert fields[0]["Reporting-MTA"] == "dns; mx.gw.test"
        assert fields[1]["Final-Recipient"] == "rfc822; alice@example.com"
        assert fields[1]["Action"] == "failed" and fields[1]["Status"] == "5.7.1"
        assert "554 5.7.1" in fields[1]["Diagnostic-Code"]
        assert "REFUSE-ME good" in parts[2].get_content()
        statuses = {e.mail_from: e.status for e in gateway.run(queue.list_entries(gateway.store, status=None))}
        assert statuses["good@sender.test"] == "failed" and statuses["forged@sender.test"] == "failed"


def test_expiry_gives_a_dsn(gateway, add_domain):
    with ThreadedSink() as dsn_sink:
        gateway.settings.dsn.relay = dsn_sink.address
        add_domain("example.com", [f"127.0.0.1:{_free_port()}"])
        entry = queue.NewSpoolEntry(txn_id="EXP1", domain="example.com", mail_from="good@sender.test",
                                    recipients=["alice@example.com"], message=message(subject="too old"),
                                    sender_aligned=True, due_now=True)
        gateway.settings.spool.max_age = 0.5
        gateway.run(queue.enqueue(gateway.store, [entry], gateway.gateway.keyring.get(), gateway.settings.spool))
        assert dsn_sink.wait_for(1, timeout=8)
        parsed = email.message_from_bytes(dsn_sink.messages[0].data, policy=policy.default)
        fields = [dict(b.items()) for b in list(parsed.iter_parts())[1].get_payload()]
        assert fields[1]["Status"] == "4.4.7"
        assert "maximum holding time" in list(parsed.iter_parts())[0].get_content()
        old = [e for e in gateway.run(queue.list_entries(gateway.store, status=None)) if e.txn_id == "EXP1"]
        assert old[0].status == "expired"


def test_backoff_is_exponential_capped_with_jitter():
    import random

    from mxguard.config import SpoolSettings
    s = SpoolSettings()
    rng = random.Random(1)
    waits = [queue.backoff(n, s, rng) for n in range(1, 10)]
    assert 54 <= waits[0] <= 66 and 108 <= waits[1] <= 132
    assert all(w <= 3600 * 1.1 for w in waits) and waits[-1] >= 3600 * 0.9


async def test_external_route_relay_mx_and_missing_domains(loopback_dns):
    """Where DSNs and notifications to domains the gateway does not serve go (RFC 5321 5.1)."""
    from mxguard.smtp.routing import external_route
    from mxguard.tls.policy import DownstreamTls
    relayed = await external_route("anything.test", relay="127.0.0.1:2526")
    assert relayed.servers == (("127.0.0.1", 2526),) and relayed.tls is DownstreamTls.OPPORTUNISTIC
    implicit = await external_route("pass.test", nameservers=[loopback_dns.address])
    assert implicit.servers == (("pass.test", 25),), "no MX record: the domain itself (implicit MX)"
    assert await external_route("no-such-domain.invalid", nameservers=[loopback_dns.address]) is None
