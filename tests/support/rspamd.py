"""A private Rspamd (normal worker only, no redis) on loopback, offline.

The stock rules from /etc/rspamd are used with local overrides: DNS goes to
the tests' loopback DNS server (fast timeouts, so nothing waits on the
network), fuzzy checks are off, and GTUBE test patterns are on. Rspamd
compiles its hyperscan cache into DBDIR on a cold start (about 8 s); the
session fixture starts it once per test run.
"""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

from tests.support.peers import free_port, need, stop_process, wait_until

RSPAMD_CONF = """\
.include "$CONFDIR/common.conf"
options {{ pidfile = "$RUNDIR/rspamd.pid"; .include "$CONFDIR/options.inc"
  .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc" }}
logging {{ type = "console"; level = "notice"; }}
worker "normal" {{ bind_socket = "127.0.0.1:{port}"; mime = true; count = 1; }}
"""


class RspamdInstance:
    """``start()`` runs rspamd in the foreground as root (``-i``); ``url`` is the normal worker."""

    def __init__(self, base: Path, dns_address: str):
        self.base = base
        self.port = free_port()
        self.log = base / "rspamd.log"
        self.proc: subprocess.Popen | None = None
        (base / "local.d").mkdir(parents=True, exist_ok=True)
        (base / "db").mkdir(exist_ok=True)
        (base / "run").mkdir(exist_ok=True)
        (base / "rspamd.conf").write_text(RSPAMD_CONF.format(port=self.port))
        (base / "local.d" / "options.inc").write_text(
            f'dns {{ nameserver = ["{dns_address}"]; timeout = 0.1s; retransmits = 0; }}\n'
            "enable_test_patterns = true;\n")
        (base / "local.d" / "fuzzy_check.conf").write_text("enabled = false;\n")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ping(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as r:  # noqa: S310 - loopback only
            return r.read().strip() == b"pong"

    def start(self) -> "RspamdInstance":
        b = self.base
        self.proc = subprocess.Popen(
            [need("rspamd"), "-f", "-i", "-c", str(b / "rspamd.conf"), f"--var=LOCAL_CONFDIR={b}",
             f"--var=DBDIR={b / 'db'}", f"--var=RUNDIR={b / 'run'}"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        wait_until(self.ping, 120, "rspamd", self.log, self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)
        self.proc = None
