"""The filtering commands as an operator runs them (the real ``mxguard`` program in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import mail
from tests.support.gateway import init_data_dir


def mx(data_dir, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MXGUARD_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "mxguard", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=120, env=environ)


def test_domain_filter_settings(tmp_path):
    data = tmp_path / "data"
    init_data_dir(data)
    out = mx(data, "domain", "add", "example.com", "--server", "127.0.0.1:2525", "--junk-tag", "3",
             "--junk-quarantine", "6")
    assert out.returncode == 0, out.stderr
    out = mx(data, "domain", "set", "example.com", "--junk-reject", "12", "--virus-action", "quarantine",
             "--engine-failure", "tag")
    assert out.returncode == 0 and "junk_reject: None → 12.0" in out.stdout
    shown = json.loads(mx(data, "domain", "show", "example.com", "--json").stdout)
    assert (shown["junk_tag"], shown["junk_quarantine"], shown["junk_reject"]) == (3.0, 6.0, 12.0)
    assert shown["virus_action"] == "quarantine" and shown["engine_failure"] == "tag"
    assert [r["name"] for r in shown["attachment_rules"]] == ["executable-extension", "executable-content",
                                                              "encrypted-archive", "unscanned-archive"]
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"name": "no-iso", "action": "reject", "extensions": ["iso"]}]))
    assert mx(data, "domain", "set", "example.com", "--attachment-rules", f"@{rules}",
              "--junk-quarantine", "off").returncode == 0
    shown = json.loads(mx(data, "domain", "show", "example.com", "--json").stdout)
    assert shown["attachment_rules"] == [{"name": "no-iso", "action": "reject", "extensions": ["iso"]}]
    assert shown["junk_quarantine"] is None
    # Bad values stop with one line naming the field; no traceback.
    for args, field in [(["--junk-reject", "1"], "junk_reject"), (["--virus-action", "bounce"], "virus_action"),
                        (["--engine-failure", "ignore"], "engine_failure"), (["--junk-tag", "lots"], "junk_tag"),
                        (["--attachment-rules", "[{]"], "attachment_rules")]:
        out = mx(data, "domain", "set", "example.com", *args)
        assert out.returncode == 2 and field in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_wrong_filter_setting_stops_start_up_naming_the_key(tmp_path):
    data = tmp_path / "data"
    init_data_dir(data)
    out = mx(data, "engines", env={"MXGUARD_FILTERS__JUNK_ENGINES": "spamassassin"})
    assert out.returncode == 2 and "filters.junk_engines" in out.stderr and "Traceback" not in out.stderr
    out = mx(data, "engines", env={"MXGUARD_FILTERS__CLAMD_ADDRESS": "host:99999"})
    assert out.returncode == 2 and "filters.clamd_address" in out.stderr


def test_engines_reports_reachability_and_versions(tmp_path, clamd):
    data = tmp_path / "data"
    init_data_dir(data)
    env = {"MXGUARD_FILTERS__VIRUS_ENGINES": "yara,clamd", "MXGUARD_FILTERS__CLAMD_ADDRESS": clamd.address}
    out = mx(data, "engines", "--json", env=env)
    assert out.returncode == 0, out.stderr
    by_name = {e["name"]: e for e in json.loads(out.stdout)}
    assert set(by_name) == {"yara", "clamd", "builtin", "policy"}
    assert by_name["clamd"]["reachable"] and by_name["clamd"]["version"].startswith("ClamAV")
    assert by_name["yara"]["version"].startswith("YARA")
    from tests.support.peers import free_port
    env["MXGUARD_FILTERS__CLAMD_ADDRESS"] = f"127.0.0.1:{free_port()}"
    out = mx(data, "engines", env=env)
    assert out.returncode == 1 and "NO" in out.stdout


def test_scan_prints_the_verdict(tmp_path, corpus_dir):
    eicar = tmp_path / "eicar.eml"
    eicar.write_bytes(mail.eicar_variants()["zip"])
    out = mx(tmp_path / "nodata", "scan", str(eicar), "--json", "--no-dns")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["viruses"][0]["name"] == "EICAR-Test-File"
    assert data["disposition"]["action"] == "reject" and data["disposition"]["category"] == "virus"
    out = mx(tmp_path / "nodata", "scan", str(corpus_dir / "spamassassin" / "sample-spam.eml"), "--no-dns")
    assert out.returncode == 0 and "GTUBE" in out.stdout and "Disposition: quarantine" in out.stdout
    out = mx(tmp_path / "nodata", "scan", str(tmp_path / "missing.eml"))
    assert out.returncode != 0 and "Traceback" not in out.stderr


def test_quarantine_list(gateway, tls_sink, add_domain, data_dir):
    from tests.support.smtp import send
    add_domain("example.com", [tls_sink.address])
    assert send(gateway.port, ["bob@example.com"], mail.gtube(subject="Prize")).data[0] == 250
    out = mx(data_dir, "quarantine", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["recipient"], row["sender"], row["subject"]) == ("bob@example.com", "a@sender.test", "Prize")
    assert row["reason"].startswith("junk: builtin score") and row["id"].startswith("Q")
    out = mx(data_dir, "quarantine", "list", env={"COLUMNS": "200"})
    assert out.returncode == 0 and row["id"] in out.stdout and "Prize" in out.stdout
