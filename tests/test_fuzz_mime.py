"""The MIME pipeline fuzzed with mutated corpus messages: no exception escapes, every message gets a verdict.

Hypothesis takes a real message from the shared corpus and damages it the ways
hostile or broken mail does: flipped bytes, truncation, boundaries duplicated
or removed, broken base64 and quoted-printable, NUL bytes, a huge header,
deep nesting. Each result goes through :class:`FilterPipeline` with the
embedded engines and the sender checks (against the loopback DNS server).

Invariants: ``scan`` returns a verdict and never raises; no engine crashes
(an engine crash fails closed, but it is still a bug); a message the parser
cannot read is an error in the verdict (fail closed), never a clean pass;
every verdict leads to a disposition; and EICAR planted in the message is
found however the rest of it was damaged.
"""

from __future__ import annotations

import asyncio
import base64
import re

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mxguard.config import Settings
from mxguard.filtering.disposition import DomainFilterPolicy, decide
from mxguard.filtering.message import Envelope
from mxguard.filtering.pipeline import FilterPipeline
from mxguard.filtering.verdict import POLICY_ACTIONS
from tests.conftest import CORPUS
from tests.support.clamd import EICAR

ENV = Envelope(client_ip="192.0.2.7", helo="client.sender.test", mail_from="a@sender.test",
               rcpts=["alice@example.com"], txn_id="FUZZ")
MESSAGES = sorted(p for p in CORPUS.rglob("*.eml")) if CORPUS.is_dir() else []
_BOUNDARY_LINE = re.compile(rb"^--[^\r\n]*\r?\n", re.M)
_B64_BODY = re.compile(rb"(?im)^content-transfer-encoding:\s*base64\s*\r?\n(?:.*\r?\n)*?\r?\n")
_QP_BODY = re.compile(rb"(?im)^content-transfer-encoding:\s*quoted-printable\s*\r?\n(?:.*\r?\n)*?\r?\n")


# -- mutations: each takes (message, draw) and returns the damaged message ----------------------

def flip_bytes(raw: bytes, data) -> bytes:
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 20), label="flips")):
        if out:
            out[data.draw(st.integers(0, len(out) - 1))] = data.draw(st.integers(0, 255))
    return bytes(out)


def truncate(raw: bytes, data) -> bytes:
    return raw[:data.draw(st.integers(0, len(raw)), label="cut at")]


def duplicate_boundary(raw: bytes, data) -> bytes:
    lines = list(_BOUNDARY_LINE.finditer(raw))
    if not lines:
        return raw
    m = data.draw(st.sampled_from(lines))
    return raw[:m.end()] + m.group(0) * data.draw(st.integers(1, 50)) + raw[m.end():]


def remove_boundary(raw: bytes, data) -> bytes:
    lines = list(_BOUNDARY_LINE.finditer(raw))
    if not lines:
        return raw
    m = data.draw(st.sampled_from(lines))
    return raw[:m.start()] + raw[m.end():]


def break_base64(raw: bytes, data) -> bytes:
    m = _B64_BODY.search(raw)
    start = m.end() if m else len(raw) // 2
    junk = data.draw(st.sampled_from([b"!!", b"=", b"===", b"\x00", b"A", b"\xff\xfe", b"*" * 77, b"====\r\n"]))
    pos = data.draw(st.integers(start, max(start, len(raw))))
    return raw[:pos] + junk + raw[pos:]


def break_qp(raw: bytes, data) -> bytes:
    m = _QP_BODY.search(raw)
    start = m.end() if m else len(raw) // 2
    junk = data.draw(st.sampled_from([b"=ZZ", b"=", b"=\r\n", b"=0", b"=\x00", b"==3D=", b"=" * 2000]))
    pos = data.draw(st.integers(start, max(start, len(raw))))
    return raw[:pos] + junk + raw[pos:]


def insert_nuls(raw: bytes, data) -> bytes:
    pos = data.draw(st.integers(0, len(raw)))
    return raw[:pos] + b"\x00" * data.draw(st.integers(1, 64)) + raw[pos:]


def huge_header(raw: bytes, data) -> bytes:
    size = data.draw(st.sampled_from([1000, 20_000, 200_000]))
    folded = data.draw(st.booleans())
    value = (b"x" * 70 + b"\r\n ") * (size // 73) if folded else b"x" * size
    name = data.draw(st.sampled_from([b"Subject", b"X-Long", b"Content-Type", b"From", b"To", b"DKIM-Signature"]))
    return name + b": " + value + b"\r\n" + raw


def deep_nesting(raw: bytes, data) -> bytes:
    depth = data.draw(st.sampled_from([5, 40, 300, 1000]))
    head, body = b"From: a@sender.test\r\nSubject: nested\r\nMIME-Version: 1.0\r\n", b""
    opening = b"".join(b"Content-Type: multipart/mixed; boundary=\"b%d\"\r\n\r\n--b%d\r\n" % (i, i)
                       for i in range(depth))
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return head + opening + raw + closing + body


def many_parts(raw: bytes, data) -> bytes:
    count = data.draw(st.sampled_from([10, 600, 5500]))
    parts = b"".join(b"--m\r\nContent-Type: text/plain\r\n\r\npart\r\n" for _ in range(count))
    return b"From: a@sender.test\r\nContent-Type: multipart/mixed; boundary=m\r\n\r\n" + parts + b"--m--\r\n" + raw


def bad_headers(raw: bytes, data) -> bytes:
    field = data.draw(st.sampled_from([
        b"Content-Type: multipart/mixed; boundary=\r\n", b"Content-Type: text/plain; charset=\"\xff\xfe\"\r\n",
        b"Content-Disposition: attachment; filename*=utf-8''%ff%fe%00.exe\r\n",
        b"Content-Disposition: attachment; filename*0*=us-ascii'en'a; filename*1=b.exe\r\n",
        b"Subject: =?utf-8?b?////?= =?bogus?q?x?= =?utf-8?q?=ZZ?=\r\n", b"From: \"\xc3\x28\" <a@b>\r\n",
        b"Content-Transfer-Encoding: x-uuencode\r\n", b"Content-Type: message/rfc822\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; s=s; h=from; bh=!!; b=\x00\r\n",
        b"Content-Type: ;;;;====\r\n", b":\r\n", b" continuation first\r\n", b"Date: 99 Foo 99999 99:99:99\r\n",
    ]))
    return field + raw


MUTATIONS = [flip_bytes, truncate, duplicate_boundary, remove_boundary, break_base64, break_qp, insert_nuls,
             huge_header, deep_nesting, many_parts, bad_headers]


def with_eicar(raw: bytes, data) -> bytes:
    """EICAR as a base64 attachment appended to the (damaged) message, in a multipart wrapper of its own."""
    encoded = base64.b64encode(EICAR)
    if data.draw(st.booleans(), label="junk in the base64"):
        encoded = encoded[:20] + b"!*\r\n" + encoded[20:] + b"=="
    return (b"From: a@sender.test\r\nSubject: carrier\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n--outer\r\n"
            b"Content-Type: message/rfc822\r\n\r\n" + raw + b"\r\n--outer\r\n"
            b"Content-Type: application/octet-stream; name=\"a.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + encoded + b"\r\n--outer--\r\n")


# -- the property -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline_runner(loopback_dns):
    """The embedded engines and sender checks, on one event loop kept for the whole module."""
    loop = asyncio.new_event_loop()
    pipeline = FilterPipeline.from_settings(Settings.model_validate({"filters": {
        "dns_servers": [loopback_dns.address], "dns_timeout": 0.5}}))
    yield lambda raw: loop.run_until_complete(pipeline.scan(raw, ENV))
    loop.run_until_complete(pipeline.close())
    loop.close()


@pytest.fixture
def engine_crashes(monkeypatch):
    """Every "filter engine crashed" the pipeline logs (a crash fails closed, but it is a bug)."""
    import mxguard.filtering.pipeline as pipeline_module
    crashes: list[str] = []
    original = pipeline_module.log

    class Spy:
        def __getattr__(self, name):
            return getattr(original, name)

        def exception(self, event, **kw):
            crashes.append(f"{event}: {kw}")
            return original.exception(event, **kw)

    monkeypatch.setattr(pipeline_module, "log", Spy())
    return crashes


def test_corpus_is_there():
    assert len(MESSAGES) >= 30, "the fuzzer needs the shared corpus"


# No shrinking phase: a failure is reported with its draws at once, instead of minutes of shrinking
# messages that take a second each to parse.
@settings(max_examples=150, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_corpus_messages_always_get_a_verdict(pipeline_runner, engine_crashes, data):
    path = data.draw(st.sampled_from(MESSAGES), label="corpus message")
    raw = path.read_bytes()
    for mutation in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=4), label="mutations"):
        raw = mutation(raw, data)
    plant = data.draw(st.booleans(), label="plant EICAR")
    if plant:
        raw = with_eicar(raw, data)
    verdict = pipeline_runner(raw)  # must not raise
    assert engine_crashes == [], engine_crashes
    assert verdict.scanned and verdict.engines == ["yara", "builtin", "policy"]
    assert verdict.errors == [], "the embedded engines always answer"
    unreadable = [hit for hit in verdict.policy if hit.rule == "unreadable-mime"]
    if unreadable:
        assert not verdict.junk and not verdict.viruses, "no engine ran on what could not be parsed"
    else:
        assert [j.engine for j in verdict.junk] == ["builtin"]
    disposition = decide(verdict, DomainFilterPolicy.defaults())
    assert disposition.action in POLICY_ACTIONS + ("tag",), disposition
    if unreadable:
        assert disposition.action == "reject", "what cannot be read is refused, never delivered unscanned"
    if plant:
        assert disposition.action == "reject", "damage elsewhere must not let the attachment through"
        # It is named, unless the structure itself is refused (parts past the part limit are not opened).
        structure = {hit.rule for hit in verdict.policy} & {"unreadable-mime", "mime-parts", "mime-depth"}
        assert structure or "EICAR-Test-File" in verdict.virus_names
