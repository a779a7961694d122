"""``mxguard serve`` start-up as a new operator meets it: listeners named with their ports,
a certificate that ``curl --cacert`` accepts on the listen address, and a failed start
that prints only its reason."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from mxguard.config import load_settings
from mxguard.supervisor import STOP_TIMEOUT
from tests.support.gateway import init_data_dir
from tests.support.peers import free_port, stop_process, wait_until

MXGUARD = str(Path(sys.executable).with_name("mxguard"))


def serve(data_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXGUARD_")}
    return subprocess.run([MXGUARD, "--data-dir", str(data_dir), "serve", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("option, endpoint", [("--smtp", "127.0.0.1"), ("--smtp", "[::1]"),
                                              ("--smtp", "localhost"), ("--web", "127.0.0.1"),
                                              ("--web", "::1")])
def test_a_listener_without_port_is_refused_naming_the_option(tmp_path, option, endpoint):
    init_data_dir(tmp_path / "data")
    out = serve(tmp_path / "data", option, endpoint, "--no-web" if option == "--smtp" else "--smtp=127.0.0.1:0")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.strip().splitlines() == [
        f"error: {option} {endpoint}: give the port too, e.g. {option} "
        f"{'127.0.0.1:25' if option == '--smtp' else '127.0.0.1:8443'}"]
    assert out.stdout == ""


def test_a_failed_start_prints_only_its_reason(tmp_path):
    """Another node holding the spool-worker lock used to print "waiting to take over" before the bind error."""
    data = tmp_path / "data"
    init_data_dir(data)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with open(data / "spool-worker.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = serve(data, "--no-web", "--smtp", f"127.0.0.1:{port}")
    busy.close()
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: smtp.listen: cannot listen on 127.0.0.1:{port}:")
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_generated_certificate_names_the_listen_addresses(tmp_path):
    data = tmp_path / "data"
    init_data_dir(data, hostname="mx1.example.test")
    s = load_settings(data, environ={})
    for cert_file in (s.tls.cert_file, s.tls.extra_cert_file):
        cert = x509.load_pem_x509_certificate(s.path(cert_file).read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName)[:2] == ["mx1.example.test", "localhost"]
        assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


def test_curl_with_the_generated_certificate_reaches_the_console_on_127_0_0_1(tmp_path):
    """The README's ``curl --cacert .../tls/cert.pem https://127.0.0.1:PORT/`` example, for real."""
    data = tmp_path / "data"
    init_data_dir(data, hostname="mx1.example.test")
    web_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXGUARD_")}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([MXGUARD, "--data-dir", str(data), "serve", "--smtp", "127.0.0.1:0",
                             "--web", f"127.0.0.1:{web_port}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"))
    try:
        def up() -> bool:
            with socket.create_connection(("127.0.0.1", web_port), timeout=1):
                return True
        wait_until(up, 30, "mxguard serve", log, proc)
        for host in ("127.0.0.1", "localhost"):
            out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
                                  str(data / "tls" / "cert.pem"), f"https://{host}:{web_port}/login"],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert out.stdout == "200"
        assert "listening" in log.read_text() and f"127.0.0.1:{web_port}" in log.read_text()
    finally:
        stop_process(proc)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _gone(pid: int) -> bool:
    """Every thread of ``pid`` has exited. The leader shows ``Z`` as soon as it exits, while its
    other threads (say one waiting on an fsync) may still hold the process's sockets open."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for tid in tasks:
        try:
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except FileNotFoundError:
            continue
        if state not in ("Z", "X"):
            return False
    return True


def test_serve_runs_one_process_per_cpu_by_default_and_they_end_with_it(tmp_path):
    """Issue 17: no --workers and the data dir's ``workers = 0`` mean one gateway process per CPU
    the supervisor may run on; when the supervisor is killed outright, no worker stays behind."""
    from mxguard.supervisor import available_cpus, worker_count
    assert available_cpus() == len(os.sched_getaffinity(0))
    assert worker_count(0, log_file=False) == available_cpus() and worker_count(3, log_file=False) == 3
    assert worker_count(0, log_file=True) == 1 and worker_count(2, log_file=True) == 2  # each would rotate the file
    data = tmp_path / "data"
    init_data_dir(data)
    assert "\nworkers = 0\n" in (data / "mxguard.toml").read_text()
    expected = available_cpus()
    if expected < 2:
        pytest.skip("one CPU: serve runs a single process")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXGUARD_")}
    proc = subprocess.Popen([MXGUARD, "--data-dir", str(data), "serve", "--no-web", "--smtp", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(_children(proc.pid)) == expected, 30, "the workers", None, proc)

        def greets() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                return s.recv(100).startswith(b"220")
        wait_until(greets, 30, "a worker's greeting", None, proc)
        workers = _children(proc.pid)
        proc.kill()  # SIGKILL: the supervisor cannot forward anything
        proc.wait(10)
        wait_until(lambda: all(_gone(pid) for pid in workers), 10, "the workers to end")
        assert all(_gone(pid) for pid in workers), workers
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "nothing listens once the gateway is gone"
    finally:
        if proc.poll() is None:
            stop_process(proc)


def test_a_stop_signal_while_the_workers_start_stops_every_worker(tmp_path):
    """SIGTERM as soon as serve says it listens lands while the supervisor is still forking
    workers; each worker forked after it must be stopped too, not left to the 60 s kill.

    A worker that got the signal after its handlers were set finishes its start first, which
    on a loaded machine takes many seconds; so the wait is longer than ``STOP_TIMEOUT`` and
    the check is the exit status: the supervisor exits 1 when it had to kill a worker."""
    data = tmp_path / "data"
    init_data_dir(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXGUARD_")}
    for _ in range(5):
        proc = subprocess.Popen([MXGUARD, "--data-dir", str(data), "serve", "--no-web", "--workers", "4",
                                 "--smtp", f"127.0.0.1:{free_port()}"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                if "listening" in line:
                    proc.send_signal(signal.SIGTERM)
                    break
            workers = _children(proc.pid) if proc.poll() is None else []
            output, _ = proc.communicate(timeout=STOP_TIMEOUT + 30)
            # -SIGTERM: the signal came before the supervisor's handler (then the kernel ends the workers).
            assert proc.returncode in (0, -signal.SIGTERM), output
            assert "did not stop after SIGTERM" not in output, output
            wait_until(lambda: all(_gone(pid) for pid in workers), 10, "the workers to end")
        finally:
            if proc.poll() is None:
                stop_process(proc)
