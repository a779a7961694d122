"""DNSSEC on loopback: zones signed with ldns-signzone, served by NSD, validated by unbound.

The tests' stand-in for the internet's DNSSEC: a real authoritative server
(NSD) holds the test zones, a real validating resolver (unbound) trusts the
signed zones' keys and sets the AD bit on what validates. Every query stays on
127.0.0.1: unbound's only upstream (the root included) is the local NSD.

Zones:

* signed (``secure``): their key is unbound's trust anchor;
* ``bogus``: signed and trusted, then one record changed after signing, so
  validation fails (unbound answers SERVFAIL);
* unsigned: no key, no trust anchor (answers are "insecure", no AD bit).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.peers import free_port, need, stop_process, wait_until


@dataclass
class Zone:
    """A test zone: ``name`` (no trailing dot), ``records`` in zone-file syntax, relative names allowed."""

    name: str
    records: list[str]
    signed: bool = True
    #: (old, new) text substitutions applied after signing: the zone becomes bogus.
    tamper: list[tuple[str, str]] = field(default_factory=list)


class LoopbackDnssec:
    """NSD + unbound on free loopback ports.

    Attributes:
        resolver_port: unbound's port on 127.0.0.1 (point lookups there).
    """

    def __init__(self, zones: list[Zone]):
        self.zones = zones
        self.dir = Path(tempfile.mkdtemp(prefix="mxguard-dnssec-"))
        self.nsd_port = free_port()
        self.resolver_port = free_port()
        self.nsd: subprocess.Popen | None = None
        self.unbound: subprocess.Popen | None = None

    def _zone_file(self, zone: Zone) -> Path:
        text = (f"$ORIGIN {zone.name}.\n$TTL 300\n"
                f"@ IN SOA ns.{zone.name}. hostmaster.{zone.name}. 1 3600 600 86400 300\n"
                f"@ IN NS ns.{zone.name}.\nns IN A 127.0.0.1\n" + "\n".join(zone.records) + "\n")
        path = self.dir / f"{zone.name}.zone"
        path.write_text(text)
        if not zone.signed:
            return path
        keygen = subprocess.run([need("ldns-keygen"), "-a", "ECDSAP256SHA256", "-k", zone.name], cwd=self.dir,
                                capture_output=True, text=True, check=True)
        key = keygen.stdout.strip()
        subprocess.run([need("ldns-signzone"), "-n", str(path), key], cwd=self.dir, check=True,
                       capture_output=True)
        signed = Path(f"{path}.signed")
        text = signed.read_text()
        for old, new in zone.tamper:
            assert old in text, f"nothing to tamper: {old!r}"
            text = text.replace(old, new)
        signed.write_text(text)
        anchors = self.dir / "anchors.keys"
        with anchors.open("a") as out:
            out.write((self.dir / f"{key}.key").read_text())
        return signed

    def start(self) -> "LoopbackDnssec":
        zone_files = {zone.name: self._zone_file(zone) for zone in self.zones}
        nsd_conf = self.dir / "nsd.conf"
        nsd_conf.write_text(
            "server:\n"
            f"  ip-address: 127.0.0.1@{self.nsd_port}\n  port: {self.nsd_port}\n"
            f"  zonesdir: \"{self.dir}\"\n  pidfile: \"{self.dir}/nsd.pid\"\n  username: \"\"\n"
            f"  xfrdfile: \"{self.dir}/xfrd.state\"\n  zonelistfile: \"{self.dir}/zone.list\"\n"
            f"  logfile: \"{self.dir}/nsd.log\"\n  verbosity: 1\n  server-count: 1\n  do-ip6: no\n"
            "remote-control:\n  control-enable: no\n"
            + "".join(f"zone:\n  name: \"{name}.\"\n  zonefile: \"{path}\"\n" for name, path in zone_files.items()))
        self.nsd = subprocess.Popen([need("nsd"), "-d", "-c", str(nsd_conf)], stdout=subprocess.DEVNULL,
                                    stderr=open(self.dir / "nsd.stderr", "wb"))
        anchors = self.dir / "anchors.keys"
        unbound_conf = self.dir / "unbound.conf"
        unbound_conf.write_text(
            "server:\n"
            f"  interface: 127.0.0.1\n  port: {self.resolver_port}\n  do-ip6: no\n"
            "  access-control: 127.0.0.0/8 allow\n  do-not-query-localhost: no\n"
            f"  username: \"\"\n  chroot: \"\"\n  directory: \"{self.dir}\"\n  pidfile: \"{self.dir}/unbound.pid\"\n"
            f"  logfile: \"{self.dir}/unbound.log\"\n  use-syslog: no\n  verbosity: 1\n  val-log-level: 2\n"
            "  module-config: \"validator iterator\"\n  cache-max-ttl: 1\n  cache-max-negative-ttl: 1\n"
            # unbound answers the RFC 6761 names (test., example., ...) itself unless told not to.
            + "".join(f"  local-zone: \"{tld}.\" nodefault\n" for tld in sorted({z.name.rsplit(".", 1)[-1] for z in self.zones}))
            + (f"  trust-anchor-file: \"{anchors}\"\n" if anchors.exists() else "")
            + "remote-control:\n  control-enable: no\n"
            # Every name, the root included, is asked of the local NSD only: nothing leaves loopback.
            + "".join(f"stub-zone:\n  name: \"{name}.\"\n  stub-addr: 127.0.0.1@{self.nsd_port}\n"
                      for name in [*zone_files, ""]))
        check = subprocess.run([need("unbound-checkconf"), str(unbound_conf)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.unbound = subprocess.Popen([need("unbound"), "-d", "-c", str(unbound_conf)],
                                        stdout=subprocess.DEVNULL, stderr=open(self.dir / "unbound.stderr", "wb"))
        first = self.zones[0].name
        wait_until(lambda: self.dig(f"ns.{first}", "A").returncode == 0, 30, "nsd and unbound",
                   self.dir / "unbound.log", self.unbound)
        return self

    def dig(self, name: str, rtype: str, *, port: int | None = None) -> subprocess.CompletedProcess:
        """``dig`` against unbound (or ``port``); returncode 0 when the answer has data."""
        out = subprocess.run([need("dig"), "+time=2", "+tries=1", "+dnssec", "-p", str(port or self.resolver_port),
                              "@127.0.0.1", name, rtype], capture_output=True, text=True, timeout=10)
        ok = out.returncode == 0 and re.search(r"ANSWER: [1-9]", out.stdout) is not None
        return subprocess.CompletedProcess(out.args, 0 if ok else 1, out.stdout, out.stderr)

    def stop(self) -> None:
        stop_process(self.unbound)
        stop_process(self.nsd)

    def __enter__(self) -> "LoopbackDnssec":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
