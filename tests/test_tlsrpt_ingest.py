"""TLS-RPT ingest (RFC 8460): reports other senders send about the served domains, POSTed over the
real HTTPS listener (httpx) and mailed to tlsrpt@<domain> through the real gateway (smtplib), stored,
shown on the console page, in the API and the CLI, read back by parsedmarc; every refusal with its
status or reply code, and a hypothesis class test over mutated reports."""

from __future__ import annotations

import copy
import datetime as dt
import gzip
import json
import os
import socket
import ssl
import time
from email.message import EmailMessage

import httpx
import parsedmarc
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from sqlalchemy import func, select

from mxguard.config import load_settings
from mxguard.errors import ConfigError
from mxguard.services import domains as domain_service
from mxguard.services import tls_reports
from mxguard.storage.models import MessageLogEntry, ReceivedTlsReport
from mxguard.tls.rpt_ingest import MAX_BODY, ReportRefused, parse_report, read_report, report_from_message
from tests.conftest import gateway_environ
from tests.support.gateway import ThreadedGateway
from tests.support.smtp import send
from tests.support.web import PASSWORD, gateway_tls_context
from tests.test_cli_filters import mx

GZIP = "application/tlsrpt+gzip"
JSON = "application/tlsrpt+json"

# Report days relative to the run (the console and API show a window back from today).
_TODAY = dt.datetime.now(dt.timezone.utc).date()
DAY0, DAY1, DAY2 = (str(_TODAY - dt.timedelta(days=n)) for n in (3, 2, 1))


def make_report(domain: str = "example.com", report_id: str = "2026-12-05T00:00:00Z_example.com",
                organization: str = "Sender Inc", *, successful: int = 120, day: str = "",
                extra_policies: list[dict] | None = None) -> dict:
    """A report in RFC 8460 section 4's format: an STS policy with several failure types (one of them
    not an RFC 8460 type) and a no-policy-found policy for the same domain."""
    day = day or DAY1
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": "mailto:tls-reports@sender.test",
        "report-id": report_id,
        "policies": [
            {"policy": {"policy-type": "sts", "policy-string": ["version: STSv1", "mode: enforce",
                                                                 f"mx: mx.{domain}", "max_age: 86400"],
                        "policy-domain": domain, "mx-host": [f"mx.{domain}"]},
             "summary": {"total-successful-session-count": successful, "total-failure-session-count": 9},
             "failure-details": [
                 {"result-type": "certificate-expired", "sending-mta-ip": "192.0.2.10",
                  "receiving-mx-hostname": f"mx.{domain}", "receiving-ip": "198.51.100.7",
                  "failed-session-count": 4},
                 {"result-type": "starttls-not-supported", "sending-mta-ip": "192.0.2.11",
                  "receiving-mx-hostname": f"mx.{domain}", "receiving-mx-helo": f"mx.{domain}",
                  "failed-session-count": 2, "additional-information": "https://sender.test/tls/why",
                  "failure-reason-code": "STARTTLS not offered"},
                 {"result-type": "x-vendor-handshake-timeout", "sending-mta-ip": "192.0.2.10",
                  "failed-session-count": 3}]},
            {"policy": {"policy-type": "no-policy-found", "policy-domain": domain},
             "summary": {"total-successful-session-count": 5, "total-failure-session-count": 1},
             "failure-details": [{"result-type": "validation-failure", "failed-session-count": 1}]},
            *(extra_policies or []),
        ],
    }


def encode(report: dict, kind: str = GZIP) -> bytes:
    raw = json.dumps(report).encode()
    return gzip.compress(raw) if kind == GZIP else raw


def report_mail(body: bytes, kind: str = GZIP, *, to: str = "tlsrpt@example.com", domain: str = "example.com",
                attach: bool = True) -> bytes:
    """A mailed report as RFC 8460 5.3 describes it: multipart/report; report-type="tlsrpt"."""
    msg = EmailMessage()
    msg["From"] = "tls-reports@sender.test"
    msg["To"] = to
    msg["Subject"] = f"Report Domain: {domain} Submitter: sender.test Report-ID: <r1@sender.test>"
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = "sender.test"
    msg["Message-ID"] = "<r1@sender.test>"
    msg["Date"] = "Sun, 06 Dec 2026 01:00:00 +0000"
    msg.set_content(f"This is an aggregate TLS report from sender.test about {domain}.")
    if attach:
        maintype, subtype = kind.split("/")
        msg.add_attachment(body, maintype=maintype, subtype=subtype,
                           filename=f"sender.test!{domain}!1796428800!1796515199.json" + (".gz" if kind == GZIP else ""))
    msg.set_type("multipart/report")
    msg.set_param("report-type", "tlsrpt")
    return msg.as_bytes()


def count_rows(web) -> int:
    async def go():
        async with web.gw.store.session() as session:
            return (await session.execute(select(func.count()).select_from(ReceivedTlsReport))).scalar_one()
    return web.run(go())


def intake(web) -> httpx.Client:
    """A client with no session, no cookie and no CSRF token: a reporter."""
    client = httpx.Client(base_url=web.url, verify=gateway_tls_context(web.cert_file), timeout=30)
    web.clients.append(client)
    return client


@pytest.fixture
def served(web, plain_sink):
    """example.com (Acme) and globex.test (Globex) served; Acme's org-admin ops@acme.test."""
    web.add_org("Acme")
    web.add_org("Globex")
    web.run(domain_service.add_domain(web.gw.store, "example.com", [plain_sink.address], org="Acme"))
    web.run(domain_service.add_domain(web.gw.store, "globex.test", [plain_sink.address], org="Globex"))
    web.add_user("ops@acme.test", "org-admin", "Acme")
    web.gw.reload()
    return web


# -- HTTPS ----------------------------------------------------------------------------------

def test_posted_reports_are_stored_and_shown_on_the_page_api_and_cli(served, data_dir):
    web = served
    client = intake(web)
    reply = client.post("/tlsrpt", content=encode(make_report()), headers={"Content-Type": GZIP})
    assert reply.status_code == 201, reply.text
    assert reply.json() == {"stored": 1, "domains": ["example.com"]}
    second = make_report(report_id="r-2026-12-06", organization="Other Mail Co", successful=30, day=DAY2)
    reply = client.post("/tlsrpt", content=encode(second, JSON), headers={"Content-Type": JSON + "; charset=utf-8"})
    assert reply.status_code == 201 and reply.json()["stored"] == 1
    assert count_rows(web) == 2

    # The console page, after a login as the other web tests do.
    console, _ = web.login("admin@gw.test")
    assert 'href="/domains/example.com/tls-reports"' in console.get("/domains").text
    page = console.get("/domains/example.com/tls-reports?days=366")
    assert page.status_code == 200
    html = page.text
    assert '<p class="big" id="report-count">2</p>' in html
    assert '<p class="big ok" id="total-successful">160</p>' in html  # (120 + 5) + (30 + 5)
    assert '<p class="big bad" id="total-failed">20</p>' in html
    assert "<tr><td>certificate-expired</td><td>8</td></tr>" in html
    assert "x-vendor-handshake-timeout <small class=\"muted\">(not an RFC 8460 type)</small></td><td>6</td>" in html
    assert "<tr><td>Sender Inc</td><td>1</td></tr>" in html and "<tr><td>Other Mail Co</td><td>1</td></tr>" in html
    assert html.index("r-2026-12-06") < html.index("2026-12-05T00:00:00Z_example.com")  # newest first
    chart = console.get("/domains/example.com/tls-reports/chart.svg?days=366")
    assert chart.status_code == 200 and chart.headers["content-type"].startswith("image/svg+xml")
    assert b"<script" not in chart.content and b"successful" in chart.content

    # The API.
    api = web.api(web.admin_key)
    body = api.get("/domains/example.com/tls-reports", params={"days": 366}).json()
    assert body["total_successful"] == 160 and body["total_failed"] == 20 and body["reports"] == 2
    assert body["failures"]["starttls-not-supported"] == 4 and body["failures"]["validation-failure"] == 2
    assert body["organizations"] == {"Other Mail Co": 1, "Sender Inc": 1}
    first, older = body["newest"]
    assert (first["report_id"], first["via"], first["successful"], first["failed"]) == ("r-2026-12-06", "https", 35, 10)
    assert older["policy_types"] == ["sts", "no-policy-found"] and older["sending_ips"] == ["192.0.2.10", "192.0.2.11"]
    assert sum(body["successful_per_day"]) == 160 and len(body["days"]) == 366
    detail = api.get(f"/domains/example.com/tls-reports/{older['id']}").json()
    assert detail["report"] == make_report()
    assert "/api/v1/domains/{name}/tls-reports" in api.get("/openapi.json").json()["paths"]

    # The CLI, against the same data dir.
    out = mx(data_dir, "tlsrpt", "received", "--domain", "example.com", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["report_id"], r["organization"], r["successful"], r["failed"]) for r in rows] == [
        ("r-2026-12-06", "Other Mail Co", 35, 10), ("2026-12-05T00:00:00Z_example.com", "Sender Inc", 125, 10)]
    table = mx(data_dir, "tls-report", "received")
    assert table.returncode == 0 and "Other Mail Co" in table.stdout and "certificate-expired: 4" in table.stdout
    unknown = mx(data_dir, "tlsrpt", "received", "--domain", "nowhere.test")
    assert unknown.returncode == 1 and "nowhere.test" in unknown.stderr and "Traceback" not in unknown.stderr


def test_https_refusals_say_why_and_store_nothing(served):
    web = served
    client = intake(web)
    good = make_report()

    def post(content: bytes, content_type: str | None = GZIP) -> httpx.Response:
        return client.post("/tlsrpt", content=content, headers={"Content-Type": content_type} if content_type else {})

    reply = post(b"{not json", JSON)
    assert reply.status_code == 400 and "not JSON" in reply.json()["error"]
    reply = post(gzip.compress(b"[1, 2]"))
    assert reply.status_code == 400 and "must be an object" in reply.json()["error"]
    broken = copy.deepcopy(good)
    del broken["policies"][0]["summary"]["total-failure-session-count"]
    reply = post(encode(broken))
    assert reply.status_code == 400
    assert "policies.0.summary.total-failure-session-count: Field required" in reply.json()["error"]
    reply = post(b"\x1f\x8b\x08\x00garbage")
    assert reply.status_code == 400 and "gzip" in reply.json()["error"]
    reply = post(encode(good), "application/json")
    assert reply.status_code == 415 and "application/tlsrpt+gzip" in reply.json()["error"]
    assert post(encode(good), None).status_code == 415
    reply = post(os.urandom(MAX_BODY + 1))
    assert reply.status_code == 413 and "larger than" in reply.json()["error"]
    # A gzip bomb: 1 GiB of zeros in about 1 MiB; refused once 8 MiB are inflated, quickly.
    bomb = gzip.compress(b"\0" * (1024 * 1024 * 1024), compresslevel=9)
    assert len(bomb) <= MAX_BODY
    started = time.monotonic()
    reply = post(bomb)
    assert reply.status_code == 413 and "decompressed" in reply.json()["error"]
    assert time.monotonic() - started < 3
    reply = post(encode(make_report(domain="not-served.test")))
    assert reply.status_code == 422 and "not-served.test" in reply.json()["error"]
    assert count_rows(web) == 0

    assert post(encode(good)).status_code == 201
    reply = post(encode(good, JSON), JSON)  # the same report again, as JSON this time
    assert reply.status_code == 409 and "stored already" in reply.json()["error"]
    assert count_rows(web) == 1
    # No console session is involved: no cookie was ever set, and a GET is a JSON 405, not a login page.
    assert not client.cookies
    reply = client.get("/tlsrpt")
    assert reply.status_code == 405 and reply.headers["content-type"].startswith("application/json")


def test_a_declared_oversized_body_is_refused_before_it_is_sent(served):
    """Content-Length over 1 MiB: 413 at once, with none of the body sent (nothing is read or buffered)."""
    host, port = served.url.removeprefix("https://").rsplit(":", 1)
    ctx = gateway_tls_context(served.cert_file)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"POST /tlsrpt HTTP/1.1\r\nHost: {host}\r\nContent-Type: {GZIP}\r\n"
                    f"Content-Length: {500 * 1024 * 1024}\r\n\r\n".encode())
        started = time.monotonic()
        head = b""
        while b"\r\n\r\n" not in head and time.monotonic() - started < 10:
            head += tls.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert time.monotonic() - started < 5


def test_a_report_about_several_domains_stores_one_row_per_served_domain(served):
    web = served
    report = make_report(extra_policies=[
        {"policy": {"policy-type": "tlsa", "policy-string": ["3 1 1 0123"], "policy-domain": "Globex.Test."},
         "summary": {"total-successful-session-count": 7, "total-failure-session-count": 2},
         "failure-details": [{"result-type": "tlsa-invalid", "failed-session-count": 2}]},
        {"policy": {"policy-type": "sts", "policy-domain": "elsewhere.test"},
         "summary": {"total-successful-session-count": 1, "total-failure-session-count": 0}}])
    reply = intake(web).post("/tlsrpt", content=encode(report), headers={"Content-Type": GZIP})
    assert reply.status_code == 201 and reply.json() == {"stored": 2, "domains": ["example.com", "globex.test"]}
    api = web.api(web.admin_key)
    globex = api.get("/domains/globex.test/tls-reports", params={"days": 366}).json()
    assert (globex["total_successful"], globex["total_failed"], globex["failures"]) == (7, 2, {"tlsa-invalid": 2})
    assert api.get("/domains/example.com/tls-reports", params={"days": 366}).json()["total_successful"] == 125


def test_an_org_admin_sees_only_its_own_domains_reports(served):
    web = served
    client = intake(web)
    for domain in ("example.com", "globex.test"):
        assert client.post("/tlsrpt", content=encode(make_report(domain=domain, report_id=f"id-{domain}")),
                           headers={"Content-Type": GZIP}).status_code == 201
    console, _ = web.login("ops@acme.test")
    assert console.get("/domains/example.com/tls-reports?days=366").status_code == 200
    assert console.get("/domains/globex.test/tls-reports").status_code == 404
    assert console.get("/domains/globex.test/tls-reports/chart.svg").status_code == 404
    listing = console.get("/domains").text
    assert "/domains/example.com/tls-reports" in listing and "globex.test" not in listing
    api = web.api(web.api_key("ops@acme.test"))
    assert api.get("/domains/example.com/tls-reports", params={"days": 366}).json()["reports"] == 1
    assert api.get("/domains/globex.test/tls-reports").status_code == 404
    own = api.get("/domains/example.com/tls-reports", params={"days": 366}).json()["newest"][0]["id"]
    other = web.api(web.admin_key).get("/domains/globex.test/tls-reports",
                                       params={"days": 366}).json()["newest"][0]["id"]
    assert api.get(f"/domains/globex.test/tls-reports/{other}").status_code == 404
    assert api.get(f"/domains/example.com/tls-reports/{other}").status_code == 404  # another domain's row
    assert api.get(f"/domains/example.com/tls-reports/{own}").status_code == 200
    acme = web.run(tls_reports.received_reports(web.gw.store, actor=_actor(web, "ops@acme.test")))
    assert [r.domain for r in acme] == ["example.com"]


def _actor(web, email: str):
    from mxguard.services import users
    return web.run(users.get_user(web.gw.store, email)).actor()


# -- hypothesis: mutated reports are refused with 400, never stored, never a 5xx -------------

#: Paths into make_report() and what each holds: (path, kind, required).
_FIELDS = [
    (("organization-name",), "str", True), (("date-range",), "dict", True),
    (("date-range", "start-datetime"), "str", True), (("date-range", "end-datetime"), "str", True),
    (("contact-info",), "str", True), (("report-id",), "str", True), (("policies",), "list", True),
    (("policies", 0, "policy"), "dict", True), (("policies", 0, "policy", "policy-type"), "str", True),
    (("policies", 0, "policy", "policy-domain"), "str", True),
    (("policies", 0, "policy", "policy-string"), "list", False), (("policies", 0, "policy", "mx-host"), "list", False),
    (("policies", 0, "summary"), "dict", True),
    (("policies", 0, "summary", "total-successful-session-count"), "int", True),
    (("policies", 0, "summary", "total-failure-session-count"), "int", True),
    (("policies", 0, "failure-details"), "list", False),
    (("policies", 0, "failure-details", 0, "result-type"), "str", True),
    (("policies", 0, "failure-details", 0, "failed-session-count"), "int", True),
    (("policies", 0, "failure-details", 0, "sending-mta-ip"), "str", False),
    (("policies", 0, "failure-details", 0, "receiving-mx-hostname"), "str", False),
    (("policies", 0, "failure-details", 1, "receiving-mx-helo"), "str", False),
    (("policies", 0, "failure-details", 0, "receiving-ip"), "str", False),
    (("policies", 0, "failure-details", 1, "additional-information"), "str", False),
    (("policies", 0, "failure-details", 1, "failure-reason-code"), "str", False),
    (("policies", 1, "summary", "total-successful-session-count"), "int", True),
    (("policies", 1, "failure-details", 0, "failed-session-count"), "int", True),
]
_COUNTS = [f for f in _FIELDS if f[1] == "int"]
_VALUES = {
    "str": st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(st.text(max_size=5), max_size=3),
                     st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)),
    "int": st.one_of(st.text(max_size=10), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                     st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "list": st.one_of(st.text(max_size=10), st.integers(), st.booleans(), st.dictionaries(st.text(max_size=3),
                                                                                           st.text(max_size=3), max_size=2)),
    "dict": st.one_of(st.text(max_size=10), st.integers(), st.booleans(), st.lists(st.integers(), max_size=3)),
}


def _parent(report: dict, path: tuple):
    node = report
    for key in path[:-1]:
        node = node[key]
    return node


@st.composite
def mutated_reports(draw) -> tuple[dict, str]:
    report = make_report()
    how = draw(st.sampled_from(["remove", "retype", "negative"]))
    if how == "remove":
        path, _, _ = draw(st.sampled_from([f for f in _FIELDS if f[2]]))
        del _parent(report, path)[path[-1]]
    elif how == "retype":
        path, kind, required = draw(st.sampled_from(_FIELDS))
        value = draw(_VALUES[kind] if not required else st.one_of(_VALUES[kind], st.none()))
        _parent(report, path)[path[-1]] = value
    else:
        path, _, _ = draw(st.sampled_from(_COUNTS))
        _parent(report, path)[path[-1]] = draw(st.integers(max_value=-1))
    return report, f"{how} {'.'.join(map(str, path))}"


@hsettings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated_reports(), kind=st.sampled_from([GZIP, JSON]))
def test_mutated_reports_are_always_refused_with_400(served_for_hypothesis, case, kind):
    web, client = served_for_hypothesis
    report, what = case
    reply = client.post("/tlsrpt", content=encode(report, kind), headers={"Content-Type": kind})
    assert reply.status_code == 400, (what, reply.status_code, reply.text)
    assert reply.json()["error"].startswith("malformed report: "), what
    assert count_rows(web) == 0


@pytest.fixture
def served_for_hypothesis(served):
    return served, intake(served)


def test_the_parser_refuses_what_the_endpoint_refuses():
    """The same rules without a server: RFC 3339 dates with a zone, end after start, known policy types."""
    base = make_report()
    for mutate, words in [
        (lambda r: r["date-range"].update({"start-datetime": "2026-12-05 00:00:00"}), "RFC 3339"),
        (lambda r: r["date-range"].update({"end-datetime": f"{DAY0}T00:00:00Z"}), "after start-datetime"),
        (lambda r: r["policies"][0]["policy"].update({"policy-type": "dane"}), "policy-type"),
        (lambda r: r.update({"policies": []}), "policies"),
        (lambda r: r["policies"][0]["summary"].update({"total-successful-session-count": 2 ** 60}), "less than"),
    ]:
        report = copy.deepcopy(base)
        mutate(report)
        with pytest.raises(ReportRefused) as refused:
            parse_report(json.dumps(report).encode())
        assert refused.value.status == 400 and words in refused.value.reason, refused.value.reason
    parsed = read_report(encode(base), GZIP)
    (tally,) = parsed.per_domain().values()
    assert (tally.successful, tally.failed) == (125, 10)
    assert tally.failures == {"certificate-expired": 4, "starttls-not-supported": 2,
                              "x-vendor-handshake-timeout": 3, "validation-failure": 1}
    with pytest.raises(ReportRefused) as refused:
        report_from_message(report_mail(b"", attach=False))
    assert refused.value.status == 400 and "no report part" in refused.value.reason


# -- mail -----------------------------------------------------------------------------------

def test_mailed_reports_are_taken_by_the_gateway_not_relayed(served, plain_sink):
    web = served
    gw = web.gw
    out = send(gw.port, ["tlsrpt@example.com"], report_mail(encode(make_report())))
    assert out.rcpt["tlsrpt@example.com"][0] == 250 and out.rcpt["tlsrpt@example.com"][1].startswith("2.1.5")
    assert out.data[0] == 250 and out.data[1].startswith("2.6.0 TLS report stored for example.com"), out.data
    json_report = make_report(report_id="mailed-json", day=DAY2)
    out = send(gw.port, ["TLSRPT@Example.com"], report_mail(encode(json_report, JSON), JSON))
    assert out.data[0] == 250 and out.data[1].startswith("2.6.0"), out.data
    assert count_rows(web) == 2
    # A duplicate is answered 250 (already stored) and changes nothing.
    out = send(gw.port, ["tlsrpt@example.com"], report_mail(encode(make_report())))
    assert out.data[0] == 250 and out.data[1].startswith("2.6.0 Already stored"), out.data
    assert count_rows(web) == 2
    assert plain_sink.messages == []  # nothing went downstream

    rows = web.api(web.admin_key).get("/domains/example.com/tls-reports", params={"days": 366}).json()["newest"]
    assert {r["via"] for r in rows} == {"mail"}
    gw.flush_log()
    records = [r for r in gw.records if r.rcpt_to.lower() == "tlsrpt@example.com"]
    assert [r.disposition for r in records] == ["tls-report"] * 3
    assert all(r.downstream == [] and r.downstream_host is None for r in records)
    assert records[0].final_reply.startswith("250 2.6.0") and records[0].results[0]["route"] is None
    api_log = web.api(web.admin_key).get("/messages", params={"disposition": "tls-report"}).json()
    assert len(api_log) == 3


def test_mail_refusals_have_their_codes(served, plain_sink):
    gw = served.gw

    def mail(body: bytes) -> tuple[int, str]:
        return send(gw.port, ["tlsrpt@example.com"], body).data

    code, text = mail(report_mail(b"", attach=False))
    assert code == 550 and text.startswith("5.6.0") and "no report part" in text
    code, text = mail(report_mail(b"{broken", JSON))
    assert code == 550 and text.startswith("5.6.0") and "not JSON" in text
    bad = make_report()
    bad["policies"][0]["summary"]["total-successful-session-count"] = -5
    code, text = mail(report_mail(encode(bad)))
    assert code == 550 and text.startswith("5.6.0") and "greater than or equal to 0" in text
    code, text = mail(report_mail(os.urandom(MAX_BODY + 10)))
    assert code == 552 and text.startswith("5.3.4"), text
    code, text = mail(report_mail(gzip.compress(b"\0" * (64 * 1024 * 1024))))
    assert code == 552 and text.startswith("5.3.4") and "decompressed" in text
    code, text = mail(report_mail(encode(make_report(domain="not-served.test"))))
    assert code == 550 and text.startswith("5.7.1") and "not-served.test" in text
    assert count_rows(served) == 0 and plain_sink.messages == []


def test_a_report_address_is_not_mixed_with_other_recipients(served, plain_sink):
    gw = served.gw
    out = send(gw.port, ["bob@example.com", "tlsrpt@example.com"])
    assert out.rcpt["bob@example.com"][0] == 250
    assert out.rcpt["tlsrpt@example.com"][0] == 452 and out.rcpt["tlsrpt@example.com"][1].startswith("4.5.3")
    assert out.data[0] == 250 and plain_sink.wait_for(1)
    assert plain_sink.messages[0].rcpt_tos == ["bob@example.com"]
    out = send(gw.port, ["tlsrpt@example.com", "carol@example.com", "tlsrpt@globex.test"],
               report_mail(encode(make_report())))
    assert out.rcpt["tlsrpt@example.com"][0] == 250 and out.rcpt["tlsrpt@globex.test"][0] == 250
    assert out.rcpt["carol@example.com"][0] == 452 and out.rcpt["carol@example.com"][1].startswith("4.5.3")
    assert out.data[0] == 250 and out.data[1].startswith("2.6.0")
    assert count_rows(served) == 1 and len(plain_sink.messages) == 1


# -- configuration ---------------------------------------------------------------------------

def test_the_local_part_and_the_switch_come_from_the_settings(data_dir, loopback_dns, plain_sink):
    settings = load_settings(data_dir, environ=gateway_environ(
        loopback_dns, MXGUARD_TLS_REPORTS__INGEST_LOCAL_PART="TLS-Reports"))
    gw = ThreadedGateway(settings).start()
    try:
        gw.run(domain_service.add_domain(gw.store, "example.com", [plain_sink.address]))
        gw.reload()
        assert send(gw.port, ["tls-reports@example.com"], report_mail(encode(make_report()))).data[1] \
            .startswith("2.6.0")
        assert send(gw.port, ["tlsrpt@example.com"]).data[0] == 250 and plain_sink.wait_for(1)  # relayed now
        assert plain_sink.messages[0].rcpt_tos == ["tlsrpt@example.com"]
    finally:
        gw.stop()
    settings = load_settings(data_dir, environ=gateway_environ(loopback_dns, MXGUARD_TLS_REPORTS__INGEST="false"))
    gw = ThreadedGateway(settings, web_listen="127.0.0.1:0").start()
    try:
        gw.reload()
        assert send(gw.port, ["tlsrpt@example.com"]).data[0] == 250 and plain_sink.wait_for(2)
        with httpx.Client(verify=gateway_tls_context(data_dir / "tls" / "cert.pem")) as client:
            reply = client.post(gw.web_url + "/tlsrpt", content=encode(make_report()), headers={"Content-Type": GZIP})
        assert reply.status_code == 404 and "does not take" in reply.json()["error"]
    finally:
        gw.stop()


def test_a_bad_local_part_stops_start_up_naming_the_key(data_dir):
    path = data_dir / "mxguard.toml"
    text = path.read_text()
    assert 'ingest_local_part = "tlsrpt"' in text  # init writes the key with its default
    path.write_text(text.replace('ingest_local_part = "tlsrpt"', 'ingest_local_part = "tls rpt@x"'))
    with pytest.raises(ConfigError) as error:
        load_settings(data_dir, environ={})
    assert "tls_reports.ingest_local_part" in str(error.value)
    out = mx(data_dir, "serve")
    assert out.returncode != 0 and "tls_reports.ingest_local_part" in out.stderr and "Traceback" not in out.stderr


# -- read back with parsedmarc ----------------------------------------------------------------

def test_parsedmarc_reads_the_stored_report_alike(served):
    web = served
    report = make_report(report_id="for-parsedmarc")
    posted = encode(report, JSON)
    assert intake(web).post("/tlsrpt", content=posted, headers={"Content-Type": JSON}).status_code == 201
    mailed = report_mail(encode(make_report(report_id="mailed-for-parsedmarc")))
    assert send(web.gw.port, ["tlsrpt@example.com"], mailed).data[0] == 250

    async def raw_of(report_id: str) -> bytes:
        async with web.gw.store.session() as session:
            return (await session.execute(select(ReceivedTlsReport.raw_gzip)
                                          .where(ReceivedTlsReport.report_id == report_id))).scalar_one()
    stored = gzip.decompress(web.run(raw_of("for-parsedmarc")))
    assert stored == posted  # kept byte for byte
    api = web.api(web.admin_key)
    rows = api.get("/domains/example.com/tls-reports", params={"days": 366}).json()["newest"]
    for row in rows:
        from_api = api.get(f"/domains/example.com/tls-reports/{row['id']}").json()["report"]
        for source in (json.dumps(from_api), gzip.decompress(web.run(raw_of(row["report_id"])))):
            theirs = parsedmarc.parse_smtp_tls_report_json(source)
            assert theirs["organization_name"] == row["organization"] == "Sender Inc"
            assert theirs["report_id"] == row["report_id"]
            assert sum(p["successful_session_count"] for p in theirs["policies"]) == row["successful"] == 125
            assert sum(p["failed_session_count"] for p in theirs["policies"]) == row["failed"] == 10
            by_type: dict[str, int] = {}
            for p in theirs["policies"]:
                for d in p.get("failure_details", []):
                    by_type[d["result_type"]] = by_type.get(d["result_type"], 0) + d["failed_session_count"]
            assert by_type == row["failures"]
    # parsedmarc also takes the test's mail for a TLS report: the message is the RFC 8460 5.3 shape.
    parsed_mail = parsedmarc.parse_report_email(mailed, offline=True)  # no DNS, no downloads
    assert parsed_mail["report_type"] == "smtp_tls"
    assert parsed_mail["report"]["report_id"] == "mailed-for-parsedmarc"


# -- storage on both databases ----------------------------------------------------------------

async def test_storing_and_duplicates_on_sqlite_and_postgresql(store):
    await domain_service.add_domain(store, "example.com", ["mail.example.com"])
    parsed = read_report(encode(make_report()), GZIP)
    stored = await tls_reports.store_report(store, parsed, "https")
    assert stored.domains == ["example.com"] and stored.ignored == []
    with pytest.raises(ReportRefused) as refused:
        await tls_reports.store_report(store, parsed, "mail")
    assert refused.value.status == 409
    other = read_report(encode(make_report(organization="Other Mail Co")), GZIP)  # same report-id, other sender
    assert (await tls_reports.store_report(store, other, "mail")).domains == ["example.com"]
    summary = await tls_reports.domain_reports(store, "EXAMPLE.com", days=366)
    assert (summary.reports, summary.total_successful, summary.total_failed) == (2, 250, 20)
    assert summary.failures["x-vendor-handshake-timeout"] == 6
    async with store.session() as session:
        rows = (await session.execute(select(ReceivedTlsReport))).scalars().all()
    assert {r.via for r in rows} == {"https", "mail"} and all(r.start.tzinfo for r in rows)
    assert json.loads(gzip.decompress(rows[0].raw_gzip)) == make_report()
    async with store.session() as session:
        logged = (await session.execute(select(func.count()).select_from(MessageLogEntry))).scalar_one()
    assert logged == 0  # an HTTPS report is not a mail transaction


def test_a_mailed_reports_dkim_signature_is_checked_and_kept_with_it(served, plain_sink, loopback_dns):
    """RFC 8460 5.3 asks reporters to DKIM-sign: the result is kept with the report (pass with
    d= and s=, fail for a changed message, none unsigned); a report is taken either way."""
    import dkim

    from tests.support.dns import _txt_chunks
    from tests.test_tls_reporting import _new_key

    web, gw = served, served.gw
    pem, record = _new_key("rsa")
    zone = loopback_dns.resolver.zone
    zone[("tlsrpt._domainkey.sender.test", "TXT")] = [_txt_chunks(record)]
    try:
        def signed(report_id: str) -> bytes:
            raw = report_mail(encode(make_report(report_id=report_id))).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            return dkim.sign(raw, b"tlsrpt", b"sender.test", pem,
                             include_headers=[b"From", b"To", b"Subject", b"Date", b"Message-ID",
                                              b"TLS-Report-Domain", b"TLS-Report-Submitter"]) + raw

        good = signed("dkim-good")
        bad = signed("dkim-bad").replace(b"Report-ID: <r1@sender.test>", b"Report-ID: <r2@sender.test>", 1)
        unsigned = report_mail(encode(make_report(report_id="dkim-none")))
        for raw in (good, bad, unsigned):
            out = send(gw.port, ["tlsrpt@example.com"], raw)
            assert out.data[0] == 250 and out.data[1].startswith("2.6.0"), out.data
    finally:
        zone.pop(("tlsrpt._domainkey.sender.test", "TXT"), None)
    rows = web.api(web.admin_key).get("/domains/example.com/tls-reports", params={"days": 366}).json()["newest"]
    by_id = {r["report_id"]: r["dkim"] for r in rows}
    assert by_id["dkim-good"] == "pass d=sender.test s=tlsrpt", by_id
    assert by_id["dkim-bad"].startswith("fail d=sender.test"), by_id
    assert by_id["dkim-none"] == "none", by_id
