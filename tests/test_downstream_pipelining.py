"""MAIL and RCPT as one command group to a downstream server that offers PIPELINING (RFC 2920).

The downstream server here is a scripted SMTP server on loopback. It answers a
group only once every command of it has arrived, so a client that waits for a
reply before sending the next command stalls and the test fails. It writes its
replies cut at hypothesis-chosen places, with pauses, so each reply can arrive
whole, split, or several in one segment. Real servers are covered too: Postfix
(which pipelines) in test_real_mtas, aiosmtpd (which does not) everywhere else.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxguard.config import DownstreamSettings
from mxguard.smtp.delivery import DownstreamConnection, DownstreamLost, send_transaction
from mxguard.smtp.routing import Route
from mxguard.tls.policy import DownstreamTls


@dataclass
class Script:
    """What the scripted server does with the next connection."""

    pipelining: bool = True
    replies: list[bytes] = field(default_factory=list)   # one per grouped command, CRLF-terminated
    cuts: list[int] = field(default_factory=list)        # offsets at which the reply stream is split
    received: list[bytes] = field(default_factory=list)  # command lines, as they came
    grouped: bool | None = None                          # every command of the group came before a reply
    close_after: int | None = None                       # close after this many bytes of replies
    pause: bool = True                                   # pause between pieces (else: back to back,
                                                         # which over TLS puts several records in one read)
    turns: int | None = None                             # instead of the pause: this many loop turns, so
                                                         # a piece lands while the client's task is between
                                                         # a parsed reply and picking it up (same loop)


class ScriptedServer:
    """A loopback SMTP server that answers the MAIL/RCPT group of the current :class:`Script`."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.script = Script()
        self.tls = tls
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        script = self.script
        try:
            writer.write(b"220 scripted.test ESMTP\r\n")
            while True:
                line = await reader.readline()
                verb = line[:8].upper()
                if verb.startswith(b"EHLO"):
                    extensions = [b"250-scripted.test", b"250-SIZE 1000000", b"250-8BITMIME"]
                    if script.pipelining:
                        extensions.append(b"250-PIPELINING")
                    if self.tls is not None and writer.get_extra_info("ssl_object") is None:
                        extensions.append(b"250-STARTTLS")
                    writer.write(b"\r\n".join(extensions + [b"250 ENHANCEDSTATUSCODES"]) + b"\r\n")
                    continue
                if verb.startswith(b"STARTTLS"):
                    writer.write(b"220 2.0.0 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(self.tls)
                    continue
                if not line or verb.startswith(b"QUIT"):
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                if line.upper().startswith(b"RSET"):
                    writer.write(b"250 2.0.0 reset\r\n")
                    continue
                if line.upper().startswith(b"DATA"):
                    writer.write(b"354 go ahead\r\n")
                    while (await reader.readline()) not in (b".\r\n", b""):
                        pass
                    writer.write(b"250 2.0.0 queued\r\n")
                    continue
                lines, grouped = [line], True
                while len(lines) < len(script.replies):
                    try:
                        lines.append(await asyncio.wait_for(reader.readline(), 1.0))
                    except asyncio.TimeoutError:
                        grouped = False  # a client that waits for each reply: answer one at a time
                        break
                script.grouped = grouped
                script.received.extend(lines)
                await self._answer(writer, script, b"".join(script.replies[:len(lines)]))
                for reply in script.replies[len(lines):]:
                    script.received.append(await reader.readline())
                    writer.write(reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, script: Script, stream: bytes) -> None:
        if script.close_after is not None:
            writer.write(stream[:script.close_after])
            await writer.drain()
            raise ConnectionError("scripted close")
        start = 0
        for cut in sorted(set(c for c in script.cuts if 0 < c < len(stream))) + [len(stream)]:
            writer.write(stream[start:cut])
            if script.turns is not None:
                await writer.drain()
                for _ in range(script.turns):
                    await asyncio.sleep(0)
            elif script.pause:
                await writer.drain()
                await asyncio.sleep(0.002)  # a separate segment
            start = cut


def _connection(port: int, tls: DownstreamTls = DownstreamTls.OFF) -> DownstreamConnection:
    route = Route(servers=(("127.0.0.1", port),), tls=tls)
    return DownstreamConnection(route, DownstreamSettings(command_timeout=10, connect_timeout=5), "gw.test")


def _reply(code: int, multiline: bool) -> bytes:
    enhanced = {2: "2.1.5", 4: "4.2.0", 5: "5.1.1"}[code // 100]
    if multiline:
        return f"{code}-{enhanced} first line\r\n{code}-{enhanced} second\r\n{code} {enhanced} last\r\n".encode()
    return f"{code} {enhanced} reply {code}\r\n".encode()


_codes = st.tuples(st.sampled_from([250, 251, 450, 451, 550, 553]), st.booleans())
_group = st.tuples(st.tuples(st.sampled_from([250, 451, 550]), st.booleans()), st.lists(_codes, min_size=1, max_size=6))


@pytest.fixture(scope="module", params=["plain", "starttls"])
def scripted(request, downstream_cert):
    """``(event loop, server, downstream TLS mode)``; the server offers STARTTLS in the second case."""
    loop = asyncio.new_event_loop()
    tls = None
    if request.param == "starttls":
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        downstream_cert.configure_cert(tls)
    server = ScriptedServer(tls)
    loop.run_until_complete(server.start())
    yield loop, server, DownstreamTls.REQUIRED if tls else DownstreamTls.OFF
    loop.run_until_complete(server.stop())
    loop.close()


async def _envelope(port: int, recipients: list[str], tls: DownstreamTls):
    conn = _connection(port, tls)
    info = await conn.open()
    assert info.tls == (tls is DownstreamTls.REQUIRED)
    try:
        return await conn.envelope("alice@sender.test", recipients, size=1234)
    finally:
        await conn.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(group=_group, cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=8), pause=st.booleans(),
       turns=st.one_of(st.none(), st.integers(min_value=0, max_value=4)))
def test_replies_to_a_group_are_matched_to_their_commands_however_they_arrive(scripted, group, cuts, pause, turns):
    loop, server, tls = scripted
    (mail_code, mail_multi), rcpt_codes = group
    recipients = [f"user{i}@example.com" for i in range(len(rcpt_codes))]
    server.script = Script(replies=[_reply(mail_code, mail_multi)] + [_reply(c, m) for c, m in rcpt_codes],
                           cuts=cuts, pause=pause, turns=turns)
    mail, replies = loop.run_until_complete(_envelope(server.port, recipients, tls))
    assert server.script.grouped is True, "MAIL and the RCPTs were not sent as one group"
    assert server.script.received[0].startswith(b"MAIL FROM:<alice@sender.test> SIZE=1234")
    assert [line.strip() for line in server.script.received[1:]] == [f"RCPT TO:<{r}>".encode() for r in recipients]
    assert mail.code == mail_code
    if mail_code != 250:
        assert replies == {}
        return
    assert [replies[r].code for r in recipients] == [code for code, _ in rcpt_codes]
    for r, (code, multi) in zip(recipients, rcpt_codes):
        assert ("last" in replies[r].text) if multi else replies[r].text.endswith(f"reply {code}")


def test_without_pipelining_commands_go_one_at_a_time(scripted):
    loop, server, tls = scripted
    server.script = Script(pipelining=False, replies=[_reply(250, False), _reply(250, False), _reply(550, False)])
    mail, replies = loop.run_until_complete(_envelope(server.port, ["a@example.com", "b@example.com"], tls))
    assert server.script.grouped is False
    assert mail.code == 250 and [r.code for r in replies.values()] == [250, 550]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(min_value=1, max_value=4), close_after=st.integers(min_value=0, max_value=120))
def test_a_group_cut_off_mid_reply_is_a_lost_connection_never_a_made_up_reply(scripted, count, close_after):
    loop, server, tls = scripted
    replies = [_reply(250, True)] + [_reply(250, False)] * count
    close_after = min(close_after, len(b"".join(replies)) - 1)
    server.script = Script(replies=replies, close_after=close_after)
    with pytest.raises(DownstreamLost):
        loop.run_until_complete(_envelope(server.port, [f"u{i}@example.com" for i in range(count)], tls))


def test_a_malformed_reply_in_a_group_is_a_lost_connection(scripted):
    loop, server, tls = scripted
    server.script = Script(replies=[_reply(250, False), b"2x0 what\r\n"])
    with pytest.raises(DownstreamLost):
        loop.run_until_complete(_envelope(server.port, ["a@example.com"], tls))


def test_a_whole_transaction_on_a_pipelining_server_delivers(scripted):
    loop, server, tls = scripted
    server.script = Script(replies=[_reply(250, False), _reply(250, False), _reply(550, False)])

    async def deliver():
        conn = _connection(server.port, tls)
        await conn.open()
        try:
            return await send_transaction(conn, "alice@sender.test", ["a@example.com", "b@example.com"],
                                          b"Subject: hi\r\n\r\nbody\r\n")
        finally:
            await conn.close()

    results = loop.run_until_complete(deliver())
    assert server.script.grouped is True
    assert results["a@example.com"].code == 250 and "queued" in results["a@example.com"].text
    assert results["b@example.com"].code == 550


def _first_reply_end(data: bytes) -> int | None:
    """Bytes up to and including the last line of the first complete reply in ``data``, or None."""
    offset = 0
    for line in data.splitlines(keepends=True):
        offset += len(line)
        if not line.endswith(b"\n"):
            return None
        if line[3:4] == b" ":
            return offset
    return None


def _deliver_later_replies_late(loop, protocol, sizes: list[int], turns: list[int]) -> None:
    """Hand the protocol the first reply of the group's reply stream at once and the rest in
    pieces of ``sizes`` bytes, each some event-loop turns after the one before.

    What a downstream server in another process does when its second reply lands in the read
    after the first: one turn later, while the client's task has not yet picked up the first
    reply. Only the order of events in this loop is changed, never the bytes.
    """
    real = protocol.data_received
    pending: deque[bytes] = deque()
    state = {"split": False, "pumping": False}
    waits = list(turns)

    def wait(n: int) -> None:
        if n <= 0:
            pump()
        else:
            loop.call_soon(wait, n - 1)

    def pump() -> None:
        if not pending:
            state["pumping"] = False
            return
        real(pending.popleft())
        wait(waits.pop(0) if waits else 1)

    def data_received(data: bytes) -> None:
        if state["split"]:
            pending.append(data)
            if not state["pumping"]:
                state["pumping"] = True
                wait(1)
            return
        end = _first_reply_end(data)
        if end is None:
            real(data)
            return
        state["split"] = True
        real(data[:end])
        rest, start = data[end:], 0
        for size in sizes + [len(data)]:
            if rest[start:start + size]:
                pending.append(rest[start:start + size])
            start += size
        state["pumping"] = True
        wait(max(1, waits.pop(0) if waits else 1))

    protocol.data_received = data_received


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rcpt_codes=st.lists(_codes, min_size=1, max_size=5),
       sizes=st.lists(st.integers(min_value=1, max_value=120), max_size=6),
       turns=st.lists(st.integers(min_value=0, max_value=3), max_size=7))
def test_a_reply_that_arrives_before_the_previous_one_was_picked_up_is_kept(scripted, rcpt_codes, sizes, turns):
    """The bench's hang: a group's next reply read one loop turn after the first, before the task
    resumed. The library drops such data; the connection must keep it, or the transaction waits
    for a reply it already received until the command timeout."""
    loop, server, tls = scripted
    recipients = [f"user{i}@example.com" for i in range(len(rcpt_codes))]
    server.script = Script(replies=[_reply(250, False)] + [_reply(c, m) for c, m in rcpt_codes], pause=False)

    async def run():
        conn = _connection(server.port, tls)
        await conn.open()
        _deliver_later_replies_late(loop, conn.client.protocol, sizes, turns)
        try:
            return await asyncio.wait_for(conn.envelope("alice@sender.test", recipients, size=10), 5)
        finally:
            await conn.close()

    mail, replies = loop.run_until_complete(run())
    assert mail.code == 250
    assert [replies[r].code for r in recipients] == [code for code, _ in rcpt_codes]
