"""The Spool page and /api/v1/spool on a running gateway: real SMTP in, real downstream servers that go down
and come back, the console over real HTTPS.

Retries are an hour apart here, so a message that arrives downstream got there
through "retry now", not through the back-off.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import time

import pytest

from tests.support.smtp import message, send
from tests.support.web import csrf_token


@pytest.fixture
def gateway_overrides():
    # The worker looks every 0.1 s, but nothing is due for an hour unless someone says "retry now".
    return {"spool.first_retry": 3600.0, "spool.max_retry": 3600.0, "spool.jitter": 0.0,
            "spool.poll_interval": 0.1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hold(web, rcpts: list[str], subject: str) -> None:
    out = send(web.gw.port, rcpts, message(subject=subject, to=rcpts[0]))
    assert out.data[0] == 250 and "held for delivery" in out.data[1], out


def test_held_message_shows_on_the_page_and_the_api_and_retry_now_delivers_it(web, tls_sink, ca_file):
    api = web.api(web.admin_key)
    assert api.post("/domains", json={"name": "example.com", "servers": [tls_sink.address],
                                      "downstream_tls": "verify", "tls_ca_file": str(ca_file)}).status_code == 201
    tls_sink.pause()
    _hold(web, ["alice@example.com", "bob@example.com"], "Held while down")

    [held] = api.get("/spool").json()
    entry_id = held["id"]
    assert (held["domain"], held["mail_from"], held["status"], held["attempts"]) == (
        "example.com", "a@sender.test", "queued", 0)
    assert held["pending"] == ["alice@example.com", "bob@example.com"] and held["subject"] == "Held while down"
    assert held["last_reply"].startswith("451 4.4.1") and held["delivering"] is False
    next_at = dt.datetime.fromisoformat(held["next_attempt_at"])
    assert next_at - dt.datetime.now(dt.timezone.utc) > dt.timedelta(minutes=50)

    client, _ = web.login("admin@gw.test")
    page = client.get("/spool").text
    row = re.search(rf'<tr class="status-queued" id="entry-{entry_id}">(.*?)</tr>', page, re.S).group(1)
    assert '<td class="domain">example.com</td>' in row and '<td class="sender">a@sender.test</td>' in row
    assert '<td class="pending">alice@example.com, bob@example.com</td>' in row
    assert '<td class="attempts">0</td>' in row and "451 4.4.1" in row
    depth = re.search(r'<tr id="depth-example.com">(.*?)</tr>', page, re.S).group(1)
    assert '<td class="messages">1</td>' in depth and 'name="domain" value="example.com"' in depth
    assert '<a href="/spool" class="active" aria-current="page">Spool</a>' in page
    detail = client.get(f"/spool/{entry_id}").text
    assert "Held while down" in detail and "No attempt from the spool yet" in detail
    token = csrf_token(detail)

    # Retry now while the server is still down: one more attempt, still held.
    reply = client.post(f"/spool/{entry_id}/retry", data={"csrf_token": token})
    assert reply.status_code == 303 and reply.headers["location"] == f"/spool/{entry_id}?retried=attempted"
    detail = client.get(reply.headers["location"]).text
    assert "Retried now: still held." in detail and '<td class="f-attempts">1</td>' in detail
    assert tls_sink.messages == []

    # The server is back. The worker would wait an hour; retry now delivers at once, over verified TLS.
    tls_sink.resume()
    time.sleep(0.5)
    assert tls_sink.messages == [], "nothing was due"
    reply = client.post(f"/spool/{entry_id}/retry", data={"csrf_token": token})
    assert reply.status_code == 303
    assert len(tls_sink.messages) == 1
    got = tls_sink.messages[0]
    assert got.tls and got.rcpt_tos == ["alice@example.com", "bob@example.com"] and b"Held while down" in got.data
    assert web.gw.gateway.worker.delivered == 2, "the gateway's own spool worker made the delivery"
    detail = client.get(reply.headers["location"]).text
    assert "Retried now: delivered." in detail and '<td class="f-status">delivered</td>' in detail
    attempts = re.findall(r"<tr><td>[^<]+UTC</td><td>mx.gw.test</td>(.*?)</tr>", detail, re.S)
    assert len(attempts) == 2
    assert '<td class="tls">none</td>' in attempts[0] and "4.4.1" in attempts[0]
    assert f'<td class="server">{tls_sink.address}</td>' in attempts[1]
    assert '<td class="tls">TLSv1.3</td>' in attempts[1] and '<td class="verified">yes</td>' in attempts[1]

    assert api.get("/spool").json() == []
    assert [e["id"] for e in api.get("/spool", params={"status": "delivered"}).json()] == [entry_id]
    one = api.get(f"/spool/{entry_id}").json()
    assert one["status"] == "delivered" and one["pending"] == [] and one["attempts"] == 2
    last = one["delivery_attempts"][-1]
    assert last["tls"] and last["verified"] and last["tls_version"] == "TLSv1.3" and last["cipher"]
    assert last["server"] == tls_sink.address and last["results"] == {"alice@example.com": 250, "bob@example.com": 250}
    time.sleep(0.5)
    assert len(tls_sink.messages) == 1, "delivered exactly once"


def test_api_endpoints_tenancy_delete_and_retry_a_domain(web, tls_sink):
    acme, globex = web.tenant("Acme", "ops@acme.test"), web.tenant("Globex", "ops@globex.test")
    admin = web.api(web.admin_key)
    for name, org in (("acme.test", "Acme"), ("globex.test", "Globex")):
        assert admin.post("/domains", json={"name": name, "servers": [tls_sink.address], "org": org}).status_code == 201
    tls_sink.pause()
    _hold(web, ["bob@acme.test"], "For Acme, kept")
    _hold(web, ["carol@acme.test"], "For Acme, deleted")
    _hold(web, ["eve@globex.test"], "For Globex")
    a, g = web.api(acme.key), web.api(globex.key)
    kept, deleted = [e["id"] for e in a.get("/spool").json()]
    [theirs] = [e["id"] for e in g.get("/spool").json()]

    # Another organization's entry does not exist for them, whatever they try.
    assert g.get(f"/spool/{kept}").status_code == 404
    assert g.post(f"/spool/{kept}/retry").status_code == 404
    assert g.delete(f"/spool/{kept}").status_code == 404
    assert g.post("/spool/retry", params={"domain": "acme.test"}).status_code == 404
    assert g.get("/spool", params={"domain": "acme.test"}).status_code == 404
    client, _ = web.login("ops@globex.test")
    assert client.get(f"/spool/{kept}").status_code == 404
    assert client.get(f"/spool/{kept}/delete").status_code == 404
    assert client.get("/spool", params={"domain": "acme.test"}).status_code == 404
    page = client.get("/spool").text
    assert "acme.test" not in page and f'id="entry-{theirs}"' in page
    token = csrf_token(page)
    assert client.post(f"/spool/{kept}/delete", data={"csrf_token": token, "confirm": "yes"}).status_code == 404

    stats = a.get("/spool/stats").json()
    assert stats["held"] == 2 and [d["domain"] for d in stats["by_domain"]] == ["acme.test"]
    assert stats["by_domain"][0]["messages"] == 2 and stats["by_domain"][0]["bytes"] > 400
    assert stats["by_domain"][0]["oldest_age_seconds"] >= 0
    assert admin.get("/spool/stats").json()["held"] == 3
    reply = a.get("/spool", params={"status": "lost"})
    assert reply.status_code == 422 and reply.json()["detail"][0]["loc"][-1] == "status"

    assert a.delete(f"/spool/{deleted}").status_code == 204
    assert a.delete(f"/spool/{deleted}").status_code == 404
    assert a.get(f"/spool/{deleted}").status_code == 404
    tls_sink.resume()
    body = a.post("/spool/retry", params={"domain": "acme.test"}).json()
    assert (body["requested"], body["delivered"], body["still_held"]) == (1, 1, 0)
    assert body["entries"][0]["id"] == kept and body["entries"][0]["attempted"] is True
    assert [m.rcpt_tos for m in tls_sink.messages] == [["bob@acme.test"]]
    assert a.post(f"/spool/{kept}/retry").status_code == 409   # delivered: nothing to retry
    time.sleep(0.5)
    assert [m.rcpt_tos for m in tls_sink.messages] == [["bob@acme.test"]], "the deleted one never goes out"
    assert [e["id"] for e in g.get("/spool").json()] == [theirs]   # Globex's was not part of it

    audit = a.get("/audit").json()
    delete = next(e for e in audit if e["action"] == "spool.delete")
    assert delete["target"] == f"spool #{deleted} (acme.test)" and delete["before"]["pending"] == ["carol@acme.test"]
    assert delete["actor"].startswith("apikey:") and delete["after"] is None
    retry = next(e for e in audit if e["action"] == "spool.retry")
    assert retry["before"]["status"] == "queued" and retry["after"]["status"] == "delivered"
    assert not [e for e in g.get("/audit").json() if e["action"].startswith("spool.")]

    doc = web.api(None).get("/openapi.json").json()
    for path, methods in (("/api/v1/spool", {"get"}), ("/api/v1/spool/stats", {"get"}),
                          ("/api/v1/spool/retry", {"post"}), ("/api/v1/spool/{entry_id}", {"get", "delete"}),
                          ("/api/v1/spool/{entry_id}/retry", {"post"})):
        assert methods <= set(doc["paths"][path]), path
    assert "SpoolEntryOut" in doc["components"]["schemas"]


def test_console_delete_asks_first_and_every_form_needs_the_csrf_token(web, tls_sink):
    web.api(web.admin_key).post("/domains", json={"name": "example.com", "servers": [tls_sink.address]})
    tls_sink.pause()
    _hold(web, ["alice@example.com"], "Delete me")
    _hold(web, ["bob@example.com"], "Keep me")
    victim, keep = [e["id"] for e in web.api(web.admin_key).get("/spool").json()]
    client, _ = web.login("admin@gw.test")
    assert client.post(f"/spool/{victim}/delete", data={"confirm": "yes"}).status_code == 403
    assert client.post(f"/spool/{victim}/delete", data={"confirm": "yes", "csrf_token": "forged"}).status_code == 403
    assert client.post(f"/spool/{victim}/retry", data={}).status_code == 403
    assert client.post("/spool/retry", data={"domain": "example.com"}).status_code == 403
    held = web.api(web.admin_key).get("/spool").json()
    assert [(e["id"], e["attempts"]) for e in held] == [(victim, 0), (keep, 0)], "nothing changed"

    confirm = client.get(f"/spool/{victim}/delete")
    assert confirm.status_code == 200 and "Delete me" in confirm.text and "never be delivered" in confirm.text
    token = csrf_token(confirm.text)
    unconfirmed = client.post(f"/spool/{victim}/delete", data={"csrf_token": token})
    assert unconfirmed.status_code == 303 and unconfirmed.headers["location"] == f"/spool/{victim}/delete"
    assert client.get(f"/spool/{victim}").status_code == 200
    done = client.post(f"/spool/{victim}/delete", data={"csrf_token": token, "confirm": "yes"})
    assert done.status_code == 303 and done.headers["location"] == f"/spool?deleted={victim}"
    assert f"Deleted spool entry #{victim}; it will not be delivered." in client.get(done.headers["location"]).text
    assert client.get(f"/spool/{victim}").status_code == 404

    tls_sink.resume()
    reply = client.post("/spool/retry", data={"csrf_token": token, "domain": "example.com"})
    assert reply.status_code == 303
    page = client.get(reply.headers["location"]).text
    assert "Retried 1 held message of example.com: 1 delivered, 0 not" in page
    assert [m.rcpt_tos for m in tls_sink.messages] == [["bob@example.com"]]
    assert b"Keep me" in tls_sink.messages[0].data
    audit = client.get("/audit").text
    assert f"spool #{victim} (example.com)" in audit and "spool.delete" in audit
    assert f"spool #{keep} (example.com)" in audit and "<code>status</code>: queued → delivered" in audit


def test_dashboard_and_metrics_show_the_spool_depth_per_domain(web):
    acme = web.tenant("Acme", "ops@acme.test")
    dead = f"127.0.0.1:{_free_port()}"
    admin = web.api(web.admin_key)
    admin.post("/domains", json={"name": "example.com", "servers": [dead]})
    admin.post("/domains", json={"name": "acme.test", "servers": [dead], "org": "Acme"})
    _hold(web, ["a@example.com"], "one")
    _hold(web, ["b@example.com"], "two")
    _hold(web, ["c@acme.test"], "three")

    client, _ = web.login("admin@gw.test")
    page = client.get("/").text
    assert 'id="spool-depth">3<' in page
    assert '<a href="/spool?domain=example.com">example.com</a>: 2' in page
    metrics = client.get("/metrics").text
    assert 'mxguard_spool_depth{domain="example.com"} 2.0' in metrics
    assert 'mxguard_spool_depth{domain="acme.test"} 1.0' in metrics
    assert admin.get("/dashboard").json()["spool_depth"] == {"acme.test": 1, "example.com": 2}
    # An org-admin's dashboard counts only their organization's domains.
    assert web.api(acme.key).get("/dashboard").json()["spool_depth"] == {"acme.test": 1}
    mine, _ = web.login("ops@acme.test")
    page = mine.get("/").text
    assert 'id="spool-depth">1<' in page and "example.com" not in page
    # Deleting one lowers the depth at the next scrape.
    first = admin.get("/spool", params={"domain": "example.com"}).json()[0]["id"]
    assert admin.delete(f"/spool/{first}").status_code == 204
    assert 'mxguard_spool_depth{domain="example.com"} 1.0' in client.get("/metrics").text


def test_retry_now_delivers_in_process_when_the_gateway_runs_no_spool_worker(data_dir, tls_sink, loopback_dns):
    """As with a second process on one SQLite data dir: the console's process has no worker of its own."""
    from mxguard.config import load_settings
    from tests.conftest import gateway_environ
    from tests.support.gateway import ThreadedGateway
    from tests.support.web import WebGateway
    gw = ThreadedGateway(load_settings(data_dir, environ=gateway_environ(loopback_dns)), web_listen="127.0.0.1:0")
    gw.gateway.spool_worker = False
    gw.start()
    w = WebGateway(gw, data_dir / "tls" / "cert.pem")
    try:
        assert gw.gateway.worker is None
        w.add_user("admin@gw.test", "admin")
        api = w.api(w.api_key("admin@gw.test"))
        api.post("/domains", json={"name": "example.com", "servers": [tls_sink.address]})
        tls_sink.pause()
        _hold(w, ["alice@example.com"], "No worker here")
        [held] = api.get("/spool").json()
        tls_sink.resume()
        body = api.post(f"/spool/{held['id']}/retry").json()
        assert body["delivered"] == 1 and body["entries"][0]["attempted"] is True
        assert [m.rcpt_tos for m in tls_sink.messages] == [["alice@example.com"]]
    finally:
        w.close()
        gw.stop()
