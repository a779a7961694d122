"""Outbound delivery to the internet (issue 15, delivery half): the spool worker takes
``kind="outbound"`` entries to the destination's MX hosts, found through a real validating
resolver (unbound over NSD, a DNSSEC-signed zone) and pointing at aiosmtpd sinks on several
127.0.0.x addresses (and ::1) sharing one port; TLS per destination (DANE, overrides); DSNs to
the organization's sender through its own server; DKIM signatures verified by dkimpy."""

from __future__ import annotations

import asyncio
import email
import hashlib
import http.server
import json
import random
import ssl
import threading

import dkim
import dns.resolver
import dns.rrset
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dnslib import TXT
from hypothesis import given, settings as hsettings, strategies as st

from mxguard.config import load_settings
from mxguard.errors import ValidationFailed
from mxguard.relay.destinations import LEVELS, DestinationTls, destination_route, matching_override
from mxguard.relay.mx import MxFailure, MxHost, MxResult, resolve_mx
from mxguard.services import destination_tls, dkim_keys
from mxguard.services import domains as domain_service
from mxguard.services.dns_check import settings_resolver
from mxguard.sink import ThreadedSink
from mxguard.smtp.routing import DomainDirectory
from mxguard.spool.accept import StoreSpooler
from mxguard.spool.worker import SpoolWorker
from mxguard.storage.db import Store
from mxguard.storage.models import SPOOL_SESSIONS_KEY, SpoolAttempt, SpoolEntry
from mxguard.storage.sealing import KeyRing
from mxguard.tls.policy import DownstreamTls
from mxguard.tls.resolver import forget_cached_lookups
from tests.conftest import FAST_SPOOL, apply_overrides, gateway_environ
from tests.support.dnssec import LoopbackDnssec, Zone
from tests.support.smtp import message
from tests.support.web import csrf_token

ORG = "org.example"
SENDER = f"alice@{ORG}"


def _tls_ctx(cert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    return ctx


class Sinks:
    """The destinations' MX hosts: one port, several loopback addresses.

    ``plain`` 127.0.0.2 (no STARTTLS), ``second`` 127.0.0.3 (no STARTTLS), ``tls`` 127.0.0.4
    (STARTTLS, the CA-signed downstream certificate), ``grey`` 127.0.0.5 (answers DATA with 451
    while ``grey.data_reply`` is set), ``v6`` ::1; nothing listens on 127.0.0.9 (the dead host).
    """

    def __init__(self, cert):
        self._threads = [ThreadedSink(host="127.0.0.2", hostname="mx1.dst.test")]
        self.plain = self._threads[0].start()
        self.port = self.plain.port
        for name, host, ctx in (("second", "127.0.0.3", None), ("tls", "127.0.0.4", _tls_ctx(cert)),
                                ("grey", "127.0.0.5", None), ("v6", "::1", None)):
            thread = ThreadedSink(host=host, port=self.port, tls_context=ctx, hostname=f"{name}.dst.test")
            self._threads.append(thread)
            setattr(self, name, thread.start())

    @property
    def all(self):
        return [self.plain, self.second, self.tls, self.grey, self.v6]

    def clear(self) -> None:
        for sink in self.all:
            sink.messages.clear()
        self.grey.data_reply = None

    def stop(self) -> None:
        for thread in self._threads:
            thread.stop()


@pytest.fixture(scope="module")
def mx_cert(ca):
    """The TLS sink's certificate, from the test CA, naming the MX hosts that point at it."""
    return ca.issue_cert("mxgood.dst.test", "mxsts.dst.test", "mxsts2.dst.test")


@pytest.fixture(scope="module")
def sinks(mx_cert):
    s = Sinks(mx_cert)
    yield s
    s.stop()


STS_POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mxsts.dst.test\r\nmax_age: 86400\r\n"


class _PolicyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        host = self.headers.get("Host", "").split(":")[0]
        known = host in ("mta-sts.stsgood.dst.test", "mta-sts.stsbad.dst.test")
        self.send_response(200 if known and self.path == "/.well-known/mta-sts.txt" else 404)
        self.send_header("Content-Type", "text/plain")
        body = STS_POLICY if known else b"no"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def policy_server(ca):
    """The destinations' MTA-STS policy host (HTTPS, a certificate from the test CA)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PolicyHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("mta-sts.stsgood.dst.test", "mta-sts.stsbad.dst.test").configure_cert(ctx)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def dnssec(sinks, mx_cert):
    leaf = x509.load_pem_x509_certificate(mx_cert.cert_chain_pems[0].bytes())
    good = hashlib.sha256(leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
    tlsa = f"_{sinks.port}._tcp"
    records = [
        "mx1 IN A 127.0.0.2", "mx2 IN A 127.0.0.3", "dead IN A 127.0.0.9", "mxgrey IN A 127.0.0.5",
        "mx6 IN AAAA ::1",
        "mxbad IN A 127.0.0.4", f"{tlsa}.mxbad IN TLSA 3 1 1 {'11' * 32}",
        "mxgood IN A 127.0.0.4", f"{tlsa}.mxgood IN TLSA 3 1 1 {good}",
        # preferred MX first; the dead one first, then the next; a null MX; no MX at all
        "pref IN MX 20 mx2", "pref IN MX 10 mx1",
        "fallback IN MX 10 dead", "fallback IN MX 20 mx2",
        "null IN MX 0 .",
        "implicit IN A 127.0.0.3",
        "v6 IN MX 10 mx6",
        "dane IN MX 10 mxbad", "danegood IN MX 10 mxgood",
        "grey IN MX 10 mxgrey", "gone IN MX 10 dead",
        "nameless IN MX 10 nowhere",
        # MTA-STS enforce (no TLSA: DANE does not apply), MX host in the policy or not
        "mxsts IN A 127.0.0.4", "mxsts2 IN A 127.0.0.4",
        "stsgood IN MX 10 mxsts", '_mta-sts.stsgood IN TXT "v=STSv1; id=1"', "mta-sts.stsgood IN A 127.0.0.1",
        "stsbad IN MX 10 mxsts2", '_mta-sts.stsbad IN TXT "v=STSv1; id=1"', "mta-sts.stsbad IN A 127.0.0.1",
    ]
    with LoopbackDnssec([Zone("dst.test", records)]) as servers:
        yield servers


@pytest.fixture
async def env(data_dir, loopback_dns, dnssec, sinks, policy_server, ca_file):
    """A migrated store, an organization domain whose own server is a sink, and a spool worker
    whose resolver is unbound."""
    forget_cached_lookups()
    sinks.clear()
    settings = load_settings(data_dir, environ=gateway_environ(loopback_dns))
    apply_overrides(settings, {**FAST_SPOOL, "downstream.dns_servers": [f"127.0.0.1:{dnssec.resolver_port}"],
                               "downstream.dns_timeout": 3.0, "downstream.outbound_port": sinks.port,
                               "downstream.connect_timeout": 3.0, "downstream.mta_sts_port": policy_server,
                               "downstream.mta_sts_ca_file": str(ca_file),
                               "downstream.outbound_ca_file": str(ca_file)})
    store = Store(settings.effective_database_url)
    await store.migrate()
    with ThreadedSink(hostname="mail.org.example") as org_server:
        await domain_service.add_domain(store, ORG, [f"127.0.0.1:{org_server.port}"])
        directory = DomainDirectory(store)
        await directory.load()
        keyring = KeyRing(settings.path(settings.sealing_key_file))
        worker = SpoolWorker(store, settings, directory, keyring)
        yield Env(store, settings, worker, keyring, org_server)
        await worker.pool.close()
    await store.close()


class Env:
    def __init__(self, store, settings, worker, keyring, org_server):
        self.store, self.settings, self.worker, self.keyring, self.org_server = (
            store, settings, worker, keyring, org_server)

    async def outbound(self, rcpts: list[str], *, sender: str = SENDER, body: bytes | None = None,
                       requiretls: bool = False) -> int:
        """Spool one outbound entry through the acceptance code, due now; its id."""
        spooler = StoreSpooler(self.store, self.keyring, self.settings)
        domain = rcpts[0].rpartition("@")[2]
        entry = spooler.entry(txn_id=f"T{random.getrandbits(40):010x}", domain=domain, mail_from=sender,
                              recipients=rcpts, message=body or message(sender=sender or "x@org.example",
                                                                         to=rcpts[0]),
                              subject="test", kind="outbound", due_now=True, requiretls=requiretls)
        await spooler.hold([entry])
        async with self.store.session() as session:
            from sqlalchemy import select
            return (await session.execute(select(SpoolEntry.id).where(SpoolEntry.txn_id == entry.txn_id,
                                                                      SpoolEntry.kind == "outbound"))).scalar_one()

    async def run(self, entry_id: int) -> SpoolEntry:
        await self.worker.run_once(ids=[entry_id])
        async with self.store.session() as session:
            return await session.get(SpoolEntry, entry_id)

    async def attempts(self, entry_id: int) -> list[SpoolAttempt]:
        from sqlalchemy import select
        async with self.store.session() as session:
            return list((await session.execute(select(SpoolAttempt).where(SpoolAttempt.spool_id == entry_id)
                                               .order_by(SpoolAttempt.id))).scalars())

    async def deliver_dsns(self) -> list:
        """Run the worker over the DSNs it queued; what the organization's server received."""
        from sqlalchemy import select
        async with self.store.session() as session:
            ids = list((await session.execute(select(SpoolEntry.id).where(SpoolEntry.kind == "dsn",
                                                                          SpoolEntry.status == "queued"))).scalars())
        if ids:
            await self.worker.run_once(ids=ids)
        return list(self.org_server.messages)


def _dsn_status(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    status = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"][0]
    return [line.split(":", 1)[1].strip() for line in status.as_string().splitlines() if line.startswith("Status:")]


# -- MX resolution -------------------------------------------------------------------------

async def test_mx_resolution_orders_falls_back_and_refuses(dnssec):
    servers = [f"127.0.0.1:{dnssec.resolver_port}"]
    pref = await resolve_mx("pref.dst.test", dns_servers=servers)
    assert [h.name for h in pref.hosts] == ["mx1.dst.test", "mx2.dst.test"] and pref.secure
    implicit = await resolve_mx("implicit.dst.test", dns_servers=servers)
    assert implicit.implicit and implicit.secure
    assert implicit.hosts == (MxHost("implicit.dst.test", 0, ("127.0.0.3",)),)
    v6 = await resolve_mx("v6.dst.test", dns_servers=servers)
    assert v6.hosts[0].addresses == ("::1",)
    for domain, code, enhanced in (("null.dst.test", 556, "5.1.10"), ("nxdomain.dst.test", 550, "5.1.2"),
                                   ("nameless.dst.test", 550, "5.4.4")):
        with pytest.raises(MxFailure) as failure:
            await resolve_mx(domain, dns_servers=servers)
        assert (failure.value.reply.code, failure.value.reply.enhanced) == (code, enhanced), domain
    # No resolver answering: temporary (4.4.3), never a bounce.
    with pytest.raises(MxFailure) as failure:
        await resolve_mx("pref.dst.test", dns_servers=["127.0.0.1:9"], timeout=0.5)
    assert (failure.value.reply.code, failure.value.reply.enhanced) == (451, "4.4.3")


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from("abcdef")), min_size=1, max_size=6, unique_by=lambda t: t[1]),
       st.integers(0, 2**32))
def test_equal_preferences_are_shuffled_but_order_by_preference_holds(records, seed):
    """Whatever the records and the shuffle, hosts come in non-decreasing preference, each once."""

    class Resolver:
        flags = 0

        async def resolve(self, name, rdtype):
            if rdtype == "MX":
                text = [f"{p} {h}.x.test." for p, h in records]
                return _Answer(dns.rrset.from_text(name, 60, "IN", "MX", *text))
            if rdtype == "A":
                return _Answer(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.1"))
            raise dns.resolver.NoAnswer

    import mxguard.relay.mx as mx_module
    original = mx_module.dns_resolver
    mx_module.dns_resolver = lambda servers, timeout: Resolver()
    try:
        result = asyncio.run(resolve_mx("x.test", dns_servers=[], rng=random.Random(seed), max_hosts=10))
    finally:
        mx_module.dns_resolver = original
    prefs = [h.preference for h in result.hosts]
    assert prefs == sorted(prefs)
    assert sorted(h.name for h in result.hosts) == sorted(f"{h}.x.test" for _, h in records)


class _Answer(list):
    def __init__(self, rrset):
        super().__init__(rrset)

        class Response:
            flags = 0
        self.response = Response()


# -- delivery by MX --------------------------------------------------------------------------

async def test_the_preferred_mx_gets_the_message(env, sinks):
    entry = await env.run(await env.outbound(["bob@pref.dst.test", "carol@pref.dst.test"]))
    assert entry.status == "delivered", entry.last_reply
    assert sinks.plain.wait_for(1) and sinks.second.messages == []
    assert sorted(sinks.plain.messages[0].rcpt_tos) == ["bob@pref.dst.test", "carol@pref.dst.test"]
    assert sinks.plain.messages[0].mail_from == SENDER


async def test_a_dead_mx_falls_back_to_the_next(env, sinks):
    entry = await env.run(await env.outbound(["bob@fallback.dst.test"]))
    assert entry.status == "delivered", entry.last_reply
    assert sinks.second.wait_for(1) and sinks.plain.messages == []
    attempts = await env.attempts(entry.id)
    assert attempts[-1].server == f"mx2.dst.test:{sinks.port}"


async def test_ipv6_and_implicit_mx(env, sinks):
    v6 = await env.run(await env.outbound(["bob@v6.dst.test"]))
    implicit = await env.run(await env.outbound(["bob@implicit.dst.test"]))
    assert v6.status == implicit.status == "delivered"
    assert sinks.v6.wait_for(1) and sinks.v6.messages[0].peer == "::1"
    assert sinks.second.wait_for(1)


async def test_null_mx_fails_at_once_with_a_dsn_to_the_sender(env, sinks):
    entry = await env.run(await env.outbound(["bob@null.dst.test"]))
    assert entry.status == "failed" and "556 5.1.10" in entry.last_reply
    dsns = await env.deliver_dsns()
    assert len(dsns) == 1 and dsns[0].rcpt_tos == [SENDER] and dsns[0].mail_from in ("", "<>")
    assert _dsn_status(dsns[0].data) == ["5.1.10"]
    assert b"does not exist or accepts no mail" in dsns[0].data and b"Remote-MTA" not in dsns[0].data


async def test_a_5xx_from_the_destination_gives_a_dsn_now(env, sinks):
    sinks.plain.rcpt_replies["nobody-here@pref.dst.test"] = "550 5.1.1 no such user"
    try:
        entry = await env.run(await env.outbound(["nobody-here@pref.dst.test"]))
    finally:
        sinks.plain.rcpt_replies.clear()
    assert entry.status == "failed"
    dsns = await env.deliver_dsns()
    assert len(dsns) == 1 and _dsn_status(dsns[0].data) == ["5.1.1"]


async def test_no_dsn_for_a_bounce(env, sinks):
    """A null-sender message that fails gets no DSN (RFC 5321 4.5.5: never a bounce for a bounce)."""
    entry = await env.run(await env.outbound(["bob@null.dst.test"], sender=""))
    assert entry.status == "failed"
    assert await env.deliver_dsns() == []


async def test_4xx_then_accept_is_retried_with_back_off(env, sinks):
    sinks.grey.data_reply = "451 4.7.1 greylisted, try again"
    entry_id = await env.outbound(["bob@grey.dst.test"])
    first = await env.run(entry_id)
    assert first.status == "queued" and first.attempts == 1 and first.next_attempt_at > first.last_attempt_at
    # The first try was from the spool: the first retry comes after first_retry, not twice that.
    spool = env.settings.spool
    wait = (first.next_attempt_at - first.last_attempt_at).total_seconds()
    assert spool.first_retry * (1 - spool.jitter) - 0.01 <= wait <= spool.first_retry * (1 + spool.jitter) + 0.01, wait
    sinks.grey.data_reply = None
    second = await env.run(entry_id)
    assert second.status == "delivered" and second.attempts == 2
    assert sinks.grey.wait_for(1)


async def test_expiry_sends_a_dsn(env, sinks):
    """Time scaled: a half-second holding time; the dead destination never answers."""
    env.settings.spool.max_age = 0.5
    entry_id = await env.outbound(["bob@gone.dst.test"])
    first = await env.run(entry_id)
    assert first.status == "queued" and "4.4.1" in first.last_reply
    await asyncio.sleep(max(0.0, (first.expires_at - first.last_attempt_at).total_seconds()) + 0.05)
    last = await env.run(entry_id)
    assert last.status == "expired"
    dsns = await env.deliver_dsns()
    assert len(dsns) == 1 and _dsn_status(dsns[0].data) == ["4.4.7"]


async def test_connections_to_a_destination_are_reused_with_rset(env, sinks):
    before = sinks.plain.connections
    ids = [await env.outbound([f"u{i}@pref.dst.test"]) for i in range(3)]
    for entry_id in ids:
        assert (await env.run(entry_id)).status == "delivered"
    assert sinks.plain.wait_for(3)
    assert sinks.plain.connections - before == 1
    reused = [a.results[SPOOL_SESSIONS_KEY][0].get("reused") for i in ids for a in await env.attempts(i)]
    assert reused == [False, True, True]
    # The server drops the parked connection: the RSET fails and a fresh connection carries the next one.
    sinks.plain.drop_connections()
    await asyncio.sleep(0.05)
    later = await env.run(await env.outbound(["u9@pref.dst.test"]))
    assert later.status == "delivered" and sinks.plain.wait_for(4)
    assert sinks.plain.connections - before == 2
    assert (await env.attempts(later.id))[-1].results[SPOOL_SESSIONS_KEY][0]["reused"] is False


# -- TLS per destination ---------------------------------------------------------------------

async def test_dane_with_a_wrong_certificate_defers_and_sends_nothing(env, sinks):
    entry = await env.run(await env.outbound(["bob@dane.dst.test"]))
    assert entry.status == "queued" and "451 4.7.5" in entry.last_reply
    assert sinks.tls.messages == []
    session = (await env.attempts(entry.id))[-1].results[SPOOL_SESSIONS_KEY][0]
    assert session["domain"] == "dane.dst.test"
    assert session["tls_rpt"] == {f"mxbad.dst.test:{sinks.port}": "validation-failure"}


async def test_dane_with_the_right_certificate_delivers_verified(env, sinks):
    entry = await env.run(await env.outbound(["bob@danegood.dst.test"]))
    assert entry.status == "delivered", entry.last_reply
    attempt = (await env.attempts(entry.id))[-1]
    assert attempt.tls and attempt.verified
    assert sinks.tls.wait_for(1) and sinks.tls.messages[0].tls_version


async def test_mta_sts_enforce_is_honoured(env, sinks):
    """No TLSA records: the destination's MTA-STS policy decides. Its MX host is delivered to over
    PKIX-verified TLS; an MX host outside the policy gets nothing (RFC 8461 section 5)."""
    good = await env.run(await env.outbound(["bob@stsgood.dst.test"]))
    assert good.status == "delivered", good.last_reply
    attempt = (await env.attempts(good.id))[-1]
    assert attempt.tls and attempt.verified
    assert attempt.results[SPOOL_SESSIONS_KEY][0]["policy"] == "mta-sts"
    assert sinks.tls.wait_for(1)
    bad = await env.run(await env.outbound(["bob@stsbad.dst.test"]))
    assert bad.status == "queued" and "451 4.7.5" in bad.last_reply
    assert len(sinks.tls.messages) == 1
    session = (await env.attempts(bad.id))[-1].results[SPOOL_SESSIONS_KEY][0]
    assert session["tls_rpt"] == {f"mxsts2.dst.test:{sinks.port}": "validation-failure"}
    assert session["tls_rpt_policy"] == {f"mxsts2.dst.test:{sinks.port}": "mta-sts"}


async def test_requiretls_goes_only_over_verified_tls_to_a_requiretls_server(env, sinks):
    """RFC 8689: neither a server without TLS nor a DANE-verified one without REQUIRETLS gets it;
    the sender hears so (5.7.10), nothing is sent."""
    plain = await env.run(await env.outbound(["bob@pref.dst.test"], requiretls=True))
    verified = await env.run(await env.outbound(["bob@danegood.dst.test"], requiretls=True))
    for entry in (plain, verified):
        assert entry.status == "failed" and "550 5.7.10" in entry.last_reply
    assert sinks.plain.messages == [] and sinks.tls.messages == []
    assert [_dsn_status(m.data) for m in await env.deliver_dsns()] == [["5.7.10"], ["5.7.10"]]


async def test_an_encrypt_override_defers_a_destination_without_starttls(env, sinks):
    await destination_tls.add_override(env.store, ".dst.test", "may")
    await destination_tls.add_override(env.store, "pref.dst.test", "encrypt")
    entry = await env.run(await env.outbound(["bob@pref.dst.test"]))
    assert entry.status == "queued" and "451 4.7.5" in entry.last_reply
    assert sinks.plain.messages == [] and sinks.second.messages == []
    # The suffix override (may) applies to the other destinations: DANE is not consulted.
    dane = await env.run(await env.outbound(["bob@dane.dst.test"]))
    assert dane.status == "delivered" and sinks.tls.wait_for(1)
    assert not (await env.attempts(dane.id))[-1].verified


async def test_a_verify_override_checks_the_certificate_names_the_mx_host(env, sinks):
    """``verify``: the certificate must chain to the CA and name the MX host; the TLS sink's names
    mxgood but not mxbad, so the one is delivered verified and the other deferred, nothing sent."""
    await destination_tls.add_override(env.store, "danegood.dst.test", "verify")
    await destination_tls.add_override(env.store, "dane.dst.test", "verify")
    good = await env.run(await env.outbound(["bob@danegood.dst.test"]))
    assert good.status == "delivered" and (await env.attempts(good.id))[-1].verified
    assert sinks.tls.wait_for(1)
    bad = await env.run(await env.outbound(["bob@dane.dst.test"]))
    assert bad.status == "queued" and "451 4.7.5" in bad.last_reply and len(sinks.tls.messages) == 1
    session = (await env.attempts(bad.id))[-1].results[SPOOL_SESSIONS_KEY][0]
    assert session["tls_rpt"] == {f"mxbad.dst.test:{sinks.port}": "certificate-host-mismatch"}


async def test_explain_says_how_mail_to_a_destination_goes(env, sinks):
    """What ``destination-tls show`` and the console print: the same resolver as delivery."""
    d = env.settings.downstream
    dane = await destination_tls.explain(env.store, d, "danegood.dst.test")
    assert dane.mx_secure and dane.mode == "dane" and dane.sts_fallback and dane.override is None
    assert [(s.source, s.tlsa[0][:6]) for s in dane.servers] == [("dane", "3 1 1 ")]
    bad = await destination_tls.explain(env.store, d, "stsbad.dst.test")
    assert bad.servers[0].source == "refused" and bad.servers[0].result_type == "validation-failure"
    await destination_tls.add_override(env.store, "pref.dst.test", "encrypt")
    pref = await destination_tls.explain(env.store, d, "pref.dst.test")
    assert pref.override == DestinationTls("pref.dst.test", "encrypt")
    assert [h[0] for h in pref.hosts] == ["mx1.dst.test", "mx2.dst.test"]
    assert {s.mode for s in pref.servers} == {"required"}
    assert (await destination_tls.explain(env.store, d, "null.dst.test")).failure.startswith("556 5.1.10")


async def test_overrides_are_validated_and_managed(env):
    with pytest.raises(ValidationFailed):
        await destination_tls.add_override(env.store, "not a domain", "encrypt")
    with pytest.raises(ValidationFailed):
        await destination_tls.add_override(env.store, "x.test", "secure-ish")
    await destination_tls.add_override(env.store, "X.Test.", "verify")
    assert await destination_tls.list_overrides(env.store) == [DestinationTls("x.test", "verify")]
    await destination_tls.add_override(env.store, "x.test", "dane-only", replace=True)
    assert (await destination_tls.remove_override(env.store, "x.test")).level == "dane-only"
    assert await destination_tls.list_overrides(env.store) == []


@given(st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){0,3}", fullmatch=True),
       st.from_regex(r"[a-z]{1,8}\.[a-z]{1,8}", fullmatch=True), st.sampled_from(sorted(LEVELS)))
def test_override_matching(label, base, level):
    """An exact pattern beats a suffix; a suffix covers every name below it, never the base or
    a name that merely ends with the same letters."""
    exact, suffix = DestinationTls(base, level), DestinationTls("." + base, "none")
    below = f"{label}.{base}"
    assert matching_override(below, [suffix]) == suffix
    assert matching_override(base, [suffix]) is None
    assert matching_override(base, [suffix, exact]) == exact
    assert matching_override(f"{label}{base}", [suffix]) is None
    assert matching_override(below.upper() + ".", [exact, suffix]) == suffix


_hosts = st.lists(st.tuples(st.from_regex(r"mx[0-9]{1,2}\.d\.test", fullmatch=True),
                            st.lists(st.sampled_from(["127.0.0.2", "127.0.0.3", "::1"]), min_size=1, max_size=3,
                                     unique=True)), min_size=1, max_size=4, unique_by=lambda h: h[0])


@given(_hosts, st.booleans(), st.none() | st.sampled_from(sorted(LEVELS)))
def test_routes_keep_the_mx_order_and_never_use_dane_over_an_unsigned_mx(hosts, secure, level):
    mx = MxResult("d.test", tuple(MxHost(name, 10 * i, tuple(addrs)) for i, (name, addrs) in enumerate(hosts)),
                  secure=secure)
    route = destination_route(mx, DestinationTls("d.test", level) if level else None, port=2525)
    assert route.addresses == tuple((name, 2525, a) for name, addrs in hosts for a in addrs)
    assert route.servers == tuple((name, 2525) for name, _ in hosts) and route.policy_domain == "d.test"
    if not secure and level != "dane-only":
        assert route.tls not in (DownstreamTls.DANE, DownstreamTls.DANE_ONLY)
    if level is None:
        assert route.tls in (DownstreamTls.DANE, DownstreamTls.MTA_STS)
    elif level != "dane":
        assert route.tls is LEVELS[level] and not route.sts_fallback


def test_default_route_is_dane_then_mta_sts_and_unsigned_mx_gets_no_dane():
    signed = MxResult("d.test", (MxHost("mx.d.test", 10, ("::1", "127.0.0.1")),), secure=True)
    route = destination_route(signed, None)
    assert route.tls is DownstreamTls.DANE and route.sts_fallback and route.policy_domain == "d.test"
    assert route.addresses == (("mx.d.test", 25, "::1"), ("mx.d.test", 25, "127.0.0.1"))
    unsigned = MxResult("d.test", signed.hosts, secure=False)
    assert destination_route(unsigned, None).tls is DownstreamTls.MTA_STS
    assert destination_route(unsigned, DestinationTls("d.test", "dane")).tls is DownstreamTls.OPPORTUNISTIC
    assert destination_route(signed, DestinationTls("d.test", "none")).tls is DownstreamTls.OFF


# -- DKIM ------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_outbound_mail_is_dkim_signed_and_verifies_at_the_sink(env, sinks, algorithm):
    view = await dkim_keys.generate_key(env.store, env.keyring.get(), ORG, selector=f"s-{algorithm}",
                                        algorithm=algorithm)
    entry = await env.run(await env.outbound(["bob@pref.dst.test"]))
    assert entry.status == "delivered"
    assert sinks.plain.wait_for(1)
    received = sinks.plain.messages[0].data
    assert received.startswith(b"DKIM-Signature:")
    published = view.record_value.encode()

    def dnsfunc(name, timeout=5):
        return published if name == view.record_name.encode() else None

    assert dkim.verify(received, dnsfunc=dnsfunc)
    sig = email.message_from_bytes(received)["DKIM-Signature"]
    assert f"d={ORG}" in sig and f"s=s-{algorithm}" in sig
    assert ("a=ed25519-sha256" if algorithm == "ed25519" else "a=rsa-sha256") in sig.replace(" ", "")


async def test_the_from_domain_signs_when_it_is_the_organizations(env, sinks):
    """DMARC alignment (RFC 7489 3.1.1): From: news.org.example, same organization as the
    envelope's org.example, signs with its own key; a From domain of another organization never
    lends its key (the envelope domain's key signs instead, or nothing)."""
    from mxguard.services import orgs
    await orgs.add_org(env.store, "Other")
    await domain_service.add_domain(env.store, "news.org.example", ["127.0.0.1:9"])
    await domain_service.add_domain(env.store, "other.example", ["127.0.0.1:9"], org="Other")
    for name in ("news.org.example", "other.example"):
        await dkim_keys.generate_key(env.store, env.keyring.get(), name, selector="k", algorithm="ed25519")
    aligned = message(sender="news@news.org.example", to="bob@pref.dst.test")
    foreign = message(subject="foreign", sender="ceo@other.example", to="bob@pref.dst.test")
    for body in (aligned, foreign):
        assert (await env.run(await env.outbound(["bob@pref.dst.test"], body=body))).status == "delivered"
    assert sinks.plain.wait_for(2)
    first, second = (m.data for m in sinks.plain.messages)
    assert "d=news.org.example" in email.message_from_bytes(first)["DKIM-Signature"]
    assert not second.startswith(b"DKIM-Signature:")


async def test_dkim_key_is_sealed_shown_and_checked_in_dns(env, loopback_dns):
    view = await dkim_keys.generate_key(env.store, env.keyring.get(), ORG, selector="mxg1", algorithm="ed25519")
    async with env.store.session() as session:
        from sqlalchemy import select
        from mxguard.storage.models import DkimKey
        row = (await session.execute(select(DkimKey))).scalar_one()
    assert b"PRIVATE KEY" not in row.private_key  # sealed
    assert view.zone_line.startswith(f"mxg1._domainkey.{ORG}. IN TXT")
    assert [k.selector for k in await dkim_keys.list_keys(env.store, ORG)] == ["mxg1"]
    resolver = settings_resolver(env.settings)
    resolver.nameservers, resolver.port = ["127.0.0.1"], loopback_dns.port
    assert (await dkim_keys.check_dns(view, resolver)).status == "missing"
    loopback_dns.set_records(f"mxg1._domainkey.{ORG}", "TXT", [TXT(view.record_value.encode())])
    try:
        assert (await dkim_keys.check_dns(view, resolver)).status == "ok"
        loopback_dns.set_records(f"mxg1._domainkey.{ORG}", "TXT", [TXT(b"v=DKIM1; k=ed25519; p=AAAA")])
        assert (await dkim_keys.check_dns(view, resolver)).status == "mismatch"
    finally:
        loopback_dns.set_records(f"mxg1._domainkey.{ORG}", "TXT", [])


@given(st.text(min_size=1, max_size=70))
def test_selectors_outside_dns_label_syntax_are_refused(selector):
    from mxguard.relay.dkim import valid_selector
    ok = valid_selector(selector)
    if ok:
        assert all(label and label[0] != "-" and label[-1] != "-" for label in selector.split("."))
        assert set(selector) <= set("abcdefghijklmnopqrstuvwxyz0123456789-.")


# -- console, API, CLI -----------------------------------------------------------------------

@pytest.fixture
def gateway_overrides(loopback_dns) -> dict:
    """The ``web`` gateway's destination lookups go to the loopback DNS server (NXDOMAIN for
    what it does not know), never to the system's resolver."""
    return {"downstream.dns_servers": [loopback_dns.address], "downstream.dns_timeout": 2.0}

def test_overrides_and_dkim_keys_in_the_api_and_console(web, plain_sink, loopback_dns):
    admin = web.api(web.admin_key)
    acme = web.tenant("Acme", "ops@acme.test")
    assert admin.post("/domains", json={"name": "acme.test", "servers": [plain_sink.address], "org": "Acme"}
                      ).status_code == 201
    assert admin.post("/domains", json={"name": "other.test", "servers": [plain_sink.address]}).status_code == 201
    # Destination TLS: admins only; bad input is 422 naming the field, a duplicate 409.
    assert admin.post("/destination-tls", json={"pattern": ".Example.org", "level": "encrypt"}).status_code == 201
    assert admin.post("/destination-tls", json={"pattern": ".example.org", "level": "may"}).status_code == 409
    bad = admin.post("/destination-tls", json={"pattern": "exa mple", "level": "may"})
    assert bad.status_code == 422 and "pattern" in bad.text
    assert admin.get("/destination-tls").json() == [{"pattern": ".example.org", "level": "encrypt", "ca_file": None}]
    org_admin = web.api(acme.key)
    assert org_admin.get("/destination-tls").status_code == 403
    assert org_admin.post("/destination-tls", json={"pattern": "x.test", "level": "may"}).status_code == 403
    # DKIM: an org-admin makes a key for its own domain; another organization's is not found.
    made = org_admin.post("/domains/acme.test/dkim", json={"selector": "s1", "algorithm": "ed25519"})
    assert made.status_code == 201 and made.json()["zone_line"].startswith("s1._domainkey.acme.test. IN TXT")
    assert org_admin.post("/domains/other.test/dkim", json={}).status_code == 404
    assert [k["selector"] for k in org_admin.get("/domains/acme.test/dkim").json()] == ["s1"]
    assert org_admin.post("/domains/acme.test/dkim/check").json()[0]["status"] == "missing"
    loopback_dns.set_records("s1._domainkey.acme.test", "TXT", [TXT(made.json()["record_value"].encode())])
    try:
        assert org_admin.post("/domains/acme.test/dkim/check").json()[0]["status"] == "ok"
        # The console shows the record and the check.
        console, _ = web.login("ops@acme.test")
        page = console.get("/outbound").text
        assert made.json()["public_key"] in page and "Set by the gateway's administrators" in page
        assert "other.test" not in page
        token = csrf_token(page)
        checked = console.post("/outbound/dkim/check", data={"csrf_token": token, "domain": "acme.test"})
        assert checked.status_code == 200 and "the published key is this key" in checked.text
        assert console.post("/outbound/dkim", data={"csrf_token": token, "domain": "other.test",
                                                    "algorithm": "rsa"}).status_code == 404
        made_rsa = console.post("/outbound/dkim", data={"csrf_token": token, "domain": "acme.test",
                                                        "selector": "s2", "algorithm": "rsa"})
        assert made_rsa.status_code == 303
        keys = org_admin.get("/domains/acme.test/dkim").json()
        assert [(k["selector"], k["algorithm"], k["active"]) for k in keys] == [("s2", "rsa", True),
                                                                                ("s1", "ed25519", False)]
    finally:
        loopback_dns.set_records("s1._domainkey.acme.test", "TXT", [])
    # The admin's console form: an override with a bad level names the field and keeps the input.
    console, _ = web.login("admin@gw.test")
    token = csrf_token(console.get("/outbound").text)
    refused = console.post("/outbound/destination-tls", data={"csrf_token": token, "pattern": "dst.test",
                                                              "level": "maybe"})
    assert refused.status_code == 422 and "level" in refused.text and 'value="dst.test"' in refused.text
    assert console.post("/outbound/destination-tls", data={"csrf_token": token, "pattern": "dst.test",
                                                           "level": "dane-only"}).status_code == 303
    assert "dane-only" in console.get("/outbound?saved=tls").text
    looked = console.post("/outbound/explain", data={"csrf_token": token, "domain": "null.test"})
    assert looked.status_code == 200 and 'id="explain-result"' in looked.text and "550 5.1.2" in looked.text
    assert console.post("/outbound/explain", data={"csrf_token": token, "domain": "no domain"}).status_code == 422
    assert console.post("/outbound/destination-tls/remove", data={"csrf_token": token, "pattern": "dst.test"}
                        ).status_code == 303
    assert admin.delete("/destination-tls/.example.org").status_code == 204
    assert admin.get("/destination-tls").json() == []


def test_cli_manages_overrides_and_prints_the_dkim_record(data_dir, loopback_dns):
    from tests.test_cli import mx
    mx("domain", "add", ORG, "--server", "127.0.0.1:2525", data_dir=data_dir)
    out = mx("domain", "dkim", "generate", ORG, "--selector", "cli1", "--algorithm", "ed25519", data_dir=data_dir)
    assert f'cli1._domainkey.{ORG}. IN TXT ( "v=DKIM1; k=ed25519; p=' in out.stdout
    shown = mx("domain", "dkim", "show", ORG, "--json", data_dir=data_dir)
    assert '"selector": "cli1"' in shown.stdout
    # A new sealing key re-seals the DKIM key; it still opens and signs.
    assert "and 1 DKIM keys" in mx("keys", "rotate", data_dir=data_dir).stdout
    from mxguard.dkim_signing import DkimSigner

    async def signer():
        settings = load_settings(data_dir, environ={})
        store = Store(settings.effective_database_url)
        try:
            return await dkim_keys.signer_for(store, KeyRing(settings.path(settings.sealing_key_file)).get(), ORG)
        finally:
            await store.close()
    assert isinstance(asyncio.run(signer()), DkimSigner)
    # A newer key takes over; the older one can be made the signing key again (a rollback).
    mx("domain", "dkim", "generate", ORG, "--selector", "cli2", "--algorithm", "rsa", data_dir=data_dir)

    def active() -> list[str]:
        return [k["selector"] for k in json.loads(mx("domain", "dkim", "show", ORG, "--json", data_dir=data_dir).stdout)
                if k["active"]]
    assert active() == ["cli2"]
    assert "cli1 of" in mx("domain", "dkim", "activate", ORG, "--selector", "cli1", data_dir=data_dir).stdout
    assert active() == ["cli1"]
    assert asyncio.run(signer()).selector == "cli1"
    missing = mx("domain", "dkim", "activate", ORG, "--selector", "nosuch", data_dir=data_dir, check=False)
    assert missing.returncode != 0 and "no DKIM key with selector nosuch" in missing.stderr
    assert active() == ["cli1"], "a failed activation changes nothing"
    wrong = mx("domain", "dkim", "generate", ORG, "--algorithm", "dsa", data_dir=data_dir, check=False)
    assert wrong.returncode == 2 and "algorithm" in wrong.stderr and "Traceback" not in wrong.stderr
    assert "encrypt" in mx("destination-tls", "add", ".dst.test", "encrypt", data_dir=data_dir).stdout
    again = mx("destination-tls", "add", ".dst.test", "may", data_dir=data_dir, check=False)
    assert again.returncode == 1 and "replace" in again.stderr
    assert ".dst.test" in mx("destination-tls", "list", data_dir=data_dir).stdout
    # The same commands under ``relay``, where the rest of the outbound set-up is.
    assert ".dst.test" in mx("relay", "destination-tls", "list", data_dir=data_dir).stdout
    looked = mx("destination-tls", "show", "nosuch.dst.test", data_dir=data_dir, check=False,
                env={"MXGUARD_DOWNSTREAM__DNS_SERVERS": loopback_dns.address})
    assert looked.returncode == 1 and "550 5.1.2" in looked.stdout and "Traceback" not in looked.stderr
    assert "override .dst.test = encrypt" in looked.stdout, "the override is shown even when DNS fails"
    mx("destination-tls", "remove", ".dst.test", data_dir=data_dir)
    assert mx("destination-tls", "list", "--json", data_dir=data_dir).stdout.strip() == "[]"
