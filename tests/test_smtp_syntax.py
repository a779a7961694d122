"""Command-line syntax at the front door: bare LF (RFC 5321 2.3.8) and path syntax (RFC 5321 4.1.2).

Real clients on loopback: raw sockets for what smtplib would never send, and
smtplib itself (``docmd``) for the path forms a careless client writes.
"""

from __future__ import annotations

import smtplib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.smtp import Raw, message

EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def _bare_lf_count(gateway) -> float:
    value = gateway.gateway.metrics.registry.get_sample_value("mxguard_smtp_refusals_total", {"reason": "bare_lf"})
    return value or 0.0


# -- bare LF ---------------------------------------------------------------------------------------

commands = st.sampled_from([b"EHLO c.test", b"HELO c.test", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<bob@example.com>",
                            b"NOOP", b"RSET", b"DATA", b"QUIT", b"STARTTLS", b"BOGUS", b"", b"MAIL FROM:<a@sender.test>\r"])


@EXAMPLES
@given(lines=st.lists(commands, min_size=1, max_size=6))
def test_every_command_line_ending_in_a_bare_lf_is_refused_and_counted(gateway, lines):
    before = _bare_lf_count(gateway)
    raw = Raw(gateway.port)
    try:
        assert raw.cmd("EHLO c.test").startswith("250")
        raw.send(b"".join(line + b"\n" for line in lines))  # one write: pipelined, as an attacker sends
        for line in lines:  # one reply per line, in order
            reply = raw.reply()
            if line.endswith(b"\r"):
                # "...\r\n" after all: a proper line, answered as the command it is.
                assert not reply.startswith("500 5.5.2 Command line ends in a bare LF"), (line, reply)
            else:
                assert reply.startswith("500 5.5.2 Command line ends in a bare LF"), (line, reply)
        # Still in step: the next CRLF command gets its own answer, and nothing refused ran.
        assert raw.cmd("NOOP").startswith("250 2.0.0")
        if not any(line.endswith(b"\r") for line in lines):
            assert raw.cmd("RCPT TO:<bob@example.com>").startswith("503"), "no MAIL ran"
    finally:
        raw.close()
    assert _bare_lf_count(gateway) - before == len(lines) - len([ln for ln in lines if ln.endswith(b"\r")])


def test_a_long_line_ending_in_a_bare_lf_gets_one_reply(gateway):
    raw = Raw(gateway.port)
    raw.cmd("EHLO c.test")
    raw.send(b"NOOP " + b"x" * 70_000 + b"\n")
    assert raw.reply().startswith("500 5.5.2 Command line too long")
    assert raw.cmd("NOOP").startswith("250 2.0.0"), "one reply for the one line: the dialogue is in step"
    raw.close()


def test_message_data_is_not_read_as_command_lines(gateway, tls_sink, add_domain):
    """Inside DATA the bare-LF rule for data applies (554 5.6.0), not the command-line one."""
    add_domain("example.com", [tls_sink.address])
    before = _bare_lf_count(gateway)
    raw = Raw(gateway.port)
    raw.cmd("EHLO c.test")
    assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
    assert raw.cmd("RCPT TO:<bob@example.com>").startswith("250")
    assert raw.cmd("DATA").startswith("354")
    raw.send(message() + b"a bare\nLF line\r\n.\r\n")
    assert raw.reply().startswith("554 5.6.0")
    raw.close()
    assert _bare_lf_count(gateway) == before


# -- path syntax (RFC 5321 4.1.2) ------------------------------------------------------------------

BAD_PATHS = {
    "alice@example.org": "the path must be in angle brackets",
    "<alice@example.org": "missing closing '>'",
    "<alice @example.org>": "spaces inside the path",
    "< alice@example.org>": "spaces inside the path",
    "<alice@example.org >": "spaces inside the path",
    '<"alice@example.org>': "unbalanced quotes",
    "<alice(x)@example.org>": "a comment inside the path",
    "<alice@example.org>SIZE=10": "text after the path",
    "<a<alice@example.org>": "'<' inside the path",
}


@pytest.fixture
def client(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    with smtplib.SMTP("127.0.0.1", gateway.port, local_hostname="client.sender.test", timeout=10) as c:
        c.ehlo()
        yield c


@pytest.mark.parametrize("path", list(BAD_PATHS))
def test_bad_sender_path_gets_501_5_1_7(client, path):
    code, text = client.docmd("MAIL", f"FROM:{path}")
    assert (code, text.decode()) == (501, f"5.1.7 Bad sender address syntax: {BAD_PATHS[path]}")
    assert client.docmd("RCPT", "TO:<bob@example.com>")[0] == 503, "no transaction was opened"


@pytest.mark.parametrize("path", [p.replace("alice@example.org", "bob@example.com") for p in BAD_PATHS])
def test_bad_recipient_path_gets_501_5_1_3(client, path):
    assert client.docmd("MAIL", "FROM:<a@sender.test>")[0] == 250
    code, text = client.docmd("RCPT", f"TO:{path}")
    problem = BAD_PATHS[path.replace("bob@example.com", "alice@example.org")]
    assert (code, text.decode()) == (501, f"5.1.3 Bad recipient address syntax: {problem}")
    assert client.docmd("RCPT", "TO:<bob@example.com>")[0] == 250, "the transaction goes on"


@pytest.mark.parametrize("path", ["<a@sender.test>", "<>", '<"a b"@sender.test>', '<"a\\"b"@sender.test>',
                                  "<@relay.test:a@sender.test>", "<a@sender.test> BODY=8BITMIME"])
def test_well_formed_sender_paths_are_accepted(client, path):
    code, text = client.docmd("MAIL", f"FROM:{path}")
    assert code == 250, (path, text)


local_parts = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_+", min_size=1, max_size=20).filter(
    lambda s: not s.startswith(".") and not s.endswith(".") and ".." not in s)
MUTATIONS = {
    "drop <": lambda p, i: p[1:],
    "drop >": lambda p, i: p[:-1],
    "space inside": lambda p, i: p[:i] + " " + p[i:],
    "tab inside": lambda p, i: p[:i] + "\t" + p[i:],
    "stray quote": lambda p, i: p[:i] + '"' + p[i:],
    "comment inside": lambda p, i: p[:i] + "(c)" + p[i:],
}


@EXAMPLES
@given(local=local_parts, mutation=st.sampled_from(list(MUTATIONS)), where=st.integers(1, 1000),
       verb=st.sampled_from(["MAIL", "RCPT"]))
def test_mutated_paths_are_refused_with_the_right_code(gateway, local, mutation, where, verb):
    address = f"{local}@example.com" if verb == "RCPT" else f"{local}@sender.test"
    good = f"<{address}>"
    bad = MUTATIONS[mutation](good, 1 + where % (len(good) - 1))
    with smtplib.SMTP("127.0.0.1", gateway.port, local_hostname="client.sender.test", timeout=10) as c:
        c.ehlo()
        if verb == "MAIL":
            code, text = c.docmd("MAIL", f"FROM:{bad}")
            assert code == 501 and text.startswith(b"5.1.7 Bad sender address syntax"), (bad, code, text)
        else:
            assert c.docmd("MAIL", "FROM:<a@sender.test>")[0] == 250
            code, text = c.docmd("RCPT", f"TO:{bad}")
            assert code == 501 and text.startswith(b"5.1.3 Bad recipient address syntax"), (bad, code, text)
