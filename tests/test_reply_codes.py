"""Every reply's enhanced status code against RFC 3463's table (and the IANA registry of
RFC 5248 that extends it), in one place: a live dialogue through the gateway, and a sweep
of every literal reply in the package's source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.smtp import Raw, crlf, message

# RFC 3463 section 3 (subjects 0-7 and their details), with the registered additions:
# X.1.10 (RFC 7505), X.5.6 (RFC 3030), X.6.6-X.6.10 (RFC 6531, 6532), X.7.8-X.7.17 (RFC 4954,
# 5248, 7208 family), X.7.20-X.7.30 (RFC 7372), X.7.10 (RFC 8689 REQUIRETLS).
REGISTERED: set[str] = (
    {"0.0"}
    | {f"1.{d}" for d in [*range(0, 9), 10]}
    | {f"2.{d}" for d in range(0, 5)}
    | {f"3.{d}" for d in range(0, 6)}
    | {f"4.{d}" for d in range(0, 8)}
    | {f"5.{d}" for d in range(0, 7)}
    | {f"6.{d}" for d in range(0, 11)}
    | {f"7.{d}" for d in [*range(0, 18), *range(20, 31)]}
)

#: What RFC 3463 says each successful command's reply is: X.1.0 "other address status"
#: covers the originator (MAIL), X.1.5 "destination address valid" an accepted RCPT.
EXPECTED = {
    "MAIL": (250, "2.1.0"),
    "RCPT accepted": (250, "2.1.5"),
    "RCPT to a stranger": (550, "5.7.1"),   # X.7.1 delivery not authorized (relay denied)
    "RCPT before MAIL": (503, "5.5.1"),     # X.5.1 invalid command (out of sequence)
    "NOOP": (250, "2.0.0"),
    "RSET": (250, "2.0.0"),
    "VRFY": (502, "5.5.1"),
    "end of DATA": (250, "2.0.0"),
    "QUIT": (221, "2.0.0"),
}

LINE = re.compile(r"^(\d{3})[ -]([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


def parse(reply: str) -> tuple[int, str]:
    last = reply.split("\r\n")[-1]
    m = LINE.match(last)
    assert m, f"no enhanced status code in {reply!r}"
    assert m.group(1)[0] == m.group(2), f"class of {reply!r} differs from its reply code"
    assert f"{m.group(3)}.{m.group(4)}" in REGISTERED, f"{reply!r}: not in RFC 3463's table"
    return int(m.group(1)), f"{m.group(2)}.{m.group(3)}.{m.group(4)}"


def test_a_dialogue_gets_rfc_3463_codes(gateway, plain_sink, add_domain):
    add_domain("example.com", [plain_sink.address], downstream_tls="off")
    raw = Raw(gateway.port)
    assert raw.greeting.startswith("220 ") and not LINE.match(raw.greeting)  # RFC 2034 3: none on 220
    ehlo = raw.cmd("EHLO client.sender.test")
    assert ehlo.startswith("250") and "ENHANCEDSTATUSCODES" in ehlo
    got = {"RCPT before MAIL": parse(raw.cmd("RCPT TO:<user@example.com>")),
           "NOOP": parse(raw.cmd("NOOP")), "VRFY": parse(raw.cmd("VRFY user")),
           "MAIL": parse(raw.cmd("MAIL FROM:<a@sender.test>")),
           "RCPT accepted": parse(raw.cmd("RCPT TO:<user@example.com>")),
           "RCPT to a stranger": parse(raw.cmd("RCPT TO:<someone@stranger.test>"))}
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(crlf(message()) + b".\r\n")
    got["end of DATA"] = parse(raw.reply(timeout=30))
    got["RSET"] = parse(raw.cmd("RSET"))
    got["QUIT"] = parse(raw.cmd("QUIT"))
    raw.close()
    assert got == EXPECTED


def test_refused_recipients_are_in_the_message_log_with_their_replies(gateway, plain_sink, add_domain):
    add_domain("example.com", [plain_sink.address], downstream_tls="off")
    raw = Raw(gateway.port)
    raw.cmd("EHLO client.sender.test")
    raw.cmd("MAIL FROM:<a@sender.test>")
    assert raw.cmd("RCPT TO:<one@stranger.test>").startswith("550 5.7.1")
    assert raw.cmd("RCPT TO:<two@other.test>").startswith("550 5.7.1")
    raw.cmd("QUIT")
    raw.close()
    record = gateway.wait_records(1)[0]
    assert record.final_reply.startswith("(ended by QUIT) refused at RCPT: one@stranger.test: 550 5.7.1 ")
    assert "; two@other.test: 550 5.7.1 " in record.final_reply
    assert record.disposition == "rejected"
    assert [(r["rcpt"], r["code"], r["enhanced"]) for r in record.results] == [
        ("one@stranger.test", 550, "5.7.1"), ("two@other.test", 550, "5.7.1")]


SOURCE_REPLY = re.compile(r'(?:Reply\((?:code=)?|["\'])([245]\d{2})(?:, *["\']|[ -])([245]\.\d{1,3}\.\d{1,3})')


def test_every_literal_reply_in_the_source_is_in_the_table():
    package = Path(__file__).resolve().parents[1] / "mxguard"
    found = []
    for path in sorted(package.rglob("*.py")):
        for code, enhanced in SOURCE_REPLY.findall(path.read_text()):
            found.append((path.name, code, enhanced))
            assert code[0] == enhanced[0], f"{path.name}: {code} {enhanced} changes class"
            assert enhanced.split(".", 1)[1] in REGISTERED, f"{path.name}: {code} {enhanced} is not registered"
    assert len(found) > 40  # the sweep did find the package's replies
    rcpt_ok = [f for f in found if f[1] == "250" and f[2] == "2.1.5"]
    assert rcpt_ok, "an accepted RCPT is 250 2.1.5 (RFC 3463 X.1.5)"


@pytest.mark.parametrize("code, enhanced", [(250, "2.0.0"), (550, "5.7.1"), (451, "4.4.1")])
def test_the_table_itself(code, enhanced):
    assert parse(f"{code} {enhanced} text") == (code, enhanced)
    with pytest.raises(AssertionError):
        parse(f"{code} {enhanced[0]}.9.9 text")
