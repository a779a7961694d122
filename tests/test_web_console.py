"""Console pages over real HTTPS: domains (form, edit, test connection), TLS upload, message log, audit,
dashboard charts, /metrics and /healthz, plain-HTTP mode."""

from __future__ import annotations

import re
import smtplib
import ssl

import httpx

from mxguard.tls.certs import describe_der, generate_self_signed
from tests.support.gateway import ThreadedGateway
from tests.support.smtp import message, send
from tests.support.web import csrf_token

DOMAIN_FORM = {"inbound_tls": "optional", "downstream_tls": "opportunistic", "tls_ca_file": "",
               "tls_fingerprint": "", "tls_min_version": "1.2", "org": ""}


def test_add_edit_and_remove_a_domain_through_the_forms(web, plain_sink):
    client, _ = web.login("admin@gw.test")
    token = csrf_token(client.get("/domains/new").text)
    reply = client.post("/domains/new", data={**DOMAIN_FORM, "csrf_token": token, "name": "Example.com",
                                              "servers": f"127.0.0.1:{plain_sink.port}\nbackup.example.com:2525"})
    assert reply.status_code == 303 and reply.headers["location"] == "/domains/example.com?saved=1"
    page = client.get("/domains/example.com?saved=1").text
    assert "Saved. The next SMTP transaction uses these settings." in page
    assert f"127.0.0.1:{plain_sink.port}\nbackup.example.com:2525" in page
    assert send(web.gw.port, ["a@example.com"]).data[0] == 250
    reply = client.post("/domains/example.com", data={**DOMAIN_FORM, "csrf_token": token,
                                                      "servers": f"127.0.0.1:{plain_sink.port}",
                                                      "downstream_tls": "required"})
    assert reply.status_code == 303
    out = send(web.gw.port, ["b@example.com"])  # no restart: the next transaction is deferred
    assert out.rcpt["b@example.com"][0] == 451 and "4.7.5" in out.rcpt["b@example.com"][1]
    listing = client.get("/domains").text
    assert "example.com" in listing and "required" in listing
    assert client.post("/domains/example.com/delete", data={"csrf_token": token}).status_code == 303
    assert send(web.gw.port, ["c@example.com"]).rcpt["c@example.com"][0] == 550
    assert client.get("/domains/example.com").status_code == 404


def test_form_errors_name_the_field_and_keep_the_input(web):
    client, _ = web.login("admin@gw.test")
    token = csrf_token(client.get("/domains/new").text)
    reply = client.post("/domains/new", data={**DOMAIN_FORM, "csrf_token": token, "name": "example.com",
                                              "servers": "mail.example.com:70000"})
    assert reply.status_code == 422
    assert re.search(r'id="form-error">servers: .*port must be 1-65535', reply.text)
    assert 'name="servers" rows="3" required aria-invalid="true"' in reply.text
    assert 'value="example.com"' in reply.text
    reply = client.post("/domains/new", data={**DOMAIN_FORM, "csrf_token": token, "name": "example.com",
                                              "servers": "mail.example.com", "tls_fingerprint": "12:34"})
    assert reply.status_code == 422 and "tls_fingerprint: " in reply.text
    client.post("/domains/new", data={**DOMAIN_FORM, "csrf_token": token, "name": "example.com",
                                      "servers": "mail.example.com"})
    dup = client.post("/domains/new", data={**DOMAIN_FORM, "csrf_token": token, "name": "example.com",
                                            "servers": "mail.example.com"})
    assert dup.status_code == 409 and "exists already" in dup.text


def test_org_admin_console_shows_only_own_domains(web):
    web.tenant("Acme", "ops@acme.test")
    web.add_org("Globex")
    api = web.api(web.admin_key)
    api.post("/domains", json={"name": "acme.test", "servers": ["mx.acme.test"], "org": "Acme"})
    api.post("/domains", json={"name": "globex.test", "servers": ["mx.globex.test"], "org": "Globex"})
    client, _ = web.login("ops@acme.test")
    listing = client.get("/domains").text
    assert "acme.test" in listing and "globex.test" not in listing
    assert client.get("/domains/globex.test").status_code == 404
    token = csrf_token(client.get("/").text)
    assert client.post("/domains/globex.test", data={**DOMAIN_FORM, "csrf_token": token,
                                                     "servers": "evil.test"}).status_code == 404
    assert api.get("/domains/globex.test").json()["servers"] == ["mx.globex.test:25"]


def test_test_connection_button_shows_certificate_and_policy(web, self_signed_sink):
    api = web.api(web.admin_key)
    api.post("/domains", json={"name": "example.com", "servers": [f"127.0.0.1:{self_signed_sink.port}"],
                               "downstream_tls": "verify"})
    client, _ = web.login("admin@gw.test")
    token = csrf_token(client.get("/domains/example.com").text)
    page = client.post("/domains/example.com/test", data={"csrf_token": token}).text
    fingerprint = describe_der(ssl.PEM_cert_to_DER_cert(self_signed_sink.cert_pem.decode())).sha256
    assert "CN=selfsigned.example.com" in page and "selfsigned.example.com, 127.0.0.1" in page
    assert ":".join(fingerprint[i:i + 2] for i in range(0, 64, 2)).upper() in page
    assert re.search(r"<th>verifies</th><td>no: [^<]*self[- ]signed", page)
    assert '<td class="starttls">yes</td>' in page
    assert "<strong>defer</strong>: 451 4.7.5" in page
    # Pin the fingerprint: the same server now passes 'verify'.
    api.patch("/domains/example.com", json={"tls_fingerprint": fingerprint})
    page = client.post("/domains/example.com/test", data={"csrf_token": token}).text
    assert "<strong>deliver-tls</strong>" in page and "<th>pinned fingerprint</th><td>matches</td>" in page


def test_unreachable_server_is_reported(web):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    api = web.api(web.admin_key)
    api.post("/domains", json={"name": "example.com", "servers": [f"127.0.0.1:{dead}"]})
    body = api.post("/domains/example.com/test").json()
    assert body["servers"][0]["reachable"] is False and body["servers"][0]["policy_outcome"] == "unreachable"
    assert "4.4.1" in body["servers"][0]["policy_detail"] and body["route_outcome"] == "defer"


def test_certificate_upload_page_validates_and_hot_reloads(web, tmp_path):
    client, _ = web.login("admin@gw.test")
    page = client.get("/tls").text
    assert "CN=mx.gw.test" in page and "ECDSA secp256r1" in page
    token = csrf_token(page)
    cert, key = generate_self_signed("uploaded.gw.test")
    _, other_key = generate_self_signed("other.gw.test")
    bad = client.post("/tls/certificate", data={"csrf_token": token},
                      files={"certificate": ("cert.pem", cert), "key": ("key.pem", other_key)})
    assert bad.status_code == 422 and "key: " in bad.text and "does not match" in bad.text
    assert "CN=mx.gw.test" in client.get("/tls").text
    ok = client.post("/tls/certificate", data={"csrf_token": token},
                     files={"certificate": ("cert.pem", cert), "key": ("key.pem", key)})
    assert ok.status_code == 303 and ok.headers["location"] == "/tls?saved=1"
    page = client.get("/tls?saved=1").text
    assert "CN=uploaded.gw.test" in page and "Certificate installed" in page
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", web.gw.port, timeout=10) as smtp:
        smtp.starttls(context=ctx)
        assert describe_der(smtp.sock.getpeercert(binary_form=True)).subject == "CN=uploaded.gw.test"
    with ssl.create_connection(("127.0.0.1", int(web.url.rsplit(":", 1)[1]))) as raw, \
            ctx.wrap_socket(raw) as tls:  # HTTPS presents it too
        assert describe_der(tls.getpeercert(binary_form=True)).subject == "CN=uploaded.gw.test"
    audit = client.get("/audit").text
    assert "tls.certificate" in audit and "CN=uploaded.gw.test" in audit


def test_message_log_search_and_detail_pages(web, tls_sink):
    web.api(web.admin_key).post("/domains", json={"name": "example.com", "servers": [f"127.0.0.1:{tls_sink.port}"]})
    send(web.gw.port, ["alice@example.com"], message(subject="Invoice 42"), sender="billing@vendor.test")
    send(web.gw.port, ["bob@example.com"], message(subject="Lunch"), sender="friend@pals.test", starttls=False)
    send(web.gw.port, ["nobody@unknown.test"], sender="spam@bad.test")
    web.gw.wait_records(2)
    web.gw.flush_log()
    client, _ = web.login("admin@gw.test")
    page = client.get("/log", params={"sender": "billing"}).text
    assert "Invoice 42" in page and "Lunch" not in page
    page = client.get("/log", params={"tls": "no"}).text
    assert "Lunch" in page and "Invoice 42" not in page
    page = client.get("/log", params={"recipient": "alice@", "disposition": "delivered",
                                      "since": "2000-01-01T00:00", "until": "2999-01-01T00:00"}).text
    assert "Invoice 42" in page
    assert "Invoice 42" not in client.get("/log", params={"until": "2000-01-01T00:00"}).text
    assert client.get("/log", params={"since": "yesterday"}).status_code == 422
    entry = re.search(r'href="/log/(\d+)">', client.get("/log", params={"subject": "invoice"}).text).group(1)
    detail = client.get(f"/log/{entry}").text
    for field in ("txn_id", "client_ip", "helo", "tls_version", "tls_cipher", "mail_from", "rcpt_to", "size",
                  "message_id", "downstream_host", "downstream_tls_version", "results", "disposition",
                  "final_reply", "total_ms"):
        assert f"<th>{field}</th>" in detail, field
    assert "billing@vendor.test" in detail and "client.sender.test" in detail
    assert client.get("/log/999999").status_code == 404


def test_audit_page_shows_before_and_after(web):
    client, _ = web.login("admin@gw.test")
    token = csrf_token(client.get("/domains/new").text)
    client.post("/domains/new", data={**DOMAIN_FORM, "csrf_token": token, "name": "example.com",
                                      "servers": "mail.example.com"})
    client.post("/domains/example.com", data={**DOMAIN_FORM, "csrf_token": token, "servers": "mail.example.com",
                                              "downstream_tls": "required"})
    page = client.get("/audit").text
    assert "user:admin@gw.test" in page and "domain.update" in page
    assert "<code>downstream_tls</code>: opportunistic → required" in page


def test_dashboard_charts_metrics_and_healthz(web, tls_sink):
    web.api(web.admin_key).post("/domains", json={"name": "example.com", "servers": [f"127.0.0.1:{tls_sink.port}"]})
    send(web.gw.port, ["a@example.com"])
    send(web.gw.port, ["b@example.com"], starttls=False)
    send(web.gw.port, ["x@unknown.test"])   # relay denied: a rejected transaction with inbound TLS
    web.gw.wait_records(3)
    web.gw.flush_log()
    client, _ = web.login("admin@gw.test")
    page = client.get("/").text
    assert 'id="total-messages">3<' in page and 'id="inbound-tls">66.7 %<' in page
    assert "delivered: 2" in page and "rejected: 1" in page
    assert 'id="downstream-tls">100.0 %<' in page
    assert 'id="spool-depth">0<' in page  # the gateway's spool is registered, and nothing is held
    assert "No filtering engines are registered" in page
    chart = client.get("/charts/messages.svg").content
    assert b"<svg" in chart and b"delivered" in chart
    assert b"Inbound sessions with TLS (2/3)" in client.get("/charts/tls.svg").content
    metrics = client.get("/metrics").text
    assert 'mxguard_messages_total{disposition="delivered"} 2.0' in metrics
    assert 'mxguard_messages_total{disposition="rejected"} 1.0' in metrics
    assert 'mxguard_inbound_transactions_total{tls="yes"} 2.0' in metrics
    assert 'mxguard_inbound_transactions_total{tls="no"} 1.0' in metrics
    assert 'mxguard_downstream_connections_total{tls="yes",verified="no"} 2.0' in metrics
    assert "mxguard_transaction_seconds_count 3.0" in metrics
    assert "mxguard_config_generation 1.0" in metrics
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}


def test_healthz_reports_a_database_that_is_gone(web):
    web.run(web.gw.store.engine.dispose())
    path = web.gw.settings.data_dir / "mxguard.db"
    path.rename(path.with_suffix(".moved"))
    (path.parent / "mxguard.db").mkdir()   # a directory where the database file was: cannot open
    with web.client() as client:
        reply = client.get("/healthz")
    assert reply.status_code == 503 and reply.json()["status"] == "error"


def test_plain_http_only_when_asked(data_dir, loopback_dns):
    from mxguard.config import load_settings
    from tests.conftest import gateway_environ
    settings = load_settings(data_dir, environ=gateway_environ(loopback_dns))
    settings.web.plain_http = True
    gw = ThreadedGateway(settings, web_listen="127.0.0.1:0", web_plain_http=True).start()
    try:
        assert gw.web_url.startswith("http://")
        reply = httpx.get(gw.web_url + "/login")
        assert reply.status_code == 200 and "strict-transport-security" not in reply.headers
        assert "secure" in reply.headers["set-cookie"].lower()  # the browser sees HTTPS at the proxy
    finally:
        gw.stop()
    gw = ThreadedGateway(load_settings(data_dir, environ=gateway_environ(loopback_dns)),
                         web_listen="127.0.0.1:0").start()
    try:
        assert gw.web_url.startswith("https://")
        try:
            httpx.get(gw.web_url.replace("https://", "http://") + "/login", timeout=5)
            plain_worked = True
        except httpx.HTTPError:
            plain_worked = False
        assert not plain_worked
    finally:
        gw.stop()


def test_one_time_password_must_be_replaced_at_first_login(web):
    from mxguard.services.users import add_user
    _, one_time = web.run(add_user(web.gw.store, "new@gw.test", "admin"))
    client, reply = web.login("new@gw.test", one_time)
    assert reply.status_code == 303
    assert client.get("/domains").headers["location"] == "/account/password"
    page = client.get("/account/password")
    assert "Choose your password" in page.text
    token = csrf_token(page.text)
    assert client.post("/account/password", data={"current_password": one_time, "new_password": "x",
                                                   "confirm_password": "x"}).status_code == 403
    short = client.post("/account/password", data={"csrf_token": token, "current_password": one_time,
                                                   "new_password": "short", "confirm_password": "short"})
    assert short.status_code == 422 and "new_password: must be at least 12 characters" in short.text
    wrong = client.post("/account/password", data={"csrf_token": token, "current_password": "guess",
                                                   "new_password": "my own good password",
                                                   "confirm_password": "my own good password"})
    assert wrong.status_code == 422 and "current_password: is not your current password" in wrong.text
    ok = client.post("/account/password", data={"csrf_token": token, "current_password": one_time,
                                                "new_password": "my own good password",
                                                "confirm_password": "my own good password"})
    assert ok.status_code == 303 and client.get("/domains").status_code == 200
    assert web.login("new@gw.test", one_time)[1].status_code == 401
    assert web.login("new@gw.test", "my own good password")[1].status_code == 303


async def test_demo_keep_running_offers_the_console_with_a_one_time_admin_password(tmp_path):
    from mxguard.demo import DemoEnvironment
    async with DemoEnvironment(tmp_path / "demo", web=True, web_listen="127.0.0.1:0") as env:
        url = env.gateway.web_url
        assert url.startswith("https://127.0.0.1:") and env.admin_password
        ctx = ssl.create_default_context(cafile=str(env.settings.path(env.settings.tls.cert_file)))
        ctx.check_hostname = False
        async with httpx.AsyncClient(base_url=url, verify=ctx) as client:
            page = await client.get("/login")
            reply = await client.post("/login", data={"email": env.admin_email, "password": env.admin_password,
                                                      "csrf_token": csrf_token(page.text), "next": "/domains"})
            assert reply.status_code == 303 and reply.headers["location"] == "/domains"
            assert (await client.get("/domains")).headers["location"] == "/account/password"


def test_engine_health_and_spool_providers_feed_the_dashboard_and_metrics(web):
    """The hooks the filtering and spool features register with. The gateway registers its own spool
    (tests/test_spool_web.py); a provider registered later is used instead, until it is unregistered."""
    from mxguard.services import status
    calls = []

    async def spool():
        calls.append("spool")
        return {"example.com": 3, "example.net": 1}

    status.register_engine_health(lambda: [status.EngineHealth("clamd", True, "ClamAV 1.4.6"),
                                           status.EngineHealth("rspamd", False, "connection refused", errors=2)])
    status.register_spool_depth(spool)
    try:
        client, _ = web.login("admin@gw.test")
        page = client.get("/").text
        assert 'id="spool-depth">4<' in page and '>example.com</a>: 3' in page
        assert "<td>clamd</td><td class=\"ok\">ok</td><td>ClamAV 1.4.6</td>" in page
        assert "<td>rspamd</td><td class=\"bad\">failing</td><td>connection refused</td><td>2</td>" in page
        metrics = client.get("/metrics").text
        assert 'mxguard_spool_depth{domain="example.com"} 3.0' in metrics
        dash = web.api(web.admin_key).get("/dashboard").json()
        assert dash["spool_depth"] == {"example.com": 3, "example.net": 1}
        assert [e["name"] for e in dash["engines"]] == ["clamd", "rspamd"] and dash["engines"][1]["errors"] == 2
        assert calls
        status.unregister_spool_depth(spool)   # back to the gateway's own (empty) spool
        assert web.api(web.admin_key).get("/dashboard").json()["spool_depth"] == {}
    finally:
        status.clear_providers()
