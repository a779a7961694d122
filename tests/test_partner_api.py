"""Partner TLS rules through the REST API (API keys) and the console (session, CSRF), on a real
gateway over HTTPS: create, list, remove; a CA given as PEM text enforced on a real STARTTLS
session with and without the partner's client certificate; malformed fingerprints, CA PEM blobs
and unknown domains refused with a 4xx naming the field, changing nothing (hypothesis)."""

from __future__ import annotations

import base64

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxguard.services import partners as partner_service
from mxguard.services.access import SYSTEM
from tests.support.smtp import message, send
from tests.support.web import csrf_token
from tests.test_partner_tls import client_ctx, fingerprint, write_pem

PARTNER = "partner.example"


@pytest.fixture(scope="module")
def partner_ca() -> trustme.CA:
    return trustme.CA(organization_name="Partner API CA")


@pytest.fixture(scope="module")
def partner_cert(partner_ca) -> trustme.LeafCert:
    return partner_ca.issue_cert("mta.partner.example", common_name="mta.partner.example")


@pytest.fixture
def acme_org(web, tls_sink):
    """Organization Acme with example.com (downstream: the TLS sink), its org-admin's API key and a
    logged-in console session of that org-admin; Globex with globex.test."""
    tenant = web.tenant("Acme", "ops@acme.test")
    web.add_org("Globex")
    admin = web.api(web.admin_key)
    for name, org in (("example.com", "Acme"), ("globex.test", "Globex")):
        assert admin.post("/domains", json={"name": name, "servers": [tls_sink.address], "org": org}).status_code == 201
    console, reply = web.login(tenant.email)
    assert reply.status_code == 303
    return {"api": web.api(tenant.key), "admin": admin, "console": console}


def partner_audit(admin) -> list[str]:
    """The audit log's partner rule entries, newest first (``action target``)."""
    return [f"{e['action']} {e['target']}" for action in ("domain.partner.add", "domain.partner.remove")
            for e in admin.get("/audit", params={"action": action}).json()]


def partner_send(web, cert_file: str | None = None, *, starttls: bool = True):
    sender = f"bob@{PARTNER}"
    return send(web.gw.port, ["alice@example.com"], message(sender=sender, to="alice@example.com"), sender=sender,
                starttls=starttls, ctx=client_ctx(cert_file))


# -- the API ---------------------------------------------------------------------------------------

def test_create_list_remove_with_an_api_key_and_the_rule_applies(web, acme_org, tls_sink, partner_ca, partner_cert,
                                                                 tmp_path):
    api, admin = acme_org["api"], acme_org["admin"]
    assert api.get("/domains/example.com/partners").json() == []
    ca_text = "# the partner's CA\n" + partner_ca.cert_pem.bytes().decode()
    created = api.post("/domains/example.com/partners", json={
        "sender": "Partner.Example.", "ca_pem": ca_text, "fingerprints": [fingerprint(partner_cert).upper()],
        "cert_host": "mta.partner.example"})
    assert created.status_code == 201, created.text
    rule = created.json()
    assert rule["sender"] == PARTNER and rule["require_cert"] is True and rule["ca_file"] is None
    assert rule["ca_pem"].startswith("-----BEGIN CERTIFICATE-----")  # stored as the certificates alone
    assert rule["ca_subjects"] and "Partner API CA" in rule["ca_subjects"][0]
    assert rule["fingerprints"] == [fingerprint(partner_cert)]
    assert [r["sender"] for r in api.get("/domains/example.com/partners").json()] == [PARTNER]

    # The stored CA is what the SMTP side checks: in clear 530, without a certificate 550, with it delivered.
    out = partner_send(web, starttls=False)
    assert out.mail[0] == 530 and out.mail[1].startswith("5.7.0")
    out = partner_send(web)
    assert out.rcpt["alice@example.com"][0] == 550
    assert "no client certificate was presented" in out.rcpt["alice@example.com"][1]
    cert_file = write_pem(tmp_path / "client.pem", partner_cert.private_key_pem, *partner_cert.cert_chain_pems)
    out = partner_send(web, cert_file)
    assert out.rcpt["alice@example.com"][0] == 250 and out.data[0] == 250, out
    tls_sink.wait_for(1)

    # A second rule for the same pattern: 409; an org-admin may not name files on the gateway: 403.
    again = api.post("/domains/example.com/partners", json={"sender": PARTNER})
    assert again.status_code == 409 and "remove it first" in again.json()["detail"]
    ca_path = write_pem(tmp_path / "ca.pem", partner_ca.cert_pem)
    denied = api.post("/domains/example.com/partners", json={"sender": "other.example", "ca_file": ca_path})
    assert denied.status_code == 403
    # The administrator may; a CA file and PEM text at once is refused naming ca_pem.
    both = admin.post("/domains/example.com/partners", json={"sender": "other.example", "ca_file": ca_path,
                                                             "ca_pem": ca_text})
    assert both.status_code == 422 and both.json()["detail"][0]["loc"] == ["body", "ca_pem"]
    assert admin.post("/domains/example.com/partners", json={"sender": "*.other.example", "ca_file": ca_path,
                                                             "require_cert": True}).status_code == 201
    listed = api.get("/domains/example.com/partners").json()
    assert [(r["sender"], r["ca_file"]) for r in listed] == [("*.other.example", ca_path), (PARTNER, None)]

    # Another organization's domain does not exist for this key.
    assert api.get("/domains/globex.test/partners").status_code == 404
    assert api.post("/domains/globex.test/partners", json={"sender": PARTNER}).status_code == 404

    assert api.delete(f"/domains/example.com/partners/{PARTNER}").status_code == 204
    assert api.delete("/domains/example.com/partners/*.other.example").status_code == 204
    assert api.get("/domains/example.com/partners").json() == []
    gone = api.delete(f"/domains/example.com/partners/{PARTNER}")
    assert gone.status_code == 404 and "no partner rule for partner.example" in gone.json()["detail"]
    out = partner_send(web, starttls=False)  # the rule is gone from the SMTP side too
    assert out.mail[0] == 250 and out.rcpt["alice@example.com"][0] == 250
    assert sorted(partner_audit(admin)) == [
        "domain.partner.add example.com *.other.example", "domain.partner.add example.com partner.example",
        "domain.partner.remove example.com *.other.example", "domain.partner.remove example.com partner.example"]


HEX = "0123456789abcdefABCDEF"


@st.composite
def malformed_fingerprint(draw) -> str:
    """Never a SHA-256 fingerprint: a wrong number of hex digits, or 64 with a non-hex character in them."""
    if draw(st.booleans()):
        length = draw(st.integers(0, 130).filter(lambda n: n != 64))
        digits = draw(st.text(alphabet=HEX, min_size=length, max_size=length))
        return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2)) if draw(st.booleans()) else digits
    digits = list(draw(st.text(alphabet=HEX, min_size=64, max_size=64)))
    bad = draw(st.characters(blacklist_characters=HEX + ": ", blacklist_categories=("Cs",)))
    digits[draw(st.integers(0, 63))] = bad
    return "".join(digits)


@st.composite
def malformed_pem(draw, real_pem: str) -> str:
    """Never a PEM certificate: no certificate block at all, garbage or a truncated body inside one,
    or another kind of PEM block."""
    kind = draw(st.sampled_from(["text", "garbage", "truncated", "other-block"]))
    if kind == "text":
        return draw(st.text(min_size=1, max_size=300).filter(lambda t: "-----BEGIN" not in t and t.strip()))
    if kind == "garbage":
        body = base64.b64encode(draw(st.binary(min_size=1, max_size=200))).decode()
        return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"
    if kind == "truncated":
        body = "".join(real_pem.strip().splitlines()[1:-1])
        cut = draw(st.integers(4, len(body) - 8))
        return f"-----BEGIN CERTIFICATE-----\n{body[:cut]}\n-----END CERTIFICATE-----\n"
    label = draw(st.sampled_from(["PRIVATE KEY", "X509 CRL", "PUBLIC KEY", "CERTIFICATE REQUEST"]))
    body = base64.b64encode(draw(st.binary(min_size=16, max_size=200))).decode()
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_malformed_input_is_422_naming_the_field_and_changes_nothing(web, acme_org, partner_ca):
    api, admin = acme_org["api"], acme_org["admin"]
    real_pem = partner_ca.cert_pem.bytes().decode()
    assert api.post("/domains/example.com/partners", json={"sender": "kept.example"}).status_code == 201
    before = (api.get("/domains/example.com/partners").json(), partner_audit(admin))

    def refused(body: dict, field: str, words: str) -> None:
        reply = api.post("/domains/example.com/partners", json=body)
        assert reply.status_code == 422, (body, reply.status_code, reply.text)
        detail = reply.json()["detail"]
        assert ["body", field] in [d["loc"] for d in detail], detail
        assert any(words in d["msg"] for d in detail), detail
        assert "Traceback" not in reply.text

    @HYPOTHESIS
    @given(bad=malformed_fingerprint(), good=st.booleans())
    def fingerprints(bad: str, good: bool) -> None:
        listed = ([fingerprint_of_any] if good else []) + [bad]
        refused({"sender": PARTNER, "ca_pem": real_pem, "fingerprints": listed}, "fingerprints",
                "must be a SHA-256 fingerprint")

    @HYPOTHESIS
    @given(blob=malformed_pem(real_pem))
    def pem_blobs(blob: str) -> None:
        refused({"sender": PARTNER, "require_cert": True, "ca_pem": blob}, "ca_pem", "")

    fingerprint_of_any = "ab" * 32
    fingerprints()
    pem_blobs()
    # An empty or whitespace-only CA with a certificate required: the CA is asked for.
    refused({"sender": PARTNER, "require_cert": True, "ca_pem": " \n"}, "ca_file", "a client certificate is required")
    # Unknown domain: 404 naming it, for valid and invalid bodies alike.
    for name in ("nowhere.example", "globex.test"):
        reply = api.post(f"/domains/{name}/partners", json={"sender": PARTNER, "ca_pem": real_pem})
        assert reply.status_code == 404 and name in reply.json()["detail"]
    assert (api.get("/domains/example.com/partners").json(), partner_audit(admin)) == before
    assert [r.sender for r in web.run(partner_service.list_rules(web.gw.store, "example.com", actor=SYSTEM))] == \
        ["kept.example"]


# -- the console -----------------------------------------------------------------------------------

def test_console_page_adds_and_removes_a_rule_for_its_organizations_admin(web, acme_org, partner_ca, partner_cert):
    console, api = acme_org["console"], acme_org["api"]
    page = console.get("/domains/example.com")
    assert page.status_code == 200 and 'href="/domains/example.com/partners"' in page.text
    page = console.get("/domains/example.com/partners")
    assert page.status_code == 200 and 'id="no-partner-rules"' in page.text
    assert 'name="ca_file"' not in page.text  # paths on the gateway host: administrators only
    token = csrf_token(page.text)
    form = {"sender": PARTNER, "min_tls": "1.3", "require_cert": "on", "ca_pem": partner_ca.cert_pem.bytes().decode(),
            "fingerprints": fingerprint(partner_cert), "cert_host": "mta.partner.example"}

    # Without the form's CSRF token: 403 and nothing stored.
    assert console.post("/domains/example.com/partners", data=form).status_code == 403
    assert console.post("/domains/example.com/partners", data={**form, "csrf_token": "forged"}).status_code == 403
    # A bad fingerprint: the form again, naming the field, the input kept, nothing stored.
    bad = console.post("/domains/example.com/partners", data={**form, "fingerprints": "abc", "csrf_token": token})
    assert bad.status_code == 422 and "fingerprints:" in bad.text and 'aria-invalid="true"' in bad.text
    assert "mta.partner.example" in bad.text
    assert api.get("/domains/example.com/partners").json() == []

    # The CA as an uploaded file instead of pasted text.
    files = {"ca_pem_file": ("partner-ca.pem", partner_ca.cert_pem.bytes(), "application/x-pem-file")}
    added = console.post("/domains/example.com/partners", data={**form, "ca_pem": "", "csrf_token": token},
                         files=files)
    assert added.status_code == 303 and added.headers["location"] == "/domains/example.com/partners?saved=added"
    page = console.get(added.headers["location"])
    assert 'id="partner-saved"' in page.text and "Partner API CA" in page.text
    assert "over TLS 1.3+ with a client certificate from its CA" in page.text
    [rule] = api.get("/domains/example.com/partners").json()
    assert (rule["min_tls"], rule["cert_host"], rule["fingerprints"]) == ("1.3", "mta.partner.example",
                                                                          [fingerprint(partner_cert)])
    again = console.post("/domains/example.com/partners", data={**form, "csrf_token": token})
    assert again.status_code == 409 and "remove it first" in again.text

    # Another organization's domain: 404 on every partner page.
    for call in (lambda: console.get("/domains/globex.test/partners"),
                 lambda: console.post("/domains/globex.test/partners", data={**form, "csrf_token": token}),
                 lambda: console.post("/domains/globex.test/partners/remove",
                                      data={"sender": PARTNER, "csrf_token": token})):
        assert call().status_code == 404

    removed = console.post("/domains/example.com/partners/remove", data={"sender": PARTNER, "csrf_token": token})
    assert removed.status_code == 303 and removed.headers["location"].endswith("saved=removed")
    assert api.get("/domains/example.com/partners").json() == []
    missing = console.post("/domains/example.com/partners/remove", data={"sender": PARTNER, "csrf_token": token})
    assert missing.status_code == 404 and "no partner rule" in missing.text

    # Markup in what the page echoes (a CA's subject, a refused sender) is escaped.
    hostile_ca = trustme.CA(organization_name="<img src=x onerror=alert(1)>")
    assert api.post("/domains/example.com/partners", json={"sender": PARTNER, "require_cert": True,
                                                           "ca_pem": hostile_ca.cert_pem.bytes().decode()}).status_code == 201
    page = console.get("/domains/example.com/partners").text
    assert "&lt;img src=x onerror=alert(1)" in page.replace("\\", "") and "<img src=x" not in page
    refused = console.post("/domains/example.com/partners", data={"sender": "<script>alert(1)</script>",
                                                                  "csrf_token": token})
    assert refused.status_code == 422 and "<script>alert(1)" not in refused.text and "&lt;script&gt;" in refused.text

    # A Message Center user gets 403 on the page and its forms.
    web.add_user("clerk@example.com", "user", "Acme")
    clerk, reply = web.login("clerk@example.com")
    assert reply.status_code == 303
    assert clerk.get("/domains/example.com/partners").status_code == 403
    assert clerk.post("/domains/example.com/partners", data=form).status_code == 403


def test_domain_form_edits_the_downstream_crl_file_for_admins(web, acme_org, tmp_path, partner_ca):
    from tests.test_partner_tls import make_crl
    admin_console, reply = web.login("admin@gw.test")
    assert reply.status_code == 303
    crl = make_crl(partner_ca, [], tmp_path / "org.crl")
    ca = write_pem(tmp_path / "org-ca.pem", partner_ca.cert_pem)
    page = admin_console.get("/domains/example.com")
    assert 'name="tls_crl_file"' in page.text
    form = {"servers": acme_org["admin"].get("/domains/example.com").json()["servers"][0], "inbound_tls": "optional",
            "downstream_tls": "verify", "tls_ca_file": ca, "tls_crl_file": crl, "tls_fingerprint": "",
            "tls_min_version": "1.2", "org": "Acme", "csrf_token": csrf_token(page.text)}
    saved = admin_console.post("/domains/example.com", data=form)
    assert saved.status_code == 303, saved.text
    assert acme_org["admin"].get("/domains/example.com").json()["tls_crl_file"] == crl
    assert f'value="{crl}"' in admin_console.get("/domains/example.com").text
    # Not a CRL: the form again naming the field, the stored value kept.
    bad = admin_console.post("/domains/example.com", data={**form, "tls_crl_file": ca})
    assert bad.status_code == 422 and "tls_crl_file" in bad.text
    assert acme_org["admin"].get("/domains/example.com").json()["tls_crl_file"] == crl
    # An org-admin may not point it at a file on the gateway host.
    console = acme_org["console"]
    other = make_crl(partner_ca, [], tmp_path / "other.crl")
    token = csrf_token(console.get("/").text)
    denied = console.post("/domains/example.com", data={**form, "tls_crl_file": other, "csrf_token": token})
    assert denied.status_code == 403 and "only an administrator sets tls_crl_file" in denied.text
    assert acme_org["admin"].get("/domains/example.com").json()["tls_crl_file"] == crl
    # Saving the form as shown (the administrator's CRL unchanged) is allowed.
    assert console.post("/domains/example.com", data={**form, "csrf_token": token}).status_code == 303
