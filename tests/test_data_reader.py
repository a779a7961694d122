"""The chunked DATA reader decides exactly as aiosmtpd's line-by-line reading does.

Three ways of checking it, on hypothesis-generated data (lines starting with a
dot, bare CR and LF, near-terminators such as ``LF.CRLF``, lines around the
line limit, messages around the size limit), split at random chunk boundaries:

* against a reference written here from RFC 5321 4.5.2 and aiosmtpd 1.4's
  limit order (pure, many examples);
* against a real aiosmtpd server on loopback fed the same bytes (what it
  stores, or which refusal it sends, and that the next command is read);
* through mxguard's own front door, :class:`~mxguard.smtp.inbound.InboundSMTP`,
  where the bytes after the end of data (a pipelined command) must survive.

The other direction, the downstream ``DATA`` (:func:`mxguard.smtp.delivery.data_stream`),
must send the bytes aiosmtplib's own ``DATA`` sends.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import socket

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mxguard.smtp import data_reader
from mxguard.smtp.data_reader import DataReader, Outcome
from mxguard.smtp.delivery import data_stream
from tests.support.peers import free_port

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def reference(stream: bytes, size_limit: int | None, line_limit: int) -> tuple[Outcome, bytes | None, int]:
    """``(outcome, content, bytes used)`` read line by line: RFC 5321 4.5.2 with aiosmtpd's limits.

    A line ends at CRLF; ``.CRLF`` as a line ends the data; a line whose text
    is longer than ``line_limit`` is too long at once (aiosmtpd's stream
    limit); otherwise the line counts towards the size, then its length with
    CRLF is checked. The first limit passed decides; the data is read to its end.
    """
    pos, counted, state, lines = 0, 0, Outcome.OK, []
    while True:
        eol = stream.find(b"\r\n", pos)
        assert eol >= 0, "the test data always holds a terminator"
        line, pos = stream[pos:eol + 2], eol + 2
        if line == b".\r\n":
            break
        if state is not Outcome.OK:
            continue
        if len(line) - 2 > line_limit:
            state = Outcome.LINE_TOO_LONG
            continue
        counted += len(line)
        if size_limit and counted > size_limit:
            state = Outcome.TOO_BIG
        elif len(line) > line_limit:
            state = Outcome.LINE_TOO_LONG
        else:
            lines.append(line[1:] if line.startswith(b".") else line)
    return state, (b"".join(lines) if state is Outcome.OK else None), pos


def read_chunks(chunks: list[bytes], size_limit: int | None, line_limit: int) -> tuple[DataReader, int]:
    reader, used = DataReader(size_limit, line_limit), 0
    for chunk in chunks:
        used += reader.feed(chunk)
        if reader.done:
            break
    return reader, used


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:])]


#: Pieces of message data chosen to hit the edge cases: dots at line starts, bare CR/LF next
#: to a dot, near-terminators, runs long enough to pass small line limits.
PIECE = st.one_of(
    st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r\n", b"\n.\r\n",
                     b"\r\n.\n", b"\r.\r\n", b"\r\n..\r\n", b"\r\r\n", b"x", b"\x00", b"\xff"]),
    st.binary(max_size=20),
    st.integers(min_value=1, max_value=70).map(lambda n: b"y" * n),
)
BODY = st.lists(PIECE, max_size=40).map(b"".join)


@st.composite
def streams(draw, body=BODY) -> tuple[bytes, list[bytes]]:
    """Data with at least one terminator, a pipelined command after it, cut into chunks."""
    stream = draw(body) + b"\r\n.\r\nNOOP\r\n"
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=12))
    return stream, split(stream, cuts)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=streams(), size_limit=st.one_of(st.none(), st.integers(min_value=1, max_value=80)),
       line_limit=st.integers(min_value=3, max_value=120))
def test_chunked_reading_equals_line_by_line_reading(data, size_limit, line_limit):
    stream, chunks = data
    want_outcome, want_content, want_used = reference(stream, size_limit, line_limit)
    event(want_outcome.value)
    reader, used = read_chunks(chunks, size_limit, line_limit)
    assert reader.done
    assert used == want_used  # the next command starts right after the terminator
    assert reader.outcome is want_outcome
    if want_outcome is Outcome.OK:
        assert reader.content() == want_content
        assert reader.bare_line_ends == bool(_BARE.search(want_content))
    else:
        with pytest.raises(RuntimeError):
            reader.content()


LINE_1001 = st.one_of(
    st.integers(min_value=0, max_value=1010).map(lambda n: b"a" * n + b"\r\n"),
    st.integers(min_value=0, max_value=90).map(lambda n: b"." + b"b" * n + b"\r\n"),
    st.binary(max_size=120),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=streams(st.lists(LINE_1001, max_size=60).map(b"".join)),
       size_limit=st.one_of(st.none(), st.integers(min_value=1024, max_value=40000)))
def test_real_limits_and_large_messages(data, size_limit):
    """The default line limit (1001) with lines around it and messages of tens of kilobytes."""
    stream, chunks = data
    want_outcome, want_content, want_used = reference(stream, size_limit, 1001)
    reader, used = read_chunks(chunks, size_limit, 1001)
    assert (reader.outcome, used) == (want_outcome, want_used)
    if want_outcome is Outcome.OK:
        assert reader.content() == want_content


def test_examples():
    """Cases worth reading: the empty message, unstuffing, a terminator split at every point."""
    for stream, content in [(b".\r\n", b""), (b"\r\n.\r\n", b"\r\n"), (b"..\r\n.\r\n", b".\r\n"),
                            (b"a\r\n..b\r\n...\r\n.\r\n", b"a\r\n.b\r\n..\r\n"),
                            (b"a\n.\r\nb\r\n.\r\n", b"a\n.\r\nb\r\n"),  # LF.CRLF does not end the data
                            (b"a\r.\r\nb\r\n.\r\n", b"a\r.\r\nb\r\n")]:
        for cut in range(len(stream) + 1):
            reader, used = read_chunks([stream[:cut], stream[cut:]], None, 1001)
            assert (reader.content(), used) == (content, len(stream)), (stream, cut)
    reader, _ = read_chunks([b"a\n.\r\nb\r\n.\r\n"], None, 1001)
    assert reader.bare_line_ends
    # Which limit wins: the first one passed, in line order (aiosmtpd's order).
    assert read_chunks([b"x" * 10 + b"\r\n" + b"y" * 2000 + b"\r\n.\r\n"], 5, 1001)[0].outcome is Outcome.TOO_BIG
    assert read_chunks([b"y" * 2000 + b"\r\nx\r\n.\r\n"], 5, 1001)[0].outcome is Outcome.LINE_TOO_LONG
    # A line of 1002 bytes with CRLF is within the stream limit but over the line limit: the size counts first.
    assert read_chunks([b"y" * 1000 + b"\r\n.\r\n"], 1002, 1001)[0].outcome is Outcome.LINE_TOO_LONG
    assert read_chunks([b"y" * 1000 + b"\r\n.\r\n"], 1001, 1001)[0].outcome is Outcome.TOO_BIG


def test_refused_data_is_not_kept():
    """Past a limit only the end is looked for: memory stays bounded whatever the sender sends."""
    reader = DataReader(10_000)
    for _ in range(200):
        reader.feed(b"z" * 998 + b"\r\n")
    assert reader.outcome is Outcome.TOO_BIG and reader._pieces == []
    endless = DataReader(None)
    for _ in range(200):
        endless.feed(b"w" * 5000)  # one line that never ends
    assert endless.outcome is Outcome.LINE_TOO_LONG and endless._pieces == []
    assert endless.feed(b"\r\n.\r\nQUIT\r\n") == 5 and endless.done


async def test_receive_leaves_the_next_command_in_the_stream():
    stream = asyncio.StreamReader()
    pushed: list[bytes] = []
    for piece in (b"Subject: x\r\n\r\n..dot\r", b"\n.\r\nRSET\r\nQUIT\r\n"):
        stream.feed_data(piece)
    reader = DataReader(None)
    await data_reader.receive(stream, reader, pushed.append)
    assert reader.content() == b"Subject: x\r\n\r\n.dot\r\n" and pushed == [b"RSET\r\nQUIT\r\n"]
    stream.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await data_reader.receive(stream, DataReader(None), pushed.append)


# -- against a real aiosmtpd server on loopback -------------------------------------------

class _Recorder:
    def __init__(self):
        self.contents: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):
        self.contents.append(envelope.original_content)
        return "250 OK"


class _SmallLimitsSMTP(SMTP):
    line_length_limit = 40  # aiosmtpd's line limit and stream limit (class attribute)


@pytest.fixture(scope="module")
def stock_aiosmtpd():
    """Stock aiosmtpd (its own DATA reading) with a 40-byte line limit and a 300-byte size limit."""
    recorder = _Recorder()

    class _Controller(Controller):
        def factory(self):
            return _SmallLimitsSMTP(self.handler, data_size_limit=300, decode_data=False)

    controller = _Controller(recorder, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller, recorder
    controller.stop()


def _replies(sock: socket.socket, buf: bytearray, count: int) -> list[bytes]:
    """Read ``count`` final reply lines (multi-line replies count once)."""
    out: list[bytes] = []
    while len(out) < count:
        eol = buf.find(b"\r\n")
        if eol < 0:
            chunk = sock.recv(65536)
            assert chunk, "server closed"
            buf += chunk
            continue
        line = bytes(buf[:eol])
        del buf[:eol + 2]
        if line[3:4] != b"-":
            out.append(line)
    return out


def _stock_dialogue(port: int, payload: list[bytes]) -> tuple[bytes, bytes]:
    """One transaction on the stock server: the data in ``payload`` pieces, then NOOP; the replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        buf = bytearray()
        _replies(sock, buf, 1)
        sock.sendall(b"EHLO t\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
        assert [r[:3] for r in _replies(sock, buf, 4)] == [b"250", b"250", b"250", b"354"]
        for piece in payload:
            sock.sendall(piece)
        final, noop = _replies(sock, buf, 2)
        sock.sendall(b"QUIT\r\n")
        _replies(sock, buf, 1)
    return final, noop


_CODES = {Outcome.OK: b"250", Outcome.TOO_BIG: b"552", Outcome.LINE_TOO_LONG: b"500"}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=streams())
def test_same_as_stock_aiosmtpd(stock_aiosmtpd, data):
    controller, recorder = stock_aiosmtpd
    stream, chunks = data
    want_outcome, _, used = reference(stream, 300, 40)
    event(want_outcome.value)
    before = len(recorder.contents)
    final, noop = _stock_dialogue(controller.port, split(stream[:used] + b"NOOP\r\n",
                                                         list(itertools.accumulate(map(len, chunks)))))
    reader, mine_used = read_chunks(chunks, 300, 40)
    assert mine_used == used and noop.startswith(b"250")  # both read the next command from the same byte
    assert final[:3] == _CODES[reader.outcome] and reader.outcome is want_outcome
    if reader.outcome is Outcome.OK:
        assert recorder.contents[before:] == [reader.content()]


@pytest.mark.parametrize("stream, outcome", [
    # 280 bytes of lines, then one that passes the 300-byte limit: its text (41 bytes) is over the
    # 40-byte line limit, so aiosmtpd's stream limit trips first: "line too long".
    ((b"x" * 38 + b"\r\n") * 7 + b"y" * 41 + b"\r\n.\r\n", Outcome.LINE_TOO_LONG),
    # Its text is 40 bytes (42 with CRLF, still over the limit of 40 with CRLF): the size counts first.
    ((b"x" * 38 + b"\r\n") * 7 + b"y" * 40 + b"\r\n.\r\n", Outcome.TOO_BIG),
    (b"x" * 38 + b"\r\n" + b"y" * 39 + b"\r\n.\r\n", Outcome.LINE_TOO_LONG),
    (b"x" * 38 + b"\r\n" + b"y" * 38 + b"\r\n.\r\n", Outcome.OK),
])
def test_which_limit_wins_as_in_stock_aiosmtpd(stock_aiosmtpd, stream, outcome):
    controller, _ = stock_aiosmtpd
    final, _ = _stock_dialogue(controller.port, [stream + b"NOOP\r\n"])
    assert final[:3] == _CODES[outcome]
    for cut in range(0, len(stream), 7):
        assert read_chunks([stream[:cut], stream[cut:]], 300, 40)[0].outcome is outcome


# -- through mxguard's front door -----------------------------------------------------------

HEAD = (b"From: <a@sender.test>\r\nTo: <user@example.com>\r\nSubject: data path\r\n"
        b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <dp@sender.test>\r\n\r\n")
#: Message text for the front door: the edge pieces and long runs, no NUL (refused elsewhere).
TEXT_PIECE = st.one_of(PIECE.filter(lambda p: b"\x00" not in p),
                       st.integers(min_value=400, max_value=1010).map(lambda n: b"\r\n" + b"L" * n + b"\r\n"))


@pytest.fixture
def gateway_overrides() -> dict:
    return {"filters.enabled": False, "smtp.max_message_size": 1500}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(body=st.lists(TEXT_PIECE, max_size=25).map(b"".join), cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_front_door_reads_data_as_aiosmtpd_would(plain_sink, gateway, add_domain, body, cuts):
    """Same bytes to mxguard: the reply class the line-by-line reading implies, the message
    delivered as it would have read it, and the pipelined command after the dot still answered.
    (``plain_sink`` comes first so that it outlives the gateway's pooled connection to it.)"""
    if not getattr(gateway, "_data_path_domain", False):
        add_domain("example.com", [plain_sink.address], downstream_tls="off")
        gateway._data_path_domain = True
    stream = HEAD + body + b"\r\n.\r\n"
    outcome, content, used = reference(stream, 1500, 1001)
    event("bare line ends" if outcome is Outcome.OK and _BARE.search(content) else outcome.value)
    payload = stream[:used] + b"NOOP\r\n"
    before = len(plain_sink.messages)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock:
        buf = bytearray()
        _replies(sock, buf, 1)
        sock.sendall(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in _replies(sock, buf, 4)] == [b"250", b"250", b"250", b"354"]
        for piece in split(payload, [c % (len(payload) + 1) for c in cuts]):
            sock.sendall(piece)
        final, noop = _replies(sock, buf, 2)
        sock.sendall(b"QUIT\r\n")
        _replies(sock, buf, 1)
    assert noop.startswith(b"250 2.0.0"), (final, noop)
    if outcome is Outcome.OK and _BARE.search(content):
        assert final.startswith(b"554 5.6.0")  # bare CR or LF (RFC 5321 2.3.8), smtp.bare_line_endings
    elif outcome is Outcome.OK:
        assert final.startswith(b"250 "), final
        assert plain_sink.wait_for(before + 1)
        delivered = plain_sink.messages[before].data
        assert delivered.endswith(content) and delivered.count(b"Message-ID: <dp@sender.test>") == 1
    else:
        code = b"552 5.3.4" if outcome is Outcome.TOO_BIG else b"500 5.6.0"
        assert final.startswith(code), final
        assert len(plain_sink.messages) == before


@settings(max_examples=2000, deadline=None)
@given(raw=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"B: c"]), max_size=30).map(b"".join))
def test_header_block_end_searches_only_the_head(raw):
    """The end of the header block (run on every message) is the first blank line, CRLF or LF."""
    from mxguard.smtp.headers import header_block_end
    ends = [p + 2 for p in [raw.find(b"\r\n\r\n")] if p >= 0] + [p + 1 for p in [raw.find(b"\n\n")] if p >= 0]
    want = 0 if raw.startswith((b"\r\n", b"\n")) else min(ends, default=len(raw))
    assert header_block_end(raw) == want
