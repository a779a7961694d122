"""``parse_bytes`` (the filters' one parse of a message) gives the stdlib's full parse, object for object.

For a one-part message it parses only the header block and takes the rest as
the payload; the property: for any message (real ones from the shared corpus,
and generated ones with odd line ends, a missing blank line, form feeds and
vertical tabs the stdlib also splits lines on, 8-bit bytes, multipart and
message/* types) the headers, defects, payloads and structure are those of
``BytesParser(policy=...).parsebytes``.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.parser import BytesParser

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mxguard.filtering.message import message_policy, parse_bytes
from tests.conftest import CORPUS

CORPUS_MESSAGES = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name != "SOURCES.md") \
    if CORPUS.is_dir() else []


def shape(node: EmailMessage) -> tuple:
    """Everything a reader of the parsed message can see, as comparable values."""
    payload = node._payload  # as the parser left it (get_payload() would decode it)
    body = tuple(shape(p) for p in payload) if isinstance(payload, list) else payload
    return (tuple((k, str(v)) for k, v in node.raw_items()), tuple(type(d).__name__ for d in node.defects),
            node.get_content_type(), node.is_multipart(), node.preamble, node.epilogue, body)


def full_parse(raw: bytes) -> EmailMessage:
    return BytesParser(policy=message_policy()).parsebytes(raw)


def test_corpus_messages_parse_the_same():
    assert len(CORPUS_MESSAGES) > 20
    for path in CORPUS_MESSAGES:
        raw = path.read_bytes()
        assert shape(parse_bytes(raw)) == shape(full_parse(raw)), path.name


LINE_END = st.sampled_from([b"\r\n", b"\n", b"\r", b"\x0c", b"\x0b", b"\x1c", b""])
HEADER = st.one_of(
    st.sampled_from([b"Subject: hello", b"From: a@b.example", b" folded continuation", b"\tmore",
                     b"Content-Type: text/plain; charset=utf-8", b"Content-Type: multipart/mixed; boundary=XX",
                     b"Content-Type: message/rfc822", b"Content-Type: message/delivery-status",
                     b"Content-Type: Multipart/Alternative; boundary=\"XX\"", b"Content-Type: text/html",
                     b"Content-Type: ;;", b"Content-Transfer-Encoding: base64", b"MIME-Version: 1.0",
                     b"not a header line", b"From the start", b"X-8bit: \xe9t\xe9", b"Bad\x00: nul"]),
    st.binary(max_size=12),
)
BODY_PIECE = st.one_of(
    st.sampled_from([b"--XX", b"--XX--", b"Content-Type: text/plain", b"", b"text", b"\xff\xfe",
                     b"aGVsbG8=", b"From x", b"."]),
    st.binary(max_size=10),
)


@st.composite
def messages(draw) -> bytes:
    head = b"".join(h + draw(LINE_END) for h in draw(st.lists(HEADER, max_size=8)))
    separator = draw(st.sampled_from([b"\r\n", b"\n", b"", b"\r\r\n", b"\n\r\n"]))
    body = b"".join(p + draw(LINE_END) for p in draw(st.lists(BODY_PIECE, max_size=10)))
    return head + separator + body


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=messages())
def test_generated_messages_parse_the_same(raw):
    fast = parse_bytes(raw)
    event(fast.get_content_maintype())
    assert shape(fast) == shape(full_parse(raw))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(min_value=0), cut=st.integers(min_value=0), junk=st.binary(max_size=8))
def test_damaged_corpus_messages_parse_the_same(index, cut, junk):
    """Corpus messages with bytes put in anywhere (a header broken, a blank line added or removed)."""
    raw = CORPUS_MESSAGES[index % len(CORPUS_MESSAGES)].read_bytes()
    cut %= len(raw) + 1
    raw = raw[:cut] + junk + raw[cut:]
    assert shape(parse_bytes(raw)) == shape(full_parse(raw))
