"""Partner TLS rules: a real gateway on loopback, real SMTP clients with and without client
certificates (smtplib, swaks, Postfix), a test CA from trustme and CRLs built with cryptography."""

from __future__ import annotations

import datetime as dt
import shutil
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from mxguard.errors import ValidationFailed
from mxguard.services import partners as partner_service
from mxguard.services.partners import PartnerRuleView, covers, normalize_pattern, sender_domain_of
from mxguard.smtp.partners import PartnerRules
from mxguard.storage import messagelog
from mxguard.tls.certs import sha256_fingerprint
from mxguard.tls.client_certs import name_matches
from tests.support.postfix import PostfixInstance
from tests.support.smtp import message, send

PARTNER = "partner.example"


# -- certificates ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def partner_ca() -> trustme.CA:
    return trustme.CA(organization_name="Partner CA")


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA(organization_name="Other partner CA")


@pytest.fixture(scope="module")
def partner_cert(partner_ca) -> trustme.LeafCert:
    return partner_ca.issue_cert("mta.partner.example", common_name="mta.partner.example")


@pytest.fixture(scope="module")
def other_cert(other_ca) -> trustme.LeafCert:
    return other_ca.issue_cert("mta.partner.example", common_name="mta.partner.example")


def write_pem(path, *blobs) -> str:
    path.write_bytes(b"".join(b.bytes() if hasattr(b, "bytes") else b for b in blobs))
    return str(path)


@pytest.fixture
def files(tmp_path, partner_ca, other_ca, partner_cert, other_cert):
    """PEM files of both CAs and both client certificates (key and chain in one file each)."""
    return {
        "ca": write_pem(tmp_path / "partner-ca.pem", partner_ca.cert_pem),
        "other_ca": write_pem(tmp_path / "other-ca.pem", other_ca.cert_pem),
        "cert": write_pem(tmp_path / "client.pem", partner_cert.private_key_pem, *partner_cert.cert_chain_pems),
        "other_cert": write_pem(tmp_path / "other.pem", other_cert.private_key_pem, *other_cert.cert_chain_pems),
    }


def leaf(cert: trustme.LeafCert) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())


def fingerprint(cert: trustme.LeafCert) -> str:
    return sha256_fingerprint(leaf(cert).public_bytes(serialization.Encoding.DER))


def make_crl(ca: trustme.CA, revoked: list[x509.Certificate], path) -> str:
    """A CRL signed by the trustme CA listing ``revoked`` (serial numbers), built with cryptography."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=1)))
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
            .revocation_date(now - dt.timedelta(minutes=1)).build())
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return str(path)


def client_ctx(cert_file: str | None = None, *, max_version=None) -> ssl.SSLContext:
    """A client context that does not check the gateway's self-signed certificate, presenting
    ``cert_file`` (key + chain) when given."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    if cert_file:
        ctx.load_cert_chain(cert_file)
    return ctx


# -- the gateway -------------------------------------------------------------------------

@pytest.fixture
def served(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address], downstream_tls="required")
    add_domain("example.org", [tls_sink.address], downstream_tls="required")
    return tls_sink


@pytest.fixture
def add_rule(gateway):
    def _add(domain="example.com", sender=PARTNER, **fields):
        view = gateway.run(partner_service.add_rule(gateway.store, domain, sender, **fields))
        gateway.reload()
        return view
    return _add


def partner_send(gateway, rcpt="alice@example.com", *, cert=None, starttls=True, sender=f"bob@{PARTNER}",
                 max_version=None):
    return send(gateway.port, [rcpt], message(sender=sender, to=rcpt), sender=sender, starttls=starttls,
                ctx=client_ctx(cert, max_version=max_version))


def test_clear_session_from_a_partner_domain_gets_530_at_mail(gateway, served, add_rule):
    add_rule(min_tls="1.2")
    out = partner_send(gateway, starttls=False)
    assert out.mail[0] == 530 and out.mail[1].startswith("5.7.0 Must issue a STARTTLS command first")
    assert PARTNER in out.mail[1]
    rec = gateway.wait_records(1)[-1]
    assert rec.disposition == "rejected" and rec.final_code == 530 and rec.mail_from == f"bob@{PARTNER}"
    # Over TLS the same sender is fine (no certificate asked for by this rule).
    assert partner_send(gateway).data[0] == 250


def test_tls_without_a_certificate_where_one_is_required_is_550_at_rcpt(gateway, served, add_rule, files):
    add_rule(require_cert=True, ca_file=files["ca"])
    out = partner_send(gateway)
    code, text = out.rcpt["alice@example.com"]
    assert code == 550 and text.startswith("5.7.1 mail from partner.example to example.com must arrive over "
                                           "TLS 1.2+ with a client certificate from its CA")
    assert "no client certificate was presented" in text
    time.sleep(0.2)
    assert served.messages == []
    rec = gateway.wait_records(1)[-1]
    assert rec.disposition == "rejected" and "no client certificate" in rec.results[0]["text"]


def test_certificate_from_the_right_ca_is_delivered_and_recorded(gateway, served, add_rule, files, partner_cert):
    add_rule(require_cert=True, ca_file=files["ca"])
    out = partner_send(gateway, cert=files["cert"])
    assert out.rcpt["alice@example.com"][0] == 250 and out.data[0] == 250
    assert served.wait_for(1)
    subject, sha = leaf(partner_cert).subject.rfc4514_string(), fingerprint(partner_cert)
    received = served.messages[0].data.split(b"\r\n\r\n", 1)[0].decode()
    assert f"(client certificate {subject}; sha256 {sha})" in received
    rec = gateway.wait_records(1)[-1]
    assert rec.client_cert_subject == subject and rec.client_cert_sha256 == sha
    gateway.flush_log()
    rows = gateway.run(messagelog.search(gateway.store, txn_id=rec.txn_id))
    assert rows[0].client_cert_sha256 == sha and "mta.partner.example" in rows[0].client_cert_subject


def test_certificate_from_another_partners_ca_is_refused(gateway, served, add_rule, files):
    add_rule(require_cert=True, ca_file=files["ca"])
    # Another partner's CA is trusted for the handshake (its own rule), never for this rule.
    add_rule(sender="other.example", require_cert=True, ca_file=files["other_ca"])
    out = partner_send(gateway, cert=files["other_cert"])
    code, text = out.rcpt["alice@example.com"]
    assert code == 550 and text.startswith("5.7.1") and "does not chain to its CA" in text
    # ... while the other partner's own mail with it is delivered.
    out = partner_send(gateway, cert=files["other_cert"], sender="carol@other.example")
    assert out.data[0] == 250


def test_fingerprint_rule(gateway, served, add_rule, files, partner_cert, partner_ca):
    second = partner_ca.issue_cert("mta2.partner.example")
    second_file = write_pem(Path(files["cert"]).with_name("second.pem"),
                            second.private_key_pem, *second.cert_chain_pems)
    add_rule(ca_file=files["ca"], fingerprints=[fingerprint(partner_cert).upper()])
    assert partner_send(gateway, cert=files["cert"]).data[0] == 250
    code, text = partner_send(gateway, cert=second_file).rcpt["alice@example.com"]
    assert code == 550 and "fingerprint is not an accepted one" in text


def test_host_name_rule(gateway, served, add_rule, files):
    add_rule(ca_file=files["ca"], cert_host="MTA.partner.example.")
    assert partner_send(gateway, cert=files["cert"]).data[0] == 250
    add_rule(domain="example.org", ca_file=files["ca"], cert_host="relay.partner.example")
    code, text = partner_send(gateway, "dave@example.org", cert=files["cert"]).rcpt["dave@example.org"]
    assert code == 550 and "does not name relay.partner.example" in text


def test_tls12_client_where_13_is_required_is_refused(gateway, served, add_rule):
    add_rule(min_tls="1.3")
    out = partner_send(gateway, max_version=ssl.TLSVersion.TLSv1_2)
    assert out.tls == "TLSv1.2"
    code, text = out.rcpt["alice@example.com"]
    assert code == 550 and "must arrive over TLS 1.3+" in text and "arrived over TLSv1.2" in text
    assert partner_send(gateway).data[0] == 250  # TLS 1.3


def test_revoked_client_certificate_is_refused(gateway, served, add_rule, files, tmp_path, partner_ca, partner_cert):
    good = partner_ca.issue_cert("mta3.partner.example")
    good_file = write_pem(tmp_path / "good.pem", good.private_key_pem, *good.cert_chain_pems)
    crl = make_crl(partner_ca, [leaf(partner_cert)], tmp_path / "partner.crl")
    add_rule(require_cert=True, ca_file=files["ca"], crl_file=crl)
    code, text = partner_send(gateway, cert=files["cert"]).rcpt["alice@example.com"]
    assert code == 550 and text.startswith("5.7.1") and text.endswith("certificate revoked")
    assert partner_send(gateway, cert=good_file).data[0] == 250


def test_crl_from_another_ca_is_refused_as_input(gateway, served, files, tmp_path, other_ca):
    crl = make_crl(other_ca, [], tmp_path / "other.crl")
    with pytest.raises(ValidationFailed) as err:
        gateway.run(partner_service.add_rule(gateway.store, "example.com", PARTNER, ca_file=files["ca"],
                                             crl_file=crl))
    assert "crl_file" in str(err.value.errors if hasattr(err.value, "errors") else err.value)


def test_senders_not_covered_are_unaffected(gateway, served, add_rule, files):
    add_rule(require_cert=True, ca_file=files["ca"])
    # No TLS, TLS without a certificate, TLS with a partner certificate: all delivered.
    for kwargs in ({"starttls": False}, {}, {"cert": files["cert"]}):
        out = partner_send(gateway, sender="eve@elsewhere.example", **kwargs)
        assert out.data[0] == 250, kwargs
    # A sub-domain is not covered by an exact rule.
    assert partner_send(gateway, sender="x@sub.partner.example", starttls=False).data[0] == 250
    # The rule belongs to example.com: example.org takes the partner's mail without a certificate.
    assert partner_send(gateway, "dave@example.org").data[0] == 250


def test_without_certificate_rules_no_certificate_is_requested(gateway, served, add_rule, files):
    add_rule(min_tls="1.2")
    assert gateway.gateway.tls.smtp_context.verify_mode == ssl.CERT_NONE
    # A client with a certificate from an unknown CA is not bothered.
    out = partner_send(gateway, cert=files["other_cert"])
    assert out.data[0] == 250
    assert gateway.wait_records(1)[-1].client_cert_sha256 is None


def test_wildcard_rule_covers_sub_domains(gateway, served, add_rule, files):
    add_rule(sender="*.partner.example", require_cert=True, ca_file=files["ca"])
    code, _ = partner_send(gateway, sender="x@Sub.Partner.Example").rcpt["alice@example.com"]
    assert code == 550
    assert partner_send(gateway, sender="x@sub.partner.example", cert=files["cert"]).data[0] == 250
    assert partner_send(gateway, starttls=False).data[0] == 250  # the parent itself is not covered


def test_rule_input_is_validated(gateway, served, files):
    bad = [({"sender": "not a domain"}, "sender"), ({"min_tls": "1.1"}, "min_tls"),
           ({"fingerprints": ["abc"]}, "fingerprints"), ({"require_cert": True}, "ca_file"),
           ({"ca_file": "/nonexistent/ca.pem"}, "ca_file"), ({"min_tls": "none"}, "min_tls")]
    for fields, key in bad:
        sender = fields.pop("sender", PARTNER)
        with pytest.raises(ValidationFailed) as err:
            gateway.run(partner_service.add_rule(gateway.store, "example.com", sender, **fields))
        assert key in str(err.value.detail if hasattr(err.value, "detail") else err.value) or key in repr(err.value)


# -- matching: never bypassed -------------------------------------------------------------

label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10).filter(
    lambda s: not s.startswith("-") and not s.endswith("-"))


def _case_variant(draw, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if f else c for c, f in zip(text, flips))


@st.composite
def sender_variant(draw):
    domain = draw(st.sampled_from([PARTNER, "partner.example"]))
    return draw(st.sampled_from(["u", "U.ser", "\"q@x\""])) + "@" + _case_variant(draw, domain) + draw(
        st.sampled_from(["", "."]))


def _rules(*views: PartnerRuleView) -> PartnerRules:
    rules = PartnerRules()
    rules.set_rules(list(views))
    return rules


@settings(max_examples=200, deadline=None)
@given(sender=sender_variant())
def test_case_and_final_dot_never_bypass_an_exact_rule(sender):
    rules = _rules(PartnerRuleView("example.com", PARTNER, require_cert=True, ca_file="x"))
    assert rules.rule_for("example.com", sender) is not None
    assert rules.starttls_first(sender) is not None


@settings(max_examples=200, deadline=None)
@given(sub=st.lists(label, min_size=1, max_size=3), upper=st.booleans())
def test_sub_domains_are_covered_by_wildcards_only(sub, upper):
    domain = ".".join(sub) + "." + PARTNER
    sender = "u@" + (domain.upper() if upper else domain)
    exact = _rules(PartnerRuleView("example.com", PARTNER, min_tls="1.2"))
    wild = _rules(PartnerRuleView("example.com", "*." + PARTNER, min_tls="1.2"))
    assert exact.rule_for("example.com", sender) is None
    assert wild.rule_for("example.com", sender) is not None and wild.starttls_first(sender) is not None
    # Look-alikes that only end in the same letters are not sub-domains.
    assert wild.rule_for("example.com", "u@" + "".join(sub) + PARTNER) is None
    assert wild.rule_for("example.com", "u@" + PARTNER) is None


@settings(max_examples=100, deadline=None)
@given(other=st.lists(label, min_size=1, max_size=3))
def test_other_domains_are_never_covered(other):
    domain = ".".join(other) + ".test"
    assert not covers(PARTNER, domain) and not covers("*." + PARTNER, domain)
    assert sender_domain_of("u@" + domain) == domain


def test_pattern_normalization():
    assert normalize_pattern(" *.Partner.Example. ") == "*.partner.example"
    assert normalize_pattern("bücher.example") == "xn--bcher-kva.example"
    for bad in ("*", "*.", "a..b", "a*b.example", "u@partner.example", "[127.0.0.1]", ""):
        with pytest.raises(ValidationFailed):
            normalize_pattern(bad)
    assert sender_domain_of("<>") is None and sender_domain_of("") is None


@pytest.mark.parametrize("presented, host, ok", [
    ("mta.partner.example", "MTA.partner.example.", True),
    ("*.partner.example", "mta.partner.example", True),
    ("*.partner.example", "a.b.partner.example", False),
    ("*.partner.example", "partner.example", False),
    ("*.example", "partner.example", False),
    ("m*a.partner.example", "mta.partner.example", False),
    ("*", "partner", False),
    ("mta.partner.example", "mta.partner.example.evil", False),
])
def test_rfc6125_name_matching(presented, host, ok):
    assert name_matches(presented, host) is ok


# -- real MTAs as the partner -------------------------------------------------------------

def swaks(port: int, sender: str, to: str, *extra: str) -> subprocess.CompletedProcess:
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed; run scripts/install-peers.sh as root")
    return subprocess.run(["swaks", "-s", "127.0.0.1", "-p", str(port), "-f", sender, "-t", to,
                           "--h-Subject", "partner test", "--body", "Hello from the partner", "--timeout", "20",
                           *extra], capture_output=True, text=True, timeout=60)


def split_pem(tmp_path, cert: trustme.LeafCert, name: str) -> tuple[str, str]:
    cert_file, key_file = tmp_path / f"{name}-cert.pem", tmp_path / f"{name}-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return str(cert_file), str(key_file)


def test_swaks_as_the_partner_with_and_without_a_client_certificate(gateway, served, add_rule, files, tmp_path,
                                                                     partner_cert, partner_ca):
    add_rule(require_cert=True, ca_file=files["ca"])
    cert_file, key_file = split_pem(tmp_path, partner_cert, "swaks")
    proc = swaks(gateway.port, f"bob@{PARTNER}", "alice@example.com", "-tls", "--tls-cert", cert_file,
                 "--tls-key", key_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert served.wait_for(1)
    assert f"sha256 {fingerprint(partner_cert)}".encode() in served.messages[0].data
    proc = swaks(gateway.port, f"bob@{PARTNER}", "alice@example.com", "-tls")
    assert "<~* 550 5.7.1 mail from partner.example to example.com" in proc.stdout, proc.stdout
    assert "no client certificate was presented" in proc.stdout
    proc = swaks(gateway.port, f"bob@{PARTNER}", "alice@example.com")
    assert "<** 530 5.7.0 Must issue a STARTTLS command first" in proc.stdout, proc.stdout
    # A revoked certificate, shown by swaks, is refused once the CRL lists it.
    gateway.run(partner_service.remove_rule(gateway.store, "example.com", PARTNER))
    add_rule(require_cert=True, ca_file=files["ca"], crl_file=make_crl(partner_ca, [leaf(partner_cert)],
                                                                       tmp_path / "swaks.crl"))
    proc = swaks(gateway.port, f"bob@{PARTNER}", "alice@example.com", "-tls", "--tls-cert", cert_file,
                 "--tls-key", key_file)
    assert "<~* 550 5.7.1" in proc.stdout and "certificate revoked" in proc.stdout, proc.stdout
    assert len(served.messages) == 1


@pytest.mark.parametrize("with_cert", [True, False])
def test_postfix_as_the_partner(gateway, served, add_rule, files, tmp_path, partner_cert, with_cert):
    add_rule(require_cert=True, ca_file=files["ca"], cert_host="mta.partner.example")
    extra = {"relay_domains": "example.com", "myorigin": PARTNER}
    if with_cert:
        cert_file, key_file = split_pem(tmp_path, partner_cert, "pf")
        extra.update({"smtp_tls_cert_file": cert_file, "smtp_tls_key_file": key_file})
    pf = PostfixInstance(Path(tempfile.mkdtemp(prefix="mxguard-pfp-")), f"127.0.0.1:{gateway.port}",
                         smtp_tls_level="encrypt", extra=extra).start()
    try:
        proc = swaks(pf.port, f"bob@{PARTNER}", "alice@example.com")
        assert proc.returncode == 0, proc.stdout
        if with_cert:
            log = pf.wait_log("status=sent")
            assert served.wait_for(1, timeout=30)
            assert b"from relay.postfix.test ([127.0.0.1])" in served.messages[0].data
            rec = gateway.wait_records(1)[-1]
            assert rec.helo == "relay.postfix.test" and rec.client_cert_sha256 == fingerprint(partner_cert)
        else:
            log = pf.wait_log("status=bounced")
            assert "550 5.7.1" in log and "no client certificate was presented" in log
            assert served.messages == []
        assert "TLS connection established to 127.0.0.1" in log
    finally:
        pf.stop()


# -- revocation downstream -----------------------------------------------------------------

def test_downstream_verify_with_a_crl_listing_the_servers_certificate(gateway, tls_sink, add_domain, ca_file, ca,
                                                                      downstream_cert, tmp_path):
    clean = make_crl(ca, [], tmp_path / "clean.crl")
    add_domain("example.com", [tls_sink.address], downstream_tls="verify", tls_ca_file=str(ca_file),
               tls_crl_file=clean)
    assert send(gateway.port, ["alice@example.com"]).data[0] == 250
    assert tls_sink.wait_for(1)
    revoked = make_crl(ca, [leaf(downstream_cert)], tmp_path / "revoked.crl")
    add_domain("example.org", [tls_sink.address], downstream_tls="verify", tls_ca_file=str(ca_file),
               tls_crl_file=revoked)
    out = send(gateway.port, ["alice@example.org"])
    code, text = out.rcpt["alice@example.org"]
    assert code == 451 and text.startswith("4.7.5")
    time.sleep(0.3)
    assert len(tls_sink.messages) == 1, "nothing may be sent to a revoked server"
    failure = gateway.wait_records(2)[-1].downstream[0]["failure"]
    assert "certificate revoked" in failure


def test_domain_crl_is_validated(gateway, tls_sink, add_domain, ca_file, tmp_path):
    not_a_crl = tmp_path / "x.crl"
    not_a_crl.write_text("hello")
    with pytest.raises(ValidationFailed) as err:
        add_domain("example.net", [tls_sink.address], downstream_tls="verify", tls_ca_file=str(ca_file),
                   tls_crl_file=str(not_a_crl))
    assert err.value.field == "tls_crl_file"
    with pytest.raises(ValidationFailed) as err:
        add_domain("example.net", [tls_sink.address], downstream_tls="required",
                   tls_crl_file=make_crl(trustme.CA(), [], tmp_path / "ok.crl"))
    assert err.value.field == "tls_crl_file" and "verify" in err.value.message


# -- the CLI -------------------------------------------------------------------------------

def test_cli_partner_add_list_remove(tmp_path, files, partner_cert):
    import json
    import os
    import sys

    exe = str(Path(sys.executable).with_name("mxguard"))
    d = tmp_path / "d"

    def mx(*args, check=True):
        proc = subprocess.run([exe, "--data-dir", str(d), *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "COLUMNS": "200"})
        assert not check or proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    mx("init", "--hostname", "mx1.example.com")
    mx("domain", "add", "example.com", "--server", "127.0.0.1:2525")
    out = mx("domain", "partner", "add", "example.com", "--sender", "Partner.Example", "--client-cert",
             "--ca-file", files["ca"], "--fingerprint", fingerprint(partner_cert), "--cert-host", "mta.partner.example")
    assert "mail from partner.example must arrive over TLS 1.2+ with a client certificate" in out.stdout
    rules = json.loads(mx("domain", "partner", "list", "example.com", "--json").stdout)
    assert rules[0]["sender"] == "partner.example" and rules[0]["fingerprints"] == [fingerprint(partner_cert)]
    bad = mx("domain", "partner", "add", "example.com", "--sender", "x.example", "--fingerprint", "zz", check=False)
    assert bad.returncode != 0 and "fingerprints" in bad.stderr and "Traceback" not in bad.stderr
    again = mx("domain", "partner", "add", "example.com", "--sender", "partner.example", check=False)
    assert again.returncode != 0 and "already" in again.stderr
    assert "Removed" in mx("domain", "partner", "remove", "example.com", "--sender", "partner.example").stdout
    assert json.loads(mx("domain", "partner", "list", "example.com", "--json").stdout) == []
    # --store-ca keeps the CA's certificates in the database: the file may go away afterwards.
    copy = tmp_path / "copy-of-ca.pem"
    copy.write_bytes(Path(files["ca"]).read_bytes())
    mx("domain", "partner", "add", "example.com", "--sender", "stored.example", "--client-cert", "--store-ca", str(copy))
    copy.unlink()
    [stored] = json.loads(mx("domain", "partner", "list", "example.com", "--json").stdout)
    assert stored["ca_file"] is None and stored["ca_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert "Partner CA" in stored["ca_subjects"][0]
    assert "stored: " in mx("domain", "partner", "list", "example.com").stdout
    gone = mx("domain", "partner", "add", "example.com", "--sender", "x.example", "--store-ca", str(copy), check=False)
    assert gone.returncode == 2 and "cannot read" in gone.stderr and "Traceback" not in gone.stderr
    assert "Removed" in mx("domain", "partner", "remove", "example.com", "--sender", "stored.example").stdout
    import sqlite3
    with sqlite3.connect(d / "mxguard.db") as db:
        actions = [row[0] for row in db.execute("SELECT action FROM audit_log WHERE target LIKE 'example.com %'")]
    assert actions == ["domain.partner.add", "domain.partner.remove"] * 2
