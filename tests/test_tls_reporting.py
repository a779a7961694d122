"""TLS-RPT (RFC 8460) aggregate reports: counted from real deliveries, found through a real DNS
server on loopback, sent as a real ``multipart/report`` message to a sink."""

from __future__ import annotations

import datetime as dt
import email
import gzip
import json
from email import policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxguard.sink import ThreadedSink
from mxguard.tls.reporting import build_report, day_window, report_filename, send_reports, tally_items
from tests.support.dns import _txt_chunks
from tests.support.smtp import message, send
from tests.support.tlsrpt import (parsedmarc_summary, read_json_with_parsedmarc, read_mail_with_parsedmarc,
                                  report_summary, schema_errors)
from tests.test_cli_filters import mx


def test_tally_counts_sessions_and_failures_per_policy():
    items = [
        ("example.com", {"host": "127.0.0.1", "port": 25, "tls": True, "policy": "setting", "domain": "example.com"}),
        ("example.com", {"host": "127.0.0.1", "port": 25, "tls": False, "policy": "setting"}),
        ("example.com", {"failure": "x", "tls_rpt": {"mx1.example.com:25": "certificate-host-mismatch"}}),
        ("example.org", {"host": "mx.example.org", "tls": True, "policy": "dane"}),
        ("example.org", {"failure": "x", "policy": "dane", "tls_rpt": {"mx2.example.org:25": "tlsa-invalid"}}),
    ]
    t = tally_items(items)
    com = t["example.com"]["no-policy-found"]
    assert com.successful == 1
    assert com.failures == {("starttls-not-supported", "127.0.0.1"): 1,
                            ("certificate-host-mismatch", "mx1.example.com"): 1}
    assert t["example.org"]["tlsa"].successful == 1
    assert t["example.org"]["tlsa"].failures == {("tlsa-invalid", "mx2.example.org"): 1}
    start, end = day_window(dt.date(2026, 12, 5))
    report = build_report("mx.gw.test", "mailto:postmaster@mx.gw.test", "example.com", start, end, t["example.com"])
    assert report["date-range"] == {"start-datetime": "2026-12-05T00:00:00Z", "end-datetime": "2026-12-06T00:00:00Z"}
    (p,) = report["policies"]
    assert p["policy"]["policy-type"] == "no-policy-found" and p["policy"]["policy-domain"] == "example.com"
    assert p["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 2}
    assert {d["result-type"] for d in p["failure-details"]} == {"starttls-not-supported", "certificate-host-mismatch"}
    assert report_filename("mx.gw.test", "example.com", start, end) == \
        f"mx.gw.test!example.com!{int(start.timestamp())}!{int(end.timestamp())}.json.gz"


@pytest.fixture
def reporting_dns(loopback_dns):
    zone = loopback_dns.resolver.zone
    added = {("_smtp._tls.example.com", "TXT"): [_txt_chunks("v=TLSRPTv1; rua=mailto:tlsrpt@reports.test")],
             ("_smtp._tls.legacy.example.org", "TXT"): [_txt_chunks("v=TLSRPTv1;rua=mailto:rpt@reports.test")]}
    zone.update(added)
    yield loopback_dns
    for key in added:
        zone.pop(key, None)


def test_the_days_report_reaches_the_domains_rua(gateway, tls_sink, plain_sink, add_domain, reporting_dns):
    add_domain("example.com", [tls_sink.address])  # opportunistic: TLS negotiated
    add_domain("legacy.example.org", [plain_sink.address], downstream_tls="required")  # no STARTTLS: refused
    add_domain("quiet.example.net", [tls_sink.address])  # no _smtp._tls record: no report
    for rcpt in ("bob@example.com", "carol@example.com", "dan@legacy.example.org", "eve@quiet.example.net"):
        send(gateway.port, [rcpt], message(to=rcpt))
    assert tls_sink.wait_for(3)
    gateway.wait_records(4)
    gateway.run(gateway.gateway.message_log.flush())  # the log is written in batches
    with ThreadedSink() as reports:
        gateway.settings.dsn.relay = reports.address  # reports.test is not served: it goes via the relay
        sent = gateway.run(send_reports(gateway.store, gateway.settings, dt.datetime.now(dt.timezone.utc).date()))
        assert sorted((s.domain, s.target, s.ok) for s in sent) == [
            ("example.com", "mailto:tlsrpt@reports.test", True),
            ("legacy.example.org", "mailto:rpt@reports.test", True)]
        assert reports.wait_for(2)
        by_rcpt = {m.rcpt_tos[0]: m for m in reports.messages}
    for m in by_rcpt.values():  # RFC 8460 4.4 schema; parsedmarc reads them the same
        _checked_report(m.data)
    got = email.message_from_bytes(by_rcpt["tlsrpt@reports.test"].data, policy=policy.default)
    assert got.get_content_type() == "multipart/report" and got.get_param("report-type") == "tlsrpt"
    assert got["TLS-Report-Domain"] == "example.com" and got["TLS-Report-Submitter"] == "mx.gw.test"
    (attachment,) = [p for p in got.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert attachment.get_filename().startswith("mx.gw.test!example.com!")
    report = json.loads(gzip.decompress(attachment.get_content()))
    (p,) = report["policies"]
    assert p["summary"] == {"total-successful-session-count": 2, "total-failure-session-count": 0}
    legacy = email.message_from_bytes(by_rcpt["rpt@reports.test"].data, policy=policy.default)
    (attachment,) = [p for p in legacy.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"]
    (p,) = json.loads(gzip.decompress(attachment.get_content()))["policies"]
    assert p["summary"]["total-failure-session-count"] == 1
    assert p["failure-details"][0]["result-type"] == "starttls-not-supported"


def test_cli_refuses_a_bad_day(data_dir):
    out = mx(data_dir, "tls-report", "send", "--day", "yesterday-ish")
    assert out.returncode == 1 and "--day" in out.stderr and "Traceback" not in out.stderr
    today = dt.datetime.now(dt.timezone.utc).date()
    for day in (today, today + dt.timedelta(days=400)):  # a day that has not ended has no report
        out = mx(data_dir, "tls-report", "send", "--day", day.isoformat())
        assert out.returncode == 1 and "has not ended yet" in out.stderr and "Traceback" not in out.stderr


async def test_a_day_is_claimed_by_one_node_only(store):
    """Several nodes on one database: the day's reports are sent by the first to claim them."""
    from mxguard.config import Settings
    from mxguard.storage.models import TlsReportRun
    from mxguard.tls.reporting import send_due
    settings = Settings.model_validate({"hostname": "node1.gw.test"})
    today = dt.date(2026, 12, 6)
    assert await send_due(store, settings, today=today) == []  # claimed; nothing logged, nothing to send
    assert await send_due(store, settings.model_copy(update={"hostname": "node2.gw.test"}), today=today) is None
    async with store.session() as session:
        run = await session.get(TlsReportRun, "2026-12-05")
    assert run.node == "node1.gw.test" and run.outcome == {"sent": 0, "failed": 0}
    assert await send_due(store, settings, today=today + dt.timedelta(days=1)) == []  # the next day is its own


def test_an_https_rua_gets_the_gzip_report_by_post(gateway, tls_sink, add_domain, loopback_dns, ca, ca_file):
    import http.server
    import ssl
    import threading
    posted: list[tuple[str, str, bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posted.append((self.path, self.headers["Content-Type"], body))
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = ("_smtp._tls.example.com", "TXT")
    loopback_dns.resolver.zone[key] = [
        _txt_chunks(f"v=TLSRPTv1; rua=https://127.0.0.1:{server.server_address[1]}/tlsrpt")]
    try:
        add_domain("example.com", [tls_sink.address])
        send(gateway.port, ["bob@example.com"], message(to="bob@example.com"))
        assert tls_sink.wait_for(1)
        gateway.wait_records(1)
        gateway.run(gateway.gateway.message_log.flush())
        sent = gateway.run(send_reports(gateway.store, gateway.settings, dt.datetime.now(dt.timezone.utc).date(),
                                        https_verify=str(ca_file)))
        assert [(s.ok, s.detail) for s in sent] == [(True, "HTTP 201")]
        ((path, ctype, body),) = posted
        assert path == "/tlsrpt" and ctype == "application/tlsrpt+gzip"
        report = json.loads(gzip.decompress(body))
        assert report["policies"][0]["summary"]["total-successful-session-count"] == 1
    finally:
        loopback_dns.resolver.zone.pop(key, None)
        server.shutdown()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mailed_reports(gateway) -> dict[str, dict]:
    """Send today's reports to a sink (via the DSN relay); ``{recipient: report JSON}``."""
    with ThreadedSink() as reports:
        gateway.settings.dsn.relay = reports.address
        sent = gateway.run(send_reports(gateway.store, gateway.settings, dt.datetime.now(dt.timezone.utc).date()))
        assert sent and all(s.ok for s in sent), sent
        assert reports.wait_for(len(sent))
        out = {}
        for m in reports.messages:
            out[m.rcpt_tos[0]] = _checked_report(m.data)
        return out


def _checked_report(data: bytes) -> dict:
    """The JSON report of a mailed report, after checking it by the RFC 8460 schema and reading the JSON
    and the message back with parsedmarc: the same organization, dates, domains and counts."""
    got = email.message_from_bytes(data, policy=policy.default)
    (part,) = [p for p in got.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"]
    raw_json = gzip.decompress(part.get_content())
    report = json.loads(raw_json)
    assert schema_errors(report) == []
    assert parsedmarc_summary(read_json_with_parsedmarc(raw_json)) == report_summary(report)
    assert parsedmarc_summary(read_mail_with_parsedmarc(data)) == report_summary(report)
    return report


def test_spool_deliveries_are_counted_once_each(gateway, tls_sink, add_domain, reporting_dns):
    """A spool retry over TLS is a successful session and a retry refused for want of STARTTLS a
    ``starttls-not-supported`` failure; the in-line attempts (connection refused: no TLS session)
    and the spool's completion record add nothing."""
    from mxguard.spool import queue
    add_domain("example.com", [tls_sink.address])
    port = _free_port()
    add_domain("legacy.example.org", [f"127.0.0.1:{port}"], downstream_tls="required")
    tls_sink.pause()
    for rcpt in ("bob@example.com", "dan@legacy.example.org"):
        assert send(gateway.port, [rcpt], message(to=rcpt)).data[0] == 250
    held = {e.domain: e for e in gateway.run(queue.list_entries(gateway.store))}
    assert set(held) == {"example.com", "legacy.example.org"}
    tls_sink.resume()
    with ThreadedSink(port=port, hostname="legacy.example.org"):  # back, but without STARTTLS
        for _ in range(2):  # two retries of the legacy entry; the first also delivers example.com
            gateway.run(gateway.gateway.worker.run_once(ids=[e.id for e in held.values()]))
    assert tls_sink.wait_for(1) and tls_sink.messages[0].tls
    entry, attempts = gateway.run(queue.get_entry(gateway.store, held["legacy.example.org"].id))
    assert entry.status == "queued" and len(attempts) == 2 and "4.7.5" in attempts[-1].reply
    gateway.run(gateway.gateway.message_log.flush())
    reports = _mailed_reports(gateway)
    (com,) = reports["tlsrpt@reports.test"]["policies"]
    assert com["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 0}
    assert com["policy"] == {"policy-type": "no-policy-found", "policy-domain": "example.com", "mx-host": ["127.0.0.1"]}
    (legacy,) = reports["rpt@reports.test"]["policies"]
    assert legacy["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 2}
    assert legacy["failure-details"] == [{"result-type": "starttls-not-supported", "receiving-mx-hostname": "127.0.0.1",
                                          "failed-session-count": 2}]


# -- DKIM-signed reports (RFC 8460 section 5.3) ------------------------------------------------

def _new_key(kind: str) -> tuple[bytes, str]:
    """``(PEM private key, DKIM key record)`` of a new RSA-2048 or Ed25519 key."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = base64.b64encode(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        public = base64.b64encode(key.public_key().public_bytes(  # RFC 8463 3: the raw 32-byte key
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, f"v=DKIM1; k={'rsa' if kind == 'rsa' else 'ed25519'}; s=tlsrpt; p={public}"


def _loopback_txt(loopback_dns):
    """A dkimpy ``dnsfunc`` asking the loopback DNS server (dnspython), never the system's."""
    import dns.resolver

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], loopback_dns.port, timeout
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)
    return dnsfunc


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_a_mailed_report_is_dkim_signed(kind, gateway, tls_sink, add_domain, reporting_dns, data_dir):
    import dkim

    from mxguard.config import load_settings
    from mxguard.tls.reporting import SIGNED_HEADERS
    pem, record = _new_key(kind)
    (data_dir / "keys" / f"tlsrpt-{kind}.pem").write_bytes(pem)
    name = (f"rpt{kind}._domainkey.gw.test", "TXT")
    reporting_dns.resolver.zone[name] = [_txt_chunks(record)]
    try:
        loaded = load_settings(data_dir, environ={  # the way an operator sets it: validated at load
            "MXGUARD_DOWNSTREAM__TLS_REPORT_DKIM_SELECTOR": f"rpt{kind}",
            "MXGUARD_DOWNSTREAM__TLS_REPORT_DKIM_DOMAIN": "gw.test",
            "MXGUARD_DOWNSTREAM__TLS_REPORT_DKIM_KEY_FILE": f"keys/tlsrpt-{kind}.pem"})
        for key in ("tls_report_dkim_selector", "tls_report_dkim_domain", "tls_report_dkim_key_file"):
            setattr(gateway.settings.downstream, key, getattr(loaded.downstream, key))
        add_domain("example.com", [tls_sink.address])
        send(gateway.port, ["bob@example.com"], message(to="bob@example.com"))
        assert tls_sink.wait_for(1)
        gateway.wait_records(1)
        gateway.run(gateway.gateway.message_log.flush())
        with ThreadedSink() as reports:
            gateway.settings.dsn.relay = reports.address
            sent = gateway.run(send_reports(gateway.store, gateway.settings, dt.datetime.now(dt.timezone.utc).date()))
            assert [s.ok for s in sent] == [True] and reports.wait_for(1)
            data = reports.messages[0].data
        assert _checked_report(data)["policies"][0]["summary"]["total-successful-session-count"] == 1
        got = email.message_from_bytes(data, policy=policy.default)
        tags = dict(t.strip().split("=", 1) for t in str(got["DKIM-Signature"]).replace("\r\n", "").split(";") if "=" in t)
        assert tags["d"] == "gw.test" and tags["s"] == f"rpt{kind}"
        assert tags["a"] == ("rsa-sha256" if kind == "rsa" else "ed25519-sha256") and "l" not in tags
        assert {h.strip().lower() for h in tags["h"].split(":")} >= {h.lower() for h in SIGNED_HEADERS}
        dnsfunc = _loopback_txt(reporting_dns)
        assert dkim.verify(data, dnsfunc=dnsfunc, tlsrpt="strict")  # the key record says s=tlsrpt
        tampered = data.replace(b"TLS-Report-Domain: example.com", b"TLS-Report-Domain: example.org")
        assert tampered != data and not dkim.verify(tampered, dnsfunc=dnsfunc, tlsrpt="strict")
    finally:
        reporting_dns.resolver.zone.pop(name, None)


@pytest.mark.parametrize("content,why", [
    (None, "cannot read"),
    (b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n", "not a PEM private key"),
    ("ec", "another type"),
])
def test_a_bad_report_key_stops_config_loading_naming_the_key(data_dir, content, why):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from mxguard.config import load_settings
    from mxguard.errors import ConfigError
    path = data_dir / "keys" / "report.pem"
    if content == "ec":
        content = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    if content is not None:
        path.write_bytes(content)
    (data_dir / "mxguard.toml").write_text((data_dir / "mxguard.toml").read_text().replace(
        'tls_report_dkim_selector = ""', 'tls_report_dkim_selector = "rpt"').replace(
        'tls_report_dkim_domain = ""', 'tls_report_dkim_domain = "gw.test"').replace(
        'tls_report_dkim_key_file = ""', 'tls_report_dkim_key_file = "keys/report.pem"'))
    with pytest.raises(ConfigError) as err:
        load_settings(data_dir, environ={})
    assert "'downstream.tls_report_dkim_key_file'" in str(err.value) and why in str(err.value), err.value
    assert "Traceback" not in str(err.value)


def test_a_selector_without_a_domain_stops_config_loading(data_dir):
    from mxguard.config import load_settings
    from mxguard.errors import ConfigError
    with pytest.raises(ConfigError) as err:
        load_settings(data_dir, environ={"MXGUARD_DOWNSTREAM__TLS_REPORT_DKIM_SELECTOR": "rpt"})
    text = str(err.value)
    assert "tls_report_dkim_selector set without tls_report_dkim_domain, tls_report_dkim_key_file" in text, text


# -- the report format (RFC 8460 section 4.4) ------------------------------------------------------

_RESULT_TYPES = ["starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                 "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
                 "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"]


def test_the_schema_refuses_what_the_rfc_does_not_allow():
    """The schema is a check that can fail: a report off the RFC's format is refused."""
    start, end = day_window(dt.date(2026, 12, 5))
    good = build_report("mx.gw.test", "mailto:postmaster@mx.gw.test", "example.com", start, end,
                        tally_items([("example.com", {"host": "mx1.example.com", "tls": False})])["example.com"])
    assert schema_errors(good) == []
    bad = json.loads(json.dumps(good))
    bad["policies"][0]["policy"]["policy-type"] = "dane"
    bad["policies"][0]["failure-details"][0]["result-type"] = "tls-failed"
    bad["date-range"]["start-datetime"] = "2026-12-05 00:00"
    del bad["report-id"]
    errors = " | ".join(schema_errors(bad))
    for field_ in ("policy-type", "result-type", "start-datetime", "report-id"):
        assert field_ in errors, errors


_hostnames = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){1,3}", fullmatch=True)


@st.composite
def _tallies(draw):
    from mxguard.tls.reporting import PolicyTally
    out = {}
    for policy_type in draw(st.sets(st.sampled_from(["tlsa", "sts", "no-policy-found"]), min_size=1)):
        tally = PolicyTally(policy_type, mx_hosts=draw(st.sets(_hostnames, max_size=3)),
                            successful=draw(st.integers(0, 10**9)))
        tally.failures = draw(st.dictionaries(st.tuples(st.sampled_from(_RESULT_TYPES), _hostnames),
                                              st.integers(1, 10**6), max_size=6))
        out[policy_type] = tally
    return out


@settings(max_examples=60, deadline=None)
@given(tallies=_tallies(), domain=_hostnames, day=st.dates(dt.date(2000, 1, 1), dt.date(2099, 12, 31)),
       organization=_hostnames)
def test_any_tally_builds_a_report_the_schema_and_parsedmarc_accept(tallies, domain, day, organization):
    start, end = day_window(day)
    report = build_report(organization, f"mailto:postmaster@{organization}", domain, start, end, tallies)
    assert schema_errors(report) == []
    for p in report["policies"]:
        assert p["summary"]["total-failure-session-count"] == sum(d["failed-session-count"]
                                                                  for d in p["failure-details"])
    raw = json.dumps(report)
    assert parsedmarc_summary(read_json_with_parsedmarc(raw)) == report_summary(report)


def test_the_gateways_own_mail_records_its_tls_outcome_and_counts_for_served_domains(
        gateway, tls_sink, plain_sink, add_domain):
    """Summaries, notifications and alerts go through the same delivery path: a refused attempt
    keeps its RFC 8460 result type in the message log, and mail to a served domain counts in
    that domain's report (mail elsewhere is recorded, with no policy domain)."""
    from mxguard.own_mail import send_own_message
    from mxguard.tls.reporting import collect

    add_domain("example.com", [tls_sink.address])
    add_domain("legacy.example.org", [plain_sink.address], downstream_tls="required")
    ok = gateway.run(send_own_message(gateway.store, gateway.settings, "bob@example.com",
                                      message(to="bob@example.com"), kind="summary"))
    refused = gateway.run(send_own_message(gateway.store, gateway.settings, "dan@legacy.example.org",
                                           message(to="dan@legacy.example.org"), kind="alert"))
    assert ok.reply.is_positive and (refused.reply.code, refused.reply.enhanced) == (451, "4.7.5")
    assert plain_sink.messages == []  # nothing in clear
    start, end = day_window(dt.datetime.now(dt.timezone.utc).date())
    tallies = gateway.run(collect(gateway.store, start, end))
    assert sum(t.successful for t in tallies["example.com"].values()) == 1
    (legacy,) = tallies["legacy.example.org"].values()
    assert legacy.successful == 0 and legacy.failures == {("starttls-not-supported", "127.0.0.1"): 1}
