"""TLS posture, as testssl.sh sees it, of running gateways: the SMTP STARTTLS port and the HTTPS console.

The STARTTLS port is scanned on a gateway with the certificates ``mxguard
init`` makes (ECDSA, and RSA beside it), the console on one with an RSA certificate, as an
operator's CA-issued certificate often is (RSA key-exchange suites and ROBOT
would show up there). The two scans run in parallel, once for the module
(about 40 s); each test reads their JSON. Meanwhile every exception that
reaches the SMTP handler is recorded: a scanner's failed handshakes must be
routine, not errors, and both gateways must still serve afterwards.

Wanted (DESIGN: TLS 1.2 is the floor; RFC 7568, RFC 8996, RFC 7525): no
SSLv2/SSLv3/TLS 1.0/TLS 1.1; no NULL, anonymous, export, LOW, 3DES/IDEA or
CBC ("AVERAGE") suites, hence no RC4 and no CBC-SHA1; forward secrecy on every
suite offered; nothing testssl calls VULNERABLE.
"""

from __future__ import annotations

import smtplib
import ssl

import pytest

from mxguard.config import load_settings
from mxguard.smtp.inbound import InboundHandler
from mxguard.tls.certs import generate_self_signed, write_private
from tests.conftest import gateway_environ
from tests.support import testssl
from tests.support.gateway import ThreadedGateway, init_data_dir
from tests.support.web import gateway_tls_context

AEAD = {"AESGCM", "ChaCha20", "AESCCM"}


def _still_serves(gw: ThreadedGateway, cert_file) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.starttls(context=ctx)
        assert client.noop()[0] == 250
    if gw.gateway.web is not None:
        import httpx
        with httpx.Client(verify=gateway_tls_context(cert_file)) as web:
            assert web.get(gw.web_url + "/healthz").status_code == 200


@pytest.fixture(scope="module")
def scans(tmp_path_factory, loopback_dns):
    """``{"smtp": Scan, "https": Scan}``, and the SMTP handler's exceptions during the scans."""
    base = tmp_path_factory.mktemp("testssl")
    init_data_dir(base / "ecdsa")
    init_data_dir(base / "rsa")
    cert, key = generate_self_signed("mx.gw.test", key_type="rsa")
    write_private(base / "rsa" / "tls" / "cert.pem", cert)
    write_private(base / "rsa" / "tls" / "key.pem", key)
    errors: list[str] = []
    original = InboundHandler.handle_exception

    async def spy(self, error):
        errors.append(repr(error))
        return await original(self, error)

    InboundHandler.handle_exception = spy
    ecdsa = ThreadedGateway(load_settings(base / "ecdsa", environ=gateway_environ(loopback_dns))).start()
    rsa = ThreadedGateway(load_settings(base / "rsa", environ=gateway_environ(loopback_dns)),
                          web_listen="127.0.0.1:0").start()
    try:
        running = {
            "smtp": testssl.start(f"127.0.0.1:{ecdsa.port}", base / "smtp.json", starttls="smtp"),
            "https": testssl.start(rsa.web_url.removeprefix("https://"), base / "https.json", extra=["-h"],
                                   path="/login"),
        }
        results = {name: testssl.finish(proc) for name, proc in running.items()}
        _still_serves(ecdsa, base / "ecdsa" / "tls" / "cert.pem")
        _still_serves(rsa, base / "rsa" / "tls" / "cert.pem")
    finally:
        InboundHandler.handle_exception = original
        ecdsa.stop()
        rsa.stop()
    for name, scan in results.items():
        print(f"\n== testssl {name}: {scan.target}\n{scan.summary()}")
    results["handler_errors"] = errors
    return results


def test_scanning_raised_no_errors_in_the_smtp_session(scans):
    assert scans["handler_errors"] == [], "failed handshakes are routine, not session errors"


ENDPOINTS = ["smtp", "https"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_the_scan_ran_cleanly(scans, endpoint):
    scan = scans[endpoint]
    problems = {k: v for k, v in scan.findings.items() if v["severity"] == "FATAL" or k.startswith("scanProblem")}
    assert not problems, problems
    assert scan.finding("service") == ("HTTP" if endpoint == "https" else "smtp")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_only_tls_1_2_and_1_3_are_offered(scans, endpoint):
    scan = scans[endpoint]
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert scan.finding(old) == "not offered", (old, scan.findings[old])
    assert scan.finding("TLS1_2") == "offered"
    assert scan.finding("TLS1_3").startswith("offered")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_no_weak_cipher_categories(scans, endpoint):
    scan = scans[endpoint]
    for category in ("NULL", "aNULL", "EXPORT", "LOW", "3DES_IDEA", "AVERAGE"):
        assert scan.finding(f"cipherlist_{category}") == "not offered", category
    assert scan.finding("cipherlist_STRONG") == "offered"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_suite_is_forward_secret_and_aead(scans, endpoint):
    scan = scans[endpoint]
    ciphers = scan.ciphers()
    assert len(ciphers) >= 4, ciphers
    for line in ciphers:
        _hexcode, name, kx, _bits, encryption, *_ = line.split()
        assert kx in ("ECDH", "DH"), f"no forward secrecy: {line}"
        assert encryption in AEAD, f"not an AEAD suite: {line}"
        assert "CBC" not in name and not name.endswith("-SHA") and "RC4" not in name and "DES" not in name, line
    # TLS 1.2 suites name the certificate's key type: the STARTTLS port of a fresh 'mxguard init'
    # offers the ECDSA certificate and the RSA one beside it (for clients without ECDSA); the
    # console here has only an RSA certificate.
    key_types = {name.split("-")[1] for name in (line.split()[1] for line in ciphers) if not name.startswith("TLS_")}
    assert key_types == ({"ECDSA", "RSA"} if endpoint == "smtp" else {"RSA"}), key_types


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_nothing_is_vulnerable(scans, endpoint):
    scan = scans[endpoint]
    expected = set(testssl.VULNERABILITIES) - ({"ticketbleed", "BREACH"} if endpoint != "https" else set())
    assert expected <= set(scan.findings), expected - set(scan.findings)
    for key in expected:
        assert scan.findings[key]["severity"] in ("OK", "INFO"), (key, scan.findings[key])
    flagged = {k: v["finding"] for k, v in scan.findings.items() if "VULNERABLE" in v["finding"]
               or v["severity"] in ("HIGH", "CRITICAL")}
    assert not flagged, flagged


def test_https_console_headers_and_cookies(scans):
    scan = scans["https"]
    assert scan.findings["HSTS_time"]["severity"] == "OK"
    assert scan.finding("X-Frame-Options") == "DENY" and scan.finding("X-Content-Type-Options") == "nosniff"
    assert "frame-ancestors 'none'" in scan.finding("Content-Security-Policy")
    assert scan.finding("banner_server").startswith("No Server banner")
    assert scan.finding("cookie_count").startswith("1 at '/login'")
    assert scan.finding("cookie_secure").startswith("All (1)") and scan.finding("cookie_httponly").startswith("All (1)")
