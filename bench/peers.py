"""The benchmark's processes: downstream sinks, the targets (Postfix, Haraka, mxguard) and the load client.

Everything runs on 127.0.0.1 with ports picked by binding port 0, in a temp
dir that the caller removes. Needs root (Postfix instances run as root with
their own config and queue; smtp-sink drops to the ``postfix`` user).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
sys.path.insert(0, str(REPO))

from tests.support.peers import free_port, stop_process  # noqa: E402
from tests.support.postfix import PostfixInstance  # noqa: E402

#: Recipient domains: the targets send ``plain.bench.test`` in clear and ``tls.bench.test`` over STARTTLS.
PLAIN_DOMAIN = "plain.bench.test"
TLS_DOMAIN = "tls.bench.test"



def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Wait until something accepts on ``127.0.0.1:port``.

    Raises:
        RuntimeError: nothing listens after ``timeout`` seconds, or ``proc`` exited.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or proc.args[0]} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what or 'server'} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")



def make_certificate(directory: Path, key_type: str = "rsa") -> tuple[Path, Path]:
    """A self-signed certificate for ``mx.bench.test`` and 127.0.0.1.

    Args:
        key_type: ``"rsa"`` (RSA-2048, the anchors' certificate) or ``"ec"`` (ECDSA P-256).

    Returns:
        ``(cert_file, key_file)`` (PEM).
    """
    from mxguard.tls.certs import generate_self_signed, write_private
    cert, key = generate_self_signed("mx.bench.test", extra_names=["127.0.0.1"], key_type=key_type)
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"cert-{key_type}.pem", directory / f"key-{key_type}.pem"
    write_private(cert_file, cert)
    write_private(key_file, key)
    os.chmod(cert_file, 0o644)
    os.chmod(key_file, 0o644)  # Postfix and Haraka read it; a throw-away bench key
    return cert_file, key_file


# -- the load client ------------------------------------------------------------------------------------

def build_c(name: str) -> Path:
    """Compile ``bench/<name>.c`` into ``bench/.cache/<name>`` (when the source is newer).

    Raises:
        RuntimeError: gcc or the OpenSSL headers (Debian ``libssl-dev``) are missing.
    """
    src, binary = BENCH_DIR / f"{name}.c", CACHE / name
    if binary.exists() and binary.stat().st_mtime >= src.stat().st_mtime:
        return binary
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc not found; run scripts/install-peers.sh as root (gcc, libssl-dev)")
    CACHE.mkdir(exist_ok=True)
    proc = subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(binary), str(src), "-lssl", "-lcrypto"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"cannot compile {name}.c (is libssl-dev installed?):\n{proc.stderr[-2000:]}")
    return binary


def build_loadclient() -> Path:
    """The compiled load client (see :func:`build_c`)."""
    return build_c("loadclient")


@dataclass
class ClientResult:
    """What one load client run reports."""

    sent: int
    errors: int
    not_attempted: int
    elapsed_s: float
    cpu_s: float
    latencies_ms: list[float]
    stderr: str
    #: With a fixed rate: transactions that started more than 10 ms behind their slot.
    late: int = 0


def run_loadclient(port: int, *, tls: bool, sessions: int, messages: int, per_conn: int, size: int,
                   rcpt: str, time_limit: float, workdir: Path, rate: float | None = None) -> ClientResult:
    """Run the compiled load client once against ``127.0.0.1:port`` and read its report.

    Args:
        size: message size in bytes (headers included).
        time_limit: no new transaction after this many seconds.
        rate: offered load in messages per second (an open-loop schedule shared by the
            sessions); None: every session sends as fast as it can.

    Raises:
        RuntimeError: the client crashed or printed no report.
    """
    binary = build_loadclient()
    lat_file = workdir / "latencies.txt"
    args = [str(binary), "-p", str(port), "-c", str(sessions), "-n", str(messages), "-k", str(per_conn),
            "-s", str(size), "-T", str(time_limit), "-w", "30", "-o", str(lat_file), "-r", rcpt]
    if tls:
        args.append("-t")
    if rate:
        args += ["-R", f"{rate:.3f}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=time_limit + 120)
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"loadclient failed ({proc.returncode}): {proc.stderr[-2000:]}") from None
    lat = [float(x) / 1000 for x in lat_file.read_text().split()] if lat_file.exists() else []
    return ClientResult(report["sent"], report["errors"], report["not_attempted"], report["elapsed_s"],
                        report["cpu_s"], lat, proc.stderr, report.get("late", 0))


# -- downstream sinks ----------------------------------------------------------------------------------

class SmtpSink:
    """Postfix's ``smtp-sink`` (plain SMTP only): accepts and drops mail; counts messages.

    Its ``-c`` counters (``sess=N quit=N mesg=N``) are flushed only on a
    terminal, so it runs on a pty and a thread keeps the latest count.
    """

    def __init__(self, backlog: int = 1024, port: int | None = None):
        self.port = port or free_port()
        self.count = 0
        self.backlog = backlog
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SmtpSink":
        if shutil.which("smtp-sink") is None:
            raise RuntimeError("smtp-sink not found; run scripts/install-peers.sh as root (postfix)")
        master, slave = pty.openpty()
        self._master = master
        self.proc = subprocess.Popen(["smtp-sink", "-u", "postfix", "-c", "-h", "sink.bench.test",
                                      f"127.0.0.1:{self.port}", str(self.backlog)],
                                     stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        os.close(slave)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_port(self.port, proc=self.proc, what="smtp-sink")
        return self

    def _read(self) -> None:
        pattern = re.compile(rb"mesg=(\d+)")
        tail = b""
        while True:
            try:
                ready, _, _ = select.select([self._master], [], [], 0.5)
                if not ready:
                    if self.proc.poll() is not None:
                        return
                    continue
                data = os.read(self._master, 65536)
            except OSError:
                return
            if not data:
                return
            tail = (tail + data)[-200:]
            found = pattern.findall(tail)
            if found:
                self.count = int(found[-1])

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        stop_process(self.proc)
        try:
            os.close(self._master)
        except OSError:
            pass


class TlsSink:
    """The STARTTLS-capable sink: ``bench/tlssink.c`` (accepts and drops mail; counts messages).

    It costs a fraction of the Postfix sink below, so it is not the bottleneck.
    """

    def __init__(self, cert_file: Path, key_file: Path):
        self.cert_file, self.key_file = cert_file, key_file
        self.port = free_port()
        self.count = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> "TlsSink":
        binary = build_c("tlssink")
        self.proc = subprocess.Popen([str(binary), str(self.port), str(self.cert_file), str(self.key_file)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_port(self.port, proc=self.proc, what="tlssink")
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.count = int(line)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        stop_process(self.proc)


class DiscardSink:
    """A STARTTLS-capable sink made of Postfix: a private instance whose only transport is ``discard``.

    Its queue lives on tmpfs (``/dev/shm``); messages are counted from its log
    (``status=sent``). Measured here at about 2.4 ms CPU per TLS message, so on
    two shared cores it is a bottleneck: ``--tls-sink postfix`` only.
    """

    def __init__(self, cert_file: Path, key_file: Path):
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
        self.base = Path(tempfile.mkdtemp(prefix="mxguard-bench-sink-", dir=shm))
        self.pf = PostfixInstance(self.base, None, cert_file=cert_file, key_file=key_file, extra={
            "default_transport": "discard:bench sink", "relay_transport": "discard:bench sink",
            "default_process_limit": "1000", "smtpd_tls_loglevel": "0", "myhostname": "tls-sink.bench.test",
        })
        self._offset = 0
        self._count = 0
        self._partial = b""

    def start(self) -> "DiscardSink":
        self.pf.start()
        return self

    @property
    def port(self) -> int:
        return self.pf.port

    @property
    def count(self) -> int:
        """Messages discarded so far (reads the new part of the log)."""
        try:
            with open(self.pf.maillog, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return self._count
        self._offset += len(data)
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        self._count += data[:cut].count(b" status=sent ")
        return self._count

    @property
    def pids(self) -> list[int]:
        return [self.pf.master_pid()]

    def stop(self) -> None:
        self.pf.stop()


# -- targets -------------------------------------------------------------------------------------------

class Target(ABC):
    """A mail system under test, started for one TLS mode.

    Attributes:
        name: ``direct`` | ``postfix`` | ``haraka`` | ``mxguard`` (the JSON ``target``).
        label: the row label in the table (``haraka x2``, ``mxguard -filters`` …).
        filters: mxguard's built-in filters on (the JSON ``filters``).
    """

    name = ""
    label = ""
    filters = False

    @abstractmethod
    def start(self, tls: bool, plain_sink: SmtpSink, tls_sink: "TlsSink | DiscardSink") -> None:
        """Start the target relaying to ``tls_sink`` (STARTTLS on both hops) or ``plain_sink``."""

    @property
    @abstractmethod
    def port(self) -> int:
        """The loopback port the load client connects to."""

    @property
    @abstractmethod
    def pids(self) -> list[int]:
        """Root pids of the target's processes (CPU and memory include all descendants)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop every process of the target."""

    def describe(self) -> str:
        return self.label


class DirectTarget(Target):
    """No gateway: the load client talks to the sink itself (the latency baseline)."""

    name = label = "direct"

    def start(self, tls, plain_sink, tls_sink):
        self.sink = tls_sink if tls else plain_sink

    @property
    def port(self):
        return self.sink.port

    @property
    def pids(self):
        return self.sink.pids  # the row's CPU is the sink's own

    def stop(self):
        pass

    def describe(self):
        return "load client → sink (Postfix smtp-sink for plain, bench/tlssink.c for STARTTLS)"


class PostfixTarget(Target):
    """A private Postfix relay (store-and-forward, fsync'd queue on disk) relaying to the sink."""

    name = label = "postfix"

    def __init__(self, workdir: Path, cert: tuple[Path, Path]):
        self.workdir, self.cert = workdir, cert
        self.pf: PostfixInstance | None = None

    def start(self, tls, plain_sink, tls_sink):
        sink = tls_sink if tls else plain_sink
        base = Path(tempfile.mkdtemp(prefix="pf-relay-", dir=self.workdir))
        self.pf = PostfixInstance(base, f"127.0.0.1:{sink.port}", cert_file=self.cert[0], key_file=self.cert[1],
                                  smtp_tls_level="encrypt" if tls else "none", extra={
                                      # Enough smtpd processes for 200 sessions at once (default 100).
                                      "default_process_limit": "400", "smtpd_tls_loglevel": "0",
                                      "smtp_tls_loglevel": "0"})
        self.pf.start()

    @property
    def port(self):
        return self.pf.port

    @property
    def pids(self):
        return [self.pf.master_pid()]

    def stop(self):
        if self.pf:
            self.pf.stop()
            self.pf = None

    def describe(self):
        version = subprocess.run(["postconf", "-dh", "mail_version"], capture_output=True, text=True).stdout.strip()
        return f"Postfix {version} relay, queue on disk (fsync), connection cache on"


class ProcessTarget(Target):
    """A target that is one child process (and its children) listening on ``self._port``.

    Subclasses start ``self.proc`` (writing to ``self.log``) in :meth:`start`.
    """

    proc: subprocess.Popen | None = None
    _port = 0

    @property
    def port(self):
        return self._port

    @property
    def pids(self):
        return [self.proc.pid]

    def stop(self):
        stop_process(self.proc)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()


class HarakaTarget(ProcessTarget):
    """Haraka from npm as a forwarder: ``rcpt_to.in_host_list`` + ``queue/smtp_forward`` (+ ``tls``).

    Args:
        nodes: worker processes (Haraka ``smtp.ini`` ``nodes``).
    """

    name = "haraka"

    def __init__(self, workdir: Path, cert: tuple[Path, Path], nodes: int = 1):
        self.workdir, self.cert, self.nodes = workdir, cert, nodes
        self.label = "haraka" if nodes == 1 else f"haraka x{nodes}"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def install() -> Path:
        """Run ``bench/setup-haraka.sh`` (npm install into bench/.cache); return the haraka script."""
        subprocess.run([str(BENCH_DIR / "setup-haraka.sh")], check=True, timeout=600)
        return CACHE / "haraka" / "node_modules" / "Haraka" / "bin" / "haraka"

    def start(self, tls, plain_sink, tls_sink):
        haraka = self.install()
        sink = tls_sink if tls else plain_sink
        inst = Path(tempfile.mkdtemp(prefix="haraka-", dir=self.workdir)) / "inst"
        subprocess.run(["node", str(haraka), "-i", str(inst)], check=True, capture_output=True, timeout=60)
        cfg = inst / "config"
        self._port = free_port()
        (cfg / "smtp.ini").write_text(f"listen=127.0.0.1:{self._port}\nnodes={self.nodes}\n"
                                      "graceful_shutdown=false\n")
        (cfg / "me").write_text("haraka.bench.test\n")
        (cfg / "host_list").write_text(f"{PLAIN_DOMAIN}\n{TLS_DOMAIN}\n")
        (cfg / "plugins").write_text("tls\nrcpt_to.in_host_list\nqueue/smtp_forward\n")
        shutil.copy(self.cert[0], cfg / "tls_cert.pem")
        shutil.copy(self.cert[1], cfg / "tls_key.pem")
        (cfg / "tls.ini").write_text("[main]\nkey=tls_key.pem\ncert=tls_cert.pem\n")
        (cfg / "smtp_forward.ini").write_text(
            f"host=127.0.0.1\nport={sink.port}\nenable_tls={'true' if tls else 'false'}\n"
            "[tls]\nrejectUnauthorized=false\n")
        self.log = open(inst / "haraka.log", "wb")
        self.proc = subprocess.Popen(["node", str(haraka), "-c", str(inst)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=inst)
        wait_port(self._port, 60, self.proc, "haraka")
        time.sleep(0.5 if self.nodes > 1 else 0.1)  # let every worker come up


    def describe(self):
        pkg = CACHE / "haraka" / "node_modules" / "Haraka" / "package.json"
        version = json.loads(pkg.read_text())["version"] if pkg.exists() else "?"
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
        return (f"Haraka {version} (Node.js {node}), nodes={self.nodes}, smtp_forward (pooled downstream "
                f"connections), default log level")


class BareForwarderTarget(ProcessTarget):
    """``bench/bare_forwarder.py``: aiosmtpd → aiosmtplib with nothing else (the issue's anchor row).

    The floor of a Python asyncio relay on this machine and Python: what
    aiosmtpd, aiosmtplib and the event loop cost with no filters, no message
    log, no routing and a new downstream connection per message.
    """

    name = "aiosmtpd"
    label = "aiosmtpd bare"

    def __init__(self, workdir: Path, cert: tuple[Path, Path]):
        self.workdir, self.cert = workdir, cert
        self.proc: subprocess.Popen | None = None

    def start(self, tls, plain_sink, tls_sink):
        sink = tls_sink if tls else plain_sink
        self._port = free_port()
        args = [sys.executable, str(BENCH_DIR / "bare_forwarder.py"), "--listen", str(self._port),
                "--sink", str(sink.port)]
        if tls:
            args += ["--cert", str(self.cert[0]), "--key", str(self.cert[1])]
        self.log = open(self.workdir / "bare-forwarder.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_port(self._port, 30, self.proc, "bare forwarder")


    def describe(self):
        from importlib.metadata import version
        return (f"bench/bare_forwarder.py: aiosmtpd {version('aiosmtpd')} → aiosmtplib {version('aiosmtplib')}, "
                f"Python {sys.version.split()[0]}, no filters, no log, a new downstream connection per message")


def mxguard_has_filter_settings() -> bool:
    """True when this mxguard build has a ``[filters]`` settings section (the filtering branch)."""
    from mxguard.config import Settings
    return "filters" in Settings.model_fields


_DNS = None


def loopback_dns():
    """One DNS server on loopback for the whole run (the tests' zone: SPF/DKIM/DMARC of the test domains)."""
    global _DNS
    if _DNS is None:
        from tests.support.dns import LoopbackDNS
        _DNS = LoopbackDNS().start()
    return _DNS


class MxguardTarget(Target):
    """``mxguard serve`` as a subprocess with its own data dir (SQLite, message log on).

    Args:
        filters: run with the built-in filters on (``MXGUARD_FILTERS__ENABLED=true``) or off.
            On a build without a ``[filters]`` section nothing is set (no filters exist).
        key_type: certificate ``"rsa"`` (RSA-2048) or ``"ec"`` (ECDSA P-256).
        env: more ``MXGUARD_*`` settings for the process.
    """

    name = "mxguard"

    def __init__(self, workdir: Path, cert: tuple[Path, Path], filters: bool, env: dict[str, str] | None = None):
        self.workdir, self.cert, self.filters = workdir, cert, filters
        self.label = "mxguard +filters" if filters else "mxguard -filters"
        self.env = dict(env or {})
        # One process unless a target asks for more (``serve`` alone runs one per CPU).
        self.serve_args: list[str] = ["--workers", "1"]
        self.proc: subprocess.Popen | None = None

    def _cli(self, data_dir: Path, *args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "mxguard", "--data-dir", str(data_dir), *args],
                              capture_output=True, text=True, timeout=120, env=self._environ())
        if proc.returncode != 0:
            raise RuntimeError(f"mxguard {' '.join(args)} failed: {proc.stderr[-2000:]}")

    def _environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MXGUARD_")}
        if mxguard_has_filter_settings():
            env["MXGUARD_FILTERS__ENABLED"] = "true" if self.filters else "false"
            # Sender checks ask a DNS server on loopback: nothing leaves the machine.
            env["MXGUARD_FILTERS__DNS_SERVERS"] = loopback_dns().address
        # Every bench session comes from 127.0.0.1: the per-client connection limit (50) would
        # refuse the 200-session rows. Postfix exempts $mynetworks (loopback included) from its
        # own per-client limit, so the same load is fair only with this one raised too.
        env["MXGUARD_SMTP__MAX_CONNECTIONS_PER_CLIENT"] = "100000"
        if getattr(self, "extra_cert", None):
            env["MXGUARD_TLS__EXTRA_CERT_FILE"], env["MXGUARD_TLS__EXTRA_KEY_FILE"] = map(str, self.extra_cert)
        env.update(self.env)
        return env

    def routes(self, plain_sink, tls_sink) -> list[tuple[str, str, str]]:
        """``(domain, server, downstream TLS mode)`` of the two bench domains."""
        return [(PLAIN_DOMAIN, f"127.0.0.1:{plain_sink.port}", "off"),
                (TLS_DOMAIN, f"127.0.0.1:{tls_sink.port}", "required")]

    def start(self, tls, plain_sink, tls_sink):
        data_dir = Path(tempfile.mkdtemp(prefix="mxguard-", dir=self.workdir)) / "data"
        (data_dir / "tls").mkdir(parents=True)
        shutil.copy(self.cert[0], data_dir / "tls" / "cert.pem")
        shutil.copy(self.cert[1], data_dir / "tls" / "key.pem")  # init keeps an existing certificate
        # Issue 5 goal 2: offer ECDSA P-256 beside the RSA-2048 certificate the anchors used.
        self.extra_cert = make_certificate(data_dir / "tls", "ec" if "rsa" in self.cert[0].name else "rsa")
        self._port = free_port()
        self._cli(data_dir, "init", "--hostname", "mx.bench.test")
        for domain, server, mode in self.routes(plain_sink, tls_sink):
            self._cli(data_dir, "domain", "add", domain, "--server", server, "--downstream-tls", mode)
        self.log = open(data_dir / "serve.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mxguard", "--data-dir", str(data_dir), "serve",
                                      "--no-web", "--smtp", f"127.0.0.1:{self._port}", *self.serve_args],
                                     env=self._environ(),
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_port(self._port, 60, self.proc, "mxguard serve")
        self.data_dir = data_dir

    @property
    def port(self):
        return self._port

    @property
    def pids(self):
        return [self.proc.pid]

    def stop(self):
        stop_process(self.proc, 20)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def describe(self):
        wired = ("MXGUARD_FILTERS__ENABLED=" + ("true" if self.filters else "false")
                 if mxguard_has_filter_settings() else "no [filters] section in this build: filters do not exist yet")
        extra = " ".join(f"{k}={v}" for k, v in self.env.items())
        args = " ".join(getattr(self, "serve_args", []) or [])
        return f"mxguard serve{(' ' + args) if args else ''} (SQLite, message log on), {wired}{(' ' + extra) if extra else ''}"


class MxguardDaneTarget(MxguardTarget):
    """``mxguard serve`` with both bench domains in ``dane`` mode (RFC 7672), through a real
    validating resolver (unbound) over zones NSD serves (tests/support/dnssec.py).

    The STARTTLS domain's server is ``mx1.dane.bench.test``: a DNSSEC-signed zone with a
    ``3 1 1`` TLSA record of the sink's key, so every message goes over DANE-verified TLS.
    The plain domain's server is ``mx1.plain.bench.test``: an unsigned zone, so DANE does not
    apply and the mode falls back to opportunistic (the sink offers no STARTTLS). The first
    message of a run pays the lookups; the rest take the per-process cache, which is the cost
    the issue bounds (0.1 ms CPU per message).
    """

    def __init__(self, workdir: Path, cert: tuple[Path, Path], env: dict[str, str] | None = None):
        super().__init__(workdir, cert, filters=True, env=env)
        self.label = "mxguard +filters dane"
        self.dnssec = None

    def _environ(self) -> dict[str, str]:
        env = super()._environ()
        if self.dnssec is not None:
            env["MXGUARD_DOWNSTREAM__DNS_SERVERS"] = f"127.0.0.1:{self.dnssec.resolver_port}"
            env["MXGUARD_DOWNSTREAM__DNS_TIMEOUT"] = "3"
        return env

    def start(self, tls, plain_sink, tls_sink):
        import hashlib

        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from tests.support.dnssec import LoopbackDnssec, Zone

        leaf = x509.load_pem_x509_certificate(Path(self.cert[0]).read_bytes())
        spki = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        digest = hashlib.sha256(spki).hexdigest()
        self.dnssec = LoopbackDnssec([
            Zone("dane.bench.test", [f"_{tls_sink.port}._tcp.mx1 IN TLSA 3 1 1 {digest}", "mx1 IN A 127.0.0.1"]),
            Zone("plain.bench.test", ["mx1 IN A 127.0.0.1"], signed=False),
        ]).start()
        super().start(tls, plain_sink, tls_sink)

    def routes(self, plain_sink, tls_sink) -> list[tuple[str, str, str]]:
        return [(PLAIN_DOMAIN, f"mx1.plain.bench.test:{plain_sink.port}", "dane"),
                (TLS_DOMAIN, f"mx1.dane.bench.test:{tls_sink.port}", "dane")]

    def _last_policy(self) -> dict:
        """What decided the last logged delivery's TLS (``{}`` when no record has a leg yet)."""
        proc = subprocess.run([sys.executable, "-m", "mxguard", "--data-dir", str(self.data_dir), "log",
                               "--last", "1", "--json"], capture_output=True, text=True, timeout=60,
                              env=self._environ())
        legs = [leg for line in proc.stdout.splitlines() if line.strip()
                for leg in json.loads(line).get("downstream") or []]
        return {k: legs[-1].get(k) for k in ("policy", "tls", "verified")} if legs else {}

    def stop(self):
        # Read while the gateway runs: its message log is written in batches (every 0.2 s), and a
        # gateway slow to stop on a loaded machine may be killed before its last batch.
        deadline = time.monotonic() + 10
        self.last_policy = self._last_policy()
        while not self.last_policy and time.monotonic() < deadline:
            time.sleep(0.2)
            self.last_policy = self._last_policy()
        super().stop()
        try:
            # The figures only mean something if DANE was really in the path.
            self.last_policy = self.last_policy or self._last_policy()
            print(f"  {self.label}: last delivery's TLS policy {self.last_policy}", file=sys.stderr)
        finally:
            if self.dnssec is not None:
                self.dnssec.stop()
                self.dnssec = None

    def describe(self):
        return (super().describe() + "; both domains in `dane` mode through unbound + NSD on loopback "
                "(STARTTLS: signed zone, TLSA 3 1 1 of the sink's key; plain: unsigned zone, falls back to "
                "opportunistic)")
