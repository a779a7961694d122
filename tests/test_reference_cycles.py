"""A finished session, and a filtered message, leave no reference cycles behind (issue 17).

Objects in a reference cycle are freed only by the garbage collector; with
about a hundred of them per connection its passes cost CPU on every message
and showed in the 99th percentile of the added latency. These tests run
sessions with the collector off, then collect with ``DEBUG_SAVEALL`` and
look for the session's objects among what only the collector could free.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import smtplib
import socket

from mxguard.filtering.message import parse_message
from tests.support import mail
from tests.support.smtp import send

#: The front door's per-connection and the filters' per-message objects, which must be freed
#: by reference counting alone. (aiosmtpd's own Session/Envelope are left out: the test's
#: downstream sink is an aiosmtpd server in this process too.)
SESSION_TYPES = {"InboundSMTP", "ProxySession", "CommandLineReader", "Part", "Budget", "ParsedMessage"}


@contextlib.contextmanager
def cyclic_garbage():
    """Yield a Counter that, on exit, holds the type names of the cyclic garbage made inside."""
    found: collections.Counter[str] = collections.Counter()
    gc.collect()
    gc.disable()
    try:
        yield found
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found.update(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_finished_sessions_leave_no_cycles(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    with cyclic_garbage() as found:
        for i in range(6):
            assert send(gateway.port, ["bob@example.com"], mail.plain(), starttls=bool(i % 2)).data[0] == 250
        # A session that ends without QUIT, and one that never says anything.
        client = smtplib.SMTP("127.0.0.1", gateway.port, local_hostname="client.sender.test", timeout=10)
        client.ehlo()
        client.mail("a@sender.test")
        client.sock.close()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
            raw.recv(512)
        assert tls_sink.wait_for(6)
        gateway.wait_records(7)
    leaked = {name: n for name, n in found.items() if name in SESSION_TYPES}
    assert not leaked, f"session objects freed only by the garbage collector: {leaked}"


def test_filter_parse_leaves_no_cycles():
    messages = [
        mail.plain(),
        mail.with_attachment(b"%PDF-1.4 test", "report.pdf", "application", "pdf"),
        mail.with_attachment(mail.zipped({"a.txt": b"hello", "b.bin": b"\x00" * 100}), "files.zip",
                             "application", "zip"),
        mail.crlf(b"Subject: nested\nContent-Type: message/rfc822\n\n" + mail.plain()),
        b"Subject: broken\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\nno end\r\n",
    ]
    with cyclic_garbage() as found:
        for raw in messages:
            parsed = parse_message(raw)
            assert parsed.parts, raw[:60]
        del parsed
    leaked = {name: n for name, n in found.items() if name in SESSION_TYPES or name in ("cell", "function")}
    assert not leaked, f"objects of a parse freed only by the garbage collector: {leaked}"
