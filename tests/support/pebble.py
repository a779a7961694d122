"""A private pebble (Let's Encrypt's ACME test CA, Debian package ``pebble``) on loopback.

Its own HTTPS is served with a certificate from a trustme CA made here
(``ca_file``); its validation authority resolves names through the tests'
loopback DNS server (``-dnsserver``) and connects to ``http_port`` for HTTP-01.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.request
from pathlib import Path

import trustme

from tests.support.peers import free_port, need, stop_process, wait_until


class PebbleInstance:
    """``start()`` runs pebble; ``directory_url``, ``ca_file`` (its HTTPS CA), ``root_pem()`` (the issuing root).

    Args:
        base: a working folder.
        dns_address: ``127.0.0.1:PORT`` of the loopback DNS server.
        http_port: the port pebble's VA connects to for HTTP-01 (the responder's).
    """

    def __init__(self, base: Path, dns_address: str, http_port: int):
        self.base = base
        self.dns_address = dns_address
        self.http_port = http_port
        self.port = free_port()
        self.management_port = free_port()
        self.log = base / "pebble.log"
        self.ca_file = base / "pebble-https-ca.pem"
        self.proc: subprocess.Popen | None = None

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def start(self) -> "PebbleInstance":
        binary = need("pebble")
        self.base.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA(organization_name="pebble HTTPS test CA")
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(self.ca_file))
        leaf.cert_chain_pems[0].write_to_path(str(self.base / "cert.pem"))
        leaf.private_key_pem.write_to_path(str(self.base / "key.pem"))
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.base / "cert.pem"), "privateKey": str(self.base / "key.pem"),
            "httpPort": self.http_port, "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}
        (self.base / "pebble-config.json").write_text(json.dumps(config))
        # No sleeps before validation; no nonces rejected at random: fast and deterministic.
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([binary, "-config", str(self.base / "pebble-config.json"),
                                          "-dnsserver", self.dns_address], stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd=self.base)

        def ready() -> bool:
            with urllib.request.urlopen(self.directory_url, context=self._context(), timeout=2) as reply:
                return reply.status == 200
        try:
            wait_until(ready, 30, "pebble", self.log, self.proc)
        except Exception:
            self.stop()
            raise
        return self

    def root_pem(self) -> bytes:
        """The root that issued the certificates (management endpoint ``/roots/0``)."""
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=self._context(), timeout=10) as reply:
            return reply.read()

    def stop(self) -> None:
        stop_process(self.proc)
