"""``mxguard demo``: the gateway's main job on real input, with no set-up and no network.

It makes a throwaway data dir, starts two downstream mail servers on loopback
(the package's own sink: one with STARTTLS and a certificate from a private
CA, one without STARTTLS) and a DNS server on loopback publishing the demo
sender's SPF, DKIM and DMARC records, configures three domains with different
downstream TLS policies, starts the gateway with its embedded filters (YARA,
built-in junk scorer, content policy), sends mail through it over STARTTLS
with Python's smtplib, and prints what happened to every recipient, with the
filters' verdict. Then the organization's own server relays one message out
(SMTP AUTH after STARTTLS): the gateway finds the destination's MX host in the
demo DNS, signs the message with the organization's DKIM key (published in the
same DNS) and delivers it to a third sink, where dkimpy verifies the signature.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from mxguard.config import load_settings
from mxguard.demo_dns import DemoDNS, txt_value
from mxguard.gateway import Gateway
from mxguard.logsetup import configure as configure_logging
from mxguard.services import domains as domain_service
from mxguard.services import orgs as org_service
from mxguard.services import users as user_service
from mxguard.services.setup import initialize
from mxguard.sink import DownstreamSink
from mxguard.storage.messagelog import LogRecord
from mxguard.tls.certs import make_private_ca, write_private
from mxguard.tls.contexts import server_context

DEMO_HOSTNAME = "mx.demo.test"
DEMO_ADMIN = "admin@demo.test"
DEMO_ORG = "Example Corp"
#: The demo recipient who finds the GTUBE message in the Message Center.
DEMO_RECIPIENT = "alice@example.com"
#: The console's usual address; the demo takes a free port when it is busy.
CONSOLE_LISTEN = ("127.0.0.1", 8443)


def _console_listen() -> str:
    host, port = CONSOLE_LISTEN
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            port = 0
    return f"{host}:{port}"
SENDER = "newsletter@sender.test"
#: The outbound relay in the demo: the organization's server authenticates as RELAY_USER and
#: sends to OUTBOUND_RCPT, whose domain's MX host (in the demo DNS) is the destination sink.
RELAY_USER = "relay@example.com"
OUTBOUND_SENDER = "alice@example.com"
OUTBOUND_RCPT = "partner@partner.test"
OUTBOUND_MX = "mx.partner.test"
DKIM_SELECTOR = "demo"


@dataclass
class DemoMessage:
    """One message the demo sends: what, to whom, over which session."""

    label: str
    recipients: list[str]
    content: bytes
    starttls: bool = True
    sender: str = SENDER


@dataclass
class SendResult:
    """What the sending client saw."""

    message: DemoMessage
    rcpt_replies: dict[str, tuple[int, str]] = field(default_factory=dict)
    final: tuple[int, str] | None = None
    tls: str | None = None
    error: str | None = None
    record: LogRecord | None = None


def _text_message() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice Sender <alice@sender.test>"
    msg["To"] = "alice@example.com"
    msg["Subject"] = "Quarterly report"
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain="sender.test")
    msg.set_content("Hello Alice,\n\nthe quarterly report is attached to the next mail.\n\n-- \nBob\n")
    return msg.as_bytes()


def _html_with_attachment() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Carol <carol@sender.test>"
    msg["To"] = "bob@example.net, alice@example.com"
    msg["Subject"] = "Invoice 2026-11 (HTML with PDF)"
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain="sender.test")
    msg.set_content("Your invoice is attached.")
    msg.add_alternative("<html><body><p>Your <b>invoice</b> is attached.</p></body></html>", subtype="html")
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="invoice-2026-11.pdf")
    return msg.as_bytes()


def _simple(to: str, subject: str, body: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Dave <dave@sender.test>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain="sender.test")
    msg.set_content(body)
    return msg.as_bytes()


# Test strings, split so that this source file is neither a test virus nor test spam itself.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*" + "GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _eicar_message() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Mallory <mallory@sender.test>"
    msg["To"] = "alice@example.com"
    msg["Subject"] = "Your parcel: delivery note"
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain="sender.test")
    msg.set_content("The delivery note is attached.")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="delivery-note.com")
    return msg.as_bytes()


def _zip_with_executable() -> bytes:
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("tools/setup.exe", b"MZ" + bytes(200))
    msg = EmailMessage()
    msg["From"] = "Dave <dave@sender.test>"
    msg["To"] = "alice@example.com"
    msg["Subject"] = "The tool you asked for"
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain="sender.test")
    msg.set_content("Unzip and run setup.exe.")
    msg.add_attachment(buf.getvalue(), maintype="application", subtype="zip", filename="tools.zip")
    return msg.as_bytes()


def default_messages(sign=None) -> list[DemoMessage]:
    """The messages the demo builds itself; each shows one behaviour.

    Args:
        sign: optional DKIM signer (``bytes -> bytes``) for the first message.
    """
    text = _text_message()
    return [
        DemoMessage("plain text, DKIM-signed", ["alice@example.com"], sign(text) if sign else text),
        DemoMessage("HTML + PDF, two routes", ["bob@example.net", "alice@example.com"], _html_with_attachment()),
        DemoMessage("unknown recipient", ["nobody@example.com"], _simple("nobody@example.com", "Hello?", "Anyone?")),
        DemoMessage("downstream lacks TLS", ["carol@legacy.example.org"],
                    _simple("carol@legacy.example.org", "Legacy", "This domain requires TLS downstream.")),
        DemoMessage("relay attempt", ["victim@elsewhere.test"], _simple("victim@elsewhere.test", "Relay", "Open relay?")),
        DemoMessage("sender without STARTTLS", ["alice@example.com"],
                    _simple("alice@example.com", "No TLS", "Sent in clear to the gateway."), starttls=False),
        DemoMessage("virus (EICAR test file)", ["alice@example.com"], _eicar_message()),
        DemoMessage("junk (GTUBE test string)", ["alice@example.com"],
                    _simple("alice@example.com", "You have won", f"Claim your prize now!\n\n{GTUBE}\n")),
        DemoMessage("blocked attachment (.exe in a zip)", ["alice@example.com"], _zip_with_executable()),
    ]


def corpus_messages(corpus: Path) -> list[DemoMessage]:
    """Every file under ``corpus`` (any depth, sorted) as a message to alice@example.com."""
    files = sorted(p for p in corpus.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [DemoMessage(str(p.relative_to(corpus)), ["alice@example.com"], p.read_bytes()) for p in files]


def normalize_line_ends(data: bytes) -> bytes:
    """What an SMTP client puts on the wire for ``data``: CRLF line ends, final CRLF."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


ADDED_FIELDS = ("received", "authentication-results", "x-mxguard-verdict", "x-spam-flag")


def identical_apart_from_added_headers(original: bytes, received: bytes) -> bool:
    """True when ``received`` is ``original`` (as sent on the wire) with only mxguard's fields prepended."""
    expected = normalize_line_ends(original)
    if not received.endswith(expected):
        return False
    prefix = received[: len(received) - len(expected)]
    for line in prefix.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            continue
        if line.split(b":", 1)[0].strip().lower().decode("ascii", "replace") not in ADDED_FIELDS:
            return False
    return True


class DemoEnvironment:
    """A throwaway data dir, two downstream sinks and a running gateway, all on loopback.

    Args:
        data_dir: where to put the data dir (a new temporary one when ``None``).
        web: also serve the Administration Console (HTTPS on 127.0.0.1:8443, or a
            free port when that is taken) and create an admin with a one-time password.
        web_listen: the console's HOST:PORT instead (``127.0.0.1:0``: a free port).
    """

    def __init__(self, data_dir: Path | None = None, *, web: bool = False, web_listen: str | None = None):
        self.own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="mxguard-demo-"))
        self.records: list[LogRecord] = []
        self.web = web
        self.web_listen = web_listen
        self.admin_email = DEMO_ADMIN
        self.admin_password: str | None = None
        self.recipient_password: str | None = None

    async def __aenter__(self) -> "DemoEnvironment":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        # Quiet unless asked: the demo prints its own tables (MXGUARD_LOG__LEVEL=info for more).
        configure_logging(os.environ.get("MXGUARD_LOG__LEVEL", "warning"))
        await initialize(self.data_dir, hostname=DEMO_HOSTNAME, smtp_listen=["127.0.0.1:0"])
        self.settings = load_settings(self.data_dir)
        # Sender checks ask only the demo's own DNS server on loopback.
        self.dns = await DemoDNS("sender.test").start()
        self.settings.filters.dns_servers = [self.dns.address]
        # The organization's own mail server: a certificate from its private CA.
        ca_pem, issue = make_private_ca("Example Corp internal CA")
        issued = issue(["mail.example.com", "127.0.0.1"])
        labdir = self.data_dir / "demo-downstream"
        self.ca_file = labdir / "ca.pem"
        write_private(self.ca_file, ca_pem)
        write_private(labdir / "cert.pem", issued.cert_pem)
        write_private(labdir / "key.pem", issued.key_pem)
        self.sink_tls = await DownstreamSink(tls_context=server_context(labdir / "cert.pem", labdir / "key.pem"),
                                             hostname="mail.example.com").start()
        self.sink_plain = await DownstreamSink(hostname="legacy-mail.example.org").start()
        # A branch office server that will be down for a moment: its mail goes through the spool.
        self.sink_branch = await DownstreamSink(tls_context=server_context(labdir / "cert.pem", labdir / "key.pem"),
                                                hostname="mail.branch.example.com").start()
        # An internet destination for the outbound relay: its MX host (the demo DNS says so) is a sink
        # with STARTTLS; outbound delivery looks MX hosts up in the demo DNS and connects to its port.
        self.sink_partner = await DownstreamSink(
            tls_context=server_context(labdir / "cert.pem", labdir / "key.pem"), hostname=OUTBOUND_MX).start()
        domain = OUTBOUND_RCPT.rpartition("@")[2]
        self.dns.zone[(domain, "MX")] = [f"10 {OUTBOUND_MX}."]
        self.dns.zone[(OUTBOUND_MX, "A")] = ["127.0.0.1"]
        self.settings.downstream.dns_servers = [self.dns.address]
        self.settings.downstream.outbound_port = self.sink_partner.port
        self.relay_password: str | None = None
        self.settings.spool.first_retry = 0.3
        self.settings.spool.max_retry = 1.0
        self.settings.spool.poll_interval = 0.2
        self.gateway = Gateway(self.settings, smtp_listen=["127.0.0.1:0"], observers=[self.records.append],
                               web_listen=(self.web_listen or _console_listen()) if self.web else None)
        await self.gateway.start()
        store = self.gateway.store
        await org_service.add_org(store, DEMO_ORG)
        await domain_service.add_domain(store, "example.com", [f"127.0.0.1:{self.sink_tls.port}"],
                                        downstream_tls="verify", tls_ca_file=str(self.ca_file), org=DEMO_ORG)
        await domain_service.add_domain(store, "example.net", [f"127.0.0.1:{self.sink_tls.port}"],
                                        downstream_tls="opportunistic")
        await domain_service.add_domain(store, "legacy.example.org", [f"127.0.0.1:{self.sink_plain.port}"],
                                        downstream_tls="required")
        await domain_service.add_domain(store, "branch.example.com", [f"127.0.0.1:{self.sink_branch.port}"],
                                        downstream_tls="required")
        # The organization may relay: an SMTP AUTH user, and a DKIM key published in the demo DNS.
        from mxguard.services import dkim_keys
        from mxguard.services import relay as relay_service
        _, self.relay_password = await relay_service.add_credential(store, DEMO_ORG, RELAY_USER)
        key = await dkim_keys.generate_key(store, self.gateway.keyring.get(), "example.com",
                                           selector=DKIM_SELECTOR, algorithm="rsa")
        self.dns.zone[(key.record_name.rstrip("."), "TXT")] = [txt_value(key.record_value)]
        if self.web:
            # After the domains: a Message Center user's address must be in one of its organization's domains.
            _, self.admin_password = await user_service.add_user(store, DEMO_ADMIN, "admin")
            self.recipient_password = user_service.generate_password()
            await user_service.add_user(store, DEMO_RECIPIENT, "user", org=DEMO_ORG,
                                        password=self.recipient_password)
        await self.gateway.directory.refresh_if_changed()

    async def stop(self) -> None:
        await self.gateway.stop()
        await self.sink_tls.stop()
        await self.sink_plain.stop()
        await self.sink_branch.stop()
        await self.sink_partner.stop()
        self.dns.stop()
        if self.own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def client_tls_context(self) -> ssl.SSLContext:
        """Trust exactly the gateway's own (self-signed) certificate."""
        ctx = ssl.create_default_context(cafile=str(self.settings.path(self.settings.tls.cert_file)))
        ctx.check_hostname = False  # we connect to 127.0.0.1; the certificate names mx.demo.test
        return ctx

    def _send_blocking(self, message: DemoMessage) -> SendResult:
        result = SendResult(message)
        try:
            with smtplib.SMTP("127.0.0.1", self.gateway.smtp_port, local_hostname="client.sender.test",
                              timeout=60) as client:
                client.ehlo()
                if message.starttls:
                    client.starttls(context=self.client_tls_context())
                    client.ehlo()
                    result.tls = client.sock.version()
                body = "8BITMIME" if any(b > 127 for b in message.content) else None
                code, text = client.mail(message.sender, ["BODY=8BITMIME"] if body else [])
                if code != 250:
                    result.error = f"MAIL: {code} {text.decode(errors='replace')}"
                    return result
                accepted = 0
                for rcpt in message.recipients:
                    code, text = client.rcpt(rcpt)
                    result.rcpt_replies[rcpt] = (code, text.decode(errors="replace"))
                    accepted += code in (250, 251)
                if accepted:
                    # smtplib sends bytes as given; put them on the wire as an MTA would.
                    code, text = client.data(normalize_line_ends(message.content))
                    result.final = (code, text.decode(errors="replace"))
                else:
                    client.rset()
        except (smtplib.SMTPException, OSError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        return result

    def _relay_blocking(self, content: bytes) -> tuple[str, str]:
        """The organization's server relays ``content``: STARTTLS, AUTH, one recipient on the internet.

        Returns:
            ``(TLS version, final reply)``.
        """
        with smtplib.SMTP("127.0.0.1", self.gateway.smtp_port, local_hostname="mail.example.com",
                          timeout=60) as client:
            client.starttls(context=self.client_tls_context())
            client.ehlo()
            client.login(RELAY_USER, self.relay_password or "")
            client.mail(OUTBOUND_SENDER)
            client.rcpt(OUTBOUND_RCPT)
            code, text = client.data(normalize_line_ends(content))
            return client.sock.version() or "", f"{code} {text.decode(errors='replace')}"

    def dkim_verified(self, data: bytes) -> bool:
        """dkimpy's verdict on ``data``, the key looked up in the demo DNS over UDP (blocking: call it
        from a thread, the DNS server answers from the event loop)."""
        import dkim
        import dns.exception
        import dns.resolver
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = ["127.0.0.1"], self.dns.port

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            try:
                answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
            except dns.exception.DNSException:
                return None
            return b"".join(b"".join(r.strings) for r in answer)
        return dkim.verify(data, dnsfunc=dnsfunc)

    async def send(self, message: DemoMessage) -> SendResult:
        """Send one message through the gateway and wait for its message-log record."""
        before = len(self.records)
        result = await asyncio.to_thread(self._send_blocking, message)
        deadline = time.monotonic() + 5
        while len(self.records) == before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        result.record = self.records[-1] if len(self.records) > before else None
        return result


def _downstream_tls(record: LogRecord | None, route: str | None) -> str:
    if record is None or not route:
        return "-"
    for item in record.downstream:
        if item.get("route") == route:
            if "failure" in item:
                return "not used"
            if not item.get("tls"):
                return "none"
            return f"{item['tls_version']}" + (" verified" if item.get("verified") else "")
    return "-"


def verdict_text(record: LogRecord | None, rcpt: str) -> str:
    """The filters' verdict for one recipient, short: ``clean``, ``virus: EICAR-Test-File``, ``junk: ...``."""
    if record is None or not record.verdict:
        return "-"
    disposition = record.verdict.get("dispositions", {}).get(rcpt)
    if disposition is None:
        return "-"
    auth = record.verdict.get("auth") or {}
    auth_text = (f" (spf={auth.get('spf')} dkim={auth.get('dkim_result')} dmarc={auth.get('dmarc')})"
                 if auth and disposition["category"] == "clean" and auth.get("dkim_result") == "pass" else "")
    return (disposition["reason"] if disposition["category"] != "clean" else "clean") + auth_text


#: Below this many columns the results are listed per recipient instead of as a table:
#: eight columns in 80 would cut words in half.
WIDE_TABLE_COLUMNS = 120


def _result_rows(results: list[SendResult]) -> list[dict[str, str]]:
    """One dict per recipient: message, recipient, TLS in/out, verdict, reply, disposition, ms."""
    rows = []
    for res in results:
        by_rcpt = {r["rcpt"]: r for r in (res.record.results if res.record else [])}
        for rcpt in res.message.recipients:
            r = by_rcpt.get(rcpt)
            code, text = res.rcpt_replies.get(rcpt, (0, res.error or ""))
            if code in (250, 251) and res.final:
                code, text = res.final
            reply = f"{code} {text}" if code else (res.error or "")
            rows.append({"message": res.message.label, "recipient": rcpt, "inbound TLS": res.tls or "none",
                         "downstream TLS": _downstream_tls(res.record, r and r["route"]),
                         "verdict": verdict_text(res.record, rcpt), "reply to sender": textwrap.shorten(reply, 90, placeholder=" ..."),
                         "disposition": r["disposition"] if r else "-",
                         "ms": f"{res.record.total_ms:.1f}" if res.record and res.record.total_ms else ""})
    return rows


def results_table(results: list[SendResult], title: str) -> Table:
    """A table with one row per recipient (for terminals of :data:`WIDE_TABLE_COLUMNS` or more)."""
    table = Table(title=title, show_lines=False)
    rows = _result_rows(results)
    for col in ("message", "recipient", "inbound TLS", "downstream TLS", "verdict", "reply to sender", "disposition",
                "ms"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    return table


def results_list(results: list[SendResult], title: str) -> Group:
    """The same facts as :func:`results_table`, one short block per recipient, for narrow terminals.

    Text wraps at spaces, so no word is cut at 80 columns.
    """
    blocks: list = [Text(title, style="bold")]
    for row in _result_rows(results):
        block = Text()
        block.append(f"{row['disposition']}", style="bold")
        block.append(f"  {row['recipient']}  ({row['message']})\n")
        block.append(f"  TLS in {row['inbound TLS']}, downstream {row['downstream TLS']}"
                     + (f", {row['ms']} ms" if row["ms"] else "") + "\n")
        block.append(f"  verdict: {row['verdict']}\n")
        block.append(f"  reply: {row['reply to sender']}")
        blocks.append(block)
    return Group(*blocks)


def results_view(results: list[SendResult], title: str, width: int) -> Table | Group:
    """:func:`results_table` on a wide console, :func:`results_list` on a narrow one.

    Args:
        width: the console's width in columns.
    """
    return results_table(results, title) if width >= WIDE_TABLE_COLUMNS else results_list(results, title)


async def run_demo(corpus: Path | None = None, keep_running: bool = False, console: Console | None = None) -> int:
    """Run the demo; return the exit status (0 when everything behaved as expected).

    Args:
        corpus: send every file under this directory instead of the built-in messages,
            and check each arrived at the downstream server byte-for-byte over TLS.
        keep_running: after sending, keep the gateway up until Ctrl-C.
    """
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)
    async with DemoEnvironment(web=keep_running) as env:
        console.print(f"[bold]mxguard demo[/bold]: gateway {DEMO_HOSTNAME} on 127.0.0.1:{env.gateway.smtp_port}; "
                      f"downstream with STARTTLS on :{env.sink_tls.port}, without on :{env.sink_plain.port}",
                      highlight=False)
        messages = corpus_messages(corpus) if corpus else default_messages(env.dns.sign)
        results = [await env.send(m) for m in messages]
        if not corpus:
            results.append(await _spool_round_trip(env, console))
        await env.gateway.message_log.flush()
        console.print(results_view(results, "Corpus through the gateway" if corpus else "What happened to each recipient",
                                   console.width))
        status = _report(console, env, results, corpus is not None)
        if not corpus:
            await _print_spool(env, console)
            await _send_summaries(env, console)
            if not await _outbound(env, console):
                status = 1
        if keep_running:
            _print_running(console, env)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        return status


async def _spool_round_trip(env: DemoEnvironment, console: Console) -> SendResult:
    """Take the branch office server down, send to it, bring it back, wait for the spool to deliver."""
    await env.sink_branch.stop()
    result = await env.send(DemoMessage("branch server down (spool)", ["dana@branch.example.com"],
                                        _simple("dana@branch.example.com", "Held while your server was down",
                                                "This message waited in the gateway's spool, sealed.")))
    await asyncio.sleep(0.9)  # a retry fails while the server is still down
    await env.sink_branch.start()
    from mxguard.spool import queue
    deadline = time.monotonic() + 10
    while await queue.list_entries(env.gateway.store) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return result


async def _outbound(env: DemoEnvironment, console: Console) -> bool:
    """The organization's server relays one message to the internet; print how it went (two lines).

    Returns:
        ``True`` when it reached the destination's MX host with a DKIM signature that verifies.
    """
    msg = EmailMessage()
    msg["From"] = f"Alice <{OUTBOUND_SENDER}>"
    msg["To"] = OUTBOUND_RCPT
    msg["Subject"] = "Order confirmation (outbound)"
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg.set_content("Relayed by the gateway for Example Corp's own mail server.")
    try:
        tls, reply = await asyncio.to_thread(env._relay_blocking, msg.as_bytes())
    except (smtplib.SMTPException, OSError) as exc:
        console.print(f"[yellow]Outbound: the relay refused the organization's server: {exc}[/yellow]")
        return False
    deadline = time.monotonic() + 10
    while not env.sink_partner.messages and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    console.print(f"Outbound: Example Corp's server relayed {OUTBOUND_SENDER} -> {OUTBOUND_RCPT} through the "
                  f"gateway (AUTH as {RELAY_USER} over {tls}): {reply}", highlight=False)
    if not env.sink_partner.messages:
        console.print(f"[yellow]Outbound: nothing reached {OUTBOUND_MX} in 10 s.[/yellow]")
        return False
    got = env.sink_partner.messages[0]
    # In a thread: the demo DNS server answers from this event loop.
    verified = got.data.startswith(b"DKIM-Signature:") and await asyncio.to_thread(env.dkim_verified, got.data)
    console.print(f"Outbound: delivered by MX to {OUTBOUND_MX} over {got.tls_version or 'plain SMTP'}, DKIM-signed "
                  f"d=example.com s={DKIM_SELECTOR}: "
                  + ("signature verified against the DNS record" if verified else "[yellow]signature NOT verified[/yellow]"),
                  highlight=False)
    return verified


async def _print_spool(env: DemoEnvironment, console: Console) -> None:
    from mxguard.spool import queue
    entries = [e for e in await queue.list_entries(env.gateway.store, status=None) if e.kind != "outbound"]
    table = Table(title="Spool: held while the branch server was down, then delivered")
    for col in ("entry", "recipient", "attempt", "server", "downstream TLS", "reply"):
        table.add_column(col, overflow="fold")
    narrow = Text()
    for entry in entries:
        _, attempts = await queue.get_entry(env.gateway.store, entry.id)
        for n, a in enumerate(attempts, 1):
            tls = f"{a.tls_version}" if a.tls else "none"
            cells = (f"#{entry.id} {entry.status}", ", ".join(r["rcpt"] for r in entry.recipients), str(n),
                     (a.server or "-")[:60], tls, a.reply[:70])
            table.add_row(*cells)
            narrow.append(f"\n{cells[0]}  {cells[1]}  attempt {cells[2]} via {cells[3]}, TLS {cells[4]}\n"
                          f"  reply: {cells[5]}")
    if console.width >= WIDE_TABLE_COLUMNS:
        console.print(table)
    else:
        console.print(Group(Text(table.title or "", style="bold"), narrow))
    if env.sink_branch.messages:
        m = env.sink_branch.messages[0]
        console.print(f"The branch server received the spooled message over {m.tls_version}.", highlight=False)


async def _send_summaries(env: DemoEnvironment, console: Console) -> None:
    """Send the quarantine summaries now (as the daily schedule would) and say how they travelled."""
    from mxguard.quarantine.summary import send_summaries

    gw = env.gateway
    report = await send_summaries(gw.store, gw.settings, gw.links, web_url=gw.web_url)
    for result, count in report.sent:
        how = result.connection.describe_tls() if result.connection else "-"
        console.print(f"Quarantine summary to {result.recipient} ({count} held message(s), with deliver and view "
                      f"links): {result.reply.one_line()} over {how}", highlight=False)


def _report(console: Console, env: DemoEnvironment, results: list[SendResult], corpus: bool) -> int:
    delivered = [r for r in results if r.record and r.record.disposition in ("delivered", "partial")]
    if corpus:
        arrived = list(env.sink_tls.messages)
        ok = held = 0
        problems = []
        for res in results:
            disposition = res.record.disposition if res.record else None
            if disposition in ("quarantined", "rejected"):
                held += 1
                rcpt = res.message.recipients[0]
                console.print(f"  {res.message.label}: {disposition} ({verdict_text(res.record, rcpt)})",
                              highlight=False)
                continue
            if disposition != "delivered":
                problems.append(f"{res.message.label}: {disposition or res.error}")
                continue
            got = arrived.pop(0) if arrived else None
            if got and got.tls and identical_apart_from_added_headers(res.message.content, got.data):
                ok += 1
            else:
                problems.append(f"{res.message.label}: arrived {'altered' if got else 'not at all'}"
                                f"{'' if not got or got.tls else ' (without TLS)'}")
        console.print(f"{ok} of {len(results)} messages arrived at the downstream server over TLS, "
                      f"byte-for-byte apart from the added headers; the filters held or refused {held}.",
                      highlight=False)
        for p in problems:
            console.print(f"  [yellow]{p}[/yellow]", highlight=False)
        return 0 if not problems else 1
    arrived = env.sink_tls.messages + env.sink_plain.messages + env.sink_branch.messages
    n = len(arrived)
    with_tls = sum(1 for m in arrived if m.tls)
    spooled = [r for r in results if r.record and r.record.disposition == "spooled"]
    filtered = [r for r in results if r.record and r.record.verdict and r.record.disposition in
                ("rejected", "quarantined") and r.record.final_code is not None and r.record.final_code >= 250]
    refused = sum(1 for r in filtered if r.record.disposition == "rejected")
    console.print(f"{len(delivered)} of {len(results)} transactions delivered at once, {len(spooled)} held in the spool; "
                  f"the filters refused {refused} and held {len(filtered) - refused} in quarantine; "
                  f"the downstream servers received {n} messages, {with_tls} of them over TLS. "
                  f"Message log: {env.gateway.message_log.written} records.", highlight=False)
    return 0


def _print_running(console: Console, env: DemoEnvironment) -> None:
    console.print(f"\nThe gateway keeps running (Ctrl-C stops it and removes {env.data_dir}).", highlight=False)
    console.print(f"  SMTP      127.0.0.1:{env.gateway.smtp_port}  (try: swaks -s 127.0.0.1 -p "
                  f"{env.gateway.smtp_port} -tls -t alice@example.com)", highlight=False)
    console.print(f"  data dir  {env.data_dir}  (MXGUARD_DATA_DIR={env.data_dir} mxguard log)", highlight=False)
    if env.gateway.web_url:
        console.print(f"  console   {env.gateway.web_url}  (self-signed certificate for {DEMO_HOSTNAME}: "
                      "accept it in the browser)", highlight=False)
        console.print(f"  log in    {env.admin_email}  one-time password: {env.admin_password}", highlight=False)
        from mxguard.quarantine.signin import signin_url
        from mxguard.quarantine.summary import message_center_url

        center = message_center_url(env.settings, env.gateway.web_url)
        console.print(f"  Message Center  {center}/mc  as the demo recipient {DEMO_RECIPIENT}, who has the GTUBE "
                      "message in the quarantine:", highlight=False)
        console.print(f"    one-time sign-in link  {signin_url(env.gateway.links, center, DEMO_RECIPIENT)}",
                      highlight=False, soft_wrap=True)
        console.print(f"    or password            {env.recipient_password}", highlight=False)
        console.print("    then press Deliver on the GTUBE message: it goes to the downstream server over "
                      "verified TLS.", highlight=False)
