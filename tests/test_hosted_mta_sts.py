"""Hosted MTA-STS (RFC 8461): the gateway's web listener serves each domain's policy by Host header,
the console, API and CLI set it and show the DNS records, and the DNS check reads them back.

The gateway runs for real on loopback with a certificate from the test CA that names
``mta-sts.<domain>``; DNS answers come from the loopback DNS server (tests/support/dns.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from dnslib import CNAME, MX, TXT, A
from hypothesis import HealthCheck, example, given, settings, strategies as st

from mxguard.config import load_settings
from mxguard.errors import ConfigError
from mxguard.services import hosted_sts
from mxguard.tls.mta_sts import StsPolicy, parse_policy
from mxguard.tls.policy import DownstreamTls
from mxguard.tls.resolver import PolicyRefusal, forget_cached_lookups, resolve_server_policy, sts_fetcher
from tests.support.dns import LoopbackDNS
from tests.support.gateway import init_data_dir
from tests.support.web import csrf_token, gateway_tls_context

MX_HOSTS = ["mx1.gw.test", "mx2.gw.test"]
POLICY_PATH = "/.well-known/mta-sts.txt"
DOMAINS = ("enforced.test", "testing.test", "off.test", "e2e.test")
MXGUARD = str(Path(sys.executable).with_name("mxguard"))


# -- set-up -------------------------------------------------------------------------------

@pytest.fixture
def sts_dns():
    """A loopback DNS server for each test: the records of the DNS checks change per test."""
    server = LoopbackDNS().start()
    for host in MX_HOSTS + ["mx.gw.test"]:
        server.set_records(host, "A", [A("127.0.0.1")])
    yield server
    server.stop()


@pytest.fixture
def data_dir(tmp_path, ca):
    """A data dir whose certificate (for HTTPS and STARTTLS) comes from the test CA and names the
    gateway and every policy host, as an administrator's SNI or SAN certificate would."""
    path = tmp_path / "data"
    init_data_dir(path)
    leaf = ca.issue_cert("mx.gw.test", *MX_HOSTS, *(f"mta-sts.{d}" for d in DOMAINS), "127.0.0.1")
    (path / "tls" / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems) + ca.cert_pem.bytes())
    (path / "tls" / "key.pem").write_bytes(leaf.private_key_pem.bytes())
    return path


@pytest.fixture
def gateway_overrides(sts_dns) -> dict:
    return {"tls.extra_cert_file": "", "tls.extra_key_file": "", "server.mx_hosts": list(MX_HOSTS),
            "downstream.dns_servers": [sts_dns.address], "downstream.dns_timeout": 2.0}


@pytest.fixture
def served(web):
    """Domains on the running gateway: enforced.test (enforce), testing.test (testing, max_age 1 day),
    off.test (off); returns the admin API client."""
    api = web.api(web.admin_key)
    for name in DOMAINS:
        assert api.post("/domains", json={"name": name, "servers": ["127.0.0.1:2525"]}).status_code == 201
    assert api.patch("/domains/enforced.test/mta-sts", json={"mode": "enforce"}).status_code == 200
    assert api.patch("/domains/testing.test/mta-sts", json={"mode": "testing", "max_age": 86400}).status_code == 200
    return api


def policy_client(web) -> httpx.Client:
    """A client without cookies or credentials, as a sending MTA fetches the policy."""
    client = httpx.Client(base_url=web.url, verify=gateway_tls_context(web.cert_file), timeout=30,
                          follow_redirects=False)
    web.clients.append(client)
    return client


def fetch(client: httpx.Client, host: str | bytes, path: str = POLICY_PATH, method: str = "GET") -> httpx.Response:
    value = host if isinstance(host, bytes) else host.encode()
    return client.request(method, path, headers=[(b"Host", value)])


def rfc8461_fields(body: bytes) -> dict[str, list[str]]:
    """Check a policy body against RFC 8461 section 3.2's grammar, written from the RFC (not the
    project's parser), and return its fields.

    * ASCII ``key: value`` lines, each ended by CRLF (``sts-policy-term``; LF alone is also
      allowed by the grammar, but the gateway writes CRLF);
    * ``version`` exactly once, ``STSv1``; ``mode`` once, ``testing``/``enforce``/``none``;
      ``max_age`` once, 1 to 10 digits, at most 31557600; ``mx`` values ``["*."] Domain``
      (RFC 5321 Domain), at least one unless the mode is ``none``.
    """
    text = body.decode("ascii")
    assert text.endswith("\r\n"), "every line ends in CRLF"
    lines = text[:-2].split("\r\n")
    assert all("\r" not in line and "\n" not in line for line in lines), "no bare CR or LF"
    fields: dict[str, list[str]] = {}
    for line in lines:
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31})[ \t]*:[ \t]*(\S(?:.*\S)?)", line)
        assert match, f"not a policy field: {line!r}"
        fields.setdefault(match.group(1), []).append(match.group(2))
    assert fields.get("version") == ["STSv1"]
    assert len(fields.get("mode", [])) == 1 and fields["mode"][0] in ("testing", "enforce", "none")
    assert len(fields.get("max_age", [])) == 1 and re.fullmatch(r"[0-9]{1,10}", fields["max_age"][0])
    assert int(fields["max_age"][0]) <= 31557600
    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    for value in fields.get("mx", []):
        assert re.fullmatch(rf"(?:\*\.)?{label}(?:\.{label})*", value), value
    assert fields["mode"] != ["none"] and fields.get("mx") or fields["mode"] == ["none"]
    return fields


def txt_value(api: httpx.Client, domain: str) -> str:
    """The suggested ``_mta-sts`` record value from the API."""
    records = api.get(f"/domains/{domain}/mta-sts").json()["records"]
    (record,) = [r for r in records if r["name"] == f"_mta-sts.{domain}."]
    return record["value"]


# -- serving the policy ---------------------------------------------------------------------

def test_the_policy_is_served_by_host_header_as_rfc_8461_asks(web, served):
    client = policy_client(web)
    reply = fetch(client, "mta-sts.enforced.test")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    assert "set-cookie" not in reply.headers and "location" not in reply.headers
    fields = rfc8461_fields(reply.content)
    assert fields == {"version": ["STSv1"], "mode": ["enforce"], "mx": MX_HOSTS, "max_age": ["604800"]}
    assert parse_policy(reply.text) == StsPolicy("enforce", tuple(MX_HOSTS), 604800)
    testing = fetch(client, "mta-sts.testing.test")
    assert parse_policy(testing.text) == StsPolicy("testing", tuple(MX_HOSTS), 86400)
    assert rfc8461_fields(testing.content)["mode"] == ["testing"]
    assert fetch(client, "mta-sts.enforced.test", method="HEAD").status_code == 200
    assert client.cookies == httpx.Cookies()


@pytest.mark.parametrize("host", ["MTA-STS.Enforced.TEST", "mta-sts.enforced.test.", "mta-sts.enforced.test:443",
                                  "Mta-Sts.enforced.test.:8443"])
def test_host_header_variants_of_the_same_name_get_the_same_policy(web, served, host):
    reply = fetch(policy_client(web), host)
    assert reply.status_code == 200 and parse_policy(reply.text).mode == "enforce"


def test_off_unknown_and_every_other_path_is_404_never_the_console(web, served):
    client = policy_client(web)
    assert fetch(client, "mta-sts.off.test").status_code == 404
    assert fetch(client, "mta-sts.unknown.test").status_code == 404
    assert fetch(client, "enforced.test").status_code == 404  # the console has no such path either
    for path in ("/", "/login", "/domains", "/api/v1/domains", "/.well-known/mta-sts.txt/", "/.well-known/x",
                 "/static/style.css", "/mc", "/metrics"):
        reply = fetch(client, "mta-sts.enforced.test", path)
        assert reply.status_code == 404, path
        assert "location" not in reply.headers and "set-cookie" not in reply.headers
    assert fetch(client, "mta-sts.enforced.test", method="POST").status_code == 405
    # The console itself still answers on its own name.
    assert client.get("/login").status_code == 200
    assert client.get("/").status_code == 303


def test_a_changed_policy_gets_a_new_id_and_the_record_suggestion_follows(web, served):
    api = served
    first = txt_value(api, "enforced.test")
    assert re.fullmatch(r'"v=STSv1; id=[A-Za-z0-9]{1,32}"', first)
    assert txt_value(api, "enforced.test") == first  # reading does not renew it
    api.patch("/domains/enforced.test/mta-sts", json={"mode": "testing"})
    second = txt_value(api, "enforced.test")
    api.patch("/domains/enforced.test/mta-sts", json={"max_age": 1209600})
    third = txt_value(api, "enforced.test")
    assert len({first, second, third}) == 3
    change = api.patch("/domains/enforced.test/mta-sts", json={"max_age": 1209600}).json()
    assert change["before"] == change["after"] and txt_value(api, "enforced.test") == third
    policy = parse_policy(fetch(policy_client(web), "mta-sts.enforced.test").text)
    assert (policy.mode, policy.max_age) == ("testing", 1209600)
    entries = [e for e in api.get("/audit").json() if e["action"] == "domain.mta_sts" and e["target"] == "enforced.test"]
    assert {(e["after"] or {}).get("mta_sts_max_age") for e in entries} >= {604800, 1209600}


def test_a_changed_mx_list_in_the_settings_renews_the_id(web, served):
    api = served
    before = txt_value(api, "enforced.test")
    web.gw.settings.server.mx_hosts = ["mx3.gw.test"]
    after = txt_value(api, "enforced.test")
    assert after != before
    assert parse_policy(fetch(policy_client(web), "mta-sts.enforced.test").text).mx == ("mx3.gw.test",)
    audit = api.get("/audit").json()
    assert any(e["action"] == "domain.mta_sts" and e["actor"] == "system" for e in audit)


def test_bad_settings_are_refused_naming_the_field(web, served):
    api = served
    reply = api.patch("/domains/enforced.test/mta-sts", json={"max_age": 3600})
    assert reply.status_code == 422 and reply.json()["detail"][0]["loc"][-1] == "max_age"
    assert api.patch("/domains/enforced.test/mta-sts", json={"max_age": 31557601}).status_code == 422
    assert api.patch("/domains/enforced.test/mta-sts", json={"mode": "strict"}).status_code == 422
    assert api.patch("/domains/nope.test/mta-sts", json={"mode": "enforce"}).status_code == 404
    with pytest.raises(Exception, match="mta_sts_max_age: must be between 86400 and 31557600"):
        hosted_sts.validate_settings(None, "60")


def test_an_org_admin_cannot_see_another_organizations_policy_settings(web, served):
    tenant = web.tenant("Acme", "ops@acme.test")
    api = web.api(tenant.key)
    assert api.get("/domains/enforced.test/mta-sts").status_code == 404
    assert api.patch("/domains/enforced.test/mta-sts", json={"mode": "off"}).status_code == 404
    assert api.post("/domains/enforced.test/dns-check").status_code == 404


# -- hostile Host headers -----------------------------------------------------------------------

BASES = ["mta-sts.enforced.test", "mta-sts.testing.test", "mta-sts.off.test", "mta-sts.unknown.test",
         "enforced.test", "mta-sts.", "mta-sts.enforced.test.testing.test", "mta-sts.testing.test.enforced.test",
         "mta-sts.mta-sts.enforced.test", "127.0.0.1"]
SUFFIXES = ["", ".", ":443", ".:8443", ":", ":99999", ":44x", "..", "/x", "@testing.test", " ", "\u0430", "%2e",
            "\x00"]
SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=6)


@st.composite
def host_headers(draw) -> str:
    base = draw(st.sampled_from(BASES))
    mask = draw(st.integers(0, 2 ** len(base) - 1))
    base = "".join(c.upper() if mask >> i & 1 else c for i, c in enumerate(base))
    # Mostly one change at a time: a variant of a served name is the interesting case.
    prefix = draw(st.sampled_from(["", "", "", " ", "x", "mta-sts.", "\u00e9", "*."]) | SAFE_TEXT)
    suffix = draw(st.sampled_from(SUFFIXES) | SAFE_TEXT)
    return prefix + base + suffix


def _names_policy_of(host: str) -> str | None:
    """Which served domain a Host value names, by RFC 9110 (case-insensitive host, optional
    ``:port``) and DNS (one optional root dot); written apart from the implementation."""
    value = host.strip(" \t").lower()  # RFC 9110 5.5: surrounding whitespace is not part of a field value
    for domain in ("enforced.test", "testing.test"):
        name = "mta-sts." + domain
        if value == name or re.fullmatch(re.escape(name) + r"\.?(:[0-9]{1,5})?", value):
            return domain
    return None


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(host=host_headers())
@example(host="mta-sts.enforced.test:44x")
@example(host="mta-sts.enforced.test..")
@example(host="mta-sts.testing.test.enforced.test")
@example(host="xmta-sts.enforced.test")
@example(host="mta-sts.enforced.test@testing.test")
@example(host="mta-sts.enforced.te\u0455t")
@example(host="mta-sts.ENFORCED.test.:443")
def test_host_header_variants_never_serve_another_domains_policy_or_fail(web, served, host):
    if not hasattr(web, "policy_client"):
        web.policy_client = policy_client(web)  # one connection for every example
    client = web.policy_client
    try:
        reply = fetch(client, host.encode("utf-8"))
    except httpx.LocalProtocolError:
        return  # the client library refuses to send such a header at all: nothing reached the server
    assert reply.status_code < 500, (host, reply.status_code)
    domain = _names_policy_of(host)
    if reply.status_code == 200 and hosted_sts.is_policy_host(host):
        assert domain is not None, (host, reply.text)
        expected = {"enforced.test": "enforce", "testing.test": "testing"}[domain]
        assert parse_policy(reply.text).mode == expected, host
    elif domain is not None:
        assert reply.status_code == 200, (host, reply.status_code)
    if hosted_sts.is_policy_host(host) and reply.status_code == 404:
        assert "location" not in reply.headers


# -- end to end: the gateway's own MTA-STS client fetches the hosted policy -------------------------

def test_the_delivery_resolver_fetches_and_applies_the_hosted_policy(web, served, sts_dns, ca_file):
    api = served
    api.patch("/domains/e2e.test/mta-sts", json={"mode": "enforce", "max_age": 86400})
    policy_id = txt_value(api, "e2e.test").strip('"').split("id=")[1]
    sts_dns.set_records("_mta-sts.e2e.test", "TXT", [TXT(f"v=STSv1; id={policy_id}")])
    sts_dns.set_records("mta-sts.e2e.test", "A", [A("127.0.0.1")])
    sts_dns.set_records("mail.elsewhere.test", "A", [A("127.0.0.1")])
    forget_cached_lookups()
    port = int(web.url.rsplit(":", 1)[1])
    # The fetcher deliveries use: TXT through the DNS server, then HTTPS to mta-sts.e2e.test with
    # SNI and Host for that name and the certificate checked against the test CA.
    fetcher = sts_fetcher([sts_dns.address], 2.0, str(ca_file), port)
    policy = web.run(fetcher.policy("e2e.test"))
    assert policy == StsPolicy("enforce", tuple(MX_HOSTS), 86400, policy_id)

    async def decide(host: str):
        return await resolve_server_policy(DownstreamTls.MTA_STS, host, 25, dns_servers=[sts_dns.address],
                                           timeout=2.0, policy_domain="e2e.test", sts=fetcher)

    decided = web.run(decide("mx1.gw.test"))
    assert decided.source == "mta-sts" and decided.mode is DownstreamTls.VERIFY
    with pytest.raises(PolicyRefusal, match="does not match the MTA-STS mx patterns"):
        web.run(decide("mail.elsewhere.test"))


# -- DNS check ----------------------------------------------------------------------------------------

def publish(sts_dns, domain: str, policy_id: str | None, *, mx: list[str] | None = None, tlsrpt: bool = True) -> None:
    sts_dns.set_records(domain, "MX", [MX(h, 10) for h in (MX_HOSTS if mx is None else mx)])
    sts_dns.set_records(f"mta-sts.{domain}", "CNAME", [CNAME("mx.gw.test")])
    sts_dns.set_records(f"_mta-sts.{domain}", "TXT", [TXT(f"v=STSv1; id={policy_id}")] if policy_id else [])
    sts_dns.set_records(f"_smtp._tls.{domain}", "TXT",
                        [TXT(f"v=TLSRPTv1; rua=mailto:tlsrpt@{domain}")] if tlsrpt else [])


def statuses(checks: list[dict]) -> dict[str, str]:
    return {f"{c['name']} {c['type']}": c["status"] for c in checks}


def test_dns_check_says_ok_mismatch_and_missing(web, served, sts_dns):
    api = served
    policy_id = txt_value(api, "enforced.test").strip('"').split("id=")[1]
    publish(sts_dns, "enforced.test", policy_id)
    checks = api.post("/domains/enforced.test/dns-check").json()
    assert statuses(checks) == {"enforced.test. MX": "ok", "mta-sts.enforced.test. CNAME": "ok",
                                "_mta-sts.enforced.test. TXT": "ok", "_smtp._tls.enforced.test. TXT": "ok"}
    sts_txt = next(c for c in checks if c["name"] == "_mta-sts.enforced.test.")
    assert sts_txt["found"] == [f"v=STSv1; id={policy_id}"] and sts_txt["expected"] == f"v=STSv1; id={policy_id}"

    publish(sts_dns, "enforced.test", "20200101000000abcdef12", mx=[*MX_HOSTS, "old-mx.elsewhere.test"])
    sts_dns.set_records("mta-sts.enforced.test", "CNAME", [])
    sts_dns.set_records("mta-sts.enforced.test", "A", [A("192.0.2.7")])
    checks = api.post("/domains/enforced.test/dns-check").json()
    assert statuses(checks) == {"enforced.test. MX": "mismatch", "mta-sts.enforced.test. CNAME": "mismatch",
                                "_mta-sts.enforced.test. TXT": "mismatch", "_smtp._tls.enforced.test. TXT": "ok"}
    assert "old-mx.elsewhere.test" in checks[0]["detail"]
    assert "20200101000000abcdef12" in checks[2]["detail"]

    checks = api.post("/domains/testing.test/dns-check").json()  # nothing published for it
    assert set(statuses(checks).values()) == {"missing"}

    # Off: no policy host row, and an _mta-sts record left behind is a mismatch.
    publish(sts_dns, "off.test", "20200101000000abcdef12")
    checks = api.post("/domains/off.test/dns-check").json()
    assert statuses(checks) == {"off.test. MX": "ok", "_mta-sts.off.test. TXT": "mismatch",
                                "_smtp._tls.off.test. TXT": "ok"}


def test_dns_check_reports_a_resolver_that_does_not_answer(web, served):
    web.gw.settings.downstream.dns_servers = ["127.0.0.1:9"]  # nothing listens (discard port)
    web.gw.settings.downstream.dns_timeout = 0.5
    checks = served.post("/domains/enforced.test/dns-check").json()
    assert {c["status"] for c in checks} == {"error"}
    assert all("lookup failed" in c["detail"] for c in checks)


# -- console and CLI ----------------------------------------------------------------------------------

def test_console_section_sets_the_policy_shows_records_and_checks_dns(web, served, sts_dns):
    client, _ = web.login("admin@gw.test")
    page = client.get("/domains/off.test").text
    assert "MTA-STS and TLS-RPT" in page and "No policy is served (mode off)." in page
    token = csrf_token(page)
    reply = client.post("/domains/off.test/mta-sts", data={"csrf_token": token, "mta_sts_mode": "enforce",
                                                           "mta_sts_max_age": "172800"})
    assert reply.status_code == 303 and reply.headers["location"] == "/domains/off.test?sts_saved=1#mta-sts"
    page = client.get("/domains/off.test?sts_saved=1").text
    policy_id = txt_value(served, "off.test").strip('"').split("id=")[1]
    assert 'id="sts-saved"' in page and f"v=STSv1; id={policy_id}" in page.replace("&#34;", '"')
    assert "https://mta-sts.off.test/.well-known/mta-sts.txt" in page
    assert "10 mx1.gw.test." in page and "10 mx2.gw.test." in page
    assert "v=TLSRPTv1; rua=mailto:tlsrpt@off.test" in page
    assert parse_policy(fetch(policy_client(web), "mta-sts.off.test").text).max_age == 172800

    bad = client.post("/domains/off.test/mta-sts", data={"csrf_token": token, "mta_sts_mode": "enforce",
                                                         "mta_sts_max_age": "60"})
    assert bad.status_code == 422 and 'id="sts-error">mta_sts_max_age: must be between' in bad.text
    assert 'name="mta_sts_max_age" type="number"' in bad.text and 'aria-invalid="true"' in bad.text
    no_token = client.post("/domains/off.test/mta-sts", data={"mta_sts_mode": "off"})
    assert no_token.status_code == 403

    publish(sts_dns, "off.test", policy_id, tlsrpt=False)
    checked = client.post("/domains/off.test/dns-check", data={"csrf_token": token})
    assert checked.status_code == 200
    rows = re.findall(r'<tr class="dns-check-row"><td class="mono">([^<]+)</td>.*?<strong>(\w+)</strong>',
                      checked.text, re.S)
    assert rows == [("off.test. MX", "ok"), ("mta-sts.off.test. CNAME", "ok"), ("_mta-sts.off.test. TXT", "ok"),
                    ("_smtp._tls.off.test. TXT", "missing")]


def mx_cli(data_dir: Path, sts_dns, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MXGUARD_DOWNSTREAM__DNS_SERVERS": sts_dns.address,
           "MXGUARD_SERVER__MX_HOSTS": ",".join(MX_HOSTS), "COLUMNS": "200"}
    return subprocess.run([MXGUARD, "--data-dir", str(data_dir), "domain", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_cli_sets_the_policy_and_checks_dns(web, served, sts_dns, data_dir):
    out = mx_cli(data_dir, sts_dns, "mta-sts", "testing.test", "--mode", "enforce", "--max-age", "1209600")
    assert out.returncode == 0, out.stderr
    assert "note: the policy changed: publish _mta-sts.testing.test with id" in " ".join(out.stderr.split())
    shown = json.loads(mx_cli(data_dir, sts_dns, "mta-sts", "testing.test", "--json").stdout)
    assert (shown["mode"], shown["max_age"], shown["mx"]) == ("enforce", 1209600, MX_HOSTS)
    assert parse_policy(fetch(policy_client(web), "mta-sts.testing.test").text).max_age == 1209600
    text = mx_cli(data_dir, sts_dns, "mta-sts", "testing.test").stdout
    assert f'_mta-sts.testing.test. IN TXT "v=STSv1; id={shown["policy_id"]}"' in text

    bad = mx_cli(data_dir, sts_dns, "mta-sts", "testing.test", "--max-age", "10")
    assert bad.returncode == 2 and "mta_sts_max_age: must be between 86400 and 31557600" in bad.stderr
    assert "Traceback" not in bad.stderr

    missing = mx_cli(data_dir, sts_dns, "dns-check", "testing.test", "--json")
    assert missing.returncode == 1 and {c["status"] for c in json.loads(missing.stdout)} == {"missing"}
    publish(sts_dns, "testing.test", shown["policy_id"])
    ok = mx_cli(data_dir, sts_dns, "dns-check", "testing.test")
    assert ok.returncode == 0, ok.stdout
    assert ok.stdout.count(" ok") >= 4 and "mismatch" not in ok.stdout
    audit = [e for e in served.get("/audit").json() if e["action"] == "domain.mta_sts" and e["target"] == "testing.test"]
    assert any(e["actor"].startswith("cli:") for e in audit)


# -- settings --------------------------------------------------------------------------------------

def test_mx_hosts_setting_is_validated_at_start_naming_the_key(tmp_path):
    path = tmp_path / "d"
    init_data_dir(path, hostname="mx9.example.net")
    assert load_settings(path, environ={}).mx_hosts == ["mx9.example.net"]
    assert load_settings(path, environ={"MXGUARD_SERVER__MX_HOSTS": "MX1.example.net., mx2.example.net"}
                         ).mx_hosts == ["mx1.example.net", "mx2.example.net"]
    for bad in ("192.0.2.1", "mx1.example.net,mx1.example.net", "*.example.net", "mx_1.example.net", "localhost"):
        with pytest.raises(ConfigError, match=r"setting 'server\.mx_hosts'"):
            load_settings(path, environ={"MXGUARD_SERVER__MX_HOSTS": bad})
    assert "[server]" in (path / "mxguard.toml").read_text() and "mx_hosts = []" in (path / "mxguard.toml").read_text()


# -- a real browser -----------------------------------------------------------------------------------

def test_the_section_in_a_real_browser(web, served, sts_dns):
    from playwright.sync_api import expect, sync_playwright

    from tests.support.browser import ARTIFACTS, CHROMIUM_ARGS, chromium_path
    from tests.support.web import PASSWORD

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.goto(web.url + "/domains/off.test")
        page.fill("input[name=email]", "admin@gw.test")
        page.fill("input[name=password]", PASSWORD)
        page.click("button:has-text('Log in')")
        section = page.locator("#mta-sts")
        expect(section.locator("h2")).to_have_text("MTA-STS and TLS-RPT")
        expect(page.locator("#policy-url")).to_contain_text("No policy is served")
        page.select_option("select[name=mta_sts_mode]", "enforce")
        page.fill("input[name=mta_sts_max_age]", "259200")
        page.click("#save-mta-sts")
        expect(page.locator("#sts-saved")).to_be_visible()
        expect(page.locator("#policy-text")).to_contain_text("mode: enforce")
        expect(page.locator("#policy-text")).to_contain_text("max_age: 259200")
        policy_id = txt_value(served, "off.test").strip('"').split("id=")[1]
        expect(page.locator("#dns-records")).to_contain_text(f'"v=STSv1; id={policy_id}"')
        publish(sts_dns, "off.test", policy_id)
        page.click("#dns-check")
        result = page.locator("#dns-check-result")
        expect(result.locator("td.check-status")).to_have_count(4)
        expect(result.locator("td.check-status.bad")).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / "hosted-mta-sts.png"), full_page=True)
        context.close()
        browser.close()
    assert problems == []


def test_a_gateway_started_with_other_mx_hosts_renews_the_ids(tmp_path, loopback_dns):
    from sqlalchemy import select

    from mxguard.services import domains
    from mxguard.storage.models import Domain
    from tests.conftest import gateway_environ
    from tests.support.gateway import ThreadedGateway

    path = tmp_path / "d"
    init_data_dir(path)
    settings_ = load_settings(path, environ=gateway_environ(loopback_dns, MXGUARD_SERVER__MX_HOSTS="mx1.gw.test"))
    gw = ThreadedGateway(settings_).start()
    try:
        gw.run(domains.add_domain(gw.store, "renew.test", ["127.0.0.1:2525"]))
        _, first = gw.run(hosted_sts.set_hosted_policy(gw.store, "renew.test", settings_.mx_hosts, "mx.gw.test",
                                                       mode="enforce"))
        assert gw.run(hosted_sts.renew_changed_ids(gw.store, settings_.mx_hosts)) == []
    finally:
        gw.stop()
    settings_ = load_settings(path, environ=gateway_environ(loopback_dns, MXGUARD_SERVER__MX_HOSTS="mx7.gw.test"))
    gw = ThreadedGateway(settings_).start()
    try:
        async def stored_id() -> str:
            async with gw.store.session() as session:
                return await session.scalar(select(Domain.mta_sts_id).where(Domain.name == "renew.test"))

        renewed = gw.run(stored_id())  # read raw: renewed at start, before anything asked for it
        assert renewed != first.policy_id
        now = gw.run(hosted_sts.get_hosted_policy(gw.store, "renew.test", ["mx7.gw.test"], "mx.gw.test"))
        assert now.policy_id == renewed and now.mx == ("mx7.gw.test",)
    finally:
        gw.stop()


def test_curl_fetches_the_policy_with_the_sni_certificate_of_its_host(web, served, tmp_path):
    """curl, as a sending MTA's policy fetcher would (RFC 8461 3.3: HTTPS, PKIX-valid for
    ``mta-sts.<domain>``, no redirects): the name resolves to the gateway, SNI picks the
    certificate added for that host (from a CA the gateway's own certificate is not from), and
    curl verifies it against that CA only. Without the SNI certificate the same fetch fails."""
    from tests.test_sni_certificates import MiniCA

    other_ca = MiniCA()
    root = tmp_path / "sni-root.pem"
    root.write_bytes(other_ca.root_pem)
    port = int(web.url.rsplit(":", 1)[1].rstrip("/"))
    host = "mta-sts.enforced.test"

    def curl() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["curl", "--silent", "--show-error", "--max-time", "20", "--proto", "=https", "--max-redirs", "0",
             "--cacert", str(root), "--resolve", f"{host}:{port}:127.0.0.1", "--write-out", "\n%{http_code} %{content_type}",
             f"https://{host}:{port}{POLICY_PATH}"], capture_output=True, timeout=60)

    before = curl()
    assert before.returncode != 0 and b"certificate" in before.stderr.lower(), before  # the gateway's own CA
    leaf = other_ca.issue(host)
    reply = served.post("/tls/certificates", json={"name": host, "certificate_pem": leaf.chain_pem.decode(),
                                                   "key_pem": leaf.key_pem.decode()})
    assert reply.status_code == 201, reply.text
    after = curl()
    assert after.returncode == 0, after.stderr
    body, status = after.stdout.rsplit(b"\n", 1)
    assert status.startswith(b"200 text/plain"), status
    fields = rfc8461_fields(body)  # the bytes as served: CRLF line ends
    assert fields["mode"] == ["enforce"] and fields["mx"] == MX_HOSTS
