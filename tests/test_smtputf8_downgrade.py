"""A sender's SMTPUTF8 to a downstream server without it (RFC 6531 3.4).

The gateway drops the parameter while the envelope is ASCII, as Postfix does,
and refuses with 5.6.7 only what needs it: a non-ASCII sender or recipient
address, or a non-ASCII header. Real gateway, real smtplib client, an aiosmtpd
sink that does not offer SMTPUTF8.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxguard.sink import ThreadedSink
from tests.support.smtp import message, send


@pytest.fixture
def plain_sink():
    """A downstream server that offers neither SMTPUTF8 nor STARTTLS."""
    with ThreadedSink(hostname="legacy.example.com", offer_smtputf8=False) as sink:
        yield sink


def _address(local_ascii: bool, n: int) -> str:
    return f"user{n}@example.com" if local_ascii else f"jörg{n}@example.com"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sender_ascii=st.booleans(), rcpts_ascii=st.lists(st.booleans(), min_size=1, max_size=3),
       header_ascii=st.booleans(), body_8bit=st.booleans())
def test_smtputf8_is_dropped_unless_the_envelope_or_header_needs_it(gateway, plain_sink, add_domain,
                                                                   sender_ascii, rcpts_ascii, header_ascii, body_8bit):
    if not getattr(plain_sink, "domain_added", False):  # one gateway and sink for every example
        add_domain("example.com", [plain_sink.address])
        plain_sink.domain_added = True
    before = len(plain_sink.messages)
    sender = "alice@sender.test" if sender_ascii else "émilie@sender.test"
    rcpts = [_address(a, n) for n, a in enumerate(rcpts_ascii)]
    data = message(subject="plain" if header_ascii else "Grüße", body="Grüße\n" if body_8bit else "Hello.\n",
                   sender=sender if sender_ascii else "a@sender.test")
    out = send(gateway.port, rcpts, data, sender=sender, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    accepted_ascii = [r for r, a in zip(rcpts, rcpts_ascii) if a]
    for rcpt, ascii_ in zip(rcpts, rcpts_ascii):
        code, text = out.rcpt[rcpt]
        if sender_ascii and ascii_:
            assert code == 250, (rcpt, text)
        else:
            assert code == 553 and text.startswith("5.6.7"), (rcpt, code, text)
    if not (sender_ascii and accepted_ascii):
        assert len(plain_sink.messages) == before
        return
    if header_ascii:
        assert out.data[0] == 250, out.data
        assert plain_sink.wait_for(before + 1)
        got = plain_sink.messages[-1]
        assert got.rcpt_tos == accepted_ascii
        assert "SMTPUTF8" not in got.mail_options  # the server does not offer it: not sent
    else:
        assert out.data[0] == 550 and out.data[1].startswith("5.6.7"), out.data
        assert len(plain_sink.messages) == before


def test_a_server_with_smtputf8_still_gets_it(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    out = send(gateway.port, ["user@example.com"], message(subject="Grüße"), mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    assert out.data[0] == 250
    assert tls_sink.wait_for(1) and "SMTPUTF8" in tls_sink.messages[0].mail_options
