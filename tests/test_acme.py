"""ACME (RFC 8555) against a real pebble on loopback: issuance through the real CLI, the certificate
presented by SNI on STARTTLS and HTTPS (verified against pebble's issuing root), failed challenges,
renewal by the running gateway and by ``tls acme renew``, requests and renewals through the REST API
and the console's TLS page, the settings' start-up checks, and the HTTP-01 responder's one path.

pebble's validation authority resolves the test names through the loopback DNS server and connects to
the responder's port on the address it got; every name here is under ``acme.test``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import http.client
import json
import ssl
import stat
import tempfile
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dnslib import A
from hypothesis import HealthCheck, given, settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import func, select

from mxguard.config import load_settings
from mxguard.errors import ConfigError
from mxguard.services import sni_certificates as sni
from mxguard.storage.db import Store
from mxguard.storage.models import AcmeChallenge
from mxguard.tls import acme_store
from mxguard.tls.acme_renewal import renew_due
from mxguard.storage.sealing import KeyRing
from mxguard.web.acme_http01 import PREFIX, responder_server
from tests.conftest import gateway_environ
from tests.support.gateway import LoopThread, ThreadedGateway
from tests.support.peers import free_port
from tests.support.pebble import PebbleInstance
from tests.test_cli import mx
from tests.test_sni_certificates import https_sha256, s_client_sha256, starttls_sha256, wait_for

pytestmark = pytest.mark.slow

#: The port pebble's VA connects to for HTTP-01: the responder's (the CLI's or a gateway's).
RESPONDER_PORT = free_port()
NAMES_AT_LOOPBACK = ("mx.acme.test", "mail.acme.test", "www.acme.test", "renew.acme.test", "api.acme.test",
                     "console.acme.test")


@pytest.fixture(scope="module")
def pebble(loopback_dns):
    for name in NAMES_AT_LOOPBACK:
        loopback_dns.set_records(name, "A", [A("127.0.0.1")])
    # Nothing listens on 127.0.0.2: the responder is bound to 127.0.0.1 only.
    loopback_dns.set_records("dead.acme.test", "A", [A("127.0.0.2")])
    instance = PebbleInstance(Path(tempfile.mkdtemp(prefix="mxguard-pebble-")), loopback_dns.address,
                              RESPONDER_PORT).start()
    yield instance
    instance.stop()


def acme_env(pebble: PebbleInstance, **extra: str) -> dict[str, str]:
    return {"MXGUARD_ACME__DIRECTORY_URL": pebble.directory_url, "MXGUARD_ACME__CA_FILE": str(pebble.ca_file),
            "MXGUARD_ACME__HTTP_LISTEN": f"127.0.0.1:{RESPONDER_PORT}",
            "MXGUARD_ACME__CONTACT_EMAIL": "hostmaster@acme.test", **extra}


def start_gateway(data_dir: Path, loopback_dns, pebble, *, web: bool = False, **extra: str) -> ThreadedGateway:
    s = load_settings(data_dir, environ=gateway_environ(loopback_dns, **acme_env(pebble, **extra)))
    return ThreadedGateway(s, web_listen="127.0.0.1:0" if web else None).start()


def stored(data_dir: Path) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(mx("tls", "cert", "list", "--json", data_dir=data_dir).stdout)}


def token_rows(data_dir: Path) -> int:
    async def count() -> int:
        store = Store(load_settings(data_dir, environ={}).effective_database_url)
        try:
            async with store.session() as session:
                return (await session.execute(select(func.count()).select_from(AcmeChallenge))).scalar_one()
        finally:
            await store.close()
    return asyncio.run(count())


def sha256_of_file_cert(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- issuance end to end ---------------------------------------------------------------------

def test_issued_through_the_cli_then_presented_by_sni(pebble, loopback_dns, data_dir, tmp_path):
    env = acme_env(pebble)
    # The gateway is not running: the CLI runs the responder for the order's duration.
    out = mx("tls", "acme", "issue", "--name", "MX.acme.test", "--name", "mail.acme.test", data_dir=data_dir,
             env=env, timeout=180)
    assert "Issued certificate for mx.acme.test, mail.acme.test" in out.stdout, out.stdout + out.stderr
    certs = stored(data_dir)
    assert set(certs) == {"mx.acme.test", "mail.acme.test"}
    fp = certs["mx.acme.test"]["fingerprint"]
    assert certs["mail.acme.test"]["fingerprint"] == fp and fp in out.stdout
    assert set(certs["mx.acme.test"]["sans"]) == {"mx.acme.test", "mail.acme.test"}
    status = json.loads(mx("tls", "acme", "status", "--json", data_dir=data_dir, env=env).stdout)
    assert [(e["name"], e["names"], e["last_error"]) for e in status] == [
        ("mx.acme.test", ["mx.acme.test", "mail.acme.test"], None)]
    assert status[0]["directory_url"] == pebble.directory_url
    key_file = data_dir / "acme" / "account.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert token_rows(data_dir) == 0  # withdrawn once the order is over

    root = tmp_path / "pebble-root.pem"
    root.write_bytes(pebble.root_pem())
    verify = ssl.create_default_context(cafile=str(root))
    gateway_fp = sha256_of_file_cert(data_dir / "tls" / "cert.pem")
    gw = start_gateway(data_dir, loopback_dns, pebble, web=True)
    try:
        web_port = int(gw.web_url.rsplit(":", 1)[1])
        for name in ("mx.acme.test", "mail.acme.test"):
            presented, verified = s_client_sha256(gw.port, name, root)
            assert presented == fp and verified == "Verify return code: 0 (ok)", (name, verified)
            assert https_sha256(web_port, name, verify) == fp
        assert starttls_sha256(gw.port, "other.acme.test") == gateway_fp
        with pytest.raises(ssl.SSLCertVerificationError):
            https_sha256(web_port, "other.acme.test", verify)

        # While the gateway runs it holds the port: the CLI's order is answered by the gateway's responder.
        again = mx("tls", "acme", "issue", "--name", "www.acme.test", data_dir=data_dir, env=env, timeout=180)
        assert "Issued certificate for www.acme.test" in again.stdout
        assert "the running gateway answers the HTTP-01 challenges" in again.stderr
        www_fp = stored(data_dir)["www.acme.test"]["fingerprint"]
        wait_for(lambda: starttls_sha256(gw.port, "www.acme.test", verify) == www_fp, timeout=15,
                 what="the certificate issued while the gateway runs")

        # Issuing for a stored name needs --replace (before any order is made).
        dup = mx("tls", "acme", "issue", "--name", "www.acme.test", data_dir=data_dir, env=env, check=False)
        assert dup.returncode == 1 and "stored already" in dup.stderr and "Traceback" not in dup.stderr
    finally:
        gw.stop()


# -- failures --------------------------------------------------------------------------------

def test_a_failed_challenge_says_what_the_ca_said_and_stores_nothing(pebble, loopback_dns, data_dir):
    env = acme_env(pebble)
    proc = mx("tls", "acme", "issue", "--name", "dead.acme.test", data_dir=data_dir, env=env, check=False,
              timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the CA could not validate the challenge: dead.acme.test:" in proc.stderr, proc.stderr
    assert "127.0.0.2" in proc.stderr and "Traceback" not in proc.stderr  # pebble's detail: where it connected
    # A name with no address at all: pebble's DNS problem, in one line.
    proc = mx("tls", "acme", "issue", "--name", "nowhere.acme.test", data_dir=data_dir, env=env, check=False,
              timeout=180)
    assert proc.returncode == 1 and "could not validate the challenge: nowhere.acme.test:" in proc.stderr
    assert stored(data_dir) == {}
    assert json.loads(mx("tls", "acme", "status", "--json", data_dir=data_dir, env=env).stdout) == []
    assert token_rows(data_dir) == 0

    # The CA unreachable, or its HTTPS not trusted (no acme.ca_file): one line saying which.
    closed = acme_env(pebble, MXGUARD_ACME__DIRECTORY_URL=f"https://127.0.0.1:{free_port()}/dir")
    proc = mx("tls", "acme", "issue", "--name", "mx.acme.test", data_dir=data_dir, env=closed, check=False)
    assert proc.returncode == 1 and "registering the account: cannot reach the ACME server" in proc.stderr
    untrusted = acme_env(pebble, MXGUARD_ACME__CA_FILE="")
    proc = mx("tls", "acme", "issue", "--name", "mx.acme.test", data_dir=data_dir, env=untrusted, check=False)
    assert proc.returncode == 1 and "certificate is not trusted (acme.ca_file)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr

    # A wildcard cannot be validated by HTTP-01: refused before anything is ordered.
    proc = mx("tls", "acme", "issue", "--name", "*.acme.test", data_dir=data_dir, env=env, check=False)
    assert proc.returncode == 2 and "cannot be validated by HTTP-01" in proc.stderr
    # ACME off: the key to set is named.
    proc = mx("tls", "acme", "issue", "--name", "mx.acme.test", data_dir=data_dir, check=False)
    assert proc.returncode == 2 and "acme.directory_url is empty" in proc.stderr


def test_a_port_held_by_another_responder_is_refused(pebble, loopback_dns, data_dir, tmp_path):
    from tests.support.gateway import init_data_dir
    other_dir = tmp_path / "other"
    init_data_dir(other_dir)
    other = start_gateway(other_dir, loopback_dns, pebble)  # its responder reads another database
    try:
        proc = mx("tls", "acme", "issue", "--name", "mx.acme.test", data_dir=data_dir, env=acme_env(pebble),
                  check=False, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "acme.http_listen" in proc.stderr and "not this gateway's HTTP-01 responder" in proc.stderr
        # A second gateway cannot start with the port taken: start-up stops, naming the key.
        with pytest.raises(ConfigError, match=r"acme\.http_listen: cannot listen on 127\.0\.0\.1:"):
            start_gateway(data_dir, loopback_dns, pebble)
    finally:
        other.stop()
    assert stored(data_dir) == {}


# -- renewal ---------------------------------------------------------------------------------

def test_the_gateway_renews_a_certificate_near_expiry(pebble, loopback_dns, data_dir, tmp_path):
    env = acme_env(pebble)
    mx("tls", "acme", "issue", "--name", "renew.acme.test", data_dir=data_dir, env=env, timeout=180)
    issued = stored(data_dir)["renew.acme.test"]
    # Renewed now from the command line (no gateway running: the CLI runs the responder).
    out = mx("tls", "acme", "renew", "--name", "Renew.acme.test", data_dir=data_dir, env=env, timeout=180)
    assert out.stdout.startswith("Renewed certificate for renew.acme.test"), out.stdout + out.stderr
    first = stored(data_dir)["renew.acme.test"]
    assert first["fingerprint"] != issued["fingerprint"] and first["fingerprint"] in out.stdout
    unknown = mx("tls", "acme", "renew", "--name", "www.acme.test", data_dir=data_dir, env=env, check=False)
    assert unknown.returncode != 0 and "ACME issued no certificate for www.acme.test" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    assert first["days_left"] > 365  # pebble's validity: years

    # With the default window (30 days) nothing is due.
    s = load_settings(data_dir, environ=acme_env(pebble))
    store = Store(s.effective_database_url)
    try:
        assert asyncio.run(renew_due(s, store, KeyRing(s.path(s.sealing_key_file)))) == {}
    finally:
        asyncio.run(store.close())
    assert stored(data_dir)["renew.acme.test"]["fingerprint"] == first["fingerprint"]

    # A window longer than pebble's validity makes it due: the gateway's loop (1 s here) renews it.
    root = tmp_path / "root.pem"
    root.write_bytes(pebble.root_pem())
    verify = ssl.create_default_context(cafile=str(root))
    gw = start_gateway(data_dir, loopback_dns, pebble, MXGUARD_ACME__RENEW_BEFORE_DAYS="5000",
                       MXGUARD_ACME__CHECK_INTERVAL="1")
    try:
        def renewed_fp() -> str | None:
            fp = gw.run(sni.stored_fingerprints(gw.store)).get("renew.acme.test")
            return fp if fp != first["fingerprint"] else None
        wait_for(lambda: renewed_fp() is not None, timeout=60, what="the renewal")
        wait_for(lambda: starttls_sha256(gw.port, "renew.acme.test", verify) != first["fingerprint"], timeout=15,
                 what="the renewed certificate on STARTTLS")
        entries = gw.run(acme_store.list_entries(gw.store))
        assert [(e.name, e.last_error) for e in entries] == [("renew.acme.test", None)]

        # A renewal that fails (the name now points where nothing answers) is recorded; the
        # current certificate stays in use.
        loopback_dns.set_records("renew.acme.test", "A", [A("127.0.0.2")])
        wait_for(lambda: (gw.run(acme_store.list_entries(gw.store))[0].last_error or "").startswith(
            "the CA could not validate the challenge"), timeout=60, what="the failed renewal")
        kept = gw.run(sni.stored_fingerprints(gw.store))["renew.acme.test"]
        assert starttls_sha256(gw.port, "renew.acme.test", verify) == kept
        status = mx("tls", "acme", "status", data_dir=data_dir, env=env).stdout
        assert "renew.acme.test" in status and "could not validate" in status
    finally:
        loopback_dns.set_records("renew.acme.test", "A", [A("127.0.0.1")])
        gw.stop()


# -- the REST API and the console -------------------------------------------------------------

def test_request_and_renew_through_the_api_and_the_console(pebble, loopback_dns, data_dir, tmp_path):
    from tests.support.web import WebGateway, csrf_token
    root = tmp_path / "root.pem"
    root.write_bytes(pebble.root_pem())
    verify = ssl.create_default_context(cafile=str(root))
    gw = start_gateway(data_dir, loopback_dns, pebble, web=True)
    web = WebGateway(gw, data_dir / "tls" / "cert.pem")
    try:
        web.add_user("admin@gw.test", "admin")
        api = web.api(web.api_key("admin@gw.test"))
        status = api.get("/tls/acme").json()
        assert (status["enabled"], status["directory_url"], status["certificates"]) == (True, pebble.directory_url, [])

        # The API orders (the running gateway's responder answers the CA) and the name is served by SNI.
        created = api.post("/tls/acme/certificates", json={"names": ["API.acme.test"]})
        assert created.status_code == 201, created.text
        assert created.json()["names"] == ["api.acme.test"]
        first = created.json()["certificates"][0]["sha256"]
        wait_for(lambda: starttls_sha256(gw.port, "api.acme.test", verify) == first, timeout=15,
                 what="the certificate ordered through the API")
        [entry] = api.get("/tls/acme").json()["certificates"]
        assert (entry["name"], entry["state"], entry["last_error"]) == ("api.acme.test", "valid", None)
        # Refusals, each with its status and message: wildcard 422, stored name 409, CA refusal 502, unknown 404.
        wildcard = api.post("/tls/acme/certificates", json={"names": ["*.acme.test"]})
        assert wildcard.status_code == 422 and "HTTP-01" in wildcard.json()["detail"][0]["msg"]
        assert api.post("/tls/acme/certificates", json={"names": ["api.acme.test"]}).status_code == 409
        dead = api.post("/tls/acme/certificates", json={"names": ["dead.acme.test"]})
        assert dead.status_code == 502 and "could not validate the challenge: dead.acme.test" in dead.json()["detail"]
        assert api.post("/tls/acme/renew", json={"name": "dead.acme.test"}).status_code == 404

        # The console: the section lists the name; "request" and "renew" buttons.
        console, reply = web.login("admin@gw.test")
        assert reply.status_code == 303
        page = console.get("/tls")
        assert 'id="acme"' in page.text and "api.acme.test" in page.text and pebble.directory_url in page.text
        token = csrf_token(page.text)
        assert console.post("/tls/acme/request", data={"names": "console.acme.test"}).status_code == 403  # no token
        requested = console.post("/tls/acme/request", data={"names": "console.acme.test", "csrf_token": token})
        assert requested.status_code == 303 and requested.headers["location"] == "/tls?acme_saved=issued#acme"
        renewed = console.post("/tls/acme/renew", data={"name": "api.acme.test", "csrf_token": token})
        assert renewed.status_code == 303, renewed.text
        certs = {c["name"]: c["sha256"] for c in api.get("/tls/certificates").json()}
        assert set(certs) == {"api.acme.test", "console.acme.test"} and certs["api.acme.test"] != first
        wait_for(lambda: starttls_sha256(gw.port, "api.acme.test", verify) == certs["api.acme.test"], timeout=15,
                 what="the renewed certificate on STARTTLS")
        bad = console.post("/tls/acme/request", data={"names": "*.acme.test", "csrf_token": token})
        assert bad.status_code == 422 and 'id="acme-error"' in bad.text and "HTTP-01" in bad.text

        # A renewal the CA refuses: 502 saying why, recorded as the status's last error, the certificate kept.
        loopback_dns.set_records("console.acme.test", "A", [A("127.0.0.2")])
        failed = api.post("/tls/acme/renew", json={"name": "console.acme.test"})
        assert failed.status_code == 502 and "could not validate the challenge" in failed.json()["detail"]
        states = {e["name"]: (e["state"], e["last_error"]) for e in api.get("/tls/acme").json()["certificates"]}
        assert states["api.acme.test"] == ("valid", None)
        assert states["console.acme.test"][0] == "failed" and "127.0.0.2" in states["console.acme.test"][1]
        assert {c["name"]: c["sha256"] for c in api.get("/tls/certificates").json()} == certs
        page = console.get("/tls").text
        assert "state-failed" in page and "could not validate the challenge" in page
    finally:
        loopback_dns.set_records("console.acme.test", "A", [A("127.0.0.1")])
        web.close()
        gw.stop()


# -- settings --------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, text", [
    ("HTTP_LISTEN", "127.0.0.1:99999", "acme.http_listen"),
    ("DIRECTORY_URL", "ftp://ca.example/dir", "acme.directory_url"),
    ("CONTACT_EMAIL", "not an address", "acme.contact_email"),
    ("RENEW_BEFORE_DAYS", "0", "acme.renew_before_days"),
])
def test_bad_acme_settings_stop_start_up_naming_the_key(data_dir, key, value, text):
    with pytest.raises(ConfigError) as info:
        load_settings(data_dir, environ={f"MXGUARD_ACME__{key}": value})
    assert text in str(info.value) and f"MXGUARD_ACME__{key}" in str(info.value)


def test_acme_files_are_checked_at_start_up(data_dir, tmp_path):
    on = {"MXGUARD_ACME__DIRECTORY_URL": "https://ca.acme.test/dir"}
    with pytest.raises(ConfigError, match=r"acme\.ca_file.*not a readable PEM CA bundle"):
        load_settings(data_dir, environ={**on, "MXGUARD_ACME__CA_FILE": str(tmp_path / "missing.pem")})
    bad_key = tmp_path / "account.key"
    bad_key.write_text("not a key")
    with pytest.raises(ConfigError, match=r"acme\.account_key_file.*not an unencrypted PEM private key"):
        load_settings(data_dir, environ={**on, "MXGUARD_ACME__ACCOUNT_KEY_FILE": str(bad_key)})
    # Off (no directory URL): the files are not looked at.
    load_settings(data_dir, environ={"MXGUARD_ACME__ACCOUNT_KEY_FILE": str(bad_key)})


# -- the responder serves one path ------------------------------------------------------------

KNOWN_TOKEN = "tK7-known_token_0123456789abcdefABCDEF"
KNOWN_HOST = "known.acme.test"
KEY_AUTHORIZATION = f"{KNOWN_TOKEN}.thumbprint-of-the-account-key"


@pytest.fixture(scope="module")
def responder():
    loop = LoopThread("acme-responder")
    base = Path(tempfile.mkdtemp(prefix="mxguard-acme-responder-"))
    store = Store(f"sqlite+aiosqlite:///{base / 'db.sqlite'}")
    loop.run(store.migrate())
    loop.run(acme_store.publish_token(store, KNOWN_TOKEN, KNOWN_HOST, KEY_AUTHORIZATION))
    loop.run(acme_store.publish_token(store, OTHER_TOKEN, OTHER_HOST, OTHER_KEY_AUTHORIZATION))
    server = responder_server(store, "127.0.0.1:0")
    loop.run(server.start())
    client = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10, trust_env=False)
    yield client
    client.close()
    loop.run(server.stop())
    loop.run(store.close())
    loop.close()


#: A second published token: it is served for its own host only, never for KNOWN_HOST.
OTHER_TOKEN, OTHER_HOST, OTHER_KEY_AUTHORIZATION = "other-token-for-another-host", "other.acme.test", "x.y"


def _answer(method: str, path: str, host: str) -> str | None:
    """The key authorization the responder must serve for this request, or ``None`` for a 404."""
    name = host.lower().rsplit(":", 1)[0] if ":" in host else host.lower()
    if method not in ("GET", "HEAD"):
        return None
    published = {(PREFIX + KNOWN_TOKEN, KNOWN_HOST): KEY_AUTHORIZATION,
                 (PREFIX + OTHER_TOKEN, OTHER_HOST): OTHER_KEY_AUTHORIZATION}
    return published.get((path, name.rstrip(".")))


PATHS = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="?#%"),
            max_size=40).map(lambda t: "/" + t),
    st.sampled_from(["/", PREFIX, PREFIX + KNOWN_TOKEN, PREFIX + KNOWN_TOKEN + "/", PREFIX + KNOWN_TOKEN + "x",
                     PREFIX + KNOWN_TOKEN[:-1], PREFIX.rstrip("/") + KNOWN_TOKEN, "/.well-known/" + KNOWN_TOKEN,
                     PREFIX + "../" + KNOWN_TOKEN, PREFIX + "other-token-for-another-host", "/login", "/healthz",
                     "/api/v1/domains", PREFIX + KNOWN_TOKEN.upper(), "//" + PREFIX + KNOWN_TOKEN]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1,
            max_size=60).map(lambda t: PREFIX + t),
)
HOSTS = st.sampled_from([KNOWN_HOST, KNOWN_HOST.upper(), f"{KNOWN_HOST}:80", f"{KNOWN_HOST}.", "other.acme.test",
                         "127.0.0.1", "acme.test", f"x.{KNOWN_HOST}", "[::1]:80"])
METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=PATHS, host=HOSTS, method=METHODS)
def test_the_responder_answers_only_a_known_token_for_its_host(responder, path, host, method):
    url = responder.base_url.copy_with(raw_path=quote(path, safe="/:@!$&'()*+,;=-._~").encode("ascii"))
    sent = unquote(url.raw_path.decode("ascii"))  # httpx removes dot segments: judge what is on the wire
    reply = responder.request(method, url, headers={"Host": host})
    expected = _answer(method, sent, host)
    if expected is not None:
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "application/octet-stream"
        assert method == "HEAD" or reply.content == expected.encode()
    else:
        assert reply.status_code == 404, (method, path, host, reply.status_code)
        assert KEY_AUTHORIZATION.encode() not in reply.content


def test_the_responder_refuses_requests_without_one_host(responder):
    url = PREFIX + KNOWN_TOKEN
    assert responder.get(url, headers={"Host": KNOWN_HOST}).status_code == 200
    # httpx will not send two Host fields; http.client will (RFC 9112 3.2: a bad request).
    for hosts in ([KNOWN_HOST, KNOWN_HOST], []):
        conn = http.client.HTTPConnection(responder.base_url.host, responder.base_url.port, timeout=10)
        try:
            conn.putrequest("GET", url, skip_host=True)
            for host in hosts:
                conn.putheader("Host", host)
            conn.endheaders()
            reply = conn.getresponse()
            assert reply.status in (400, 404) and KEY_AUTHORIZATION.encode() not in reply.read(), hosts
        finally:
            conn.close()


def test_an_expired_token_is_not_served(tmp_path):
    loop = LoopThread("acme-expiry")
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    try:
        loop.run(store.migrate())
        loop.run(acme_store.publish_token(store, KNOWN_TOKEN, KNOWN_HOST, KEY_AUTHORIZATION))
        assert loop.run(acme_store.key_authorization_for(store, KNOWN_TOKEN, KNOWN_HOST)) == KEY_AUTHORIZATION

        async def age() -> None:
            async with store.session() as session:
                row = await session.get(AcmeChallenge, KNOWN_TOKEN)
                row.expires_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
                await session.commit()
        loop.run(age())
        assert loop.run(acme_store.key_authorization_for(store, KNOWN_TOKEN, KNOWN_HOST)) is None
        with pytest.raises(ValueError, match="not base64url"):
            loop.run(acme_store.publish_token(store, "../../etc/passwd", KNOWN_HOST, "x"))
    finally:
        loop.run(store.close())
        loop.close()

