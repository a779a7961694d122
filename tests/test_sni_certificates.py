"""Certificates chosen by SNI, end to end: the name rules, upload validation, the real CLI and API,
and a running gateway whose STARTTLS and HTTPS listeners present each name's certificate.

The test CA and every certificate are made here with ``cryptography``. Handshakes are checked with
``openssl s_client -starttls smtp -servername`` and with Python's ``ssl`` (``server_hostname``), both
verifying against the test CA, so a passing check means the right certificate was presented.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from mxguard.errors import ValidationFailed
from mxguard.services import sni_certificates as svc
from mxguard.storage.models import Organization, SniCertificate
from mxguard.storage.sealing import Sealer
from mxguard.tls.sni import normalize_sni_name, san_covers, select as sni_select
from tests.support.smtp import Raw
from tests.support.web import PASSWORD, csrf_token
from tests.test_cli import mx

NOW = dt.datetime.now(dt.timezone.utc)


# -- certificate material ------------------------------------------------------------------

def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Leaf:
    cert: x509.Certificate
    chain_pem: bytes  # leaf, then the intermediate
    key_pem: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_file.write_bytes(self.chain_pem)
        key_file.write_bytes(self.key_pem)
        return cert_file, key_file


class MiniCA:
    """A root and an intermediate CA; ``issue`` signs ECDSA P-256 server certificates."""

    def __init__(self):
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SNI test root")])
        self.root = self._ca_cert(root_name, root_name, self.root_key.public_key(), self.root_key, path_length=1)
        self.int_key = ec.generate_private_key(ec.SECP256R1())
        self.int_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SNI test intermediate")])
        self.intermediate = self._ca_cert(self.int_name, root_name, self.int_key.public_key(), self.root_key,
                                          path_length=0)
        self.root_pem = self.root.public_bytes(serialization.Encoding.PEM)

    @staticmethod
    def _ca_cert(subject, issuer, public_key, signer, path_length):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(signer, hashes.SHA256()))

    def issue(self, *sans: str, not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              key=None) -> Leaf:
        key = key or ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (sans or ("no-san",))[0])]))
                   .issuer_name(self.int_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or NOW - dt.timedelta(minutes=5))
                   .not_valid_after(not_after or NOW + dt.timedelta(days=90))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]),
                                            critical=False)
        cert = builder.sign(self.int_key, hashes.SHA256())
        chain = cert.public_bytes(serialization.Encoding.PEM) + \
            self.intermediate.public_bytes(serialization.Encoding.PEM)
        return Leaf(cert, chain, _pem(key))

    def client_context(self) -> ssl.SSLContext:
        """Verifies chain and host name against this CA only."""
        ctx = ssl.create_default_context(cadata=self.root_pem.decode())
        ctx.check_hostname = True
        return ctx


@pytest.fixture(scope="module")
def test_ca() -> MiniCA:
    return MiniCA()


# -- handshakes ----------------------------------------------------------------------------

def _any_cert_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def starttls_sha256(port: int, server_name: str | None, ctx: ssl.SSLContext | None = None) -> str:
    """EHLO, STARTTLS, handshake with ``server_name`` as SNI (``None``: no SNI); the leaf's SHA-256."""
    raw = Raw(port)
    try:
        assert raw.greeting.startswith("220"), raw.greeting
        assert "STARTTLS" in raw.cmd("EHLO client.sni.test")
        assert raw.cmd("STARTTLS").startswith("220")
        with (ctx or _any_cert_context()).wrap_socket(raw.sock, server_hostname=server_name) as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()
    finally:
        raw.close()


def https_sha256(port: int, server_name: str | None, ctx: ssl.SSLContext | None = None) -> str:
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with (ctx or _any_cert_context()).wrap_socket(sock, server_hostname=server_name) as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def s_client_sha256(port: int, server_name: str, ca_file: Path | None = None) -> tuple[str, str]:
    """``openssl s_client -starttls smtp -servername NAME``: the presented leaf's SHA-256 and the verify line."""
    cmd = ["openssl", "s_client", "-starttls", "smtp", "-servername", server_name, "-connect", f"127.0.0.1:{port}"]
    if ca_file:
        cmd += ["-CAfile", str(ca_file), "-verify_hostname", server_name]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    match = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", proc.stdout, re.S)
    assert match, proc.stdout + proc.stderr
    der = x509.load_pem_x509_certificate(match.group(0).encode()).public_bytes(serialization.Encoding.DER)
    verify = re.search(r"Verify return code: .*", proc.stdout)
    return hashlib.sha256(der).hexdigest(), verify.group(0) if verify else ""


def wait_for(check, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``check`` (bounded): the gateway picks up a change made by another process within ~1 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def gateway_sha256(web) -> str:
    cert = x509.load_pem_x509_certificate(web.cert_file.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- the name rules (hypothesis) -----------------------------------------------------------------

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
TLD = st.from_regex(r"[a-z][a-z0-9]{1,5}", fullmatch=True)  # not all digits: that would be an address
DOMAIN = st.builds(lambda labels, tld: ".".join([*labels, tld]), st.lists(LABEL, min_size=1, max_size=3), TLD)


@given(label=LABEL, other=LABEL, base=DOMAIN)
def test_wildcard_covers_exactly_one_label(label, other, base):
    wildcard = f"*.{base}"
    assert san_covers([wildcard], f"{label}.{base}")
    assert not san_covers([wildcard], base)                       # never the bare domain
    assert not san_covers([wildcard], f"{other}.{label}.{base}")  # never two labels
    assert not san_covers([f"{label}.{base}"], wildcard)          # a host SAN does not cover a wildcard name
    table = {wildcard: "wild"}
    assert sni_select(table, f"{label}.{base}") == "wild"
    assert sni_select(table, base) is None
    assert sni_select(table, f"{other}.{label}.{base}") is None
    assert sni_select({**table, f"{label}.{base}": "exact"}, f"{label.upper()}.{base}.") == "exact"  # exact first


@given(sans=st.lists(DOMAIN, min_size=1, max_size=3), name=DOMAIN)
def test_a_name_is_covered_only_by_an_equal_san_or_its_parent_wildcard(sans, name):
    parent = "*." + name.split(".", 1)[1] if name.count(".") >= 2 else None
    expected = name in sans or (parent in sans)
    assert san_covers(sans, name) is expected


@pytest.mark.parametrize("bad", ["", "*", "*.com", "a.*.example.com", "m*.example.com", "1.2.3.4", "localhost",
                                 "-a.example.com", "a" * 64 + ".example.com", "exa mple.com"])
def test_names_that_cannot_be_stored(bad):
    with pytest.raises(ValidationFailed) as info:
        normalize_sni_name(bad)
    assert info.value.field == "name"


def test_names_are_normalised():
    assert normalize_sni_name(" MX.Example.COM. ") == "mx.example.com"
    assert normalize_sni_name("*.Example.com") == "*.example.com"
    assert normalize_sni_name("bücher.example") == "xn--bcher-kva.example"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(san=DOMAIN, label=LABEL, other=LABEL)
def test_upload_of_a_name_the_sans_do_not_cover_is_always_refused(test_ca, san, label, other):
    leaf = test_ca.issue(san, f"*.{san}")
    # Covered: the SAN itself, the wildcard itself, one label under the wildcard.
    for name in (san, f"*.{san}", f"{label}.{san}"):
        assert svc.validate_upload(name, leaf.chain_pem, leaf.key_pem)[0] == name
    # Never covered: two labels under the wildcard, a sibling, the parent of a two-label SAN's wildcard.
    for name in (f"{other}.{label}.{san}", f"{label}x.{other}.example", f"*.{label}.{san}"):
        with pytest.raises(ValidationFailed) as info:
            svc.validate_upload(name, leaf.chain_pem, leaf.key_pem)
        assert info.value.field == "certificate" and "do not cover" in info.value.message


def _leaf_pem(leaf: Leaf) -> bytes:
    return leaf.cert.public_bytes(serialization.Encoding.PEM)


def test_upload_refusals_say_why(test_ca):
    good = test_ca.issue("mx.example.com")
    other = test_ca.issue("mx.example.com")
    cases = {
        "key mismatch": (good.chain_pem, other.key_pem, "key", "does not match"),
        "expired": (test_ca.issue("mx.example.com", not_before=NOW - dt.timedelta(days=30),
                                  not_after=NOW - dt.timedelta(days=1)), None, "certificate", "expired on"),
        "not yet valid": (test_ca.issue("mx.example.com", not_before=NOW + dt.timedelta(days=2)), None,
                          "certificate", "is not valid before"),
        "no SAN": (test_ca.issue(), None, "certificate", "(none) do not cover mx.example.com"),
        "not PEM": (b"hello", good.key_pem, "certificate", "holds no PEM certificate"),
        "key not PEM": (good.chain_pem, b"-----BEGIN NOTHING-----", "key", "no unencrypted PEM private key"),
        "empty": (b"  ", good.key_pem, "certificate", "is empty"),
        "out of order": (b"".join(reversed(re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n",
                                                      good.chain_pem, re.S))), None, "key", "does not match"),
        "wrong issuer next": (_leaf_pem(good) + _leaf_pem(other), good.key_pem, "certificate",
                              "certificate 2 of the chain did not issue certificate 1"),
    }
    for what, (cert, key, field, text) in cases.items():
        if isinstance(cert, Leaf):
            cert, key = cert.chain_pem, cert.key_pem
        if key is None:
            key = good.key_pem
        with pytest.raises(ValidationFailed) as info:
            svc.validate_upload("mx.example.com", cert, key)
        assert (info.value.field, text in info.value.message) == (field, True), (what, str(info.value))
    assert svc.validate_upload("MX.example.com", good.chain_pem, good.key_pem)[0] == "mx.example.com"


# -- a running gateway: CLI, API, STARTTLS and HTTPS ------------------------------------------------

def test_each_name_gets_its_certificate_on_starttls_and_https(web, test_ca, tmp_path, data_dir):
    port, web_port = web.gw.port, int(web.url.rsplit(":", 1)[1])
    gateway_fp = gateway_sha256(web)
    ca_file = tmp_path / "root.pem"
    ca_file.write_bytes(test_ca.root_pem)
    exact = test_ca.issue("mx.example.com")
    wild = test_ca.issue("*.example.org")
    api_leaf = test_ca.issue("mail.example.net", "smtp.example.net")
    verify = test_ca.client_context()

    # Before any is stored, every name gets the gateway certificate.
    assert starttls_sha256(port, "mx.example.com") == gateway_fp

    # Added through the real CLI while the gateway runs (another process: the gateway sees it by polling).
    mx("tls", "cert", "add", "--name", "mx.example.com", *map(str, exact.write(tmp_path, "exact")), data_dir=data_dir)
    mx("tls", "cert", "add", "--name", "*.Example.ORG", *map(str, wild.write(tmp_path, "wild")), data_dir=data_dir)
    wait_for(lambda: starttls_sha256(port, "mx.example.com") == exact.sha256, what="the CLI's certificate")
    wait_for(lambda: starttls_sha256(port, "a.example.org") == wild.sha256, what="the wildcard certificate")

    # Added through the API: the serving process applies it at once.
    api = web.api(web.admin_key)
    reply = api.post("/tls/certificates", json={"name": "mail.example.net", "certificate_pem": api_leaf.chain_pem.decode(),
                                                "key_pem": api_leaf.key_pem.decode()})
    assert reply.status_code == 201, reply.text
    assert reply.json()["sha256"] == api_leaf.sha256 and reply.json()["domain"] is None
    assert starttls_sha256(port, "mail.example.net") == api_leaf.sha256

    # STARTTLS with Python's ssl, verifying chain and name against the test CA.
    assert starttls_sha256(port, "mx.example.com", verify) == exact.sha256
    assert starttls_sha256(port, "MX.EXAMPLE.COM", verify) == exact.sha256
    assert starttls_sha256(port, "a.example.org", verify) == wild.sha256
    assert starttls_sha256(port, "b.example.org", verify) == wild.sha256
    # Unknown names, two labels under the wildcard, the bare domain and no SNI: the gateway certificate.
    for name in ("unknown.example.com", "x.a.example.org", "example.org", "smtp.example.net", None):
        assert starttls_sha256(port, name) == gateway_fp, name
    with pytest.raises(ssl.SSLCertVerificationError):
        starttls_sha256(port, "x.a.example.org", verify)

    # The same with openssl s_client -starttls smtp -servername.
    for name, expected in (("mx.example.com", exact.sha256), ("c.example.org", wild.sha256),
                           ("mail.example.net", api_leaf.sha256)):
        fp, verified = s_client_sha256(port, name, ca_file)
        assert fp == expected and verified == "Verify return code: 0 (ok)", (name, verified)
    assert s_client_sha256(port, "nobody.example.com")[0] == gateway_fp
    assert s_client_sha256(port, "deep.a.example.org")[0] == gateway_fp

    # HTTPS: the console's listener chooses by SNI too (httpx sends the name and checks it).
    for name, expected in (("mx.example.com", exact.sha256), ("a.example.org", wild.sha256)):
        assert https_sha256(web_port, name, verify) == expected
        with httpx.Client(verify=verify, timeout=10) as client:
            reply = client.get(f"{web.url}/healthz", extensions={"sni_hostname": name})
            assert reply.status_code == 200
    assert https_sha256(web_port, "unknown.example.com") == gateway_fp
    assert https_sha256(web_port, None) == gateway_fp

    # The CLI lists them (name, not_after, fingerprint, days left).
    out = mx("tls", "cert", "list", data_dir=data_dir).stdout
    for leaf, name in ((exact, "mx.example.com"), (wild, "*.example.org"), (api_leaf, "mail.example.net")):
        assert name in out and leaf.sha256 in out
    listed = {c["name"]: c for c in json.loads(mx("tls", "cert", "list", "--json", data_dir=data_dir).stdout)}
    assert listed["mx.example.com"]["days_left"] in (89, 90) and listed["mx.example.com"]["fingerprint"] == exact.sha256

    # Renewal (--replace) and removal take effect on the next handshake, without a restart.
    renewed = test_ca.issue("mx.example.com")
    again = mx("tls", "cert", "add", "--name", "mx.example.com", *map(str, renewed.write(tmp_path, "renewed")),
               data_dir=data_dir, check=False)
    assert again.returncode == 1 and "stored already" in again.stderr and "Traceback" not in again.stderr
    mx("tls", "cert", "add", "--replace", "--name", "mx.example.com", *map(str, renewed.write(tmp_path, "renewed")),
       data_dir=data_dir)
    wait_for(lambda: starttls_sha256(port, "mx.example.com") == renewed.sha256, what="the renewed certificate")
    mx("tls", "cert", "remove", "--name", "*.example.org", data_dir=data_dir)
    wait_for(lambda: starttls_sha256(port, "a.example.org") == gateway_fp, what="the removal")
    assert api.delete("/tls/certificates/mail.example.net").status_code == 204
    assert starttls_sha256(port, "mail.example.net") == gateway_fp
    assert api.delete("/tls/certificates/mail.example.net").status_code == 404
    assert [c["name"] for c in api.get("/tls/certificates").json()] == ["mx.example.com"]
    gone = mx("tls", "cert", "remove", "--name", "*.example.org", data_dir=data_dir, check=False)
    assert gone.returncode == 1 and "no certificate for *.example.org" in gone.stderr

    # Every change is in the audit log.
    actions = [e["action"] for e in api.get("/audit", params={"limit": 50}).json()]
    for action in ("tls.sni.add", "tls.sni.replace", "tls.sni.remove"):
        assert action in actions, actions

    # keys rotate re-seals the stored keys too; the gateway keeps serving the certificate.
    rotated = mx("keys", "rotate", data_dir=data_dir).stdout
    assert "re-sealed 0 spool entries, 1 SNI certificate keys and 0 DKIM keys" in rotated, rotated
    assert starttls_sha256(port, "mx.example.com") == renewed.sha256

    # The key is stored sealed with the current key, bound to its name.
    async def row(name):
        async with web.gw.store.session() as session:
            return (await session.execute(select(SniCertificate).where(SniCertificate.name == name))).scalar_one()
    stored = web.run(row("mx.example.com"))
    assert b"PRIVATE KEY" not in stored.sealed_key and renewed.key_pem not in stored.sealed_key
    sealer = Sealer.from_file(data_dir / "keys" / "sealing.keys")
    assert stored.key_id == sealer.current_key_id
    assert sealer.open(stored.sealed_key, svc.seal_context("mx.example.com")) == renewed.key_pem


def test_cli_refusals_are_one_line(web, test_ca, tmp_path, data_dir):
    good = test_ca.issue("mx.example.com")
    cert_file, _ = good.write(tmp_path, "good")
    _, other_key = test_ca.issue("mx.example.com").write(tmp_path, "other")
    for args, text in (
            (["--name", "mx.example.com", str(cert_file), str(other_key)], "key: does not match the certificate"),
            (["--name", "other.example.com", *map(str, good.write(tmp_path, "g2"))],
             "certificate: its subject alternative names (mx.example.com) do not cover other.example.com"),
            (["--name", "*.com", *map(str, good.write(tmp_path, "g3"))], "name: '*.com' is not a fully qualified"),
            (["--name", "mx.example.com", str(tmp_path / "missing.pem"), str(other_key)], "CERT: cannot read")):
        proc = mx("tls", "cert", "add", *args, data_dir=data_dir, check=False)
        assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert "No certificates by SNI" in mx("tls", "cert", "list", data_dir=data_dir).stdout


def test_api_validation_tenancy_and_expiry_alert(web, test_ca):
    api = web.api(web.admin_key)
    acme = web.tenant("Acme", "ops@acme.test")
    globex = web.tenant("Globex", "ops@globex.test")
    for name, org in (("acme.test", "Acme"), ("globex.test", "Globex")):
        assert api.post("/domains", json={"name": name, "servers": ["127.0.0.1:9"], "org": org,
                                          "downstream_tls": "off"}).status_code == 201
    acme_api, globex_api = web.api(acme.key), web.api(globex.key)

    def body(leaf: Leaf, name: str, **extra) -> dict:
        return {"name": name, "certificate_pem": leaf.chain_pem.decode(), "key_pem": leaf.key_pem.decode(), **extra}

    # Validation: 422 naming the field.
    leaf = test_ca.issue("mx.acme.test", "*.acme.test")
    bad = acme_api.post("/tls/certificates", json=body(leaf, "mx.acme.test", key_pem=test_ca.issue("x.test").key_pem.decode()))
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "key"]
    bad = acme_api.post("/tls/certificates", json=body(leaf, "a.b.acme.test"))
    assert bad.status_code == 422 and "do not cover a.b.acme.test" in bad.json()["detail"][0]["msg"]
    expired = test_ca.issue("old.acme.test", not_before=NOW - dt.timedelta(days=9), not_after=NOW - dt.timedelta(days=1))
    bad = acme_api.post("/tls/certificates", json=body(expired, "old.acme.test"))
    assert bad.status_code == 422 and "expired on" in bad.json()["detail"][0]["msg"]
    assert acme_api.post("/tls/certificates", json={"name": "mx.acme.test"}).status_code == 422

    # Tenancy: an org-admin adds names under its own domains only; an admin may add any name.
    assert acme_api.post("/tls/certificates", json=body(leaf, "mx.acme.test")).status_code == 201
    assert acme_api.post("/tls/certificates", json=body(leaf, "*.acme.test")).status_code == 201
    theirs = test_ca.issue("mx.globex.test")
    refused = acme_api.post("/tls/certificates", json=body(theirs, "mx.globex.test"))
    assert refused.status_code == 403 and "only an administrator" in refused.text
    unserved = test_ca.issue("mx.unserved.test")
    assert acme_api.post("/tls/certificates", json=body(unserved, "mx.unserved.test")).status_code == 403
    assert api.post("/tls/certificates", json=body(unserved, "mx.unserved.test")).status_code == 201
    assert globex_api.post("/tls/certificates", json=body(theirs, "mx.globex.test")).status_code == 201
    assert acme_api.post("/tls/certificates", json=body(leaf, "mx.acme.test")).status_code == 409
    assert acme_api.post("/tls/certificates", json=body(leaf, "mx.acme.test", replace=True)).status_code == 201
    mine = acme_api.get("/tls/certificates").json()
    assert [(c["name"], c["domain"], c["org"]) for c in mine] == [("*.acme.test", "acme.test", "Acme"),
                                                                  ("mx.acme.test", "acme.test", "Acme")]
    assert sorted(c["name"] for c in api.get("/tls/certificates").json()) == [
        "*.acme.test", "mx.acme.test", "mx.globex.test", "mx.unserved.test"]
    assert acme_api.delete("/tls/certificates/mx.globex.test").status_code == 404   # not theirs: not found
    refusals = [e for e in api.get("/audit", params={"action": "tls.sni.add.refused"}).json()]
    assert {e["target"] for e in refusals} == {"mx.globex.test", "mx.unserved.test"}

    # The expiry alert covers SNI certificates (and only those within the warning days).
    soon = test_ca.issue("soon.globex.test", not_after=NOW + dt.timedelta(days=3))
    assert globex_api.post("/tls/certificates", json=body(soon, "soon.globex.test")).status_code == 201
    alerts = web.run(web.gw.gateway.notifier.check_certificates())
    sni_alerts = [a for a in alerts if a.key.startswith("cert:sni:")]
    assert [(a.key, a.domains) for a in sni_alerts] == [(f"cert:sni:soon.globex.test:{soon.sha256}", ("globex.test",))]
    assert "expires in 3 days" in sni_alerts[0].subject or "expires in 2 days" in sni_alerts[0].subject
    assert "mxguard tls cert add --replace --name soon.globex.test" in sni_alerts[0].text


def test_console_lists_uploads_and_removes(web, test_ca):
    client, reply = web.login("admin@gw.test")
    assert reply.status_code == 303
    page = client.get("/tls")
    assert page.status_code == 200 and 'id="sni-certs"' in page.text and "every client gets the gateway" in page.text
    leaf = test_ca.issue("www.example.com")
    files = {"certificate": ("c.pem", leaf.chain_pem), "key": ("k.pem", leaf.key_pem)}
    no_token = client.post("/tls/sni", data={"name": "www.example.com"}, files=files)
    assert no_token.status_code == 403
    bad = client.post("/tls/sni", data={"name": "other.example.com", "csrf_token": csrf_token(page.text)}, files=files)
    assert bad.status_code == 422 and "do not cover other.example.com" in bad.text and 'value="other.example.com"' in bad.text
    done = client.post("/tls/sni", data={"name": "www.example.com", "csrf_token": csrf_token(page.text)}, files=files)
    assert done.status_code == 303 and done.headers["location"] == "/tls?sni_saved=added"
    page = client.get("/tls?sni_saved=added")
    colons = ":".join(leaf.sha256[i:i + 2] for i in range(0, 64, 2)).upper()
    assert '<td class="sni-name">www.example.com</td>' in page.text and colons in page.text
    assert 'id="sni-saved"' in page.text
    assert starttls_sha256(web.gw.port, "www.example.com", test_ca.client_context()) == leaf.sha256
    removed = client.post("/tls/sni/remove", data={"name": "www.example.com", "csrf_token": csrf_token(page.text)})
    assert removed.status_code == 303
    assert "www.example.com" not in client.get("/tls").text
    assert starttls_sha256(web.gw.port, "www.example.com") == gateway_sha256(web)


def test_sni_contexts_survive_a_key_that_cannot_be_opened(web, test_ca, tmp_path):
    """A row sealed with a key this node lacks is skipped (logged); the others are still served."""
    good, lost = test_ca.issue("good.example.com"), test_ca.issue("lost.example.com")
    keys = web.gw.gateway.keyring.get()
    foreign = Sealer({"kforeign": b"\x01" * 32})
    web.run(svc.add_sni_certificate(web.gw.store, keys, "good.example.com", good.chain_pem, good.key_pem))
    web.run(svc.add_sni_certificate(web.gw.store, foreign, "lost.example.com", lost.chain_pem, lost.key_pem))
    web.gw.reload()
    assert starttls_sha256(web.gw.port, "good.example.com") == good.sha256
    assert starttls_sha256(web.gw.port, "lost.example.com") == gateway_sha256(web)


async def test_service_on_sqlite_and_postgresql(store, test_ca, tmp_path):
    """Add, replace, list, re-seal after a key rotation, remove — on both databases."""
    from mxguard.services import domains, orgs
    from mxguard.services.access import Actor
    from mxguard.storage.sealing import append_key, create_key_file
    key_file = tmp_path / "sealing.keys"
    create_key_file(key_file)
    await orgs.add_org(store, "Acme")
    await domains.add_domain(store, "acme.test", ["127.0.0.1:9"], org="Acme")
    await domains.add_domain(store, "eu.acme.test", ["127.0.0.1:9"])
    leaf = test_ca.issue("mx.eu.acme.test", "mx.acme.test")
    sealer = Sealer.from_file(key_file)
    first = await svc.add_sni_certificate(store, sealer, "mx.acme.test", leaf.chain_pem, leaf.key_pem)
    assert (first.domain, first.org) == ("acme.test", "Acme")
    # The longest served domain decides: eu.acme.test has no organization, so only admins see it.
    deeper = await svc.add_sni_certificate(store, sealer, "mx.eu.acme.test", leaf.chain_pem, leaf.key_pem)
    assert (deeper.domain, deeper.org) == ("eu.acme.test", None)
    async with store.session() as session:
        acme_id = (await session.execute(select(Organization.id).where(Organization.name == "Acme"))).scalar_one()
    org_admin = Actor("user:ops@acme.test", "org-admin", org_id=acme_id, org="Acme")
    assert [v.name for v in await svc.list_sni_certificates(store, actor=org_admin)] == ["mx.acme.test"]
    assert [v.name for v in await svc.list_sni_certificates(store)] == ["mx.acme.test", "mx.eu.acme.test"]
    renewed = test_ca.issue("mx.acme.test")
    await svc.add_sni_certificate(store, sealer, "mx.acme.test", renewed.chain_pem, renewed.key_pem,
                                  actor=org_admin, replace=True)
    append_key(key_file)
    rotated = Sealer.from_file(key_file)
    assert await svc.reseal_keys(store, rotated) == 2
    assert await svc.reseal_keys(store, rotated) == 0
    only_new = Sealer({rotated.current_key_id: rotated.keys[rotated.current_key_id]})
    material = {m.name: m for m in await svc.load_material(store, only_new, ["mx.acme.test", "mx.eu.acme.test"])}
    assert material["mx.acme.test"].key_pem == renewed.key_pem and material["mx.acme.test"].fingerprint == renewed.sha256
    assert material["mx.eu.acme.test"].key_pem == leaf.key_pem
    await svc.remove_sni_certificate(store, "MX.eu.acme.test.")
    assert await svc.stored_fingerprints(store) == {"mx.acme.test": renewed.sha256}
