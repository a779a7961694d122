"""The process log of ``mxguard serve``: stderr by default (journald collects it), JSON on
request, a size-rotated file when ``log.file`` is set; command output stays on stdout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.gateway import init_data_dir
from tests.support.peers import free_port, stop_process, wait_until
from tests.support.smtp import Raw

MXGUARD = str(Path(sys.executable).with_name("mxguard"))


def start(data: Path, env: dict, stdout, stderr) -> tuple[subprocess.Popen, int]:
    port = free_port()
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("MXGUARD_")}, **env}
    proc = subprocess.Popen([MXGUARD, "--data-dir", str(data), "serve", "--no-web", "--smtp", f"127.0.0.1:{port}"],
                            env=environ, stdout=stdout, stderr=stderr)

    def up() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(100).startswith(b"220")
    wait_until(up, 30, "mxguard serve", None, proc)
    return proc, port


def relay_attempts(port: int, count: int) -> None:
    """Sessions that each leave log lines (a refused RCPT and the transaction)."""
    for i in range(count):
        raw = Raw(port)
        raw.cmd("EHLO client.sender.test")
        raw.cmd("MAIL FROM:<a@sender.test>")
        raw.cmd(f"RCPT TO:<n{i}@stranger.test>")
        raw.cmd("QUIT")
        raw.close()


def test_json_log_on_stderr_and_nothing_on_stdout(tmp_path):
    data = tmp_path / "data"
    init_data_dir(data)
    out, err = open(tmp_path / "out", "wb"), open(tmp_path / "err", "wb")
    proc, port = start(data, {"MXGUARD_LOG__FORMAT": "json"}, out, err)
    try:
        relay_attempts(port, 2)
        time.sleep(0.5)
    finally:
        stop_process(proc)
    assert (tmp_path / "out").read_bytes() == b""
    records = [json.loads(line) for line in (tmp_path / "err").read_text().splitlines()]
    events = [r["event"] for r in records]
    assert "listening" in events and events.count("relay denied") == 2
    assert all({"timestamp", "level", "event"} <= set(r) for r in records)


def test_log_file_is_rotated_by_size(tmp_path):
    data = tmp_path / "data"
    init_data_dir(data)
    env = {"MXGUARD_LOG__FORMAT": "json", "MXGUARD_LOG__FILE": "logs/mxguard.log",
           "MXGUARD_LOG__MAX_BYTES": "2048", "MXGUARD_LOG__BACKUP_COUNT": "2"}
    err = open(tmp_path / "err", "wb")
    proc, port = start(data, env, subprocess.DEVNULL, err)
    try:
        relay_attempts(port, 25)
        time.sleep(0.5)
    finally:
        stop_process(proc)
    logs = data / "logs"
    files = sorted(p.name for p in logs.iterdir())
    assert files == ["mxguard.log", "mxguard.log.1", "mxguard.log.2"], files
    for path in logs.iterdir():
        assert path.stat().st_size <= 2048 + 1024  # one line may straddle the limit
        for line in path.read_text().splitlines():
            assert json.loads(line)["event"]  # every line whole, none cut by rotation
    newest = [json.loads(x)["event"] for x in (logs / "mxguard.log").read_text().splitlines()]
    assert newest[-1] == "shutting down" or "shutting down" in newest
    assert (tmp_path / "err").read_bytes() == b"", "with a log file, stderr stays quiet"


def test_unwritable_log_file_stops_start_up_naming_the_key(tmp_path):
    data = tmp_path / "data"
    init_data_dir(data)
    (data / "logs").mkdir()
    (data / "logs" / "mxguard.log").mkdir()  # a directory where the file should be
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("MXGUARD_")},
               "MXGUARD_LOG__FILE": "logs/mxguard.log"}
    out = subprocess.run([MXGUARD, "--data-dir", str(data), "serve", "--no-web", "--smtp", "127.0.0.1:0"],
                         env=environ, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("error: log.file: cannot write ") and "Traceback" not in out.stderr


_WRITER = """
import sys
import structlog
from mxguard.logsetup import configure
configure("info", sys.argv[1])
log = structlog.get_logger()
for i in range(int(sys.argv[2])):
    log.info("transaction", worker=sys.argv[3], n=i, reply="250 2.0.0 Ok: queued", padding="x" * (i % 300))
"""


def test_processes_sharing_stderr_never_mix_their_lines(tmp_path):
    """``serve`` workers share one stderr (a file, a pipe to journald): each line must reach it in
    one write, so no line holds two records and none is empty, buffered or not."""
    lines = 3000
    out = tmp_path / "shared.log"
    for fmt in ("console", "json"):
        with open(out, "wb") as shared:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            procs = [subprocess.Popen([sys.executable, "-c", _WRITER, fmt, str(lines), str(w)], stderr=shared,
                                      stdout=subprocess.DEVNULL, env=env) for w in range(3)]
            for proc in procs:
                assert proc.wait(timeout=120) == 0
        got = out.read_text(encoding="utf-8").split("\n")
        assert got[-1] == ""
        got = got[:-1]
        assert len(got) == 3 * lines, (fmt, len(got))
        seen = set()
        for line in got:
            if fmt == "json":
                record = json.loads(line)
                seen.add((record["worker"], record["n"]))
            else:
                assert line.count("[info") == 1 and line.count("transaction") == 1, line[:300]
                fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
                seen.add((fields["worker"], int(fields["n"])))
        assert seen == {(str(w), n) for w in range(3) for n in range(lines)}
