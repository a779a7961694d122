"""The CLI contract, run as a user runs it: the installed ``mxguard`` command in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mxguard.supervisor import STOP_TIMEOUT
from tests.support.smtp import send

MXGUARD = [str(Path(sys.executable).with_name("mxguard"))]


def mx(*args: str, data_dir: Path | None = None, check: bool = True, env: dict | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = MXGUARD + (["--data-dir", str(data_dir)] if data_dir else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_is_idempotent_and_reports_files(tmp_path):
    d = tmp_path / "d"
    out = mx("init", "--hostname", "mx1.example.com", data_dir=d).stdout
    assert "mx1.example.com" in out and "certificate" in out
    assert (d / "mxguard.toml").exists() and (d / "mxguard.db").exists()
    # The database holds the message log and password hashes: owner only, like the keys.
    assert (d / "mxguard.db").stat().st_mode & 0o777 == 0o600
    # Every setting is written with its meaning, the delivery resolver too (DANE trusts it).
    toml = (d / "mxguard.toml").read_text()
    assert "\n[downstream]\n" in toml and "\ndns_servers = []\n" in toml.split("\n[downstream]\n")[1].split("\n[")[0]
    out = mx("init", data_dir=d).stdout
    assert "already initialised" in out
    bad = mx("init", "--hostname", "other.example.com", data_dir=d, check=False)
    assert bad.returncode == 2 and "hostname" in bad.stderr and "Traceback" not in bad.stderr


def test_data_dir_from_environment(tmp_path):
    d = tmp_path / "envdir"
    mx("init", "--hostname", "mx.env.test", env={"MXGUARD_DATA_DIR": str(d)})
    assert (d / "mxguard.toml").exists()


def test_domain_commands(tmp_path, ca_file):
    d = tmp_path / "d"
    mx("init", "--hostname", "mx.example.net", data_dir=d)
    out = mx("domain", "add", "example.com", "--server", "mail1.example.com", "--server", "mail2.example.com:2525",
             data_dir=d).stdout
    assert "example.com" in out and "opportunistic" in out
    mx("domain", "add", "secure.example", "--server", "10.0.0.5", "--downstream-tls", "verify",
       "--tls-ca-file", str(ca_file), "--inbound-tls", "required", data_dir=d)
    listing = json.loads(mx("domain", "list", "--json", data_dir=d).stdout)
    assert [x["name"] for x in listing] == ["example.com", "secure.example"]
    assert listing[0]["servers"] == ["mail1.example.com:25", "mail2.example.com:2525"]
    shown = json.loads(mx("domain", "show", "secure.example", "--json", data_dir=d).stdout)
    assert shown["downstream_tls"] == "verify" and shown["inbound_tls"] == "required"
    assert shown["tls_ca_file"] == str(ca_file)
    out = mx("domain", "set", "example.com", "--downstream-tls", "required", data_dir=d).stdout
    assert "opportunistic → required" in out
    table = mx("domain", "list", data_dir=d).stdout
    assert "secure.example" in table and "required" in table
    mx("domain", "remove", "secure.example", data_dir=d)
    gone = mx("domain", "show", "secure.example", data_dir=d, check=False)
    assert gone.returncode == 1 and "not configured" in gone.stderr


@pytest.mark.parametrize("args,needle", [
    (["domain", "add", "example.com", "--server", "m.example", "--downstream-tls", "sometimes"], "downstream_tls"),
    (["domain", "add", "bad domain", "--server", "m.example"], "domain"),
    (["domain", "add", "example.com", "--server", "m.example:70000"], "servers"),
    (["domain", "set", "unknown.example", "--downstream-tls", "off"], "not configured"),
])
def test_domain_errors_are_one_line_without_traceback(tmp_path, args, needle):
    d = tmp_path / "d"
    mx("init", "--hostname", "mx.example.net", data_dir=d)
    proc = mx(*args, data_dir=d, check=False)
    assert proc.returncode in (1, 2)
    assert needle in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_uninitialised_data_dir_is_a_clear_error(tmp_path):
    proc = mx("domain", "list", data_dir=tmp_path / "nothing", check=False)
    assert proc.returncode == 2 and "mxguard init" in proc.stderr


def test_bad_setting_stops_serve_naming_the_key(tmp_path):
    d = tmp_path / "d"
    mx("init", "--hostname", "mx.example.net", data_dir=d)
    toml = d / "mxguard.toml"
    toml.write_text(toml.read_text().replace("max_recipients = 100", "max_recipients = 0"))
    proc = mx("serve", "--smtp", "127.0.0.1:0", data_dir=d, check=False)
    assert proc.returncode == 2 and "smtp.max_recipients" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_relays_and_log_shows_the_transaction(tmp_path, tls_sink):
    d = tmp_path / "d"
    mx("init", "--hostname", "mx.cli.test", data_dir=d)
    mx("domain", "add", "example.com", "--server", tls_sink.address, "--downstream-tls", "required", data_dir=d)
    port = _free_port()
    proc = subprocess.Popen(MXGUARD + ["--data-dir", str(d), "serve", "--no-web", "--smtp", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        out = send(port, ["alice@example.com", "mallory@elsewhere.test"])
        assert out.rcpt["mallory@elsewhere.test"][0] == 550
        assert out.data[0] == 250
        assert tls_sink.wait_for(1) and tls_sink.messages[0].tls
        # A domain added while serving applies to the next transaction (generation poll).
        mx("domain", "add", "example.org", "--server", tls_sink.address, data_dir=d)
        time.sleep(1.5)
        assert send(port, ["bob@example.org"]).data[0] == 250
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    rows = [json.loads(line) for line in mx("log", "--last", "5", "--json", data_dir=d).stdout.splitlines()]
    assert len(rows) == 2
    first = rows[0]
    assert first["client_ip"] == "127.0.0.1" and first["helo"] == "client.sender.test"
    assert first["inbound_tls"] is True and first["tls_version"] and first["tls_cipher"] and first["tls_bits"]
    assert first["mail_from"] == "a@sender.test"
    assert first["downstream_host"] == tls_sink.address and first["downstream_tls"] is True
    assert first["disposition"] == "partial"
    codes = {r["rcpt"]: r["code"] for r in first["results"]}
    assert codes == {"mallory@elsewhere.test": 550, "alice@example.com": 250}
    for key in ("accept_ms", "connect_ms", "tls_ms", "total_ms"):
        assert first[key] is not None and first[key] >= 0, key
    assert first["size"] > 0
    table = mx("log", data_dir=d).stdout
    assert "alice@example.com" in table and "delivered" in table


def test_serve_with_two_workers_shares_the_listener(tmp_path, tls_sink):
    d = tmp_path / "d"
    mx("init", "--hostname", "mx.cli.test", data_dir=d)
    mx("domain", "add", "example.com", "--server", tls_sink.address, data_dir=d)
    port = _free_port()
    proc = subprocess.Popen(MXGUARD + ["--data-dir", str(d), "serve", "--no-web", "--workers", "2",
                                       "--smtp", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        def workers() -> list[str]:
            return Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()

        def wait_workers(ok, timeout: float = 20) -> list[str]:
            # The supervisor starts (and replaces) workers one after the other: on a loaded
            # machine the second may come up after the listener already answers.
            end = time.monotonic() + timeout
            while not ok(now := workers()) and time.monotonic() < end:
                time.sleep(0.1)
            return now

        children = wait_workers(lambda c: len(c) == 2)
        assert len(children) == 2, children
        for i in range(20):
            assert send(port, ["alice@example.com"]).data[0] == 250
        assert tls_sink.wait_for(20)
        time.sleep(0.5)  # message-log records are written in batches (log.flush_interval = 0.2 s)
        # A worker that dies is replaced; the listener keeps answering.
        os.kill(int(children[1]), signal.SIGKILL)
        now = wait_workers(lambda c: len(c) == 2 and children[1] not in c)
        assert len(now) == 2 and children[1] not in now
        assert send(port, ["alice@example.com"]).data[0] == 250
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    rows = [json.loads(line) for line in mx("log", "--last", "50", "--json", data_dir=d).stdout.splitlines()]
    assert len(rows) == 21 and {r["disposition"] for r in rows} == {"delivered"}


def test_sigterm_right_after_a_worker_is_replaced_stops_every_worker(tmp_path):
    """A SIGTERM that reaches the supervisor while it forks a replacement is not lost.

    Before the fix the new worker, for a moment still running the supervisor's signal
    handler, swallowed the forwarded SIGTERM and ran on forever (2 hangs in 5 tries).
    """
    d = tmp_path / "d"
    mx("init", "--hostname", "mx.cli.test", data_dir=d)
    for _ in range(3):
        port = _free_port()
        proc = subprocess.Popen(MXGUARD + ["--data-dir", str(d), "serve", "--no-web", "--workers", "2",
                                           "--smtp", f"127.0.0.1:{port}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        children_file = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        try:
            end = time.monotonic() + 30
            while len(children := children_file.read_text().split()) < 2 and time.monotonic() < end:
                time.sleep(0.02)
            assert len(children) == 2, children
            os.kill(int(children[1]), signal.SIGKILL)
            end = time.monotonic() + 10
            while children[1] in (now := children_file.read_text().split()) or len(now) < 2:
                assert time.monotonic() < end, now
                time.sleep(0.001)
        finally:
            proc.send_signal(signal.SIGTERM)  # at once: the replacement has only just been forked
        try:
            # Longer than the supervisor's straggler kill: a lost SIGTERM shows as exit 1 and its log line.
            output = proc.communicate(timeout=STOP_TIMEOUT + 30)[0]
        except subprocess.TimeoutExpired:
            left = children_file.read_text().split()
            for pid in left:
                os.kill(int(pid), signal.SIGKILL)
            proc.kill()
            raise AssertionError(f"serve --workers 2 did not stop on SIGTERM; workers left: {left}")
        assert proc.returncode == 0, output
        assert "did not stop after SIGTERM" not in output, output
        assert "Traceback" not in output


def test_dane_only_with_address_servers_is_allowed_with_a_warning(tmp_path):
    """Addresses have no TLSA (RFC 7672 2.2): such a dane-only domain could never deliver; the CLI says so."""
    d = tmp_path / "d"
    mx("init", "--hostname", "mx1.example.com", data_dir=d)
    out = mx("domain", "add", "addr.test", "--server", "127.0.0.1:2525", "--downstream-tls", "dane-only", data_dir=d)
    assert "warning: addr.test is dane-only but its servers are all addresses" in out.stderr
    named = mx("domain", "add", "named.test", "--server", "mx.named.test", "--downstream-tls", "dane-only", data_dir=d)
    assert "warning" not in named.stderr
    changed = mx("domain", "set", "named.test", "--server", "192.0.2.1", data_dir=d)
    assert "warning: named.test is dane-only" in changed.stderr
