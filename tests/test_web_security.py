"""Console security over real HTTPS: CSRF, escaping, lockout, rate limit, cookies, fixation, redirects, headers."""

from __future__ import annotations

import http.client
import re
import time
from urllib.parse import urlsplit

import pytest

from mxguard.services import domains as domain_service
from mxguard.web.security import safe_next
from tests.support.smtp import message, send
from mxguard.web.server import KEEP_ALIVE_SECONDS
from tests.support.web import PASSWORD, csrf_token, gateway_tls_context


def test_unauthenticated_pages_redirect_to_login_with_next(web):
    client = web.client()
    for path in ("/", "/domains", "/tls", "/log", "/audit", "/domains/new"):
        reply = client.get(path)
        assert reply.status_code == 303 and reply.headers["location"] == f"/login?next={path}"


def test_session_cookie_flags(web):
    client, reply = web.login("admin@gw.test")
    assert reply.status_code == 303 and reply.headers["location"] == "/"
    cookie = next(v for k, v in reply.headers.multi_items()
                  if k == "set-cookie" and v.startswith("__Host-mxguard_session="))
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= flags
    assert not any(f.startswith("domain=") for f in flags)
    assert client.get("/").status_code == 200
    login_cookie = web.client().get("/login").headers["set-cookie"].lower()
    assert "secure" in login_cookie and "httponly" in login_cookie and "samesite=strict" in login_cookie


def test_csrf_token_missing_or_wrong_is_403_and_changes_nothing(web):
    client, _ = web.login("admin@gw.test")
    form = {"name": "example.com", "servers": "mail.example.com", "inbound_tls": "optional",
            "downstream_tls": "opportunistic", "tls_min_version": "1.2"}
    assert client.post("/domains/new", data=form).status_code == 403
    assert client.post("/domains/new", data={**form, "csrf_token": "forged"}).status_code == 403
    assert web.api(web.admin_key).get("/domains").json() == []
    token = csrf_token(client.get("/domains/new").text)
    assert client.post("/domains/new", data={**form, "csrf_token": token}).status_code == 303
    assert client.post("/domains/example.com/delete", data={}).status_code == 403
    assert client.post("/domains/example.com/test", data={}).status_code == 403
    assert client.post("/tls/certificate", data={}).status_code == 403
    assert client.post("/logout", data={}).status_code == 403
    assert [d["name"] for d in web.api(web.admin_key).get("/domains").json()] == ["example.com"]
    # The login form has its own token (double-submit cookie).
    fresh = web.client()
    fresh.get("/login")
    assert fresh.post("/login", data={"email": "admin@gw.test", "password": PASSWORD}).status_code == 403


def test_script_in_subject_is_shown_escaped_in_the_message_log(web, tls_sink):
    web.api(web.admin_key).post("/domains", json={"name": "example.com", "servers": [f"127.0.0.1:{tls_sink.port}"]})
    evil = '<script>alert("owned")</script><img src=x onerror=alert(1)>'
    send(web.gw.port, ["alice@example.com"], message(subject=evil))
    web.gw.wait_records(1)
    web.gw.flush_log()
    client, _ = web.login("admin@gw.test")
    page = client.get("/log").text
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    entry = re.search(r'href="/log/(\d+)"', page).group(1)
    detail = client.get(f"/log/{entry}").text
    assert "<script>alert" not in detail and "&lt;script&gt;alert" in detail


def test_brute_force_locks_the_account(web):
    for _ in range(5):
        client, reply = web.login("admin@gw.test", "wrong password!")
    assert reply.status_code == 403 and "locked" in reply.text
    _, reply = web.login("admin@gw.test")  # the right password is refused while locked
    assert reply.status_code == 403 and "locked" in reply.text and "__Host-mxguard_session" not in reply.headers.get(
        "set-cookie", "")
    assert int(reply.headers["retry-after"]) > 0
    audit = web.api(web.admin_key).get("/audit", params={"action": "user.locked"}).json()
    assert audit and audit[0]["target"] == "admin@gw.test"
    # An administrator's password reset unlocks.
    from mxguard.services.users import set_password
    web.run(set_password(web.gw.store, "admin@gw.test", PASSWORD))
    assert web.login("admin@gw.test")[1].status_code == 303


def test_failed_logins_from_one_address_are_rate_limited(web):
    limit = web.gw.settings.web.login_ip_max_failures
    for i in range(limit):
        _, reply = web.login(f"nobody{i}@gw.test", "whatever it is")
        assert reply.status_code == 401
    _, reply = web.login("admin@gw.test")
    assert reply.status_code == 429 and "Too many failed logins" in reply.text and reply.headers["retry-after"]


def test_wrong_password_and_unknown_user_get_the_same_answer(web):
    _, a = web.login("admin@gw.test", "not the password")
    _, b = web.login("nobody@gw.test", "not the password")
    assert a.status_code == b.status_code == 401
    assert re.search(r'id="login-error">([^<]+)<', a.text).group(1) == \
        re.search(r'id="login-error">([^<]+)<', b.text).group(1)


def test_login_gives_a_new_session_id_no_fixation(web):
    client = web.client()
    planted = "attacker-chosen-session-id"
    client.cookies.set("__Host-mxguard_session", planted, domain="127.0.0.1")
    _, reply = web.login("admin@gw.test", client=client)
    issued = reply.cookies.get("__Host-mxguard_session")
    assert issued and issued != planted
    first = issued
    client2, reply2 = web.login("admin@gw.test")
    assert reply2.cookies.get("__Host-mxguard_session") not in (None, first)
    # Logging out ends the session on the server, not only in the browser.
    token = csrf_token(client2.get("/").text)
    stolen = dict(client2.cookies)
    assert client2.post("/logout", data={"csrf_token": token}).status_code == 303
    replay = web.client()
    replay.cookies.set("__Host-mxguard_session", stolen["__Host-mxguard_session"], domain="127.0.0.1")
    assert replay.get("/").status_code == 303


@pytest.mark.parametrize("target, expected", [
    ("/domains", "/domains"), ("/log?sender=a", "/log?sender=a"), ("https://evil.test/", "/"),
    ("//evil.test/", "/"), ("/\\evil.test", "/"), ("javascript:alert(1)", "/"), ("evil.test", "/"),
    ("/\r\nLocation: https://evil.test", "/"),
])
def test_no_open_redirect_after_login(web, target, expected):
    assert safe_next(target) == expected
    _, reply = web.login("admin@gw.test", next_path=target)
    assert reply.status_code == 303 and reply.headers["location"] == expected


def test_security_headers_and_csp(web):
    client, _ = web.login("admin@gw.test")
    for path in ("/", "/login", "/api/v1/openapi.json"):
        h = client.get(path).headers
        csp = h["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
        assert "script-src 'self'" in csp and "object-src 'none'" in csp
        assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer"
        assert h["strict-transport-security"].startswith("max-age=")
    page = client.get("/").text
    assert "<script" not in page and " style=" not in page   # nothing inline for the CSP to allow
    svg = client.get("/charts/messages.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml") and b"<script" not in svg.content
    assert "script-src" not in svg.headers["content-security-policy"]  # default-src 'none' forbids script


def test_an_idle_keep_alive_connection_outlives_the_clients_expiry(web):
    """A client reuses an idle connection for about 5 s (httpx, browsers); the
    console must not close it at that same moment, or the reused request meets
    "server disconnected". http.client does not reconnect by itself, so a
    connection the server closed fails the second request."""
    assert KEEP_ALIVE_SECONDS > 10
    url = urlsplit(web.url)
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=gateway_tls_context(web.cert_file), timeout=30)
    try:
        for pause in (0, 6.5):
            time.sleep(pause)
            conn.request("GET", "/login")
            reply = conn.getresponse()
            assert reply.status == 200 and reply.read()
    finally:
        conn.close()


def test_plain_user_may_not_use_the_console(web):
    web.add_org("Acme")
    web.run(domain_service.add_domain(web.gw.store, "acme.test", ["a.test"], org="Acme"))
    web.add_user("clerk@acme.test", "user", "Acme")
    client, reply = web.login("clerk@acme.test")
    assert reply.status_code == 303
    page = client.get("/domains")
    assert page.status_code == 403 and "Message Center" in page.text
