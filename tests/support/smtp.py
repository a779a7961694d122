"""A blocking SMTP client (Python's smtplib) that records every reply, for tests."""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
from dataclasses import dataclass, field

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}( |$)")


@dataclass
class Outcome:
    """Replies one transaction got: ``mail``, per recipient ``rcpt``, ``data`` (final)."""

    ehlo: str = ""
    tls: str | None = None
    mail: tuple[int, str] | None = None
    rcpt: dict[str, tuple[int, str]] = field(default_factory=dict)
    data: tuple[int, str] | None = None

    @property
    def accepted(self) -> list[str]:
        return [r for r, (code, _) in self.rcpt.items() if code in (250, 251)]


def crlf(data: bytes) -> bytes:
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def message(subject: str = "test", body: str = "Hello.\n", sender: str = "a@sender.test",
            to: str = "user@example.com", extra_headers: str = "") -> bytes:
    return crlf((f"From: {sender}\nTo: {to}\nSubject: {subject}\nMessage-ID: <{abs(hash(subject))}@sender.test>\n"
                 f"Date: Sun, 29 Nov 2026 10:00:00 +0000\n{extra_headers}\n{body}").encode())


def send(port: int, rcpts: list[str], data: bytes | None = None, *, sender: str = "a@sender.test",
         starttls: bool = True, ctx: ssl.SSLContext | None = None, mail_options: list[str] | None = None,
         host: str = "127.0.0.1") -> Outcome:
    """One transaction through ``host:port``; replies are recorded, never raised."""
    out = Outcome()
    data = data if data is not None else message(to=rcpts[0] if rcpts else "x@example.com")
    with smtplib.SMTP(host, port, local_hostname="client.sender.test", timeout=30) as client:
        code, text = client.ehlo()
        out.ehlo = text.decode()
        if starttls:
            if ctx is None:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            client.starttls(context=ctx)
            client.ehlo()
            out.tls = client.sock.version()
        code, text = client.mail(sender, mail_options or [])
        out.mail = (code, text.decode())
        if code != 250:
            return out
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            out.rcpt[rcpt] = (code, text.decode())
        if out.accepted:
            code, text = client.data(crlf(data))
            out.data = (code, text.decode())
        else:
            client.rset()
    return out


class Raw:
    """A raw client socket: write exact bytes, read replies (for attacks smtplib would not send)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, timeout: float = 5) -> str:
        """One complete (possibly multi-line) reply."""
        self.sock.settimeout(timeout)
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed: " + " | ".join(lines))
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] != b"-":
                return "\r\n".join(lines)

    def cmd(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, socket.timeout):
            return True

    def close(self) -> None:
        self.sock.close()
