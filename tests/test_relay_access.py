"""The outbound relay's front door: who may relay, and outbound mail accepted into the sealed spool.

A real gateway on loopback (port 25 style listener and a submission listener), real clients
(smtplib, swaks with a client certificate, Postfix relaying with SASL AUTH). Strangers, AUTH in
clear, wrong passwords and foreign sender domains are refused with the RFC 4954 / RFC 3463 codes;
what is accepted is in the spool, sealed, as ``kind="outbound"`` entries, before the 250.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import smtplib
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import select

from mxguard.config import load_settings
from mxguard.relay import ratelimit
from mxguard.relay.access import RelayAccess
from mxguard.services import domains as domain_service
from mxguard.services import orgs as org_service
from mxguard.services import orgsettings, relay as relay_service
from mxguard.services.relay import RelayAccessData
from mxguard.spool.queue import seal_context
from mxguard.storage.models import MessageLogEntry, SpoolEntry
from tests.conftest import gateway_environ
from tests.support import mail
from tests.support.gateway import ThreadedGateway
from tests.support.peers import need, wait_until
from tests.support.smtp import crlf, message

ORG = "Example"
PASSWORD = "correct horse battery staple"


def _client_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


@pytest.fixture
def relay_gw(data_dir, loopback_dns, tls_sink):
    """A gateway with a submission listener and no spool worker (entries stay as written), serving
    example.com for the organization Example, which has the relay user relay@example.com."""
    s = load_settings(data_dir, environ=gateway_environ(loopback_dns))
    gw = ThreadedGateway(s, submission_listen=["127.0.0.1:0"], spool_worker=False).start()
    gw.run(org_service.add_org(gw.store, ORG))
    gw.run(domain_service.add_domain(gw.store, "example.com", [tls_sink.address], org=ORG, downstream_tls="off"))
    gw.run(orgsettings.update_settings(gw.store, ORG, alert_address="ops@example.com"))
    gw.run(relay_service.add_credential(gw.store, ORG, "relay@example.com", PASSWORD))
    gw.reload()
    yield gw
    gw.stop()


def _spool(gw) -> list[SpoolEntry]:
    async def rows():
        async with gw.store.session() as session:
            return list((await session.execute(select(SpoolEntry).order_by(SpoolEntry.id))).scalars().all())
    return gw.run(rows())


def _log(gw) -> list[MessageLogEntry]:
    gw.flush_log()

    async def rows():
        async with gw.store.session() as session:
            return list((await session.execute(select(MessageLogEntry).order_by(MessageLogEntry.id))).scalars().all())
    return gw.run(rows())


def _authed(port: int, user: str = "relay@example.com", password: str = PASSWORD) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="app.example.com", timeout=30)
    client.starttls(context=_client_ctx())
    client.ehlo("app.example.com")
    client.login(user, password)
    return client


# -- AUTH ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("listener", ["smtp", "submission"])
def test_auth_is_offered_inside_tls_only_and_refused_in_clear(relay_gw, listener):
    port = relay_gw.port if listener == "smtp" else relay_gw.submission_port
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("app.example.com")
        assert not c.has_extn("auth"), "no AUTH before STARTTLS (RFC 4954 4)"
        for mechanism in ("PLAIN " + base64.b64encode(f"\0relay@example.com\0{PASSWORD}".encode()).decode(),
                          "LOGIN", "PLAIN", "CRAM-MD5"):
            code, text = c.docmd("AUTH", mechanism)
            assert (code, text[:7]) == (538, b"5.7.11 "), (mechanism, code, text)
        c.starttls(context=_client_ctx())
        c.ehlo("app.example.com")
        assert c.has_extn("auth") and set(c.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        c.login("relay@example.com", PASSWORD)
    time.sleep(0.2)
    assert not _spool(relay_gw), "AUTH alone stores nothing"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mechanism=st.sampled_from(["PLAIN", "LOGIN", "plain", "CRAM-MD5", "XOAUTH2", "X"]),
       initial=st.one_of(st.just(""), st.binary(max_size=60).map(lambda b: " " + base64.b64encode(b).decode()),
                         st.just(" " + base64.b64encode(f"\0relay@example.com\0{PASSWORD}".encode()).decode())),
       submission=st.booleans())
def test_any_auth_in_clear_is_refused_before_a_challenge(relay_gw, mechanism, initial, submission):
    """In clear, AUTH never gets a 334 challenge or a 235, whatever the mechanism and initial response
    (even the right password): 538 5.7.11 (RFC 4954 section 4), and MAIL stays unauthorized."""
    port = relay_gw.submission_port if submission else relay_gw.port
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("app.example.com")
        code, text = c.docmd("AUTH", mechanism + initial)
        assert (code, text[:7]) == (538, b"5.7.11 "), (code, text)
        code, _ = c.mail("alice@example.com")
        if submission:
            assert code == 530
        else:
            assert code == 250 and c.rcpt("bob@elsewhere.test")[0] == 550


def test_wrong_passwords_get_535_and_the_connection_ends_after_the_limit(relay_gw):
    limit = relay_gw.settings.relay.max_auth_failures
    with smtplib.SMTP("127.0.0.1", relay_gw.submission_port, timeout=30) as c:
        c.starttls(context=_client_ctx())
        c.ehlo("app.example.com")
        for attempt in range(1, limit + 1):
            user = "relay@example.com" if attempt % 2 else "nobody@example.com"
            blob = base64.b64encode(f"\0{user}\0wrong password {attempt}".encode()).decode()
            code, text = c.docmd("AUTH", "PLAIN " + blob)
            assert (code, text[:6]) == (535, b"5.7.8 "), (attempt, code, text)
        # The limit: 421 4.7.0 and the connection is closed (RFC 5321 3.8).
        code, text = c.getreply()
        assert code == 421 and text.startswith(b"4.7.0"), (code, text)
    # A fresh connection authenticates with the right password.
    with _authed(relay_gw.submission_port) as c:
        assert c.noop()[0] == 250


def test_submission_port_needs_authentication_before_mail(relay_gw):
    with smtplib.SMTP("127.0.0.1", relay_gw.submission_port, timeout=30) as c:
        c.ehlo("app.example.com")
        code, text = c.mail("alice@example.com")
        assert (code, text[:6]) == (530, b"5.7.0 "), (code, text)
        c.starttls(context=_client_ctx())
        c.ehlo("app.example.com")
        code, text = c.mail("alice@example.com")
        assert (code, text[:6]) == (530, b"5.7.0 "), "TLS alone is not authentication"
    assert all(r.disposition == "rejected" for r in _log(relay_gw))


# -- relaying ------------------------------------------------------------------------------------

def test_authenticated_mail_to_the_internet_is_spooled_sealed_before_250(relay_gw, tls_sink):
    body = message(subject="Quarterly numbers", sender="alice@example.com", to="bob@elsewhere.test")
    with _authed(relay_gw.submission_port) as c:
        c.mail("alice@example.com")
        assert c.rcpt("bob@elsewhere.test")[0] == 250
        assert c.rcpt("carol@elsewhere.test")[0] == 250
        assert c.rcpt("dave@other.example")[0] == 250
        code, text = c.data(crlf(body))
        # The reply came after the commit: the entries are there the moment we read them.
        entries = _spool(relay_gw)
    assert code == 250 and text.startswith(b"2.0.0"), (code, text)
    assert sorted((e.kind, e.domain, tuple(r["rcpt"] for r in e.recipients)) for e in entries) == [
        ("outbound", "elsewhere.test", ("bob@elsewhere.test", "carol@elsewhere.test")),
        ("outbound", "other.example", ("dave@other.example",))]
    sealer = relay_gw.gateway.keyring.get()
    org_id = relay_gw.run(org_service.get_org(relay_gw.store, ORG)).id
    for e in entries:
        assert e.status == "queued" and e.mail_from == "alice@example.com"
        assert e.org_id == org_id, "the relaying organization is kept (its org-admins see the entry)"
        assert b"Quarterly numbers" not in e.body, "the body is sealed (AES-256-GCM)"
        plain = sealer.open(e.body, seal_context(e.txn_id))
        received = plain.split(b"\r\n\r\n", 1)[0].decode()
        assert received.startswith("Received: from app.example.com ([127.0.0.1])")
        assert "with ESMTPSA id" in received and "using TLSv1.3 with cipher" in received
        assert b"Subject: Quarterly numbers" in plain
    assert tls_sink.messages == [], "nothing went to the served domain's server"
    record = [r for r in _log(relay_gw) if r.final_code == 250][-1]
    assert record.direction == "outbound" and record.disposition == "spooled" and record.tls_version == "TLSv1.3"
    from prometheus_client import generate_latest
    metrics = generate_latest(relay_gw.gateway.metrics.registry).decode()
    assert 'mxguard_messages_by_direction_total{direction="outbound",disposition="spooled"} 1.0' in metrics


def test_sender_domain_must_be_the_organizations(relay_gw):
    relay_gw.run(domain_service.add_domain(relay_gw.store, "other-org.test", ["127.0.0.1:9"]))
    relay_gw.reload()
    with _authed(relay_gw.submission_port) as c:
        for sender in ("alice@gmail.test", "alice@other-org.test", "alice@sub.example.com", "alice@example.com.evil"):
            code, text = c.mail(sender)
            assert (code, text[:6]) == (550, b"5.7.1 ") and b"not one of Example's domains" in text, (sender, text)
        assert c.mail("alice@EXAMPLE.com")[0] == 250
    assert not _spool(relay_gw)


def test_mixed_transaction_relays_and_delivers_in_line(relay_gw, tls_sink):
    with _authed(relay_gw.port) as c:
        c.mail("alice@example.com")
        assert c.rcpt("bob@example.com")[0] == 250  # served: today's in-line path
        assert c.rcpt("zoe@elsewhere.test")[0] == 250  # relayed
        code, _ = c.data(crlf(message(subject="Both ways", sender="alice@example.com")))
    assert code == 250
    assert tls_sink.wait_for(1) and tls_sink.messages[0].rcpt_tos == ["bob@example.com"]
    assert [(e.kind, e.domain) for e in _spool(relay_gw)] == [("outbound", "elsewhere.test")]


def test_viruses_forbidden_attachments_and_junk_are_refused_outbound(relay_gw):
    samples = {"eicar": (mail.eicar_variants()["zip"], 554),
               "exe": (mail.with_attachment(b"MZ\x90\x00" + b"\x00" * 60, "invoice.exe"), 550),
               "junk": (mail.gtube(sender="alice@example.com"), 550)}
    with _authed(relay_gw.submission_port) as c:
        for name, (data, expected) in samples.items():
            c.mail("alice@example.com")
            c.rcpt("bob@elsewhere.test")
            code, text = c.data(crlf(data))
            assert code == expected and text.startswith(b"5.7.1"), (name, code, text)
    assert not _spool(relay_gw), "a refused message is not stored"
    assert {r.disposition for r in _log(relay_gw) if r.direction == "outbound"} == {"rejected"}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(domain=st.from_regex(r"[a-z][a-z0-9-]{0,20}\.(test|example|invalid|com|net)", fullmatch=True),
       sender=st.sampled_from(["", "alice@example.com", "x@sender.test"]), tls=st.booleans())
def test_strangers_are_never_relayed(relay_gw, domain, sender, tls):
    """No network, certificate or AUTH: any recipient outside the served domains is 550 5.7.1."""
    if domain == "example.com":
        return
    with smtplib.SMTP("127.0.0.1", relay_gw.port, timeout=30) as c:
        if tls:
            c.starttls(context=_client_ctx())
        c.ehlo("stranger.test")
        assert c.mail(sender)[0] == 250
        code, text = c.rcpt(f"victim@{domain}")
        assert (code, text[:6]) == (550, b"5.7.1 ") and b"Relay access denied" in text, (domain, text)
        assert c.rcpt("bob@example.com")[0] == 250, "mail for a served domain is still taken"
        c.rset()
    assert not _spool(relay_gw)
    from prometheus_client import generate_latest
    assert 'mxguard_relay_refusals_total{reason="stranger"}' in generate_latest(relay_gw.gateway.metrics.registry).decode()


def test_a_registered_network_may_relay_on_port_25(relay_gw, tls_sink):
    relay_gw.run(relay_service.add_network(relay_gw.store, ORG, "127.0.0.0/8", note="app servers"))
    relay_gw.reload()
    with smtplib.SMTP("127.0.0.1", relay_gw.port, timeout=30) as c:
        c.ehlo("app.example.com")
        assert c.mail("alice@example.com")[0] == 250
        assert c.rcpt("bob@elsewhere.test")[0] == 250
        assert c.data(crlf(message(sender="alice@example.com")))[0] == 250
        # Inbound mail from anyone to the served domains is unchanged from that network...
        assert c.mail("someone@sender.test")[0] == 250
        assert c.rcpt("bob@example.com")[0] == 250
        # ...but relaying needs a sender in the organization's domains.
        code, text = c.rcpt("bob@elsewhere.test")
        assert (code, text[:6]) == (550, b"5.7.1 ") and b"not one of Example's domains" in text
        assert c.data(crlf(message()))[0] == 250
    assert [e.domain for e in _spool(relay_gw)] == ["elsewhere.test"]
    assert tls_sink.wait_for(1)


# -- who may relay: the decision itself -------------------------------------------------------------

_NETWORKS = st.one_of(
    st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False), st.ip_addresses(v=4), st.integers(8, 32)),
    st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False), st.ip_addresses(v=6), st.integers(16, 128)))


@settings(max_examples=200, deadline=None)
@given(networks=st.lists(st.tuples(_NETWORKS, st.integers(1, 3)), max_size=6),
       client=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_network_grants_only_addresses_inside_a_registered_network(networks, client):
    access = RelayAccess()
    nets = sorted(networks, key=lambda n: -n[0].prefixlen)
    access.set_data(RelayAccessData({1: "A", 2: "B", 3: "C"}, {}, nets, {}, {}, [], ()))
    grant = access.by_network(str(client))
    # A dual-stack listener reports IPv4 clients as IPv4-mapped IPv6 (::ffff:a.b.c.d): the IPv4 address counts.
    effective = client.ipv4_mapped if client.version == 6 and client.ipv4_mapped else client
    holding = [(net, org) for net, org in nets if effective.version == net.version and effective in net]
    if not holding:
        assert grant is None
    else:
        assert grant is not None and grant.org_id == holding[0][1] and grant.method == "network"
        assert ipaddress.ip_network(grant.identity).prefixlen == max(n.prefixlen for n, _ in holding)
    mapped = f"::ffff:{client}" if client.version == 4 else None  # the same client through a dual-stack listener
    if mapped:
        assert (access.by_network(mapped) is None) == (grant is None), "IPv4-mapped IPv6 is the IPv4 address"


@pytest.mark.parametrize("text", ["0.0.0.0/0", "::/0", "10.0.0.1/8", "not-a-net", "", "300.1.1.1"])
def test_relay_networks_that_are_no_network_or_everything_are_refused(text):
    from mxguard.errors import ValidationFailed
    with pytest.raises(ValidationFailed) as info:
        relay_service.normalize_network(text)
    assert info.value.field == "network"


# -- rate limits --------------------------------------------------------------------------------------

async def test_rate_counters_count_each_message_once_across_concurrent_workers(store):
    async def one():
        return await ratelimit.count_message(store, sender="Alice@example.com", org_id=7, sender_limit=5,
                                             org_limit=100, window=3600)
    results = await asyncio.gather(*(one() for _ in range(12)))
    sender_counts = sorted(r[0].count for r in results)
    assert sender_counts == list(range(1, 13)), "every message got its own count"
    assert sum(r[0].first_over for r in results) == 1, "exactly one message is the first over the limit"
    assert [r[0].exceeded for r in sorted(results, key=lambda r: r[0].count)] == [False] * 5 + [True] * 7
    assert {r[1].scope for r in results} == {"org:7"} and not any(r[1].exceeded for r in results)


def test_over_the_rate_limit_mail_is_held_and_the_admins_alerted_once(relay_gw, tls_sink):
    relay_gw.settings.relay.sender_rate = 2
    with _authed(relay_gw.submission_port) as c:
        for n in range(5):
            c.mail("alice@example.com")
            c.rcpt(f"r{n}@elsewhere.test")
            code, text = c.data(crlf(message(subject=f"burst {n}", sender="alice@example.com")))
            assert code == 250, text
            assert (b"held" in text) == (n >= 2), (n, text)
    statuses = [e.status for e in _spool(relay_gw)]
    assert statuses == ["queued", "queued", "held", "held", "held"]
    relay_gw.run(relay_gw.gateway.notifier.drain())
    alerts = [m for m in tls_sink.messages if b"X-MXGuard-Notification: relay-rate" in m.data]
    assert len(alerts) == 1, "one alert per window, not one per message"
    assert alerts[0].rcpt_tos == ["ops@example.com"] and b"alice@example.com" in alerts[0].data
    held = relay_gw.run(relay_service.list_held(relay_gw.store))
    assert [h.recipients for h in held] == [("r2@elsewhere.test",), ("r3@elsewhere.test",), ("r4@elsewhere.test",)]
    relay_gw.run(relay_service.release_held(relay_gw.store, held[0].id))
    assert [e.status for e in _spool(relay_gw)] == ["queued", "queued", "queued", "held", "held"]
    assert {r.disposition for r in _log(relay_gw) if r.direction == "outbound"} == {"spooled", "held"}


# -- real clients: swaks with a client certificate, Postfix with SASL -------------------------------------

def entry_cert_sha256(proc_cert) -> str:
    """SHA-256 of a PEM certificate file, as the gateway writes it."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    import hashlib
    der = x509.load_pem_x509_certificate(proc_cert.read_bytes()).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("swaks"), "-s", "127.0.0.1", "-p", str(port), "--tls", "-f", "alice@example.com",
                           "-t", "bob@elsewhere.test", "--h-Subject", "from swaks", "--body", "hi", *args],
                          capture_output=True, text=True, timeout=60)


def test_swaks_with_a_registered_client_certificate_relays(relay_gw, ca, tmp_path):
    leaf = ca.issue_cert("app.example.com")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    # Not registered yet: a stranger with a certificate.
    proc = _swaks(relay_gw.port, "--tls-cert", str(cert), "--tls-key", str(key))
    assert "<~* 550 5.7.1 Relay access denied" in proc.stdout, proc.stdout
    relay_gw.run(relay_service.add_certificate(relay_gw.store, ORG, ca_pem=ca.cert_pem.bytes().decode()))
    relay_gw.reload()
    proc = _swaks(relay_gw.port, "--tls-cert", str(cert), "--tls-key", str(key))
    assert proc.returncode == 0 and "<~  250 2.0.0 Ok: queued as" in proc.stdout, proc.stdout
    # Without the certificate the same client is a stranger again; the certificate is never required.
    proc = _swaks(relay_gw.port)
    assert "<~* 550 5.7.1 Relay access denied" in proc.stdout, proc.stdout
    [entry] = _spool(relay_gw)
    assert entry.kind == "outbound" and entry.domain == "elsewhere.test"
    plain = relay_gw.gateway.keyring.get().open(entry.body, seal_context(entry.txn_id))
    assert f"sha256 {entry_cert_sha256(proc_cert=cert)}".encode() in plain, "the Received comment names it"
    record = [r for r in _log(relay_gw) if r.final_code == 250][-1]
    assert record.direction == "outbound" and record.client_cert_sha256


def test_postfix_relays_through_the_gateway_with_sasl_auth(relay_gw, tmp_path):
    from tests.support.postfix import PostfixInstance
    base = Path(tempfile.mkdtemp(prefix="mxguard-pfsasl-"))  # the postfix user must reach it
    maps = base / "sasl_passwd"
    maps.write_text(f"[127.0.0.1]:{relay_gw.submission_port} relay@example.com:{PASSWORD}\n")
    postfix = PostfixInstance(base, f"127.0.0.1:{relay_gw.submission_port}", smtp_tls_level="encrypt",
                              extra={"smtp_sasl_auth_enable": "yes",
                                     "smtp_sasl_password_maps": f"texthash:{maps}",
                                     "smtp_sasl_security_options": "noanonymous",
                                     "smtp_sasl_tls_security_options": "noanonymous",
                                     "myorigin": "example.com"}).start()
    try:
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as c:
            c.sendmail("alice@example.com", ["bob@elsewhere.test"],
                       crlf(message(subject="via Postfix", sender="alice@example.com", to="bob@elsewhere.test")))
        postfix.flush()
        log_text = postfix.wait_log("status=sent", timeout=60)
        assert "250 2.0.0 Ok: queued as" in log_text
        wait_until(lambda: bool(_spool(relay_gw)), 10, "the outbound spool entry")
    finally:
        postfix.stop()
    [entry] = _spool(relay_gw)
    assert (entry.kind, entry.domain, entry.mail_from) == ("outbound", "elsewhere.test", "alice@example.com")
    plain = relay_gw.gateway.keyring.get().open(entry.body, seal_context(entry.txn_id))
    assert b"with ESMTPSA" in plain and b"Subject: via Postfix" in plain


def test_a_submission_port_in_use_stops_start_up_naming_the_key(data_dir, loopback_dns):
    import socket
    from mxguard.errors import ConfigError
    s = load_settings(data_dir, environ=gateway_environ(loopback_dns))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        gw = ThreadedGateway(s, submission_listen=[f"127.0.0.1:{taken.getsockname()[1]}"], spool_worker=False)
        try:
            with pytest.raises(ConfigError, match=r"^smtp\.submission_listen: cannot listen on 127\.0\.0\.1:"):
                gw.start()
        finally:
            gw.loop.close()


# -- managing who may relay: services, API, console, migration ------------------------------------------

async def test_relay_entries_survive_the_migration_down_and_up_and_passwords_are_hashes(store):
    from alembic import command
    from mxguard.storage.db import _alembic_config
    from mxguard.storage.models import RelayCredential

    await org_service.add_org(store, ORG)
    _, generated = await relay_service.add_credential(store, ORG, "gen@example.com")
    assert len(generated) >= 16
    await relay_service.add_credential(store, ORG, "mine@example.com", PASSWORD)
    async with store.session() as session:
        hashes = dict((await session.execute(select(RelayCredential.username, RelayCredential.password_hash))).all())
    assert all(h.startswith("$argon2id$") for h in hashes.values()) and PASSWORD not in str(hashes)
    assert relay_service.verify_password(hashes["mine@example.com"], PASSWORD)
    assert not relay_service.verify_password(hashes["mine@example.com"], PASSWORD + "x")
    assert not relay_service.verify_password(None, PASSWORD), "an unknown user never matches"

    def cycle(connection):
        command.downgrade(_alembic_config(connection), "0012_console_acme")
        command.upgrade(_alembic_config(connection), "head")

    async with store.engine.begin() as conn:
        await conn.run_sync(cycle)
    assert await store.schema_is_current()
    assert await relay_service.list_credentials(store, ORG) == [], "the downgrade dropped the relay tables"
    await relay_service.add_network(store, ORG, "2001:db8::/48")
    assert [n.network for n in await relay_service.list_networks(store, ORG)] == ["2001:db8::/48"]


async def test_outbound_entries_get_their_organization_in_migration_0015(store):
    """0015_spool_org: existing outbound entries get the organization of their sender's domain
    (none when the domain is no organization's); inbound entries stay without one; down and up again."""
    from alembic import command
    from sqlalchemy import text
    from mxguard.storage.db import _alembic_config

    await org_service.add_org(store, ORG)
    await domain_service.add_domain(store, "example.com", ["127.0.0.1:9"], org=ORG)
    await domain_service.add_domain(store, "orphan.test", ["127.0.0.1:9"])
    org_id = (await org_service.get_org(store, ORG)).id
    rows = [("outbound", "elsewhere.test", "alice@Example.COM"), ("outbound", "elsewhere.test", "bob@orphan.test"),
            ("message", "example.com", "x@sender.test")]

    def down_insert_up(connection):
        command.downgrade(_alembic_config(connection), "0014_outbound_delivery")
        for kind, domain, sender in rows:
            connection.execute(text(
                "INSERT INTO spool (kind, txn_id, created_at, expires_at, domain, mail_from, recipients, size, "
                "body_8bit, smtputf8, requiretls, sender_aligned, subject, key_id, body, status, attempts, "
                "next_attempt_at, last_reply) VALUES (:kind, 'T1', :now, :now, :domain, :sender, '[]', 0, "
                "false, false, false, false, '', 'k', :body, 'queued', 0, :now, '')"),
                {"kind": kind, "domain": domain, "sender": sender, "now": dt.datetime.now(dt.timezone.utc),
                 "body": b"x"})
        command.upgrade(_alembic_config(connection), "head")

    async with store.engine.begin() as conn:
        await conn.run_sync(down_insert_up)
    assert await store.schema_is_current()
    async with store.session() as session:
        found = (await session.execute(select(SpoolEntry.mail_from, SpoolEntry.org_id).order_by(SpoolEntry.id))).all()
    assert found == [("alice@Example.COM", org_id), ("bob@orphan.test", None), ("x@sender.test", None)]


async def test_spool_scope_shows_an_organization_its_own_outbound_entries_only(store):
    """Every combination of kind, domain and organization column: the SQL scope and its Python
    twin agree, an organization sees its own outbound entries whatever their destination (even one
    of another organization's domains), never another's, and no outbound entry without one."""
    import itertools
    from mxguard.spool import queue
    from mxguard.storage.models import utcnow

    kinds, domains, owners = ("message", "dsn", "outbound"), ("a.test", "b.test", "elsewhere.test"), (None, 1, 2)
    now = utcnow()
    async with store.session() as session:
        for kind, domain, owner in itertools.product(kinds, domains, owners):
            session.add(SpoolEntry(kind=kind, txn_id="T", created_at=now, expires_at=now, domain=domain,
                                   recipients=[], key_id="k", body=b"x", next_attempt_at=now, org_id=owner))
        await session.commit()
    for scope in (queue.Scope(frozenset({"a.test"}), 1), queue.Scope(frozenset({"b.test"}), 2),
                  queue.Scope(frozenset(), 1), queue.Scope(frozenset({"a.test", "b.test"}), None)):
        every = await queue.list_entries(store, status=None, limit=None)
        seen = {e.id for e in await queue.list_entries(store, status=None, limit=None, domains=scope)}
        assert seen == {e.id for e in every if scope.allows(e)}, scope
        for e in every:
            if e.kind == "outbound":
                assert (e.id in seen) == (e.org_id is not None and e.org_id == scope.org_id), (scope, e.domain, e.org_id)
            elif e.org_id is None:
                assert (e.id in seen) == (e.domain in scope.domains), (scope, e.kind, e.domain)
        by_status = (await queue.stats(store, domains=scope))["by_status"]
        assert sum(by_status.values()) == len(seen)


def test_relay_access_is_managed_over_the_api_and_console_per_organization(web):
    web.add_org(ORG)
    web.add_user("ops@example.com", "org-admin", ORG)
    admin = web.api(web.admin_key)
    assert admin.post("/domains", json={"name": "example.com", "servers": ["127.0.0.1:9"], "org": ORG}).status_code == 201
    api = web.api(web.api_key("ops@example.com"))
    made = api.post(f"/orgs/{ORG}/relay/users", json={"username": "relay@example.com"})
    assert made.status_code == 201 and len(made.json()["password"]) >= 16, made.text
    assert api.get(f"/orgs/{ORG}/relay/users").json() == [{"username": "relay@example.com", "password": None}]
    assert api.post(f"/orgs/{ORG}/relay/users", json={"username": "relay@example.com"}).status_code == 409
    assert api.post(f"/orgs/{ORG}/relay/users", json={"username": "x@example.com", "password": "short"}).status_code == 422
    assert api.post(f"/orgs/{ORG}/relay/networks", json={"network": "0.0.0.0/0"}).status_code == 422
    assert api.post(f"/orgs/{ORG}/relay/networks", json={"network": "192.0.2.7"}).json()["network"] == "192.0.2.7/32"
    assert api.post(f"/orgs/{ORG}/relay/certs", json={"fingerprint": "AB:" * 31 + "AB"}).status_code == 201
    assert api.post(f"/orgs/{ORG}/relay/certs", json={"fingerprint": "ab" * 32, "ca_pem": "x"}).status_code == 422
    assert api.delete(f"/orgs/{ORG}/relay/networks/192.0.2.7/32").status_code == 204
    assert api.get(f"/orgs/{ORG}/relay/networks").json() == []
    # The gateway took the new user at once: AUTH works on the next connection.
    with _authed(web.gw.port, "relay@example.com", made.json()["password"]) as c:
        assert c.mail("alice@example.com")[0] == 250
    # The console page: a new user's password is shown once, on the answer to the form.
    console, _ = web.login("ops@example.com")
    page = console.get(f"/orgs/{ORG}/relay")
    assert page.status_code == 200 and "relay@example.com" in page.text and "ab" * 32 in page.text
    from tests.support.web import csrf_token
    reply = console.post(f"/orgs/{ORG}/relay", data={"action": "add-user", "value": "second@example.com",
                                                      "csrf_token": csrf_token(page.text)})
    assert reply.status_code == 200 and 'id="relay-password"' in reply.text and "second@example.com" in reply.text
    assert 'id="relay-password"' not in console.get(f"/orgs/{ORG}/relay").text
    bad = console.post(f"/orgs/{ORG}/relay", data={"action": "add-network", "value": "not a network",
                                                   "csrf_token": csrf_token(page.text)})
    assert bad.status_code == 422 and "not an IP network" in bad.text
    audit = [e["action"] for e in admin.get("/audit").json()]
    assert {"relay.credential.add", "relay.network.add", "relay.network.remove", "relay.certificate.add"} <= set(audit)


def test_a_client_certificate_grants_by_fingerprint_or_issuing_ca_only(ca):
    import trustme
    from mxguard.tls.client_certs import peer_certificate
    other = trustme.CA()
    mine, stranger, by_fp = ca.issue_cert("a.example.com"), other.issue_cert("b.example.com"), other.issue_cert("c.test")

    def peer(leaf):
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding
        cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        return peer_certificate(cert.public_bytes(Encoding.DER))

    from cryptography import x509
    access = RelayAccess()
    access.set_data(RelayAccessData({1: "A", 2: "B"}, {1: frozenset({"a.example"})}, [], {},
                                    {peer(by_fp).sha256: 2}, [(x509.load_pem_x509_certificate(ca.cert_pem.bytes()), 1)],
                                    ()))
    assert access.by_certificate(peer(mine)).org_id == 1
    assert access.by_certificate(peer(by_fp)).org_id == 2, "its fingerprint, though its CA is not registered"
    assert access.by_certificate(peer(stranger)) is None
    assert access.by_certificate(None) is None


def test_the_relay_commands_manage_entries_and_say_what_is_wrong_in_one_line(data_dir, ca, tmp_path):
    from tests.test_cli import mx
    mx("org", "add", ORG, data_dir=data_dir)
    mx("domain", "add", "example.com", "--server", "127.0.0.1:9", "--org", ORG, data_dir=data_dir)
    out = mx("relay", "user", "add", ORG, "relay@example.com", data_dir=data_dir).stdout
    password = out.split("Password (shown once): ")[1].split()[0]
    assert len(password) >= 16
    assert mx("relay", "user", "list", ORG, data_dir=data_dir).stdout.split() == ["relay@example.com"]
    assert password not in mx("relay", "user", "list", ORG, "--json", data_dir=data_dir).stdout
    from tests.test_cli import MXGUARD
    typed = subprocess.run(MXGUARD + ["--data-dir", str(data_dir), "relay", "user", "add", ORG, "app",
                                      "--password-stdin"], input=PASSWORD + "\n", capture_output=True, text=True,
                           timeout=60)
    assert typed.returncode == 0 and "Password" not in typed.stdout, typed.stdout + typed.stderr
    mx("relay", "network", "add", ORG, "192.0.2.0/24", "--note", "office", data_dir=data_dir)
    assert "192.0.2.0/24  office" in mx("relay", "network", "list", ORG, data_dir=data_dir).stdout
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    assert "(ca)" in mx("relay", "cert", "add", ORG, "--ca", str(ca_file), data_dir=data_dir).stdout
    [cert] = json.loads(mx("relay", "cert", "list", ORG, "--json", data_dir=data_dir).stdout)
    assert cert["kind"] == "ca" and "O=Example Corp test CA" in cert["label"]
    for args, words in ((["relay", "network", "add", ORG, "0.0.0.0/0"], "open relay"),
                        (["relay", "network", "add", "Nobody", "192.0.2.0/24"], "does not exist"),
                        (["relay", "cert", "add", ORG, "--cert", str(tmp_path / "missing.pem")], "cannot read"),
                        (["relay", "cert", "add", ORG, "--cert", str(ca_file), "--ca", str(ca_file)], "exactly one"),
                        (["relay", "user", "add", ORG, "relay@example.com"], "taken"),
                        (["relay", "release", "99"], "no held outbound message")):
        proc = mx(*args, data_dir=data_dir, check=False)
        assert proc.returncode != 0 and words in proc.stderr + proc.stdout, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and len((proc.stderr + proc.stdout).strip().splitlines()) == 1, args
    mx("relay", "cert", "remove", ORG, cert["fingerprint"], data_dir=data_dir)
    mx("relay", "network", "remove", ORG, "192.0.2.0/24", data_dir=data_dir)
    mx("relay", "user", "remove", ORG, "app", data_dir=data_dir)
    assert mx("relay", "held", "--json", data_dir=data_dir).stdout.strip() == "[]"


def test_serve_with_workers_shares_the_submission_listener(tmp_path):
    import os
    import signal
    from tests.support.peers import free_port
    from tests.test_cli import MXGUARD, mx
    d = tmp_path / "d"
    mx("init", "--hostname", "mx.cli.test", data_dir=d)
    mx("org", "add", ORG, data_dir=d)
    mx("domain", "add", "example.com", "--server", "127.0.0.1:9", "--org", ORG, data_dir=d)
    subprocess.run(MXGUARD + ["--data-dir", str(d), "relay", "user", "add", ORG, "relay@example.com",
                              "--password-stdin"], input=PASSWORD + "\n", check=True, capture_output=True, text=True,
                   timeout=60)
    smtp_port, submission = free_port(), free_port()
    proc = subprocess.Popen(MXGUARD + ["--data-dir", str(d), "serve", "--no-web", "--workers", "2",
                                       "--smtp", f"127.0.0.1:{smtp_port}"],
                            env={**os.environ, "MXGUARD_SMTP__SUBMISSION_LISTEN": f"127.0.0.1:{submission}"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def answers() -> bool:
            try:
                with smtplib.SMTP("127.0.0.1", submission, timeout=5) as c:
                    return c.ehlo()[0] == 250
            except OSError:
                return False
        wait_until(answers, 30, "the submission listener")
        for _ in range(4):  # connections land on either worker
            with smtplib.SMTP("127.0.0.1", submission, timeout=30) as c:
                c.ehlo("app.example.com")
                assert c.mail("alice@example.com")[0] == 530
            with _authed(submission) as c:
                assert c.mail("alice@example.com")[0] == 250
                assert c.rcpt("bob@elsewhere.test")[0] == 250
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "Traceback" not in output, output


async def test_old_rate_windows_are_forgotten(store):
    import datetime as dt
    from mxguard.storage.models import RelayRateCounter
    day = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    for hours in (0, 1, 30):
        await ratelimit.count_message(store, sender="a@example.com", org_id=1, sender_limit=5, org_limit=5,
                                      window=3600, now=day + dt.timedelta(hours=hours))
    async with store.session() as session:
        windows = sorted({r.window_start.replace(tzinfo=dt.timezone.utc) for r in
                          (await session.execute(select(RelayRateCounter))).scalars()})
    assert windows == [day + dt.timedelta(hours=30)], "windows that ended more than a day ago were removed"


@pytest.mark.parametrize("listener", ["smtp", "submission"])
def test_auth_login_prompts_are_username_and_password(relay_gw, listener):
    """AUTH LOGIN prompts with the customary base64 "Username:" and "Password:" (no NUL byte),
    with and without an initial response, and the right password then gets 235 2.7.0."""
    port = relay_gw.port if listener == "smtp" else relay_gw.submission_port
    b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.starttls(context=_client_ctx())
        c.ehlo("app.example.com")
        assert c.docmd("AUTH", "LOGIN") == (334, b"VXNlcm5hbWU6")
        assert base64.b64decode(b"VXNlcm5hbWU6") == b"Username:"
        assert c.docmd(b64("relay@example.com")) == (334, b"UGFzc3dvcmQ6")
        assert base64.b64decode(b"UGFzc3dvcmQ6") == b"Password:"
        code, text = c.docmd(b64(PASSWORD))
        assert (code, text[:6]) == (235, b"2.7.0 "), (code, text)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.starttls(context=_client_ctx())
        c.ehlo("app.example.com")
        assert c.docmd("AUTH", "LOGIN " + b64("relay@example.com")) == (334, b"UGFzc3dvcmQ6")
        code, text = c.docmd(b64("wrong"))
        assert (code, text[:6]) == (535, b"5.7.8 "), (code, text)


def test_relay_release_takes_the_transaction_id_the_sender_was_given(relay_gw, data_dir):
    """``accepted as TXN (held: over the outbound rate limit)``: relay held shows TXN, and relay
    release takes it (as well as the spool ID); a transaction for two destinations is refused with
    both entries listed."""
    import re

    from tests.test_cli import mx
    relay_gw.settings.relay.sender_rate = 1
    txns = []
    with _authed(relay_gw.submission_port) as c:
        for rcpts in (["r0@elsewhere.test"], ["r1@elsewhere.test"], ["r2@elsewhere.test", "r3@other.test"]):
            c.mail("alice@example.com")
            for rcpt in rcpts:
                assert c.rcpt(rcpt)[0] == 250
            code, text = c.data(crlf(message(subject="burst", sender="alice@example.com")))
            assert code == 250, text
            txns.append(re.search(r"(?:accepted|queued) as ([0-9A-F]{16})", text.decode()).group(1))
    assert b"held" in text
    held = {e.txn_id: e for e in _spool(relay_gw) if e.status == "held"}
    assert txns[1] in held and txns[2] in held
    shown = mx("relay", "held", data_dir=data_dir).stdout
    assert "transaction" in shown and txns[1] in shown and txns[2] in shown, shown
    out = mx("relay", "release", txns[1], data_dir=data_dir)
    assert f"Released spool entry {held[txns[1]].id} (alice@example.com to elsewhere.test)" in out.stdout, out.stdout
    both = sorted(e.id for e in _spool(relay_gw) if e.txn_id == txns[2])
    refused = mx("relay", "release", txns[2], data_dir=data_dir, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"has 2 spool entries: #{both[0]} (elsewhere.test: r2@elsewhere.test; held)" in refused.stderr, refused.stderr
    assert f"#{both[1]} (other.test: r3@other.test; held)" in refused.stderr
    assert mx("relay", "release", str(both[1]), data_dir=data_dir).returncode == 0
    assert [e.status for e in _spool(relay_gw) if e.txn_id in txns[1:]] == ["queued", "held", "queued"]
