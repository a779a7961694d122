"""The outbound relay end to end (issue 15): real sending servers, the gateway, a destination
found by MX.

A real Postfix relays with SASL AUTH to the gateway's submission listener, and swaks presents a
client certificate on port 25; the gateway's own spool worker takes each message to the
destination's MX host, found through the project's loopback DNS server (MX, A and the
organization's DKIM record), an aiosmtpd sink with STARTTLS on 127.0.0.6. At the sink the
message arrives over TLS with a DKIM signature dkimpy verifies against the record in that DNS;
the message log has the relay's acceptance and the delivery as ``direction="outbound"``, with
the outbound hop's TLS, and the direction filter of the API and the console shows them to the
organization's admin, with the organization's spool entry.
"""

from __future__ import annotations

import email
import json
import smtplib
import ssl
import subprocess
import tempfile
from pathlib import Path

import dkim
import dns.resolver
import pytest
from dnslib import MX, TXT, A
from sqlalchemy import select

from mxguard.config import load_settings
from mxguard.services import domains as domain_service
from mxguard.services import orgs as org_service
from mxguard.services import relay as relay_service
from mxguard.sink import ThreadedSink
from mxguard.storage.models import MessageLogEntry
from tests.conftest import FAST_SPOOL, apply_overrides, gateway_environ
from tests.support.gateway import ThreadedGateway
from tests.support.web import WebGateway
from tests.support.peers import need, wait_until
from tests.support.smtp import crlf, message
from tests.test_cli import mx

ORG = "Example"
PASSWORD = "correct horse battery staple"
SELECTOR = "e2e"
#: The destinations: ``tls.e2e.test``'s one MX host is the TLS sink; ``fallback.e2e.test``'s
#: preferred MX host is dead (nothing listens on 127.0.0.9), its next one the TLS sink.
DNS_RECORDS = {
    ("mx.tls.e2e.test", "A"): [A("127.0.0.6")],
    ("dead.e2e.test", "A"): [A("127.0.0.9")],
    ("tls.e2e.test", "MX"): [MX("mx.tls.e2e.test", 10)],
    ("fallback.e2e.test", "MX"): [MX("dead.e2e.test", 10), MX("mx.tls.e2e.test", 20)],
}


@pytest.fixture(scope="module")
def mx_sink(ca):
    """The destinations' MX host: STARTTLS with a certificate from the test CA naming it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("mx.tls.e2e.test").configure_cert(ctx)
    with ThreadedSink(host="127.0.0.6", tls_context=ctx, hostname="mx.tls.e2e.test") as sink:
        yield sink


@pytest.fixture
def relay(data_dir, loopback_dns, tls_sink, mx_sink, ca_file):
    """A gateway with a submission listener and its spool worker, serving example.com for the
    organization Example (relay user, a DKIM key made with ``mxguard domain dkim generate`` and
    published in the loopback DNS), whose outbound mail is looked up in the loopback DNS."""
    settings = load_settings(data_dir, environ=gateway_environ(loopback_dns))
    apply_overrides(settings, {**FAST_SPOOL, "downstream.dns_servers": [loopback_dns.address],
                               "downstream.dns_timeout": 3.0, "downstream.connect_timeout": 3.0,
                               "downstream.outbound_port": mx_sink.port,
                               "downstream.outbound_ca_file": str(ca_file)})
    gw = ThreadedGateway(settings, submission_listen=["127.0.0.1:0"], web_listen="127.0.0.1:0").start()
    gw.web = WebGateway(gw, data_dir / "tls" / "cert.pem")
    published: list[tuple[str, str]] = []
    try:
        gw.run(org_service.add_org(gw.store, ORG))
        gw.web.add_user("ops@example.com", "org-admin", ORG)
        gw.run(domain_service.add_domain(gw.store, "example.com", [tls_sink.address], org=ORG,
                                         downstream_tls="off"))
        gw.run(relay_service.add_credential(gw.store, ORG, "relay@example.com", PASSWORD))
        out = mx("domain", "dkim", "generate", "example.com", "--selector", SELECTOR, "--algorithm", "ed25519",
                 data_dir=data_dir).stdout
        assert f"{SELECTOR}._domainkey.example.com. IN TXT" in out
        [key] = json.loads(mx("domain", "dkim", "show", "example.com", "--json", data_dir=data_dir).stdout)
        records = {**DNS_RECORDS, (key["record_name"], "TXT"): [TXT(key["record_value"].encode())]}
        for (name, qtype), rdatas in records.items():
            loopback_dns.set_records(name, qtype, rdatas)
            published.append((name, qtype))
        gw.reload()
        mx_sink.messages.clear()
        yield gw
    finally:
        for name, qtype in published:
            loopback_dns.set_records(name, qtype, [])
        gw.web.close()
        gw.stop()


def _verified_at_the_sink(raw: bytes, loopback_dns) -> bool:
    """dkimpy's verdict, the public key looked up in the loopback DNS server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = ["127.0.0.1"], loopback_dns.port

    def dnsfunc(name, timeout=5):
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(r.strings) for r in answer)

    return dkim.verify(raw, dnsfunc=dnsfunc)


def _outbound_log(gw) -> list[MessageLogEntry]:
    gw.flush_log()

    async def rows():
        async with gw.store.session() as session:
            return list((await session.execute(select(MessageLogEntry).where(MessageLogEntry.direction == "outbound")
                                               .order_by(MessageLogEntry.id))).scalars().all())
    return gw.run(rows())


def _delivered_record(gw) -> MessageLogEntry:
    """The spool worker's completion record (after the relay's acceptance record)."""
    found: list[MessageLogEntry] = []

    def done() -> bool:
        found[:] = [r for r in _outbound_log(gw) if r.client_ip == "spool"]
        return bool(found)
    wait_until(done, 10, "the outbound delivery's message-log record")
    return found[-1]


def test_postfix_relays_with_sasl_and_the_message_is_delivered_by_mx_dkim_signed(relay, mx_sink, loopback_dns):
    from tests.support.postfix import PostfixInstance
    base = Path(tempfile.mkdtemp(prefix="mxguard-pfe2e-"))  # the postfix user must reach it
    maps = base / "sasl_passwd"
    maps.write_text(f"[127.0.0.1]:{relay.submission_port} relay@example.com:{PASSWORD}\n")
    postfix = PostfixInstance(base, f"127.0.0.1:{relay.submission_port}", smtp_tls_level="encrypt",
                              extra={"smtp_sasl_auth_enable": "yes",
                                     "smtp_sasl_password_maps": f"texthash:{maps}",
                                     "smtp_sasl_security_options": "noanonymous",
                                     "smtp_sasl_tls_security_options": "noanonymous",
                                     "myorigin": "example.com"}).start()
    try:
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as c:
            c.sendmail("alice@example.com", ["bob@tls.e2e.test"],
                       crlf(message(subject="end to end", sender="alice@example.com", to="bob@tls.e2e.test")))
        postfix.flush()
        assert "250 2.0.0 Ok: queued as" in postfix.wait_log("status=sent", timeout=60)
        assert mx_sink.wait_for(1, timeout=20), "nothing reached the destination's MX host"
    finally:
        postfix.stop()
    [got] = mx_sink.messages
    assert (got.mail_from, got.rcpt_tos) == ("alice@example.com", ["bob@tls.e2e.test"])
    assert got.tls_version in ("TLSv1.2", "TLSv1.3"), "opportunistic STARTTLS to the MX host"
    assert got.data.startswith(b"DKIM-Signature:") and b"with ESMTPSA" in got.data
    signature = email.message_from_bytes(got.data)["DKIM-Signature"]
    assert "d=example.com;" in signature and f"s={SELECTOR};" in signature
    assert _verified_at_the_sink(got.data, loopback_dns)
    # A changed signed header no longer verifies: the check above can fail.
    assert not _verified_at_the_sink(got.data.replace(b"Subject: end to end", b"Subject: end to END"), loopback_dns)
    # The message log: the relay's acceptance and the delivery, both outbound, the hop's TLS kept.
    record = _delivered_record(relay)
    assert record.disposition == "delivered" and record.rcpt_to == "bob@tls.e2e.test"
    assert record.downstream_host == f"mx.tls.e2e.test:{mx_sink.port}"
    assert record.downstream_tls and record.downstream_tls_version == got.tls_version and record.downstream_cipher
    assert f"via mx.tls.e2e.test:{mx_sink.port} ({got.tls_version}" in record.final_reply
    assert record.results[0]["route"] == "mx:tls.e2e.test"
    accepted = [r for r in _outbound_log(relay) if r.client_ip != "spool"]
    assert accepted and accepted[-1].final_code == 250 and accepted[-1].txn_id == record.txn_id
    # The direction filter in the API and the console, as the organization's admin; and its spool
    # entry (the destination's domain, the organization's entry) on the spool API.
    api = relay.web.api(relay.web.api_key("ops@example.com"))
    outbound = api.get("/messages", params={"direction": "outbound"}).json()
    inbound = api.get("/messages", params={"direction": "inbound"}).json()
    assert {r["id"] for r in outbound} >= {record.id, accepted[-1].id}
    assert not {r["id"] for r in inbound} & {record.id, accepted[-1].id}
    console, _ = relay.web.login("ops@example.com")
    page = console.get("/log", params={"direction": "outbound"}).text
    assert "bob@tls.e2e.test" in page
    assert "bob@tls.e2e.test" not in console.get("/log", params={"direction": "inbound"}).text
    [entry] = api.get("/spool", params={"status": "all"}).json()
    assert (entry["kind"], entry["domain"], entry["status"]) == ("outbound", "tls.e2e.test", "delivered")


def test_swaks_with_a_client_certificate_is_delivered_past_a_dead_mx(relay, mx_sink, ca, tmp_path, loopback_dns):
    leaf = ca.issue_cert("app.example.com")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    relay.run(relay_service.add_certificate(relay.store, ORG, ca_pem=ca.cert_pem.bytes().decode()))
    relay.reload()
    proc = subprocess.run([need("swaks"), "-s", "127.0.0.1", "-p", str(relay.port), "--tls",
                           "--tls-cert", str(cert), "--tls-key", str(key), "-f", "carol@example.com",
                           "-t", "dave@fallback.e2e.test", "--h-Subject", "swaks e2e", "--body", "hello"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "<~  250 2.0.0 Ok: queued as" in proc.stdout, proc.stdout
    assert mx_sink.wait_for(1, timeout=20), "nothing reached the next MX host"
    [got] = mx_sink.messages
    assert got.rcpt_tos == ["dave@fallback.e2e.test"] and got.tls_version
    assert _verified_at_the_sink(got.data, loopback_dns)
    record = _delivered_record(relay)
    assert record.disposition == "delivered" and record.downstream_host == f"mx.tls.e2e.test:{mx_sink.port}"
    assert record.downstream_tls
