"""testssl.sh (Debian package ``testssl.sh``) against a listener on loopback, its JSON findings parsed.

Every run sets ``NXCONNECT=127.0.0.1:0`` and passes ``--nodns none``: without
them testssl's self-test of the local openssl connects to ``invalid.`` through
the system resolver, a DNS query that leaves the machine. Its exit code is not
0 even for a good run (it counts findings), so only the JSON decides.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.peers import need

#: Protocols (-p), standard cipher categories (-s), every cipher offered with its key exchange (-e)
#: and the vulnerability checks (-U): about 35 s per endpoint here. (-f adds nothing -e does not show.)
CHECKS = ["-p", "-s", "-e", "-U"]


@dataclass
class Scan:
    """One testssl run: its findings by id (``{"SSLv3": {"severity": "OK", "finding": "not offered"}}``)."""

    target: str
    findings: dict[str, dict]
    output: str

    def finding(self, check_id: str) -> str:
        return self.findings[check_id]["finding"]

    def ciphers(self) -> list[str]:
        """The offered cipher lines of ``-e``: ``x1302 TLS_AES_256_GCM_SHA384 ECDH 253 AESGCM 256 ...``."""
        return [" ".join(f["finding"].split()) for key, f in self.findings.items() if key.startswith("cipher_x")]

    def summary(self) -> str:
        """The lines a report needs: protocols, cipher categories, the suites offered, vulnerabilities."""
        keys = [k for k in self.findings if k in PROTOCOLS or k.startswith("cipherlist_") or k in VULNERABILITIES]
        lines = [f"{k}: {self.findings[k]['severity']} {self.findings[k]['finding']}" for k in keys]
        return "\n".join(lines + [f"suite: {line}" for line in self.ciphers()])


PROTOCOLS = ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3")
VULNERABILITIES = ("heartbleed", "CCS", "ticketbleed", "ROBOT", "secure_renego", "secure_client_renego", "CRIME_TLS",
                   "BREACH", "POODLE_SSL", "fallback_SCSV", "SWEET32", "FREAK", "DROWN", "LOGJAM", "BEAST", "LUCKY13",
                   "RC4")


def start(host_port: str, jsonfile: Path, *, starttls: str | None = None, extra: list[str] | None = None,
          path: str = "") -> subprocess.Popen:
    """Start a scan of ``host_port`` (``127.0.0.1:PORT``); read it with :func:`finish`.

    Args:
        starttls: ``"smtp"`` for STARTTLS on an SMTP port; ``None`` for direct TLS (HTTPS).
        extra: more testssl options (``-h`` for the HTTP headers).
        path: the URL path for HTTPS targets (``/login``).
    """
    env = {**os.environ, "NXCONNECT": "127.0.0.1:0"}
    args = [need("testssl"), "--quiet", "--color", "0", "--nodns", "none", "--warnings", "off",
            "--connect-timeout", "10", "--openssl-timeout", "10", *CHECKS, *(extra or [])]
    if starttls:
        args += ["--starttls", starttls]
    target = host_port if starttls else f"https://{host_port}{path}"
    args += ["--jsonfile", str(jsonfile), target]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.target = target  # type: ignore[attr-defined]
    proc.jsonfile = jsonfile  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> Scan:
    """Wait for a scan and parse its JSON (a missing or empty file fails loudly with testssl's output)."""
    output, _ = proc.communicate(timeout=timeout)
    jsonfile: Path = proc.jsonfile  # type: ignore[attr-defined]
    if not jsonfile.exists() or not jsonfile.stat().st_size:
        raise RuntimeError(f"testssl wrote no JSON (exit {proc.returncode}):\n{output[-4000:]}")
    findings = {item["id"]: item for item in json.loads(jsonfile.read_text())}
    return Scan(proc.target, findings, output)  # type: ignore[attr-defined]
