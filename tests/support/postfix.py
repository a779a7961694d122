"""A private Postfix instance on loopback: its own config and queue in a temp dir.

Used as a real sending MTA (relayhost = the gateway), as a real downstream
server, and by the benchmark. Runs as root with ``chroot = n`` everywhere.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.peers import free_port

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""



class PostfixInstance:
    """A Postfix relay: accepts on ``127.0.0.1:port`` and relays everything to ``relayhost``.

    Args:
        base: an empty directory for config, queue, data and log.
        relayhost: ``host:port`` every message is relayed to; ``None`` for none (for example
            with ``extra={"default_transport": "discard"}``: a sink that accepts and drops mail).
        cert_file, key_file: certificate offered by smtpd (STARTTLS); none if ``None``.
        smtp_tls_level: Postfix ``smtp_tls_security_level`` for the relay hop
            (``none``, ``may``, ``encrypt``).
        extra: more main.cf lines.
    """

    def __init__(self, base: Path, relayhost: str | None, *, cert_file: Path | None = None, key_file: Path | None = None,
                 smtp_tls_level: str = "may", extra: dict[str, str] | None = None, port: int | None = None):
        if shutil.which("postfix") is None:
            raise RuntimeError("postfix is not installed; run scripts/install-peers.sh (as root)")
        self.base = base
        self.port = port or free_port()
        self.etc = base / "etc"
        self.relayhost = relayhost
        self.cert_file, self.key_file = cert_file, key_file
        self.smtp_tls_level = smtp_tls_level
        self.extra = extra or {}

    @property
    def maillog(self) -> Path:
        return self.base / "maillog"

    def _main_cf(self) -> str:
        lines = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.base / "spool"),
            "data_directory": str(self.base / "data"),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.base),
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "myhostname": "relay.postfix.test",
            "smtp_tls_security_level": self.smtp_tls_level,
            "smtp_tls_loglevel": "1",
            "smtpd_tls_loglevel": "1",
            "smtp_connection_cache_on_demand": "yes",
            "maximal_backoff_time": "10s",
            "minimal_backoff_time": "5s",
            "queue_run_delay": "5s",
        }
        if self.relayhost:
            host, port = self.relayhost.rsplit(":", 1)
            lines["relayhost"] = f"[{host}]:{port}"
        if self.cert_file:
            lines.update({"smtpd_tls_cert_file": str(self.cert_file), "smtpd_tls_key_file": str(self.key_file),
                          "smtpd_tls_security_level": "may"})
        lines.update(self.extra)
        return "".join(f"{k} = {v}\n" for k, v in lines.items())

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # postfix writes its errors to a tty or to maillog_file only; read the log on failure.
        proc = subprocess.run(["postfix", "-c", str(self.etc), *args], capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            log = self.maillog.read_text(errors="replace")[-3000:] if self.maillog.exists() else ""
            raise RuntimeError(f"postfix {' '.join(args)} failed ({proc.returncode}): {proc.stderr}\n{log}")
        return proc

    def start(self) -> "PostfixInstance":
        self.etc.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)  # the postfix user must reach data/ and the queue
        (self.base / "data").mkdir(exist_ok=True)
        (self.base / "spool").mkdir(exist_ok=True)
        pw = pwd.getpwnam("postfix")
        os.chown(self.base / "data", pw.pw_uid, pw.pw_gid)
        (self.etc / "main.cf").write_text(self._main_cf())
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        self._postfix("check")
        self._postfix("start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"postfix did not listen on {self.port}")

    def master_pid(self) -> int:
        """The pid of the instance's master process (its processes are all descendants of it)."""
        return int((self.base / "spool" / "pid" / "master.pid").read_text().split()[0])

    def flush(self) -> None:
        """Retry deferred mail now (``postqueue -f``)."""
        subprocess.run(["postqueue", "-c", str(self.etc), "-f"], capture_output=True, timeout=30)

    def log_text(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def wait_log(self, needle: str, timeout: float = 30) -> str:
        """Wait until ``needle`` appears in the maillog; return the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not in postfix log:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        self._postfix("stop", check=False)
        time.sleep(0.2)
        shutil.rmtree(self.base, ignore_errors=True)
