"""The console and REST API under attack, over real HTTPS: other tenants' objects, script in every
field a message brings, SQL metacharacters in every search field (SQLite and PostgreSQL), session
fixation and open redirects after login.

The route tables are checked against the application's own routes, so a new page or endpoint that
takes an id or a name, or a new search field, fails here until it is covered.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from fastapi.routing import APIRoute
from playwright.sync_api import sync_playwright

from mxguard.config import load_settings
from tests.conftest import gateway_environ
from tests.support.browser import CHROMIUM_ARGS, chromium_path
from tests.support.gateway import ThreadedGateway, init_data_dir
from tests.support.smtp import Raw, message, send
from tests.support.web import PASSWORD, WebGateway, csrf_token

DOMAIN_FORM = {"inbound_tls": "optional", "downstream_tls": "off", "tls_min_version": "1.2"}


def _api_routes(routes, prefix: str = ""):
    """``(full path, APIRoute)`` of every page and endpoint (newer FastAPI keeps included routers nested)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix + route.path, route
        elif hasattr(route, "original_router"):
            yield from _api_routes(route.original_router.routes, prefix + route.include_context.prefix)


def _routes(web) -> set[tuple[str, str]]:
    found = {(method, path) for path, route in _api_routes(web.gw.gateway.web.app.routes)
             for method in route.methods if method != "HEAD"}
    assert ("GET", "/log") in found and ("GET", "/api/v1/messages") in found, "the route walk works"
    return found


def _entry_ids(web, admin) -> dict[str, int]:
    web.gw.flush_log()
    return {row["rcpt_to"].split("@")[-1]: row["id"] for row in admin.get("/messages").json()}


@pytest.fixture
def tenants(web, tls_sink):
    """Acme and Globex, each with a domain, an org-admin (console session and API key) and one logged message."""
    acme = web.tenant("Acme", "ops@acme.test")
    web.add_org("Globex")
    admin = web.api(web.admin_key)
    for name, org in (("acme.test", "Acme"), ("globex.test", "Globex"), ("spare.acme.test", "Acme")):
        assert admin.post("/domains", json={"name": name, "servers": [tls_sink.address], "org": org}).status_code == 201
    send(web.gw.port, ["bob@acme.test"], message(subject="Acme memo", to="bob@acme.test"))
    send(web.gw.port, ["carol@globex.test"], message(subject="Globex secret", to="carol@globex.test"))
    web.gw.wait_records(2)
    ids = _entry_ids(web, admin)
    console, reply = web.login(acme.email)
    assert reply.status_code == 303
    return {"acme": acme, "ids": ids, "console": console, "api": web.api(acme.key), "admin": admin,
            "servers": tls_sink.address}


# -- authorization across organizations -----------------------------------------------------------------

def _console_post(console, path, data=None):
    token = csrf_token(console.get("/").text)
    return console.post(path, data={**(data or {}), "csrf_token": token})


#: (method, route) -> how to call it on an object named or numbered ``target`` (console client, API client).
SCOPED = {
    ("GET", "/domains/{name}"): lambda c, a, t: c.get(f"/domains/{t['domain']}"),
    ("POST", "/domains/{name}"): lambda c, a, t: _console_post(c, f"/domains/{t['domain']}",
                                                              {**DOMAIN_FORM, "servers": t["servers"]}),
    ("POST", "/domains/{name}/delete"): lambda c, a, t: _console_post(c, f"/domains/{t['domain']}/delete"),
    ("POST", "/domains/{name}/test"): lambda c, a, t: _console_post(c, f"/domains/{t['domain']}/test"),
    ("GET", "/log/{entry_id}"): lambda c, a, t: c.get(f"/log/{t['entry']}"),
    ("GET", "/api/v1/domains/{name}"): lambda c, a, t: a.get(f"/domains/{t['domain']}"),
    ("PATCH", "/api/v1/domains/{name}"): lambda c, a, t: a.patch(f"/domains/{t['domain']}",
                                                                 json={"downstream_tls": "off"}),
    ("DELETE", "/api/v1/domains/{name}"): lambda c, a, t: a.delete(f"/domains/{t['domain']}"),
    ("POST", "/api/v1/domains/{name}/test"): lambda c, a, t: a.post(f"/domains/{t['domain']}/test"),
    ("GET", "/api/v1/messages/{entry_id}"): lambda c, a, t: a.get(f"/messages/{t['entry']}"),
}


def test_the_scoped_route_table_covers_every_route_with_an_id_or_name(web):
    with_params = {(m, p) for m, p in _routes(web) if "{" in p}
    assert with_params == set(SCOPED), "a route that takes an id or a name needs a tenancy case here"


def test_another_organizations_objects_are_not_found_on_every_route(web, tenants):
    console, api, ids, admin = tenants["console"], tenants["api"], tenants["ids"], tenants["admin"]
    before = admin.get("/domains/globex.test").json()
    theirs = {"domain": "globex.test", "entry": ids["globex.test"], "servers": tenants["servers"]}
    for (method, path), call in SCOPED.items():
        reply = call(console, api, theirs)
        assert reply.status_code == 404, (method, path, reply.status_code)
        assert "Globex secret" not in reply.text and "carol@" not in reply.text
    assert admin.get("/domains/globex.test").json() == before, "nothing of Globex's changed"
    # The same calls on Acme's own objects work: the 404s above were the tenancy rule, not broken routes.
    mine = {"domain": "spare.acme.test", "entry": ids["acme.test"], "servers": tenants["servers"]}
    for (method, path), call in SCOPED.items():
        reply = call(console, api, mine)
        assert reply.status_code in (200, 204, 303), (method, path, reply.status_code, reply.text[:200])
        if "delete" in path or method == "DELETE":
            admin.post("/domains", json={"name": "spare.acme.test", "servers": [tenants["servers"]], "org": "Acme"})


def test_lists_and_searches_show_only_the_own_organization(web, tenants):
    console, api = tenants["console"], tenants["api"]
    for params in ({}, {"subject": "secret"}, {"recipient": "globex"}, {"sender": "a@sender.test"}):
        assert [r["subject"] for r in api.get("/messages", params=params).json()] in (["Acme memo"], []), params
        page = console.get("/log", params=params).text
        assert "Globex secret" not in page and "globex.test" not in page
    assert [d["name"] for d in api.get("/domains").json()] == ["acme.test", "spare.acme.test"]
    assert {d["domain"] for d in api.get("/tls/domains").json()} <= {"acme.test", "spare.acme.test"}
    assert not any("globex" in (e["target"] or "") for e in api.get("/audit").json())
    assert api.get("/audit", params={"target": "globex.test"}).json() == []
    assert [o["name"] for o in api.get("/orgs").json()] == ["Acme"]
    assert all(u["org"] == "Acme" for u in api.get("/users").json())
    assert "globex" not in console.get("/domains").text and "globex" not in console.get("/tls").text
    assert "globex.test" not in console.get("/audit").text


def test_a_plain_user_gets_403_from_every_api_endpoint(web, tenants):
    web.add_user("clerk@acme.test", "user", "Acme")
    clerk = web.api(web.api_key("clerk@acme.test"))
    for method, path in sorted(_routes(web)):
        if not path.startswith("/api/v1/") or path in ("/api/v1/me",):
            continue
        url = path.removeprefix("/api/v1").replace("{name}", "acme.test").replace("{entry_id}", "1")
        reply = clerk.request(method, url, json={} if method in ("POST", "PUT", "PATCH") else None)
        assert reply.status_code in (403, 422), (method, path, reply.status_code)
        if reply.status_code == 422:  # a body was needed; with a valid one it is still refused
            assert method in ("POST", "PUT"), (method, path)
    # With valid bodies the answer is still no.
    assert clerk.post("/domains", json={"name": "x.acme.test", "servers": ["a.test"]}).status_code == 403
    assert clerk.post("/orgs", json={"name": "Mine"}).status_code == 403
    assert clerk.post("/users", json={"email": "x@acme.test", "role": "user", "org": "Acme"}).status_code == 403
    assert clerk.get("/me").json()["role"] == "user"


# -- script in every field a message brings ------------------------------------------------------------

PAYLOADS = {
    "subject": '<script>alert("subject")</script>',
    "helo": "<script>alert('helo')</script>",
    "sender": "<img src=x onerror=alert('from')>",
    "recipient": "<svg/onload=alert('rcpt')>",
    "message_id": "<\"><script>alert('mid')</script>@x>",
    "filename": "<img src=x onerror=alert('file')>.exe",
    "reply": "<script>alert('reply')</script>",
}
RAW_MARKERS = ("<script>alert(", "<img src=x", "<svg/onload")


def _send_hostile_messages(web, tls_sink) -> None:
    web.api(web.admin_key).post("/domains", json={"name": "example.com", "servers": [tls_sink.address]})
    tls_sink.rcpt_replies["refused@example.com"] = f"550 5.1.1 {PAYLOADS['reply']} no such user"
    raw = Raw(web.gw.port)
    raw.cmd(f"EHLO {PAYLOADS['helo']}")
    assert raw.cmd(f'MAIL FROM:<"{PAYLOADS["sender"]}"@sender.test>').startswith("250")
    assert raw.cmd(f'RCPT TO:<"{PAYLOADS["recipient"]}"@example.com>').startswith("250")
    assert raw.cmd("RCPT TO:<refused@example.com>").startswith("550")
    raw.cmd("DATA")
    raw.send(b"From: a@sender.test\r\nSubject: " + PAYLOADS["subject"].encode() + b"\r\nMessage-ID: "
             + PAYLOADS["message_id"].encode() + b"\r\n\r\nbody\r\n.\r\n")
    assert raw.reply().startswith("250")
    # An attachment whose name is script: refused by the default rules, the name in the reply and verdict.
    attachment = (b"From: a@sender.test\r\nSubject: file\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
                  b"boundary=b\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: "
                  b"attachment; filename=\"" + PAYLOADS["filename"].encode() + b"\"\r\n\r\nMZ\r\n--b--\r\n")
    raw.cmd("MAIL FROM:<a@sender.test>")
    raw.cmd("RCPT TO:<alice@example.com>")
    raw.cmd("DATA")
    raw.send(attachment + b".\r\n")
    assert raw.reply().startswith("550 5.7.1")
    raw.close()
    web.gw.wait_records(2)
    web.gw.flush_log()


def _no_raw_markup(html: str, where: str) -> None:
    for marker in RAW_MARKERS:
        assert marker not in html, f"{marker!r} unescaped in {where}"


def test_script_in_every_message_field_is_escaped_on_every_page(web, tls_sink):
    _send_hostile_messages(web, tls_sink)
    client, _ = web.login("admin@gw.test")
    listing = client.get("/log").text
    _no_raw_markup(listing, "/log")
    ids = re.findall(r'href="/log/(\d+)"', listing)
    assert len(ids) == 2
    details = [client.get(f"/log/{i}").text for i in ids]
    for i, page in zip(ids, details):
        _no_raw_markup(page, f"/log/{i}")
    everything = listing + "".join(details)
    for field, payload in PAYLOADS.items():
        escaped = payload.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        variants = {escaped, escaped.replace('"', "&#34;").replace("'", "&#39;"),
                    escaped.replace('"', "&#34;"), escaped.replace("'", "&#39;")}
        assert any(v in everything for v in variants), f"{field} is shown (escaped) somewhere"
    for page in ("/", "/tls", "/audit", "/domains"):
        _no_raw_markup(client.get(page).text, page)
    assert PAYLOADS["subject"] in [r["subject"] for r in web.api(web.admin_key).get("/messages").json()], \
        "the API returns the data as data (JSON), unchanged"


def test_no_script_runs_in_a_real_browser(web, tls_sink):
    _send_hostile_messages(web, tls_sink)
    dialogs: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(ignore_https_errors=True)
        page = context.new_page()
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(web.url + "/login")
        page.fill("input[name=email]", "admin@gw.test")
        page.fill("input[name=password]", PASSWORD)
        page.click("button:has-text('Log in')")
        page.wait_for_url(web.url + "/")
        page.goto(web.url + "/log")
        links = page.eval_on_selector_all("a[href^='/log/']", "els => els.map(e => e.getAttribute('href'))")
        assert len(links) == 2
        for link in links:
            page.goto(web.url + link)
            assert page.locator("#message-detail").count() == 1
        page.wait_for_timeout(300)
        context.close()
        browser.close()
    assert dialogs == [], f"script ran in the console: {dialogs}"


# -- SQL metacharacters in every search field --------------------------------------------------------

SQL_PAYLOADS = ["'", "' OR '1'='1", "' OR 1=1 --", "\"; DROP TABLE message_log; --", "%", "_", "\\", "%%",
                "') UNION SELECT id, txn_id FROM users --", "a\x00b", "\x00", "*", "[a-z]", "ÿ€😀", "x" * 300]

#: Every search parameter of the console and the API, by route.
SEARCH_FIELDS = {
    ("/log", "console"): ["sender", "recipient", "subject", "client_ip", "disposition", "tls", "since", "until",
                          "page"],
    ("/api/v1/messages", "api"): ["sender", "recipient", "subject", "client_ip", "disposition", "tls", "since",
                                  "until", "limit", "offset"],
    ("/api/v1/audit", "api"): ["action", "target", "limit", "offset"],
    ("/audit", "console"): ["page"],
}
TEXT_FIELDS = {"sender", "recipient", "subject", "action", "target", "client_ip"}


def _query_params(dependant) -> set[str]:
    """Query parameters of a route, its dependencies' included."""
    names = {p.name for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_params(sub)
    return names


def test_the_search_table_covers_every_query_parameter(web):
    seen = set()
    for path, route in _api_routes(web.gw.gateway.web.app.routes):
        if "GET" not in route.methods or "{" in path:
            continue
        params = _query_params(route.dependant)
        key = next((k for k in SEARCH_FIELDS if k[0] == path), None)
        if key is None:
            assert not params - {"next", "saved"}, f"{path} takes {params}: add it to SEARCH_FIELDS"
        else:
            assert params == set(SEARCH_FIELDS[key]), path
            seen.add(key)
    assert seen == set(SEARCH_FIELDS)


def _seed_search_data(gw, web) -> dict:
    """Two messages, one with metacharacters in its subject and sender; returns the admin clients."""
    admin = web.api(web.admin_key)
    admin.post("/domains", json={"name": "example.com", "servers": [web.sink_address]})
    tricky = "100% _off_ O'Brien \"quoted\" back\\slash; DROP"
    send(gw.port, ["alice@example.com"], message(subject=tricky), sender="o'brien_100%@sender.test")
    send(gw.port, ["bob@example.com"], message(subject="Plain one"), sender="plain@sender.test")
    gw.wait_records(2)
    gw.flush_log()
    console, _ = web.login("admin@gw.test")
    return {"api": admin, "console": console, "tricky": tricky}


def _search_everything(web, seeded) -> None:
    api, console, tricky = seeded["api"], seeded["console"], seeded["tricky"]
    for (path, kind), fields in SEARCH_FIELDS.items():
        for field in fields:
            for payload in SQL_PAYLOADS:
                if kind == "console":
                    reply = console.get(path, params={field: payload})
                else:
                    reply = api.get(path.removeprefix("/api/v1"), params={field: payload})
                assert reply.status_code in (200, 422), (path, field, payload, reply.status_code)
                if reply.status_code == 200 and path == "/api/v1/messages" and field in TEXT_FIELDS:
                    subjects = [r["subject"] for r in reply.json()]
                    # Only what really contains the text matches: never everything.
                    if field == "subject" and payload in tricky:
                        assert subjects == [tricky], (field, payload, subjects)
                    elif field == "sender" and payload in "o'brien_100%@sender.test":
                        assert subjects == [tricky], (field, payload, subjects)
                    else:
                        assert subjects == [], (field, payload, subjects)
                if reply.status_code == 200 and kind == "console":
                    assert "Internal error" not in reply.text
    # Everything is still there.
    assert len(api.get("/messages").json()) == 2
    assert {r["subject"] for r in api.get("/messages", params={"subject": "%"}).json()} == {tricky}
    assert console.get("/log").text.count('href="/log/') == 2


def test_sql_metacharacters_in_every_search_field_sqlite(web, tls_sink):
    web.sink_address = tls_sink.address
    _search_everything(web, _seed_search_data(web.gw, web))


def test_sql_metacharacters_in_every_search_field_postgresql(tmp_path, pg_url, tls_sink, loopback_dns):
    init_data_dir(tmp_path / "pg", database_url=pg_url)
    gw = ThreadedGateway(load_settings(tmp_path / "pg", environ=gateway_environ(loopback_dns)),
                         web_listen="127.0.0.1:0").start()
    web = WebGateway(gw, tmp_path / "pg" / "tls" / "cert.pem")
    try:
        web.add_user("admin@gw.test", "admin")
        web.admin_key = web.api_key("admin@gw.test")
        web.sink_address = tls_sink.address
        _search_everything(web, _seed_search_data(gw, web))
        # NUL also reaches the database through forms: a clear answer, never a 500.
        _, reply = web.login("a\x00b@gw.test")
        assert reply.status_code == 401
        api = web.api(web.admin_key)
        assert api.post("/users", json={"email": "x\x00@gw.test", "role": "admin"}).status_code == 422
        assert api.post("/domains", json={"name": "n.test", "servers": ["a\x00b"]}).status_code == 422
        assert api.post("/orgs", json={"name": "A\x00"}).status_code == 422
    finally:
        web.close()
        gw.stop()


# -- session fixation and open redirects ---------------------------------------------------------------

def test_logging_in_again_replaces_the_session_and_an_attackers_planted_session_is_ended(web):
    web.tenant("Acme", "ops@acme.test")
    attacker, reply = web.login("ops@acme.test")
    planted = reply.cookies.get("__Host-mxguard_session")
    victim = web.client()
    form = victim.get("/login")  # the victim opens the login page...
    victim.cookies.set("__Host-mxguard_session", planted, domain="127.0.0.1")  # ...the attacker plants a session
    reply = victim.post("/login", data={"email": "admin@gw.test", "password": PASSWORD,
                                        "csrf_token": csrf_token(form.text), "next": "/"})
    assert reply.status_code == 303
    issued = reply.cookies.get("__Host-mxguard_session")
    assert issued and issued != planted, "the victim never uses the planted session id"
    assert attacker.get("/domains").status_code == 303, "the planted session was ended, not upgraded to admin"
    again_client = web.client()
    again_client.cookies.set("__Host-mxguard_session", issued, domain="127.0.0.1")
    form = web.client().get("/login")
    again_client.cookies.set("__Host-mxguard_login", form.cookies.get("__Host-mxguard_login"), domain="127.0.0.1")
    again = again_client.post("/login", data={"email": "admin@gw.test", "password": PASSWORD,
                                              "csrf_token": csrf_token(form.text), "next": "/"})
    second = again.cookies.get("__Host-mxguard_session")
    assert again.status_code == 303 and second and second != issued, "logging in again gives a new session"
    stale = web.client()
    stale.cookies.set("__Host-mxguard_session", issued, domain="127.0.0.1")
    assert stale.get("/").status_code == 303, "the replaced session no longer works"


OPEN_REDIRECTS = ["//evil.test", "//evil.test/%2e%2e", "/\\evil.test", "\\\\evil.test", "https:evil.test",
                  "https://evil.test", " //evil.test", "/\t/evil.test", "//evil.test%2F@gw.test", "/%0d%0aLocation:x",
                  "javascript:alert(1)", "data:text/html,x", "//%65vil.test", "///evil.test", "/login?next=//evil.test"]


def _same_site(location: str) -> bool:
    parts = urlsplit(location)
    return (location.startswith("/") and not location.startswith(("//", "/\\")) and not parts.scheme
            and not parts.netloc and all(ord(c) >= 32 for c in location))


@pytest.mark.parametrize("target", OPEN_REDIRECTS)
def test_no_open_redirect_on_any_path_to_login(web, target):
    _, reply = web.login("admin@gw.test", next_path=target)
    assert reply.status_code == 303 and _same_site(reply.headers["location"]), reply.headers["location"]
    signed_in, _ = web.login("admin@gw.test")
    reply = signed_in.get("/login", params={"next": target})   # already signed in: straight to next
    assert reply.status_code == 303 and _same_site(reply.headers["location"]), reply.headers["location"]


def test_login_required_redirect_keeps_the_target_on_the_site(web):
    client = web.client()
    reply = client.get("/log", params={"sender": "//evil.test", "subject": "https://evil.test/"})
    assert reply.status_code == 303 and reply.headers["location"].startswith("/login?next=/log")
    page = client.get(reply.headers["location"])
    hidden = re.search(r'name="next" value="([^"]*)"', page.text).group(1).replace("&amp;", "&")
    assert hidden.startswith("/log?") and _same_site(hidden), hidden
    done = client.post("/login", data={"email": "admin@gw.test", "password": PASSWORD,
                                       "csrf_token": csrf_token(page.text), "next": hidden})
    assert done.status_code == 303 and done.headers["location"] == hidden
    assert client.get(done.headers["location"]).status_code == 200
