"""A private PostgreSQL cluster for the test run: initdb in a temp dir, loopback only.

Uses the PostgreSQL server binaries of the Debian ``postgresql`` package. As
root, the cluster runs as the ``postgres`` user (initdb refuses root).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path


def _pg_bin() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if not candidates:
        raise RuntimeError("PostgreSQL server binaries not found; run scripts/install-peers.sh (as root)")
    return Path(candidates[0]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """``start()`` makes and starts the cluster; ``url(db)`` gives an asyncpg URL; ``stop()`` removes it."""

    def __init__(self, base: Path):
        self.base = base
        self.datadir = base / "data"
        self.sockdir = base / "sock"
        self.port = _free_port()
        self.password = secrets.token_hex(8)
        self.bin = _pg_bin()
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> "PostgresCluster":
        self.base.mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(exist_ok=True)
        pwfile = self.base / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            for p in (self.base, self.sockdir, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.datadir), "-U", "mxguard", "-A", "scram-sha-256",
                  f"--pwfile={pwfile}", "--no-sync", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.base / "log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 -c fsync=on "
                        f"-c max_connections=200", "start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not start; see {self.base / 'log'}")

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh database; return its SQLAlchemy URL."""
        name = name or f"t_{secrets.token_hex(6)}"
        env = dict(os.environ, PGPASSWORD=self.password)
        subprocess.run([str(self.bin / "createdb") if (self.bin / "createdb").exists() else "createdb",
                        "-h", "127.0.0.1", "-p", str(self.port), "-U", "mxguard", name],
                       check=True, env=env, capture_output=True, timeout=60)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://mxguard:{self.password}@127.0.0.1:{self.port}/{database}"

    def pause(self) -> None:
        """Stop the server (the database becomes unavailable); ``resume()`` starts it again."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop")

    def resume(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.base / "log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.base, ignore_errors=True)
