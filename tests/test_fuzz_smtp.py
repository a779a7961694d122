"""A hypothesis state machine drives the real SMTP listener with valid and invalid dialogue.

Invariants: every reply is a well-formed RFC 5321 reply with a known code; every 2xx/4xx/5xx
reply (but the greeting and the EHLO/HELO replies, RFC 2034) carries an enhanced status code of
its own class, and 354 carries none (RFC 3463 has no class 3); the gateway never hits an
unhandled exception; and the downstream server only ever receives messages the gateway
answered 250 for.
"""

from __future__ import annotations

import re
import socket
import ssl
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mxguard.smtp.inbound import InboundHandler

KNOWN_CODES = {211, 214, 220, 221, 250, 251, 252, 354, 421, 450, 451, 452, 455, 500, 501, 502, 503, 504,
               521, 530, 550, 551, 552, 553, 554, 555, 556}
REPLY_LINE = re.compile(r"^(\d{3})([ -])(.*)$")
ENHANCED_CODE = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}(?: |$)")


def check_enhanced(verb: str, code: int, lines: list[str]) -> None:
    """RFC 2034 / RFC 3463: the enhanced code is there, and of the reply's own class."""
    if code == 354:
        assert not any(re.match(r"\d\.\d{1,3}\.\d{1,3}", line) for line in lines), f"354 with a code: {lines}"
        return
    if verb in ("EHLO", "HELO"):
        return
    for line in lines:
        m = ENHANCED_CODE.match(line)
        assert m, f"{code} reply to {verb} without an enhanced code: {lines}"
        assert m.group(1) == str(code)[0], f"enhanced code of another class: {code} {line}"

junk = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
local = st.sampled_from(["alice", "bob", "unknown", "x" * 70, "a.b", "", "\"q\""])
domain = st.sampled_from(["example.com", "elsewhere.test", "EXAMPLE.COM", "[127.0.0.1]", "", "a..b"])


class SmtpDialogue(RuleBasedStateMachine):
    port: int = 0
    sink = None
    #: Across every example of the run: markers of messages sent, and of those answered 250.
    all_sent: set[str] = set()
    all_accepted: set[str] = set()

    def __init__(self):
        super().__init__()
        self.sock: socket.socket | None = None
        self.buf = b""
        self.tls = False
        self._connect()

    def _connect(self) -> None:
        if self.sock:
            self.sock.close()
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.buf = b""
        self.tls = False
        greeting = self._reply()
        assert greeting and greeting[0] in (220, 421)

    def _reply(self, verb: str = ""):
        """(code, text) of one reply, or None if the server closed the connection."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                try:
                    chunk = self.sock.recv(65536)
                except (ConnectionError, socket.timeout, ssl.SSLError):
                    chunk = b""
                if not chunk:
                    return None
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            m = REPLY_LINE.match(line.decode("utf-8", "replace"))
            assert m, f"malformed reply line {line!r}"
            code = int(m.group(1))
            assert code in KNOWN_CODES, f"unexpected code {code}: {line!r}"
            lines.append(m.group(3))
            if m.group(2) == " ":
                if verb:
                    check_enhanced(verb, code, lines)
                return code, "\n".join(lines)

    def _cmd(self, data: bytes, verb: str | None = None):
        if verb is None:
            verb = data.split(b"\r\n", 1)[0].split(b" ", 1)[0].decode("ascii", "replace").upper()
        try:
            self.sock.sendall(data)
        except (ConnectionError, ssl.SSLError):
            self._connect()
            return None
        reply = self._reply(verb)
        if reply is None or reply[0] == 421:
            self._connect()
        return reply

    @rule(name=st.sampled_from(["client.test", "", "x" * 300, "[127.0.0.1]"]), verb=st.sampled_from(["EHLO", "HELO"]))
    def hello(self, verb, name):
        self._cmd(f"{verb} {name}\r\n".encode())

    @rule(lp=local, dom=domain, params=st.sampled_from(["", " SIZE=1000", " BODY=8BITMIME", " SIZE=x", " FOO=1"]))
    def mail(self, lp, dom, params):
        self._cmd(f"MAIL FROM:<{lp}@{dom}>{params}\r\n".encode() if lp or dom else b"MAIL FROM:<>\r\n")

    @rule(lp=local, dom=domain)
    def rcpt(self, lp, dom):
        self._cmd(f"RCPT TO:<{lp}@{dom}>\r\n".encode())

    @rule(body=st.binary(max_size=300))
    def data(self, body):
        reply = self._cmd(b"DATA\r\n")
        if reply is None or reply[0] != 354:
            return
        marker = uuid.uuid4().hex
        self.all_sent.add(marker)
        # Dot-stuff every line that starts with a dot (RFC 5321 4.5.2), the body's first line too.
        payload = re.sub(rb"(^|\r\n)\.", rb"\1..", b"Subject: fuzz " + marker.encode() + b"\r\n\r\n" + body)
        final = self._cmd(payload + b"\r\n.\r\n", verb="end of DATA")
        if final and final[0] == 250:
            self.all_accepted.add(marker)

    @rule(lines=st.lists(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
                         max_size=8), starttls_first=st.booleans())
    def whole_transaction(self, lines, starttls_first):
        """A well-formed transaction (so the state machine also reaches delivery)."""
        if starttls_first and not self.tls:
            self.starttls()
        self.hello("EHLO", "client.test")
        self.mail("a", "sender.test", "")
        self._cmd(b"RCPT TO:<alice@example.com>\r\n")
        self.data("\r\n".join(lines).encode())

    @rule(cmd=st.sampled_from(["RSET", "NOOP", "QUIT", "HELP", "VRFY alice", "EXPN list", "AUTH PLAIN"]))
    def simple(self, cmd):
        reply = self._cmd(f"{cmd}\r\n".encode())
        if cmd == "QUIT":
            self._connect()
        assert reply is None or reply[0] in KNOWN_CODES

    @rule(text=junk)
    def garbage(self, text):
        self._cmd(text.encode() + b"\r\n")

    @precondition(lambda self: not self.tls)
    @rule()
    def starttls(self):
        reply = self._cmd(b"STARTTLS\r\n")
        if reply and reply[0] == 220:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            try:
                self.sock = ctx.wrap_socket(self.sock, server_hostname="mx.gw.test")
                self.tls = True
            except (ssl.SSLError, ConnectionError):
                self._connect()

    @rule()
    def disconnect(self):
        self._connect()

    @invariant()
    def only_answered_mail_is_delivered(self):
        if self.sink is None:
            return
        delivered = {re.search(rb"Subject: fuzz ([0-9a-f]{32})", m.data).group(1).decode()
                     for m in self.sink.messages if b"Subject: fuzz " in m.data}
        assert delivered <= self.all_accepted, "delivered a message that was not answered 250"

    def teardown(self):
        if self.sock:
            self.sock.close()


@pytest.fixture
def gateway_overrides():
    # Generous limits: the fuzzer must reach deep states, not be cut off by the junk limit.
    return {"smtp.junk_command_limit": 10000, "smtp.hard_error_limit": 10000}


def test_smtp_dialogue_state_machine(gateway, tls_sink, add_domain, monkeypatch):
    add_domain("example.com", [tls_sink.address])
    errors = []
    original = InboundHandler.handle_exception

    async def spy(self, error):
        errors.append(repr(error))
        return await original(self, error)

    monkeypatch.setattr(InboundHandler, "handle_exception", spy)
    SmtpDialogue.port = gateway.port
    SmtpDialogue.sink = tls_sink
    SmtpDialogue.all_sent, SmtpDialogue.all_accepted = set(), set()
    run = settings(max_examples=60, stateful_step_count=30, deadline=None,
                   suppress_health_check=list(HealthCheck))(SmtpDialogue).TestCase
    run().runTest()
    assert errors == [], "unhandled exceptions in the SMTP session"
    assert SmtpDialogue.all_accepted, "the fuzzer never got a message through; it explored too little"
    tls_sink.wait_for(len(SmtpDialogue.all_accepted), timeout=5)
    delivered = [m for m in tls_sink.messages if b"Subject: fuzz " in m.data]
    assert len(delivered) == len(SmtpDialogue.all_accepted), "every 250 was delivered exactly once"
    print(f"fuzz: {len(SmtpDialogue.all_sent)} messages sent, {len(SmtpDialogue.all_accepted)} accepted, "
          f"{len(gateway.records)} transactions logged")
