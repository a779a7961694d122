"""Smoke test of the benchmark harness: ``bench/run.py --quick`` with a tiny count runs end to end.

It drives the real targets (Postfix relay, Haraka from npm, mxguard serve)
and the real sinks with the compiled load client; the figures themselves
are not judged here (speed is measured by the bench, not by tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_quick_bench_runs_every_target(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--messages", "30", "--runs", "1",
         "--warmup", "0", "--json", str(out), "--json-all", str(tmp_path / "all.json")],
        capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = json.loads(out.read_text())
    assert [(r["target"], r["tls"]) for r in rows] == [
        (t, tls) for tls in (False, True) for t in ("direct", "postfix", "haraka", "mxguard", "mxguard", "mxguard")]
    for r in rows:
        assert list(r) == ["target", "tls", "concurrency", "size", "per_conn", "filters", "msgs_per_s",
                           "cpu_ms_per_msg", "p50_ms", "p99_ms", "rss_mb"]
        assert (r["concurrency"], r["size"], r["per_conn"]) == (20, 4096, 1)
        assert r["msgs_per_s"] > 0 and r["rss_mb"] > 0
        assert r["filters"] is (r["target"] == "mxguard")
        if r["target"] != "direct":
            assert r["cpu_ms_per_msg"] > 0, r
    every = json.loads((tmp_path / "all.json").read_text())
    # Every message went all the way to the sink, without errors.
    assert all(r["errors"] == 0 and r["delivered"] == 30 for r in every), every
    labels = [r["label"] for r in every if r["target"] == "mxguard"]
    assert any(label.startswith("mxguard +filters x") for label in labels), labels  # serve --workers
    # The dane row really went through DANE: verified TLS over STARTTLS, the unsigned zone's fallback in clear.
    assert "mxguard +filters dane" in labels
    assert "mxguard +filters dane: last delivery's TLS policy {'policy': 'dane', 'tls': True, 'verified': True}" \
        in proc.stderr, proc.stderr[-3000:]
    assert "mxguard +filters dane: last delivery's TLS policy {'policy': 'setting', 'tls': False, " \
        "'verified': False}" in proc.stderr
    assert "goal 1, plain (mxguard +filters): messages/s" in proc.stdout
    assert "goal 1, STARTTLS (mxguard +filters): messages/s" in proc.stdout
    assert "dane cost, STARTTLS, DANE-verified c=20 4 KiB: CPU/msg" in proc.stdout


def test_fixed_rate_pass_holds_half_of_postfix_saturation(tmp_path):
    """``--fixed-rate 0.5`` runs every row again at half of Postfix's rate in the same run (issue 17)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--targets", "direct,postfix,mxguard-filters",
         "--tls", "plain", "--messages", "60", "--runs", "1", "--warmup", "0", "--fixed-rate", "0.5",
         "--json-all", str(tmp_path / "all.json")],
        capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    every = json.loads((tmp_path / "all.json").read_text())
    saturated = {r["target"]: r for r in every if r["rate"] is None}
    paced = {r["target"]: r for r in every if r["rate"] is not None}
    assert set(saturated) == set(paced) == {"direct", "postfix", "mxguard"}
    rate = paced["mxguard"]["rate"]
    assert rate == pytest.approx(0.5 * saturated["postfix"]["msgs_per_s"])
    for r in paced.values():
        # The last of 60 messages may not start before 59/rate seconds: the schedule held the load down.
        assert r["errors"] == 0 and r["delivered"] == 60 and r["msgs_per_s"] <= 1.1 * rate, r
    assert "fixed rate, mxguard +filters, plain c=20 4 KiB at" in proc.stdout


def test_bare_forwarder_floor_runs(tmp_path):
    """The aiosmtpd → aiosmtplib floor (``--targets aiosmtpd-bare``) relays every message, plain and STARTTLS."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--targets", "aiosmtpd-bare", "--messages", "20",
         "--runs", "1", "--warmup", "0", "--json-all", str(tmp_path / "all.json")],
        capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = json.loads((tmp_path / "all.json").read_text())
    assert [(r["target"], r["tls"]) for r in rows] == [("aiosmtpd", False), ("aiosmtpd", True)]
    assert all(r["errors"] == 0 and r["delivered"] == 20 and r["cpu_ms_per_msg"] > 0 for r in rows), rows
