"""Faults: the downstream dies mid-DATA; the database is unavailable for a while; clamd is killed
mid-scan. Nothing accepted is lost, nothing is delivered unscanned."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from mxguard.config import load_settings
from mxguard.services.domains import add_domain
from mxguard.spool import queue
from tests.conftest import FAST_SPOOL, apply_overrides, gateway_environ
from tests.support.gateway import ThreadedGateway, init_data_dir
from tests.support.postgres import PostgresCluster
from tests.support.smtp import message, send


@pytest.fixture
def gateway_overrides():
    return dict(FAST_SPOOL)


def test_downstream_dies_mid_data_the_message_is_spooled_and_delivered_once(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    tls_sink.die_at_data = True
    out = send(gateway.port, ["alice@example.com"], message(subject="mid-data"))
    assert out.data[0] == 250, out.data
    assert gateway.wait_records(1)[-1].disposition == "spooled"
    assert tls_sink.messages == []
    tls_sink.die_at_data = False
    assert tls_sink.wait_for(1, timeout=5)
    time.sleep(1.0)
    assert len(tls_sink.messages) == 1


@pytest.fixture
def own_postgres():
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="mxguard-pgf-"))).start()
    yield cluster
    cluster.stop()


def test_database_unavailable_for_ten_seconds(tmp_path, own_postgres, tls_sink, loopback_dns):
    url = own_postgres.create_database()
    data_dir = tmp_path / "data"
    init_data_dir(data_dir, database_url=url)
    settings = load_settings(data_dir, environ=gateway_environ(loopback_dns))
    apply_overrides(settings, FAST_SPOOL)
    gw = ThreadedGateway(settings).start()
    try:
        gw.run(add_domain(gw.store, "example.com", [tls_sink.address]))
        gw.reload()
        own_postgres.pause()
        outage_started = time.monotonic()
        # Downstream up: mail needs no database on its way through; it still flows.
        assert send(gw.port, ["alice@example.com"], message(subject="during outage")).data[0] == 250
        assert tls_sink.wait_for(1)
        # Downstream down too: nothing can be stored, so the sender must keep the message.
        tls_sink.pause()
        out = send(gw.port, ["alice@example.com"], message(subject="cannot be stored"))
        assert out.data[0] == 451 and out.data[1].startswith("4.3.0"), out.data
        time.sleep(max(0.0, 10 - (time.monotonic() - outage_started)))
        own_postgres.resume()
        # Back: the same message is now accepted and held, then delivered.
        out = send(gw.port, ["alice@example.com"], message(subject="cannot be stored"))
        assert out.data[0] == 250, out.data
        held = gw.run(queue.list_entries(gw.store))
        assert len(held) == 1
        tls_sink.resume()
        assert tls_sink.wait_for(2, timeout=10)
        # The message-log records made during the outage were kept and written afterwards.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                gw.flush_log()
                break
            except Exception:  # noqa: BLE001 - retry until the pool has reconnected
                time.sleep(0.5)
        from mxguard.storage.messagelog import recent
        # The SMTP side's records; the spool worker's completion record ("spool") may or may not
        # have been written yet, depending on how soon the delivery is recorded.
        rows = [r for r in gw.run(recent(gw.store, 10)) if r.client_ip != "spool"]
        subjects = [r.subject for r in rows]
        assert "during outage" in subjects and subjects.count("cannot be stored") == 2
        assert {r.disposition for r in rows if r.subject == "cannot be stored" and r.client_ip != "spool"} == {
            "deferred", "spooled"}
    finally:
        gw.stop()


def _established(port: int) -> int:
    """How many local sockets have an ESTABLISHED connection to ``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


def test_clamd_killed_mid_scan_defers_and_the_retry_is_delivered(tmp_path, loopback_dns, clamd, tls_sink):
    """clamd dies (SIGKILL) while it scans a large message: the sender gets 451 4.3.0, nothing is
    delivered unscanned, and the sender's retry once clamd is back goes through."""
    import os
    import threading

    from tests.support import mail

    init_data_dir(tmp_path / "data")
    env = gateway_environ(loopback_dns, MXGUARD_FILTERS__VIRUS_ENGINES="clamd",
                          MXGUARD_FILTERS__CLAMD_ADDRESS=clamd.address, MXGUARD_FILTERS__TIMEOUT="60")
    gw = ThreadedGateway(load_settings(tmp_path / "data", environ=env)).start()
    body = mail.with_attachment(os.urandom(12 * 1024 * 1024), "archive.bin", subject="Large scan")
    killed = threading.Event()

    def kill_during_instream() -> None:
        # A connection to clamd that exists already (another client, a health check) is not
        # the scan: wait for one more than there were before the message was sent.
        baseline = _established(clamd.port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _established(clamd.port) <= baseline:
            time.sleep(0.002)
        clamd.proc.kill()  # SIGKILL: no goodbye, the INSTREAM connection just breaks
        clamd.proc.wait(10)
        killed.set()

    try:
        gw.run(add_domain(gw.store, "example.com", [tls_sink.address]))
        gw.reload()
        killer = threading.Thread(target=kill_during_instream, daemon=True)
        killer.start()
        out = send(gw.port, ["alice@example.com"], body)
        killer.join(10)
        assert killed.is_set(), "clamd was killed while the scan was in flight"
        assert out.data[0] == 451 and out.data[1].startswith("4.3.0"), out.data
        rec = gw.wait_records(1)[-1]
        assert rec.disposition == "deferred"
        [error] = rec.verdict["errors"]
        assert error["engine"] == "clamd" and "connection broke" in error["reason"], "killed mid-INSTREAM"
        time.sleep(0.3)
        assert tls_sink.messages == [], "never delivered unscanned"
        clamd.proc = None
        clamd.start()
        out = send(gw.port, ["alice@example.com"], body)  # the sending MTA retries
        assert out.data[0] == 250, out.data
        assert tls_sink.wait_for(1) and tls_sink.messages[0].data.endswith(body)
        assert b"X-MXGuard-Verdict: clean; action=deliver" in tls_sink.messages[0].data
    finally:
        if clamd.proc is None or clamd.proc.poll() is not None:
            clamd.proc = None
            clamd.start()
        gw.stop()
