"""SPF, DKIM and DMARC against the loopback DNS server: pass, fail and none cases."""

from __future__ import annotations

import pytest

from mxguard.filtering.message import Envelope, parse_message
from mxguard.filtering.sender_auth import SenderAuth, aligned, organizational_domain
from mxguard.smtp.headers import authentication_results_field
from tests.support import mail


@pytest.fixture
async def auth(loopback_dns):
    checker = SenderAuth([loopback_dns.address], timeout=2.0, hostname="mx.gw.test")
    yield checker
    checker.close()


def _msg(loopback_dns, from_domain: str, *, sign: str | None = None, wrong_key: bool = False,
         mail_from: str | None = None, ip: str = "127.0.0.1") -> tuple:
    raw = mail.plain(sender=f"alice@{from_domain}")
    if sign:
        raw = loopback_dns.sign(raw, sign, wrong_key=wrong_key)
    env = Envelope(client_ip=ip, helo="mx.pass.test", mail_from=mail_from or f"alice@{from_domain}")
    return parse_message(raw, env)


async def test_spf_dkim_dmarc_pass(auth, loopback_dns):
    result = await auth.check(_msg(loopback_dns, "pass.test", sign="pass.test"))
    assert result.spf == "pass" and result.spf_domain == "pass.test"
    assert result.dkim == [{"result": "pass", "domain": "pass.test", "selector": "sel"}]
    assert result.dmarc == "pass" and result.dmarc_policy == "reject"
    assert result.sender_aligned is True


async def test_spf_fail_and_dkim_fail_give_dmarc_fail(auth, loopback_dns):
    result = await auth.check(_msg(loopback_dns, "fail.test", sign="fail.test", wrong_key=True))
    assert result.spf == "fail"
    assert result.dkim[0]["result"] == "fail"
    assert result.dmarc == "fail" and result.dmarc_policy == "reject"
    assert result.sender_aligned is False


async def test_softfail_and_quarantine_policy(auth, loopback_dns):
    result = await auth.check(_msg(loopback_dns, "soft.test"))
    assert result.spf == "softfail" and result.dkim == [] and result.dmarc == "fail"
    assert result.dmarc_policy == "quarantine"


async def test_no_records_give_none(auth, loopback_dns):
    result = await auth.check(_msg(loopback_dns, "none.test"))
    assert (result.spf, result.dkim_result, result.dmarc) == ("none", "none", "none")
    assert result.sender_aligned is False


async def test_dkim_alone_aligns_when_spf_fails(auth, loopback_dns):
    """Forwarded mail: the client IP is not in SPF, but the DKIM signature of the From domain passes."""
    result = await auth.check(_msg(loopback_dns, "pass.test", sign="pass.test", ip="203.0.113.7"))
    assert result.spf == "fail" and result.dkim_result == "pass" and result.dmarc == "pass"
    assert result.sender_aligned is True


async def test_signature_with_no_published_key_is_permerror(auth, loopback_dns):
    result = await auth.check(_msg(loopback_dns, "none.test", sign="none.test"))
    assert result.dkim[0]["result"] == "permerror"


async def test_dns_server_down_gives_temperror_not_an_exception(loopback_dns):
    from tests.support.peers import free_port
    checker = SenderAuth([f"127.0.0.1:{free_port()}"], timeout=0.3, hostname="mx.gw.test")
    try:
        result = await checker.check(_msg(loopback_dns, "pass.test", sign="pass.test"))
    finally:
        checker.close()
    assert result.spf == "temperror"
    assert result.dkim[0]["result"] == "temperror"
    assert result.dmarc == "temperror"


async def test_every_query_went_to_the_loopback_server(auth, loopback_dns):
    before = len(loopback_dns.queries)
    await auth.check(_msg(loopback_dns, "pass.test", sign="pass.test"))
    names = {q for q, _ in loopback_dns.queries[before:]}
    assert {"pass.test", "sel._domainkey.pass.test", "_dmarc.pass.test"} <= names


def test_alignment_and_organizational_domain():
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert aligned("news.example.com", "example.com", strict=False)
    assert not aligned("news.example.com", "example.com", strict=True)
    assert not aligned("example.com", "example.net", strict=False)


async def test_authentication_results_header(auth, loopback_dns):
    result = await auth.check(_msg(loopback_dns, "pass.test", sign="pass.test"))
    field = authentication_results_field("mx.gw.test", result, sender="alice@pass.test")
    unfolded = " ".join(field.split())
    assert unfolded == ("Authentication-Results: mx.gw.test; spf=pass smtp.mailfrom=alice@pass.test; "
                        "dkim=pass header.d=pass.test header.s=sel; dmarc=pass (p=reject) header.from=pass.test")
    assert all(len(line) <= 78 for line in field.split("\r\n"))


def test_gateway_records_auth_results(gateway, tls_sink, add_domain, loopback_dns):
    """Through the gateway: a DKIM-signed message from pass.test (client 127.0.0.1) passes all three."""
    from tests.support.smtp import send
    add_domain("example.com", [tls_sink.address])
    raw = loopback_dns.sign(mail.plain(sender="alice@pass.test"), "pass.test")
    out = send(gateway.port, ["bob@example.com"], raw, sender="alice@pass.test")
    assert out.data[0] == 250 and tls_sink.wait_for(1)
    head = tls_sink.messages[0].data.split(b"\r\n\r\n")[0].decode()
    assert "spf=pass smtp.mailfrom=alice@pass.test" in head and "dmarc=pass" in head
    rec = gateway.wait_records(1)[-1]
    assert rec.verdict["auth"]["sender_aligned"] is True
    assert "DMARC_PASS" in rec.verdict["junk"][0]["rules"]


# -- DKIM body length (l=): text appended after signing is not covered ------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from mxguard.filtering.message import parse_message as _parse  # noqa: E402


def _tail_message(loopback_dns, tail: bytes, canonicalize=(b"relaxed", b"relaxed")):
    raw = loopback_dns.sign(mail.plain(sender="alice@pass.test"), "pass.test", length=True, canonicalize=canonicalize)
    env = Envelope(client_ip="203.0.113.7", helo="mx.pass.test", mail_from="alice@pass.test")
    return _parse(raw + tail, env)


async def test_signature_with_l_covering_the_whole_body_passes(auth, loopback_dns):
    result = await auth.check(_tail_message(loopback_dns, b""))
    assert result.dkim[0]["result"] == "pass" and result.dmarc == "pass"


async def test_text_appended_after_an_l_signature_fails_dkim_and_dmarc(auth, loopback_dns):
    """p=reject domain, SPF fails (forwarded), the only pass would be the l= signature: now dmarc=fail."""
    result = await auth.check(_tail_message(loopback_dns, b"\r\nClick https://evil.example/ now.\r\n"))
    sig = result.dkim[0]
    assert sig["result"] == "fail" and "shorter than the body" in sig["reason"]
    assert result.dmarc == "fail" and result.dmarc_policy == "reject" and not result.sender_aligned
    field = authentication_results_field("mx.gw.test", result, sender="alice@pass.test")
    assert 'dkim=fail reason="body length l=' in field


async def test_body_length_allow_keeps_rfc_6376_behaviour(loopback_dns):
    checker = SenderAuth([loopback_dns.address], timeout=2.0, hostname="mx.gw.test", body_length="allow")
    try:
        result = await checker.check(_tail_message(loopback_dns, b"\r\nappended\r\n"))
    finally:
        checker.close()
    assert result.dkim[0]["result"] == "pass" and "reason" not in result.dkim[0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.binary(min_size=1, max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n")),
       canon=st.sampled_from([(b"relaxed", b"relaxed"), (b"relaxed", b"simple"), (b"simple", b"simple")]))
async def test_any_tail_that_changes_the_canonical_body_is_never_a_pass(loopback_dns, tail, canon):
    """The class: whatever is appended, in either canonicalization, a pass is only given when the
    canonicalized body is still exactly what l= counted (e.g. only trailing empty lines were added)."""
    from mxguard.filtering.sender_auth import _body_coverage
    checker = SenderAuth([loopback_dns.address], timeout=2.0, hostname="mx.gw.test")
    try:
        message = _tail_message(loopback_dns, tail, canonicalize=canon)
        result = await checker.check(message)
    finally:
        checker.close()
    import dkim as _dkim
    sig = _dkim.rfc822_parse(message.raw)[0]
    tags = dict(part.strip().split("=", 1) for part in
                b"".join(v for k, v in sig if k.lower() == b"dkim-signature").decode().replace("\r\n", "").split(";")
                if "=" in part)
    covered, total = _body_coverage(message.raw, tags["c"].strip(), tags["l"].strip())
    if tail.strip(b" \t\r\n"):  # visible text appended: never covered, whatever the canonicalization
        assert covered < total and result.dkim[0]["result"] == "fail"
    if covered < total:
        assert result.dkim[0]["result"] == "fail"
    else:
        assert result.dkim[0]["result"] == "pass"
