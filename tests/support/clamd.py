"""A private clamd (ClamAV daemon) on loopback with a signature database built at test time.

No ClamAV database can be downloaded here, so the database is made from the
corpus's ClamAV test files and the EICAR string: MD5 signatures (``.hdb``,
``md5:size:name``, what ``sigtool --md5`` prints) for the whole files, and a
body signature (``.ndb``) for EICAR so it is found anywhere in a stream.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
from pathlib import Path

from tests.support.peers import free_port, need, stop_process, wait_until

# Split so that this source file is not itself the test virus.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def build_database(dbdir: Path, corpus: Path) -> None:
    """Write ``local.hdb`` and ``local.ndb`` into ``dbdir``."""
    dbdir.mkdir(parents=True, exist_ok=True)
    lines = [f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:Eicar-Test-Signature"]
    clam = (corpus / "clamav" / "clam.exe.bin").read_bytes()
    lines.append(f"{hashlib.md5(clam).hexdigest()}:{len(clam)}:ClamAV-Test-File")
    (dbdir / "local.hdb").write_text("\n".join(lines) + "\n")
    (dbdir / "local.ndb").write_text(f"Eicar-NDB:0:*:{EICAR.hex()}\n")


class ClamdInstance:
    """``start()`` runs clamd in the foreground; ``stop()``/``start()`` again keep the same port and socket."""

    def __init__(self, base: Path, corpus: Path):
        self.base = base
        self.port = free_port()
        self.socket_path = base / "clamd.sock"
        self.log = base / "clamd.log"
        self.proc: subprocess.Popen | None = None
        build_database(base / "db", corpus)
        (base / "clamd.conf").write_text(
            f"DatabaseDirectory {base / 'db'}\nTCPSocket {self.port}\nTCPAddr 127.0.0.1\nForeground yes\n"
            f"LocalSocket {self.socket_path}\nLogFile {self.log}\nStreamMaxLength 30M\n")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"zPING\0")
            return s.recv(16).startswith(b"PONG")

    def start(self) -> "ClamdInstance":
        self.proc = subprocess.Popen([need("clamd"), "-c", str(self.base / "clamd.conf")],
                                     stdout=subprocess.DEVNULL, stderr=open(self.base / "stderr.log", "ab"))
        wait_until(self.ping, 60, "clamd", self.log, self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
