"""CLI: org, user, apikey, domain --org / test, and 'serve' with the console (a real process, real signals)."""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.support.web import gateway_tls_context


def _cli(data_dir, *args):
    """Run ``mxguard`` as a real process (stdin not a terminal: passwords are generated)."""
    proc = subprocess.run([sys.executable, "-m", "mxguard", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, COLUMNS="200"))
    return proc.returncode, proc.stdout + proc.stderr


def test_tenancy_commands_and_audit_actor(data_dir):
    assert _cli(data_dir, "org", "add", "Acme Corp") == (0, "Added organization Acme Corp\n")
    code, out = _cli(data_dir, "user", "add", "ops@acme.test", "--role", "org-admin", "--org", "Acme Corp")
    assert code == 0 and "Added org-admin ops@acme.test (Acme Corp)" in out
    password = out.split("One-time password: ")[1].split()[0]
    assert len(password) >= 16
    code, out = _cli(data_dir, "user", "add", "x@acme.test", "--role", "owner")
    assert code == 2 and "role: 'owner' is not one of" in out and "Traceback" not in out
    code, out = _cli(data_dir, "user", "add", "y@acme.test", "--role", "user")
    assert code == 2 and "org: a user needs an organization" in out
    code, out = _cli(data_dir, "apikey", "create", "--user", "ops@acme.test", "--name", "ci")
    assert code == 0 and out.strip().splitlines()[-1].startswith("mxg_")
    prefix = out.strip().splitlines()[-1].split("_")[1]
    code, out = _cli(data_dir, "apikey", "list")
    assert code == 0 and prefix in out and "ops@acme.test" in out
    code, out = _cli(data_dir, "apikey", "revoke", prefix)
    assert code == 0 and f"Revoked {prefix}" in out
    code, out = _cli(data_dir, "apikey", "create", "--user", "ghost@acme.test")
    assert code == 1 and "ghost@acme.test does not exist" in out
    code, out = _cli(data_dir, "user", "passwd", "ops@acme.test")
    assert code == 0 and "One-time password: " in out and password not in out
    code, out = _cli(data_dir, "user", "list", "--json")
    assert json.loads(out) == [{"email": "ops@acme.test", "role": "org-admin", "org": "Acme Corp"}]
    code, out = _cli(data_dir, "domain", "add", "acme.test", "--server", "mx.acme.test", "--org", "Acme Corp")
    assert code == 0
    code, out = _cli(data_dir, "domain", "show", "acme.test", "--json")
    assert json.loads(out)["org"] == "Acme Corp"
    code, out = _cli(data_dir, "domain", "set", "acme.test", "--org", "")
    assert code == 0 and "org: Acme Corp → None" in out
    assert _cli(data_dir, "domain", "add", "b.test", "--server", "mx.b.test", "--org", "Nope")[0] == 2

    from mxguard.config import load_settings
    from mxguard.services.access import SYSTEM
    from mxguard.services.audit import list_entries
    from mxguard.storage.db import Store
    import asyncio

    async def entries():
        store = Store(load_settings(data_dir, environ={}).effective_database_url)
        try:
            return await list_entries(store, SYSTEM)
        finally:
            await store.close()

    got = asyncio.run(entries())
    assert {e.actor for e in got} == {f"cli:{getpass.getuser()}"}
    assert [e.action for e in got][:2] == ["domain.update", "domain.add"]
    assert {"org.add", "user.add", "apikey.create", "apikey.revoke", "user.password"} <= {e.action for e in got}


def test_domain_test_command(data_dir, tls_sink, ca_file):
    _cli(data_dir, "domain", "add", "example.com", "--server", f"127.0.0.1:{tls_sink.port}",
         "--downstream-tls", "verify", "--tls-ca-file", str(ca_file))
    code, out = _cli(data_dir, "domain", "test", "example.com", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["route_outcome"].startswith("deliver-tls") and result["servers"][0]["verified"] is True
    code, out = _cli(data_dir, "domain", "test", "example.com")
    assert code == 0 and "STARTTLS offered  yes" in out and "verifies  yes" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_the_console_and_stops_on_sigterm(data_dir):
    port = _free_port()
    env = dict(os.environ, MXGUARD_SMTP__LISTEN="127.0.0.1:0")
    proc = subprocess.Popen([sys.executable, "-m", "mxguard", "--data-dir", str(data_dir), "serve",
                             "--web", f"127.0.0.1:{port}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        reply = None
        while time.monotonic() < deadline:
            try:
                reply = httpx.get(f"https://127.0.0.1:{port}/healthz",
                                  verify=gateway_tls_context(data_dir / "tls" / "cert.pem"), timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert reply is not None and reply.json() == {"status": "ok", "database": "ok"}
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "shutting down" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_names_the_key_for_a_bad_or_busy_web_address(data_dir):
    env = dict(os.environ, MXGUARD_SMTP__LISTEN="127.0.0.1:0")
    bad = subprocess.run([sys.executable, "-m", "mxguard", "--data-dir", str(data_dir), "serve", "--web",
                          "127.0.0.1:99999"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--web: " in bad.stderr and "Traceback" not in bad.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "mxguard", "--data-dir", str(data_dir), "serve", "--web",
                               f"127.0.0.1:{taken}"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "web.listen: cannot listen on" in proc.stderr
    assert "Traceback" not in proc.stderr
    env["MXGUARD_WEB__LISTEN"] = "nowhere:port"
    proc = subprocess.run([sys.executable, "-m", "mxguard", "--data-dir", str(data_dir), "serve"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "setting 'web.listen'" in proc.stderr
