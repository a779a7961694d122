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
