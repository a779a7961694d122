"""A private SpamAssassin spamd on loopback, offline (``-L``: no DNS or network tests)."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

from tests.support.peers import free_port, need, stop_process, wait_until


class SpamdInstance:
    """``start()`` runs spamd in the foreground as ``nobody`` with its own home (Bayes off)."""

    def __init__(self, base: Path):
        self.base = base
        self.port = free_port()
        self.home = base / "home"
        self.log = base / "spamd.log"
        self.proc: subprocess.Popen | None = None
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.home, nobody.pw_uid, nobody.pw_gid)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ping(self) -> bool:
        out = subprocess.run([need("spamc"), "-d", "127.0.0.1", "-p", str(self.port), "-K"],
                             capture_output=True, timeout=5)
        return out.returncode == 0 and b"SPAMD/" in out.stdout

    def start(self) -> "SpamdInstance":
        args = [need("spamd"), "-x", "-L", "-H", str(self.home), f"--listen=127.0.0.1:{self.port}",
                "-s", "stderr", "--cf=bayes_auto_learn 0", "--cf=use_bayes 0"]
        if os.geteuid() == 0:
            args[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_until(self.ping, 60, "spamd", self.log, self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)
        self.proc = None
