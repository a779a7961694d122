"""REST API /api/v1 over real HTTPS on a running gateway: every endpoint, authorization, validation."""

from __future__ import annotations

import ssl
import smtplib

import pytest

from mxguard.tls.certs import describe_der, generate_self_signed
from tests.support.smtp import message, send


def _field_errors(reply) -> list[str]:
    assert reply.status_code == 422, reply.text
    return [e["loc"][-1] for e in reply.json()["detail"]]


# -- authentication ---------------------------------------------------------------------

def test_no_key_bad_key_and_revoked_key_get_401(web):
    assert web.api(None).get("/domains").status_code == 401
    reply = web.api("mxg_00000000_nope").get("/domains")
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    key = web.api_key("admin@gw.test")
    assert web.api(key).get("/me").status_code == 200
    from mxguard.services.apikeys import revoke_api_key
    web.run(revoke_api_key(web.gw.store, key.split("_")[1]))
    assert web.api(key).get("/me").status_code == 401


def test_me_names_the_user_and_role(web):
    tenant = web.tenant("Acme", "ops@acme.test")
    assert web.api(web.admin_key).get("/me").json() == {
        "email": "admin@gw.test", "role": "admin", "org": None,
        "actor": f"apikey:{web.admin_key.split('_')[1]} (admin@gw.test)"}
    me = web.api(tenant.key).get("/me").json()
    assert (me["email"], me["role"], me["org"]) == ("ops@acme.test", "org-admin", "Acme")


def test_openapi_document_lists_the_endpoints(web):
    doc = web.api(None).get("/openapi.json").json()
    for path in ("/api/v1/domains", "/api/v1/domains/{name}", "/api/v1/domains/{name}/test", "/api/v1/messages",
                 "/api/v1/messages/{entry_id}", "/api/v1/tls/certificate", "/api/v1/tls/domains", "/api/v1/orgs",
                 "/api/v1/users", "/api/v1/audit", "/api/v1/dashboard", "/api/v1/me"):
        assert path in doc["paths"], path
    assert "/login" not in doc["paths"]


# -- organizations and users ------------------------------------------------------------

def test_orgs_create_list_and_validation(web):
    api = web.api(web.admin_key)
    reply = api.post("/orgs", json={"name": "Acme Corp"})
    assert reply.status_code == 201 and reply.json()["name"] == "Acme Corp"
    assert api.post("/orgs", json={"name": "Acme Corp"}).status_code == 409
    assert _field_errors(api.post("/orgs", json={"name": "<b>bad</b>"})) == ["name"]
    assert _field_errors(api.post("/orgs", json={})) == ["name"]
    assert [o["name"] for o in api.get("/orgs").json()] == ["Acme Corp"]
    tenant = web.tenant("Globex", "ops@globex.test")
    assert [o["name"] for o in web.api(tenant.key).get("/orgs").json()] == ["Globex"]
    assert web.api(tenant.key).post("/orgs", json={"name": "Mine"}).status_code == 403


def test_users_create_list_roles_and_validation(web):
    api = web.api(web.admin_key)
    api.post("/orgs", json={"name": "Acme"})
    # Message Center users need an address in one of their organization's domains.
    assert api.post("/domains", json={"name": "acme.test", "servers": ["a.test"], "org": "Acme"}).status_code == 201
    reply = api.post("/users", json={"email": "Boss@Acme.test", "role": "org-admin", "org": "Acme"})
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert body["email"] == "boss@acme.test" and body["org"] == "Acme" and len(body["generated_password"]) >= 16
    assert api.post("/users", json={"email": "boss@acme.test", "role": "user", "org": "Acme"}).status_code == 409
    assert _field_errors(api.post("/users", json={"email": "x@acme.test", "role": "owner", "org": "Acme"})) == ["role"]
    assert _field_errors(api.post("/users", json={"email": "x@acme.test", "role": "user"})) == ["org"]
    assert _field_errors(api.post("/users", json={"email": "not-an-address", "role": "admin"})) == ["email"]
    assert _field_errors(api.post("/users", json={"email": "x@acme.test", "role": "admin",
                                                  "password": "short"})) == ["password"]
    boss = web.api(web.api_key("boss@acme.test"))
    reply = boss.post("/users", json={"email": "clerk@acme.test", "role": "user", "org": "Acme",
                                      "password": "a long enough password"})
    assert reply.status_code == 201 and reply.json()["generated_password"] is None
    assert boss.post("/users", json={"email": "root@acme.test", "role": "admin"}).status_code == 403
    web.tenant("Globex", "ops@globex.test")
    assert boss.post("/users", json={"email": "spy@globex.test", "role": "user", "org": "Globex"}).status_code == 403
    assert sorted(u["email"] for u in boss.get("/users").json()) == ["boss@acme.test", "clerk@acme.test"]
    assert "ops@globex.test" in [u["email"] for u in api.get("/users").json()]
    clerk = web.api(web.api_key("clerk@acme.test"))
    assert clerk.get("/domains").status_code == 403  # a plain user has the Message Center only


# -- domains ----------------------------------------------------------------------------

def test_domain_crud(web, tls_sink):
    api = web.api(web.admin_key)
    reply = api.post("/domains", json={"name": "Example.COM", "servers": [f"127.0.0.1:{tls_sink.port}"],
                                       "downstream_tls": "required"})
    assert reply.status_code == 201, reply.text
    assert reply.json()["name"] == "example.com" and reply.json()["downstream_tls"] == "required"
    assert api.post("/domains", json={"name": "example.com", "servers": ["a.test"]}).status_code == 409
    assert [d["name"] for d in api.get("/domains").json()] == ["example.com"]
    assert api.get("/domains/example.com").json()["servers"] == [f"127.0.0.1:{tls_sink.port}"]
    reply = api.patch("/domains/example.com", json={"inbound_tls": "required", "servers": ["a.test", "b.test:2525"]})
    assert reply.status_code == 200
    assert reply.json()["before"]["inbound_tls"] == "optional"
    assert reply.json()["after"]["servers"] == ["a.test:25", "b.test:2525"]
    assert api.delete("/domains/example.com").status_code == 204
    assert api.get("/domains/example.com").status_code == 404
    assert api.delete("/domains/example.com").status_code == 404


@pytest.mark.parametrize("body, field", [
    ({"name": "example.com", "servers": ["a.test"], "downstream_tls": "sometimes"}, "downstream_tls"),
    ({"name": "example.com", "servers": ["a.test"], "inbound_tls": "yes"}, "inbound_tls"),
    ({"name": "example.com", "servers": []}, "servers"),
    ({"name": "example.com", "servers": ["a.test:99999"]}, "servers"),
    ({"name": "example.com", "servers": ["a.test", "a.test:25"]}, "servers"),
    ({"name": "not a domain", "servers": ["a.test"]}, "name"),  # the body's own field name
    ({"name": "example.com", "servers": ["a.test"], "tls_min_version": "1.1"}, "tls_min_version"),
    ({"name": "example.com", "servers": ["a.test"], "downstream_tls": "verify", "tls_fingerprint": "abc"},
     "tls_fingerprint"),
    ({"name": "example.com", "servers": ["a.test"], "tls_ca_file": "/nonexistent/ca.pem",
      "downstream_tls": "verify"}, "tls_ca_file"),
    ({"name": "example.com", "servers": ["a.test"], "org": "Nobody Inc"}, "org"),
    ({"name": "example.com", "servers": ["a.test"], "colour": "blue"}, "colour"),
])
def test_domain_validation_errors_name_the_field(web, body, field):
    reply = web.api(web.admin_key).post("/domains", json=body)
    assert _field_errors(reply) == [field], reply.text
    assert web.api(web.admin_key).get("/domains").json() == []


def test_every_invalid_field_is_reported_at_once(web):
    """One request, several bad values: FastAPI's list names each, from the schema and from the service."""
    api = web.api(web.admin_key)
    schema = api.post("/domains", json={"name": "example.com", "servers": [], "downstream_tls": "sometimes",
                                        "inbound_tls": "yes"})
    assert sorted(_field_errors(schema)) == ["downstream_tls", "inbound_tls", "servers"]
    service = api.post("/domains", json={"name": "not a domain", "servers": ["a.test:99999"],
                                         "downstream_tls": "verify", "tls_fingerprint": "abc",
                                         "tls_ca_file": "/nonexistent/ca.pem"})
    assert _field_errors(service) == ["name", "servers", "tls_fingerprint", "tls_ca_file"], service.text
    assert all(e["msg"] and e["type"] == "value_error" for e in service.json()["detail"])
    api.post("/domains", json={"name": "example.com", "servers": ["a.test"]})
    patch = api.patch("/domains/example.com", json={"servers": ["a.test:0"], "tls_fingerprint": "zz"})
    assert _field_errors(patch) == ["servers", "tls_fingerprint"], patch.text
    assert web.api(web.admin_key).get("/domains/example.com").json()["servers"] == ["a.test:25"]


def test_patch_validation_names_the_field(web):
    api = web.api(web.admin_key)
    api.post("/domains", json={"name": "example.com", "servers": ["a.test"]})
    assert _field_errors(api.patch("/domains/example.com", json={"downstream_tls": "maybe"})) == ["downstream_tls"]
    assert _field_errors(api.patch("/domains/example.com", json={"tls_fingerprint": "ab" * 32})) == ["tls_fingerprint"]
    assert api.get("/domains/example.com").json()["downstream_tls"] == "opportunistic"


def test_org_admin_sees_only_own_domains_and_gets_404_for_others(web):
    acme = web.tenant("Acme", "ops@acme.test")
    globex = web.tenant("Globex", "ops@globex.test")
    admin = web.api(web.admin_key)
    assert admin.post("/domains", json={"name": "globex.test", "servers": ["mx.globex.test"],
                                        "org": "Globex"}).status_code == 201
    a = web.api(acme.key)
    reply = a.post("/domains", json={"name": "acme.test", "servers": ["mx.acme.test"]})
    assert reply.status_code == 201 and reply.json()["org"] == "Acme"
    assert [d["name"] for d in a.get("/domains").json()] == ["acme.test"]
    assert a.get("/domains/globex.test").status_code == 404
    assert a.patch("/domains/globex.test", json={"downstream_tls": "off"}).status_code == 404
    assert a.delete("/domains/globex.test").status_code == 404
    assert a.post("/domains/globex.test/test").status_code == 404
    assert _field_errors(a.post("/domains", json={"name": "x.test", "servers": ["a.test"], "org": "Globex"})) == ["org"]
    assert a.patch("/domains/acme.test", json={"org": "Globex"}).status_code == 403
    assert admin.get("/domains/globex.test").json()["downstream_tls"] == "opportunistic"
    assert sorted(d["name"] for d in admin.get("/domains").json()) == ["acme.test", "globex.test"]
    assert [d["name"] for d in web.api(globex.key).get("/domains").json()] == ["globex.test"]


def test_domain_change_applies_to_the_next_smtp_transaction(web, plain_sink):
    api = web.api(web.admin_key)
    api.post("/domains", json={"name": "example.com", "servers": [f"127.0.0.1:{plain_sink.port}"]})
    assert send(web.gw.port, ["a@example.com"]).data[0] == 250
    api.patch("/domains/example.com", json={"downstream_tls": "required"})
    out = send(web.gw.port, ["b@example.com"])
    assert out.rcpt["b@example.com"][0] == 451 and out.rcpt["b@example.com"][1].startswith("4.7.5")
    assert len(plain_sink.messages) == 1


def test_connection_test_reports_tls_certificate_and_policy(web, tls_sink, plain_sink, ca_file, downstream_cert):
    api = web.api(web.admin_key)
    api.post("/domains", json={"name": "example.com", "servers": [f"127.0.0.1:{tls_sink.port}"],
                               "downstream_tls": "verify", "tls_ca_file": str(ca_file)})
    api.post("/domains", json={"name": "legacy.test", "servers": [f"127.0.0.1:{plain_sink.port}"],
                               "downstream_tls": "required"})
    reply = api.post("/domains/example.com/test")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    server = body["servers"][0]
    assert server["reachable"] and server["starttls_offered"] and server["verified"] is True
    assert server["tls_version"] in ("TLSv1.2", "TLSv1.3") and server["cipher"]
    cert = server["certificate"]
    assert "mail.example.com" in cert["sans"] and "127.0.0.1" in cert["sans"]
    assert "Example Corp test CA" in cert["issuer"]
    expected = describe_der(ssl.PEM_cert_to_DER_cert(downstream_cert.cert_chain_pems[0].bytes().decode())).sha256
    assert cert["sha256"] == expected
    assert server["policy_outcome"] == "deliver-tls" and body["route_outcome"].startswith("deliver-tls")
    legacy = api.post("/domains/legacy.test/test").json()
    assert legacy["servers"][0]["reachable"] and not legacy["servers"][0]["starttls_offered"]
    assert legacy["servers"][0]["policy_outcome"] == "defer" and "4.7.5" in legacy["servers"][0]["policy_detail"]
    assert legacy["route_outcome"] == "defer"


# -- message log ------------------------------------------------------------------------

def test_message_search_detail_and_tenancy(web, tls_sink):
    acme = web.tenant("Acme", "ops@acme.test")
    admin = web.api(web.admin_key)
    admin.post("/domains", json={"name": "example.com", "servers": [f"127.0.0.1:{tls_sink.port}"]})
    admin.post("/domains", json={"name": "acme.test", "servers": [f"127.0.0.1:{tls_sink.port}"], "org": "Acme"})
    send(web.gw.port, ["alice@example.com"], message(subject="Quarterly numbers"), sender="cfo@sender.test")
    send(web.gw.port, ["bob@acme.test"], message(subject="Acme order", to="bob@acme.test"), starttls=False)
    web.gw.wait_records(2)
    web.gw.flush_log()
    rows = admin.get("/messages", params={"sender": "CFO@"}).json()
    assert [r["subject"] for r in rows] == ["Quarterly numbers"]
    assert rows[0]["inbound_tls"] is True and rows[0]["disposition"] == "delivered"
    assert [r["subject"] for r in admin.get("/messages", params={"tls": "false"}).json()] == ["Acme order"]
    assert len(admin.get("/messages", params={"disposition": "delivered"}).json()) == 2
    assert admin.get("/messages", params={"disposition": "rejected"}).json() == []
    assert _field_errors(admin.get("/messages", params={"disposition": "lost"})) == ["disposition"]
    detail = admin.get(f"/messages/{rows[0]['id']}").json()
    assert detail["txn_id"] == rows[0]["txn_id"] and detail["results"][0]["rcpt"] == "alice@example.com"
    assert "tls_cipher" in detail and "downstream" in detail and "total_ms" in detail
    a = web.api(acme.key)
    assert [r["subject"] for r in a.get("/messages").json()] == ["Acme order"]
    assert a.get(f"/messages/{rows[0]['id']}").status_code == 404
    assert admin.get("/messages/999999").status_code == 404


# -- TLS --------------------------------------------------------------------------------

def _peer_sha256(port: int) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=ctx)
        return describe_der(client.sock.getpeercert(binary_form=True)).sha256


def test_certificate_get_put_and_hot_reload(web, tls_sink):
    api = web.api(web.admin_key)
    chain = api.get("/tls/certificate").json()
    assert chain[0]["subject"] == "CN=mx.gw.test" and chain[0]["sans"] == ["mx.gw.test", "localhost", "127.0.0.1", "::1"]
    assert _peer_sha256(web.gw.port) == chain[0]["sha256"]
    # An SMTP session opened before the change keeps working after it.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    api.post("/domains", json={"name": "example.com", "servers": [f"127.0.0.1:{tls_sink.port}"]})
    early = smtplib.SMTP("127.0.0.1", web.gw.port, timeout=10)
    early.starttls(context=ctx)
    cert, key = generate_self_signed("mx-new.gw.test", extra_names=["mx2.gw.test"], key_type="rsa")
    bad = api.put("/tls/certificate", json={"certificate_pem": cert.decode(), "key_pem": generate_self_signed("x")[1].decode()})
    assert _field_errors(bad) == ["key"] and "does not match" in bad.json()["detail"][0]["msg"]
    assert _field_errors(api.put("/tls/certificate", json={"certificate_pem": "junk", "key_pem": key.decode()})) == ["certificate"]
    assert _field_errors(api.put("/tls/certificate", json={"certificate_pem": cert.decode()})) == ["key_pem"]
    reply = api.put("/tls/certificate", json={"certificate_pem": cert.decode(), "key_pem": key.decode()})
    assert reply.status_code == 200, reply.text
    new = reply.json()
    assert new["subject"] == "CN=mx-new.gw.test" and new["key_type"] == "RSA-2048"
    assert _peer_sha256(web.gw.port) == new["sha256"]            # new STARTTLS handshakes
    assert api.get("/tls/certificate").json()[0]["sha256"] == new["sha256"]
    with web.api(web.admin_key) as fresh:                         # new HTTPS handshakes too
        fresh.get("/me")
    assert early.sendmail("a@sender.test", ["x@example.com"], message()) == {}
    early.quit()
    files = web.gw.settings.path(web.gw.settings.tls.key_file)
    assert files.stat().st_mode & 0o777 == 0o600
    tenant = web.tenant("Acme", "ops@acme.test")
    assert web.api(tenant.key).put("/tls/certificate", json={"certificate_pem": cert.decode(),
                                                             "key_pem": key.decode()}).status_code == 403


def test_tls_per_domain_and_dashboard(web, tls_sink, plain_sink):
    api = web.api(web.admin_key)
    api.post("/domains", json={"name": "example.com", "servers": [f"127.0.0.1:{tls_sink.port}"]})
    api.post("/domains", json={"name": "legacy.test", "servers": [f"127.0.0.1:{plain_sink.port}"]})
    send(web.gw.port, ["a@example.com"])
    send(web.gw.port, ["b@example.com"], starttls=False)
    send(web.gw.port, ["c@legacy.test"], message(to="c@legacy.test"))
    web.gw.wait_records(3)
    web.gw.flush_log()
    per = {d["domain"]: d for d in api.get("/tls/domains").json()}
    assert per["example.com"]["last_24h"]["transactions"] == 2
    assert per["example.com"]["last_24h"]["inbound_pct"] == 50.0
    assert per["example.com"]["last_24h"]["downstream_pct"] == 100.0
    assert per["legacy.test"]["last_30d"]["downstream_pct"] == 0.0
    dash = api.get("/dashboard").json()
    assert sum(dash["messages_per_hour"]["delivered"]) == 3 and len(dash["hours"]) == 24
    assert dash["tls_24h"]["transactions"] == 3 and dash["tls_24h"]["inbound_tls"] == 2
    assert dash["spool_depth"] == {} and dash["engines"] is None  # a spool with nothing held


# -- audit ------------------------------------------------------------------------------

def test_audit_records_who_what_before_after_and_is_scoped(web):
    acme = web.tenant("Acme", "ops@acme.test")
    admin = web.api(web.admin_key)
    admin.post("/domains", json={"name": "example.com", "servers": ["a.test"]})
    admin.patch("/domains/example.com", json={"downstream_tls": "required"})
    web.api(acme.key).post("/domains", json={"name": "acme.test", "servers": ["mx.acme.test"]})
    entries = admin.get("/audit").json()
    update = next(e for e in entries if e["action"] == "domain.update")
    prefix = web.admin_key.split("_")[1]
    assert update["actor"] == f"apikey:{prefix} (admin@gw.test)" and update["target"] == "example.com"
    assert update["before"]["downstream_tls"] == "opportunistic" and update["after"]["downstream_tls"] == "required"
    assert {"domain.add", "domain.update", "org.add", "user.add", "apikey.create"} <= {e["action"] for e in entries}
    mine = web.api(acme.key).get("/audit").json()
    assert mine and all(e["target"] != "example.com" for e in mine)
    assert any(e["action"] == "domain.add" and e["target"] == "acme.test" for e in mine)
    assert [e["target"] for e in admin.get("/audit", params={"action": "domain.update"}).json()] == ["example.com"]


def test_console_and_api_on_postgresql(tmp_path, pg_url, tls_sink, loopback_dns):
    """The same endpoints with the gateway on PostgreSQL (several-node set-up)."""
    from mxguard.config import load_settings
    from tests.conftest import gateway_environ
    from tests.support.gateway import ThreadedGateway, init_data_dir
    from tests.support.web import WebGateway
    init_data_dir(tmp_path / "pgdata", database_url=pg_url)
    settings = load_settings(tmp_path / "pgdata", environ=gateway_environ(loopback_dns))
    gw = ThreadedGateway(settings, web_listen="127.0.0.1:0").start()
    w = WebGateway(gw, tmp_path / "pgdata" / "tls" / "cert.pem")
    try:
        acme = w.tenant("Acme", "ops@acme.test")
        a = w.api(acme.key)
        assert a.post("/domains", json={"name": "acme.test", "servers": [f"127.0.0.1:{tls_sink.port}"]}).status_code == 201
        assert send(gw.port, ["bob@acme.test"], message(subject="On PostgreSQL", to="bob@acme.test")).data[0] == 250
        gw.wait_records(1)
        gw.flush_log()
        rows = a.get("/messages", params={"subject": "postgresql"}).json()
        assert [r["subject"] for r in rows] == ["On PostgreSQL"]
        dash = a.get("/dashboard").json()
        assert dash["messages_per_hour"]["delivered"][-1] == 1 and dash["tls_24h"]["inbound_tls"] == 1
        assert a.get("/tls/domains").json()[0]["last_24h"]["downstream_pct"] == 100.0
        assert any(e["action"] == "domain.add" for e in a.get("/audit").json())
        client, reply = w.login("ops@acme.test")
        assert reply.status_code == 303 and "On PostgreSQL" in client.get("/log").text
        assert client.get("/healthz").json()["status"] == "ok"
    finally:
        w.close()
        gw.stop()
