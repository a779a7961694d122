"""MTA-STS (RFC 8461): policies found through a real resolver (unbound over NSD on loopback),
fetched from a real HTTPS server with a test CA, and applied to real deliveries."""

from __future__ import annotations

import http.server
import ssl
import threading
import time

import pytest
from hypothesis import given, strategies as st

from mxguard.sink import ThreadedSink
from mxguard.tls.mta_sts import PolicyError, StsFetcher, StsPolicy, parse_policy, parse_txt
from tests.support.dnssec import LoopbackDnssec, Zone
from tests.support.smtp import message, send

POLICIES = {
    "sts.test": (200, "text/plain", "version: STSv1\r\nmode: enforce\r\nmx: mx1.sts.test\r\nmax_age: 86400\r\n"),
    "testing.test": (200, "text/plain", "version: STSv1\nmode: testing\nmx: elsewhere.testing.test\nmax_age: 600\n"),
    "html.test": (200, "text/html", "version: STSv1\nmode: enforce\nmx: mx1.html.test\nmax_age: 600\n"),
    "big.test": (200, "text/plain", "version: STSv1\nmode: enforce\nmx: mx1.big.test\nmax_age: 600\n"
                 + "x: " + "y" * 70000 + "\n"),
    "redirect.test": (302, "text/plain", ""),
    "v2.test": (200, "text/plain", "version: STSv2\nmode: enforce\nmx: mx1.v2.test\nmax_age: 600\n"),
}
SLOW = {"slow.test"}


class PolicyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        domain = self.headers.get("Host", "").removeprefix("mta-sts.").split(":")[0]
        if domain in SLOW:
            time.sleep(3)
        status, ctype, body = POLICIES.get(domain, (404, "text/plain", "no policy"))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if status == 302:
            self.send_header("Location", "https://example.invalid/")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def policy_server(ca):
    cert = ca.issue_cert(*[f"mta-sts.{d}" for d in [*POLICIES, *SLOW]])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PolicyHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def sts_sink(ca):
    cert = ca.issue_cert("mx1.sts.test", "mx9.sts.test", "mx1.testing.test", "mx1.slow.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    with ThreadedSink(tls_context=ctx, hostname="mx1.sts.test") as sink:
        yield sink


@pytest.fixture(scope="module")
def dns(policy_server):
    zones = [Zone(d, ['_mta-sts IN TXT "v=STSv1; id=20261206"', "mta-sts IN A 127.0.0.1", "mx1 IN A 127.0.0.1",
                      "mx9 IN A 127.0.0.1"], signed=False) for d in [*POLICIES, *SLOW]]
    zones.append(Zone("nopolicy.test", ["mx1 IN A 127.0.0.1"], signed=False))
    with LoopbackDnssec(zones) as servers:
        yield servers


@pytest.fixture
def gateway_overrides(dns, policy_server, ca_file) -> dict:
    return {"downstream.dns_servers": [f"127.0.0.1:{dns.resolver_port}"], "downstream.dns_timeout": 1.5,
            "downstream.mta_sts_ca_file": str(ca_file), "downstream.mta_sts_port": policy_server,
            "downstream.pool_max_idle": 0}


def fetcher(dns, policy_server, ca_file) -> StsFetcher:
    return StsFetcher(["127.0.0.1"], dns.resolver_port, 1.5, ssl.create_default_context(cafile=str(ca_file)),
                      policy_server)


def relay(gateway, add_domain, sink, domain: str, server: str, ca_file):
    sink.messages.clear()
    add_domain(domain, [f"{server}:{sink.port}"], downstream_tls="mta-sts", tls_ca_file=str(ca_file))
    before = len(gateway.records)
    out = send(gateway.port, [f"bob@{domain}"], message(to=f"bob@{domain}"))
    return out, gateway.wait_records(before + 1)[before]


def test_enforce_with_a_matching_mx_delivers_over_verified_tls(gateway, add_domain, sts_sink, ca_file):
    out, record = relay(gateway, add_domain, sts_sink, "sts.test", "mx1.sts.test", ca_file)
    assert out.data and out.data[0] == 250, out
    leg = record.downstream[0]
    assert leg["policy"] == "mta-sts" and leg["verified"] and leg["tls"]
    assert sts_sink.wait_for(1)


def test_enforce_with_a_non_matching_mx_sends_nothing(gateway, add_domain, sts_sink, ca_file):
    out, record = relay(gateway, add_domain, sts_sink, "sts.test", "mx9.sts.test", ca_file)
    code, text = out.rcpt["bob@sts.test"]
    assert code == 250 and "TLS-Required: No" in text, out  # provisional: the header comes with DATA
    assert out.data and out.data[0] == 451 and out.data[1].startswith("4.7.5"), out
    assert sts_sink.messages == []
    assert "does not match the MTA-STS mx patterns" in record.downstream[0]["failure"]
    assert record.downstream[0]["tls_rpt"] == {f"mx9.sts.test:{sts_sink.port}": "validation-failure"}


def test_testing_mode_delivers_and_says_so(gateway, add_domain, sts_sink, ca_file):
    out, record = relay(gateway, add_domain, sts_sink, "testing.test", "mx1.testing.test", ca_file)
    assert out.data and out.data[0] == 250
    assert record.downstream[0]["policy"] == "mta-sts-testing"
    # The MX host is outside the testing policy's mx patterns: delivered, and counted as a
    # validation-failure of the sts policy in the day's TLS-RPT report (RFC 8461 5, RFC 8460 4.3).
    assert record.downstream[0]["report_failure"] == "validation-failure"
    (tally,) = _todays_tallies(gateway)["testing.test"].values()
    assert (tally.policy_type, tally.successful) == ("sts", 0)
    assert tally.failures == {("validation-failure", "mx1.testing.test"): 1}


def test_a_policy_that_cannot_be_fetched_is_reported_as_a_fetch_failure(gateway, add_domain, sts_sink, ca_file):
    """A published ``_mta-sts`` record whose policy fetch fails: delivered opportunistically
    (RFC 8461 5.1), counted under sts with the fetch error's result type (RFC 8460 4.3.2.2)."""
    out, record = relay(gateway, add_domain, sts_sink, "html.test", "mx1.html.test", ca_file)
    assert out.data and out.data[0] == 250
    assert record.downstream[0]["report_failure"] in ("sts-policy-invalid", "sts-policy-fetch-error")
    (tally,) = _todays_tallies(gateway)["html.test"].values()
    assert tally.policy_type == "sts" and sum(tally.failures.values()) == 1 and tally.successful == 0


def _todays_tallies(gateway):
    import datetime as dt

    from mxguard.tls.reporting import collect, day_window
    gateway.run(gateway.gateway.message_log.flush())
    start, end = day_window(dt.datetime.now(dt.timezone.utc).date())
    return gateway.run(collect(gateway.store, start, end))


def test_a_policy_fetch_that_times_out_falls_back_to_opportunistic(gateway, add_domain, sts_sink, ca_file):
    out, record = relay(gateway, add_domain, sts_sink, "slow.test", "mx1.slow.test", ca_file)
    assert out.data and out.data[0] == 250
    assert record.downstream[0]["policy"] == "setting" and record.downstream[0]["tls"]


@pytest.mark.parametrize("domain, needle", [
    ("html.test", "is not text/plain"), ("big.test", "larger than 65536 bytes"),
    ("redirect.test", "HTTP 302"), ("v2.test", "is not STSv1"), ("slow.test", "fetch failed: ReadTimeout"),
])
async def test_bad_policies_are_refused_with_a_reason(dns, policy_server, ca_file, domain, needle):
    with pytest.raises(PolicyError, match=needle):
        await fetcher(dns, policy_server, ca_file).policy(domain)


async def test_policy_is_fetched_once_and_cached(dns, policy_server, ca_file):
    sts = fetcher(dns, policy_server, ca_file)
    first = await sts.policy("sts.test")
    assert first == StsPolicy("enforce", ("mx1.sts.test",), 86400, "20261206")
    assert await sts.policy("sts.test") is first
    assert await sts.policy("nopolicy.test") is None


def test_txt_record_rules():
    assert parse_txt(["v=STSv1; id=abc123"]) == "abc123"
    assert parse_txt(["something else"]) is None
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two records: no policy (3.1)
    with pytest.raises(PolicyError):
        parse_txt(["v=STSv1; id=not-valid!"])


label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)


@given(first=label, second=label, base=st.lists(label, min_size=1, max_size=3))
def test_wildcard_matches_exactly_one_label(first, second, base):
    """RFC 8461 4.1: ``*.example.com`` matches ``mx.example.com`` but not ``a.b.example.com`` nor the base."""
    suffix = ".".join(base)
    policy = parse_policy(f"version: STSv1\nmode: enforce\nmx: *.{suffix}\nmax_age: 60\n")
    assert policy.matches(f"{first}.{suffix}") and policy.matches(f"{first.upper()}.{suffix}.")
    assert not policy.matches(f"{first}.{second}.{suffix}")
    assert not policy.matches(suffix)
    exact = parse_policy(f"version: STSv1\nmode: enforce\nmx: {first}.{suffix}\nmax_age: 60\n")
    assert exact.matches(f"{first}.{suffix}") and not exact.matches(f"x{first}.{suffix}")


async def test_the_effective_policy_shows_the_mta_sts_policy_and_its_verdict_per_mx(dns, policy_server, ca_file):
    """``domain show`` / the console's domain page: the policy in force (id, mode, mx, max_age),
    and per server whether MTA-STS decides or refuses it; a bad policy says why."""
    from mxguard.config import DownstreamSettings
    from mxguard.tls.explain import explain_route
    from mxguard.tls.resolver import forget_cached_lookups

    forget_cached_lookups()
    settings = DownstreamSettings(dns_servers=[f"127.0.0.1:{dns.resolver_port}"], dns_timeout=1.5,
                                  mta_sts_ca_file=str(ca_file), mta_sts_port=policy_server)
    report = await explain_route("sts.test", "mta-sts", [("mx1.sts.test", 25), ("mx9.sts.test", 25)], settings)
    assert report.mta_sts == {"id": "20261206", "mode": "enforce", "mx": ["mx1.sts.test"], "max_age": 86400}
    good, other = report.servers
    assert (good.source, good.mode) == ("mta-sts", "verify") and good.requiretls.startswith("allowed")
    assert (other.source, other.result_type) == ("refused", "validation-failure")
    assert "does not match the MTA-STS mx patterns" in other.refusal
    testing = await explain_route("testing.test", "mta-sts", [("mx1.testing.test", 25)], settings)
    assert testing.mta_sts["mode"] == "testing" and testing.servers[0].source == "mta-sts-testing"
    html = await explain_route("html.test", "mta-sts", [("mx1.html.test", 25)], settings)
    assert html.mta_sts["result_type"] == "sts-policy-invalid" and "is not text/plain" in html.mta_sts["error"]
    assert html.servers[0].source == "setting" and "no MTA-STS policy in force" in html.servers[0].meaning
    none = await explain_route("nopolicy.test", "mta-sts", [("mx1.nopolicy.test", 25)], settings)
    assert none.mta_sts == {"none": True} and none.servers[0].requiretls.startswith("refused")
