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
from mxguard.quarantine import senderlists
from mxguard.quarantine.store import list_quarantine
from mxguard.services import users
from mxguard.services.access import SYSTEM
from tests.conftest import gateway_environ
from tests.support import mail
from tests.support.browser import CHROMIUM_ARGS, chromium_path
from tests.support.gateway import ThreadedGateway, init_data_dir
from tests.support.peers import free_port
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
    """The message-log id of the delivered message per recipient domain."""
    web.gw.flush_log()
    return {row["rcpt_to"].split("@")[-1]: row["id"] for row in admin.get("/messages").json()
            if row["disposition"] == "delivered"}


@pytest.fixture
def tenants(web, tls_sink):
    """Acme and Globex, each with a domain, an org-admin (console session and API key), a logged message,
    a quarantined message, a spooled message (a domain whose server is down) and an allow-list entry."""
    acme = web.tenant("Acme", "ops@acme.test")
    web.add_org("Globex")
    web.add_user("ops@globex.test", "org-admin", "Globex")
    admin = web.api(web.admin_key)
    down = f"127.0.0.1:{free_port()}"  # nothing listens: mail for these domains is spooled
    for name, org, servers in (("acme.test", "Acme", tls_sink.address), ("globex.test", "Globex", tls_sink.address),
                               ("spare.acme.test", "Acme", tls_sink.address), ("down.acme.test", "Acme", down),
                               ("down.globex.test", "Globex", down)):
        assert admin.post("/domains", json={"name": name, "servers": [servers], "org": org}).status_code == 201
    relay = {domain: _relay_entries(web, org, domain, net) for org, domain, net in
             (("Acme", "acme.test", "192.0.2.0/24"), ("Globex", "globex.test", "198.51.100.0/24"))}
    send(web.gw.port, ["bob@acme.test"], message(subject="Acme memo", to="bob@acme.test"))
    send(web.gw.port, ["carol@globex.test"], message(subject="Globex secret", to="carol@globex.test"))
    held = {}
    for rcpt in ("bob@acme.test", "carol@globex.test"):
        assert send(web.gw.port, [rcpt], mail.gtube(to=rcpt)).data[0] == 250
        held[rcpt.split("@")[1]] = web.run(list_quarantine(web.gw.store, recipient=rcpt))[0].id
    for rcpt in ("dan@down.acme.test", "dan@down.acme.test", "erin@down.globex.test"):
        assert send(web.gw.port, [rcpt], message(subject="Spooled", to=rcpt)).data[0] == 250
    spooled: dict[str, list[int]] = {}
    for entry in admin.get("/spool").json():
        spooled.setdefault(entry["domain"].removeprefix("down."), []).append(entry["id"])
    lists = {}
    for email in ("ops@acme.test", "ops@globex.test"):
        user = web.run(users.get_user(web.gw.store, email))
        web.run(senderlists.add_entry(web.gw.store, user.id, "allow", f"friend@{email.split('@')[1]}",
                                      actor=SYSTEM))
        lists[email.split("@")[1]] = web.run(senderlists.list_entries(web.gw.store, user.id))[0].id
    web.gw.wait_records(6)
    ids = _entry_ids(web, admin)
    # A TLS-RPT report about each organization's domain, and an SNI certificate under each.
    reports, sni = {}, {}
    from tests.test_sni_certificates import MiniCA
    from tests.test_tlsrpt_ingest import encode, make_report
    sni_ca = MiniCA()
    for domain in ("globex.test", "spare.acme.test"):
        posted = web.client().post("/tlsrpt", content=encode(make_report(domain, report_id=f"r-{domain}")),
                                   headers={"Content-Type": "application/tlsrpt+gzip"})
        assert posted.status_code == 201, posted.text
        reports[domain] = admin.get(f"/domains/{domain}/tls-reports").json()["newest"][0]["id"]
        leaf = sni_ca.issue(f"mx.{domain}")
        added = admin.post("/tls/certificates", json={"name": f"mx.{domain}", "certificate_pem": leaf.chain_pem.decode(),
                                                      "key_pem": leaf.key_pem.decode()})
        assert added.status_code == 201, added.text
        sni[domain] = f"mx.{domain}"
    console, reply = web.login(acme.email)
    assert reply.status_code == 303
    links = web.gw.gateway.links
    return {"acme": acme, "ids": ids, "console": console, "api": web.api(acme.key), "admin": admin,
            "servers": tls_sink.address, "held": held, "spooled": spooled, "lists": lists, "links": links,
            "reports": reports, "sni": sni, "relay": relay}


def _relay_entries(web, org: str, domain: str, network: str) -> dict:
    """Who may relay for ``org`` (a network, an AUTH user, a certificate fingerprint), one outbound
    message of its sender held by a rate limit and one queued for a later attempt (both to the same
    foreign destination, elsewhere.test, for every organization: the destination says nothing of
    whose mail it is); returns their names and the entries' ids."""
    import datetime as dt
    import hashlib
    from mxguard.services import orgs as org_service
    from mxguard.services import relay as relay_service
    from mxguard.spool import queue
    store = web.gw.store
    web.run(relay_service.add_network(store, org, network))
    web.run(relay_service.add_credential(store, org, f"relay@{domain}", "a long relay password"))
    fingerprint = hashlib.sha256(domain.encode()).hexdigest()
    web.run(relay_service.add_certificate(store, org, fingerprint=fingerprint))
    org_id = web.run(org_service.get_org(store, org)).id

    async def outbound(status: str) -> int:
        async with store.session() as session:
            [row] = queue.add_entries(session, [queue.NewSpoolEntry(
                txn_id=f"{status.upper()}{org.upper()}", domain="elsewhere.test", mail_from=f"alice@{domain}",
                recipients=["zed@elsewhere.test"], message=b"Subject: outbound\r\n\r\nx\r\n", kind="outbound",
                org_id=org_id)], web.gw.gateway.keyring.get(), web.gw.settings.spool)
            row.status = status
            # Not due for a day: the gateway's worker never looks the destination up.
            row.next_attempt_at = row.created_at + dt.timedelta(days=1)
            await session.commit()
            return row.id
    return {"net": network, "net2": network.replace(".0/24", ".128/25"), "user": f"relay@{domain}",
            "fp": fingerprint, "fp2": hashlib.sha256(b"2" + domain.encode()).hexdigest(),
            "held": web.run(outbound("held")), "queued": web.run(outbound("queued"))}


# -- authorization across organizations -----------------------------------------------------------------

def _console_post(console, path, data=None):
    token = csrf_token(console.get("/").text)
    return console.post(path, data={**(data or {}), "csrf_token": token})


#: (method, route) -> how to call it on an object named or numbered ``target`` (console client, API client).
SCOPED = {
    ("GET", "/domains/{name}"): lambda c, a, t: c.get(f"/domains/{t['domain']}"),
    # Hosted MTA-STS, DNS check, TLS-RPT reports received, partner TLS rules, SNI certificates.
    ("POST", "/domains/{name}/mta-sts"): lambda c, a, t: _console_post(c, f"/domains/{t['domain']}/mta-sts",
                                                                      {"mta_sts_mode": "testing"}),
    ("POST", "/domains/{name}/dns-check"): lambda c, a, t: _console_post(c, f"/domains/{t['domain']}/dns-check"),
    ("GET", "/domains/{name}/tls-reports"): lambda c, a, t: c.get(f"/domains/{t['domain']}/tls-reports"),
    ("GET", "/domains/{name}/tls-reports/chart.svg"):
        lambda c, a, t: c.get(f"/domains/{t['domain']}/tls-reports/chart.svg"),
    ("GET", "/api/v1/domains/{name}/mta-sts"): lambda c, a, t: a.get(f"/domains/{t['domain']}/mta-sts"),
    ("PATCH", "/api/v1/domains/{name}/mta-sts"): lambda c, a, t: a.patch(f"/domains/{t['domain']}/mta-sts",
                                                                         json={"mode": "testing"}),
    ("POST", "/api/v1/domains/{name}/dns-check"): lambda c, a, t: a.post(f"/domains/{t['domain']}/dns-check"),
    ("GET", "/api/v1/domains/{name}/tls-reports"): lambda c, a, t: a.get(f"/domains/{t['domain']}/tls-reports"),
    ("GET", "/api/v1/domains/{name}/tls-reports/{report_pk}"):
        lambda c, a, t: a.get(f"/domains/{t['domain']}/tls-reports/{t['report']}"),
    ("GET", "/api/v1/domains/{name}/partners"): lambda c, a, t: a.get(f"/domains/{t['domain']}/partners"),
    ("POST", "/api/v1/domains/{name}/partners"): lambda c, a, t: a.post(f"/domains/{t['domain']}/partners",
                                                                        json={"sender": "partner.example"}),
    ("DELETE", "/api/v1/domains/{name}/partners/{sender}"):
        lambda c, a, t: a.delete(f"/domains/{t['domain']}/partners/partner.example"),
    ("DELETE", "/api/v1/tls/certificates/{name}"): lambda c, a, t: a.delete(f"/tls/certificates/{t['sni']}"),
    # The console's partner rules page: list, add (the API's rule was removed above), remove.
    ("GET", "/domains/{name}/partners"): lambda c, a, t: c.get(f"/domains/{t['domain']}/partners"),
    ("POST", "/domains/{name}/partners"): lambda c, a, t: _console_post(c, f"/domains/{t['domain']}/partners",
                                                                        {"sender": "partner.example", "min_tls": "1.2"}),
    ("POST", "/domains/{name}/partners/remove"): lambda c, a, t: _console_post(
        c, f"/domains/{t['domain']}/partners/remove", {"sender": "partner.example"}),
    # DKIM keys of outbound mail (generated, checked in DNS, deleted again).
    ("GET", "/api/v1/domains/{name}/dkim"): lambda c, a, t: a.get(f"/domains/{t['domain']}/dkim"),
    ("POST", "/api/v1/domains/{name}/dkim"): lambda c, a, t: a.post(f"/domains/{t['domain']}/dkim",
                                                                    json={"selector": "tenancy", "algorithm": "ed25519"}),
    ("POST", "/api/v1/domains/{name}/dkim/check"): lambda c, a, t: a.post(f"/domains/{t['domain']}/dkim/check"),
    ("DELETE", "/api/v1/domains/{name}/dkim/{selector}"):
        lambda c, a, t: a.delete(f"/domains/{t['domain']}/dkim/tenancy"),
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
    # The Message Center (quarantine) and the allow/block lists.
    ("GET", "/mc/messages/{qid}"): lambda c, a, t: c.get(f"/mc/messages/{t['held']}"),
    ("GET", "/mc/messages/{qid}/frame"): lambda c, a, t: c.get(f"/mc/messages/{t['held']}/frame"),
    ("POST", "/mc/messages/{qid}/deliver"): lambda c, a, t: _console_post(c, f"/mc/messages/{t['held']}/deliver"),
    ("POST", "/mc/messages/{qid}/delete"): lambda c, a, t: _console_post(c, f"/mc/messages/{t['held']}/delete"),
    ("POST", "/mc/messages/{qid}/notjunk"): lambda c, a, t: _console_post(c, f"/mc/messages/{t['held']}/notjunk"),
    ("POST", "/mc/lists/{entry_id}/delete"): lambda c, a, t: _console_post(c, f"/mc/lists/{t['list']}/delete"),
    # Organization settings.
    ("POST", "/orgs/{name}"): lambda c, a, t: _console_post(c, f"/orgs/{t['org']}", {"message_links": "on",
                                                                                 "route_down_minutes": "30"}),
    # Who may relay for an organization, and its outbound mail held by a rate limit (removals last).
    ("GET", "/orgs/{name}/relay"): lambda c, a, t: c.get(f"/orgs/{t['org']}/relay"),
    ("POST", "/orgs/{name}/relay"): lambda c, a, t: _console_post(c, f"/orgs/{t['org']}/relay",
                                                                  {"action": "add-network", "value": t["relay"]["net2"]}),
    ("GET", "/api/v1/orgs/{org}/relay/networks"): lambda c, a, t: a.get(f"/orgs/{t['org']}/relay/networks"),
    ("POST", "/api/v1/orgs/{org}/relay/networks"):
        lambda c, a, t: a.post(f"/orgs/{t['org']}/relay/networks", json={"network": t["relay"]["net2"]}),
    ("GET", "/api/v1/orgs/{org}/relay/users"): lambda c, a, t: a.get(f"/orgs/{t['org']}/relay/users"),
    ("POST", "/api/v1/orgs/{org}/relay/users"):
        lambda c, a, t: a.post(f"/orgs/{t['org']}/relay/users", json={"username": "second@" + t["domain"]}),
    ("GET", "/api/v1/orgs/{org}/relay/certs"): lambda c, a, t: a.get(f"/orgs/{t['org']}/relay/certs"),
    ("POST", "/api/v1/orgs/{org}/relay/certs"):
        lambda c, a, t: a.post(f"/orgs/{t['org']}/relay/certs", json={"fingerprint": t["relay"]["fp2"]}),
    ("POST", "/api/v1/relay/held/{entry_id}/release"): lambda c, a, t: a.post(f"/relay/held/{t['relay']['held']}/release"),
    ("DELETE", "/api/v1/orgs/{org}/relay/networks/{network:path}"):
        lambda c, a, t: a.delete(f"/orgs/{t['org']}/relay/networks/{t['relay']['net']}"),
    ("DELETE", "/api/v1/orgs/{org}/relay/users/{username}"):
        lambda c, a, t: a.delete(f"/orgs/{t['org']}/relay/users/{t['relay']['user']}"),
    ("DELETE", "/api/v1/orgs/{org}/relay/certs/{fingerprint}"):
        lambda c, a, t: a.delete(f"/orgs/{t['org']}/relay/certs/{t['relay']['fp']}"),
    # The spool (the deleting calls come last: they remove the own entry).
    ("GET", "/spool/{entry_id}"): lambda c, a, t: c.get(f"/spool/{t['spooled']}"),
    ("GET", "/spool/{entry_id}/delete"): lambda c, a, t: c.get(f"/spool/{t['spooled']}/delete"),
    ("POST", "/spool/{entry_id}/retry"): lambda c, a, t: _console_post(c, f"/spool/{t['spooled']}/retry"),
    ("GET", "/api/v1/spool/{entry_id}"): lambda c, a, t: a.get(f"/spool/{t['spooled']}"),
    ("POST", "/api/v1/spool/{entry_id}/retry"): lambda c, a, t: a.post(f"/spool/{t['spooled']}/retry"),
    ("POST", "/spool/{entry_id}/delete"): lambda c, a, t: _console_post(c, f"/spool/{t['spooled']}/delete",
                                                                        {"confirm": "yes"}),
    ("DELETE", "/api/v1/spool/{entry_id}"): lambda c, a, t: a.delete(f"/spool/{t['spooled_last']}"),
}

#: Routes whose path holds a signed capability (a mailed link), not an object id: what matters is that a
#: forged or altered token is refused (400/404/410) and a genuine one works.
CAPABILITIES = {
    ("GET", "/mc/link/{token}"): lambda c, t: c.get(f"/mc/link/{t}"),
    ("GET", "/mc/frame/{token}"): lambda c, t: c.get(f"/mc/frame/{t}"),
}


#: Routes that take a name of no organization's object (the gateway's own configuration): an
#: org-admin is refused (403) whatever the name.
ADMIN_ONLY = {
    ("DELETE", "/api/v1/destination-tls/{pattern}"): lambda c, a: a.delete("/destination-tls/.example.org"),
}


def test_the_scoped_route_table_covers_every_route_with_an_id_or_name(web):
    with_params = {(m, p) for m, p in _routes(web) if "{" in p}
    assert with_params == set(SCOPED) | set(CAPABILITIES) | set(ADMIN_ONLY), \
        "a route that takes an id or a name needs a tenancy case here"


def test_gateway_wide_routes_refuse_an_org_admin(web, tenants):
    for (method, path), call in ADMIN_ONLY.items():
        assert call(tenants["console"], tenants["api"]).status_code == 403, (method, path)


def test_another_organizations_objects_are_not_found_on_every_route(web, tenants):
    console, api, ids, admin = tenants["console"], tenants["api"], tenants["ids"], tenants["admin"]
    globex_state = lambda: (admin.get("/domains/globex.test").json(),  # noqa: E731
                            [(e["id"], e["status"], e["attempts"]) for e in admin.get("/spool").json()],
                            [(h.id, h.released_at, h.deleted_at) for h in web.run(list_quarantine(web.gw.store))],
                            admin.get("/audit", params={"target": "Globex"}).json())
    before = globex_state()
    def objects_of(tenant: str, domain: str, org: str) -> dict:
        """The ids a scoped call needs, of ``tenant``'s objects (``domain`` is the one it may delete)."""
        return {"domain": domain, "entry": ids[tenant], "servers": tenants["servers"],
                "held": tenants["held"][tenant], "spooled": tenants["spooled"][tenant][0],
                "spooled_last": tenants["spooled"][tenant][-1], "list": tenants["lists"][tenant], "org": org,
                "report": tenants["reports"][domain], "sni": tenants["sni"][domain],
                "relay": tenants["relay"][tenant]}

    theirs = objects_of("globex.test", "globex.test", "Globex")
    for (method, path), call in SCOPED.items():
        reply = call(console, api, theirs)
        assert reply.status_code == 404, (method, path, reply.status_code)
        assert "Globex secret" not in reply.text and "carol@" not in reply.text and "erin@" not in reply.text
    # Globex's outbound entry (to the same destination domain as Acme's) is not Acme's either.
    outbound = tenants["relay"]["globex.test"]["queued"]
    for reply in (console.get(f"/spool/{outbound}"), api.get(f"/spool/{outbound}"),
                  api.post(f"/spool/{outbound}/retry"), api.delete(f"/spool/{outbound}"),
                  _console_post(console, f"/spool/{outbound}/retry")):
        assert reply.status_code == 404 and "globex" not in reply.text, reply.status_code
    assert globex_state() == before, "nothing of Globex's changed"
    own = tenants["relay"]["acme.test"]["queued"]
    assert api.get(f"/spool/{own}").json()["mail_from"] == "alice@acme.test"
    assert console.get(f"/spool/{own}").status_code == 200
    # The same calls on Acme's own objects work: the 404s above were the tenancy rule, not broken routes.
    # (409: the own message was already delivered by the call before; it was found all the same.)
    mine = objects_of("acme.test", "spare.acme.test", "Acme")
    for (method, path), call in SCOPED.items():
        reply = call(console, api, mine)
        assert reply.status_code in (200, 201, 204, 303, 409), (method, path, reply.status_code, reply.text[:200])
        if path.startswith(("/domains/", "/api/v1/domains/")) and ("delete" in path or method == "DELETE"):
            admin.post("/domains", json={"name": "spare.acme.test", "servers": [tenants["servers"]], "org": "Acme"})


def test_forged_or_altered_capability_links_are_refused(web, tenants):
    links = tenants["links"]
    genuine = {("GET", "/mc/link/{token}"): links.make("view", tenants["held"]["acme.test"]),
               ("GET", "/mc/frame/{token}"): links.make("frame", tenants["held"]["acme.test"])}
    anonymous = web.client()
    for key, call in CAPABILITIES.items():
        token = genuine[key]
        assert call(anonymous, token).status_code == 200, key
        altered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
        for forged in (altered, "x", "." * 40, token + "x", links.make("signin", "ops@acme.test")[::-1]):
            assert call(anonymous, forged).status_code in (400, 404, 410), (key, forged)
    # A link of one purpose does not open another door: a view link is no frame capability.
    assert CAPABILITIES[("GET", "/mc/frame/{token}")](anonymous, genuine[("GET", "/mc/link/{token}")]).status_code \
        == 404


def test_lists_and_searches_show_only_the_own_organization(web, tenants):
    console, api = tenants["console"], tenants["api"]
    for params in ({}, {"subject": "secret"}, {"recipient": "globex"}, {"sender": "a@sender.test"}):
        rows = api.get("/messages", params=params).json()
        assert all(r["rcpt_to"].endswith("acme.test") for r in rows), (params, rows)
        page = console.get("/log", params=params).text
        assert "Globex secret" not in page and "globex.test" not in page
    assert len(api.get("/messages").json()) == 4, "Acme sees its own four"
    for params in ({}, {"q": "carol"}, {"q": "globex"}):
        page = console.get("/mc", params=params).text
        assert "carol@" not in page and "globex.test" not in page, params
    assert tenants["held"]["acme.test"] in console.get("/mc").text
    # The spool: Acme's inbound entries (by domain) and its own outbound entry (by organization; its
    # domain is the destination's), never Globex's outbound entry to the same destination.
    relay = tenants["relay"]
    listed = api.get("/spool").json()
    assert {e["domain"] for e in listed} == {"down.acme.test", "elsewhere.test"}
    assert {e["id"] for e in listed if e["domain"] == "elsewhere.test"} == {relay["acme.test"]["queued"]}
    every = {e["id"] for e in api.get("/spool", params={"status": "all"}).json()}
    assert {relay["acme.test"]["queued"], relay["acme.test"]["held"]} <= every
    assert not {relay["globex.test"]["queued"], relay["globex.test"]["held"]} & every
    assert {d["domain"] for d in api.get("/spool/stats").json()["by_domain"]} == {"down.acme.test", "elsewhere.test"}
    assert [h["id"] for h in api.get("/relay/held").json()] == [relay["acme.test"]["held"]]
    assert {h["id"] for h in tenants["admin"].get("/relay/held").json()} == {
        relay["acme.test"]["held"], relay["globex.test"]["held"]}
    assert "alice@globex.test" not in console.get("/spool", params={"status": "all"}).text
    assert "alice@acme.test" in console.get("/spool").text
    page = console.get("/spool").text
    assert "erin@" not in page and "down.globex.test" not in page and "dan@down.acme.test" in page
    assert api.get("/spool", params={"domain": "down.globex.test"}).status_code == 404
    assert api.post("/spool/retry", params={"domain": "down.globex.test"}).status_code == 404
    assert sorted(d["name"] for d in api.get("/domains").json()) == ["acme.test", "down.acme.test", "spare.acme.test"]
    assert {d["domain"] for d in api.get("/tls/domains").json()} <= {"acme.test", "down.acme.test", "spare.acme.test"}
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
        url = (path.removeprefix("/api/v1").replace("{name}", "acme.test").replace("{entry_id}", "1")
               .replace("{report_pk}", "1").replace("{sender}", "partner.example").replace("{org}", "Acme")
               .replace("{network:path}", "192.0.2.0/24").replace("{username}", "relay@acme.test")
               .replace("{fingerprint}", "ab" * 32).replace("{selector}", "s1").replace("{pattern}", "example.org"))
        reply = clerk.request(method, url, json={} if method in ("POST", "PUT", "PATCH") else None)
        assert reply.status_code in (403, 422), (method, path, reply.status_code)
        if reply.status_code == 422:  # a body was needed; with a valid one it is still refused
            assert method in ("POST", "PUT"), (method, path)
    # With valid bodies the answer is still no.
    assert clerk.post("/domains", json={"name": "x.acme.test", "servers": ["a.test"]}).status_code == 403
    assert clerk.post("/orgs", json={"name": "Mine"}).status_code == 403
    assert clerk.post("/users", json={"email": "x@acme.test", "role": "user", "org": "Acme"}).status_code == 403
    assert clerk.get("/me").json()["role"] == "user"
    # The same user in the console: 403 for the role (not for the token) on the partner rules page and
    # its forms, and on the ACME forms.
    console, reply = web.login("clerk@acme.test")
    assert reply.status_code == 303
    token = csrf_token(console.get("/mc").text)
    for method, path, data in (("GET", "/domains/acme.test/partners", None),
                               ("POST", "/domains/acme.test/partners", {"sender": "partner.example"}),
                               ("POST", "/domains/acme.test/partners/remove", {"sender": "partner.example"}),
                               ("POST", "/tls/acme/request", {"names": "mx.acme.test"}),
                               ("POST", "/tls/acme/renew", {"name": "mx.acme.test"})):
        reply = console.request(method, path, data={**data, "csrf_token": token} if data else None)
        assert reply.status_code == 403 and "Message Center only" in reply.text, (method, path, reply.status_code)
    # An org-admin may not order or renew ACME certificates (the account and port 80 are the gateway's).
    acme_console, acme_api = tenants["console"], tenants["api"]
    assert acme_api.get("/tls/acme").status_code == 403
    assert acme_api.post("/tls/acme/certificates", json={"names": ["mx.acme.test"]}).status_code == 403
    assert acme_api.post("/tls/acme/renew", json={"name": "mx.acme.test"}).status_code == 403
    assert _console_post(acme_console, "/tls/acme/request", {"names": "mx.acme.test"}).status_code == 403
    assert _console_post(acme_console, "/tls/acme/renew", {"name": "mx.acme.test"}).status_code == 403
    assert 'id="acme"' not in acme_console.get("/tls").text


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


def _hostile_transaction(raw: Raw, rcpt_domain: str, content: bytes) -> str:
    assert raw.cmd(f'MAIL FROM:<"{PAYLOADS["sender"]}"@sender.test>').startswith("250")
    assert raw.cmd(f'RCPT TO:<"{PAYLOADS["recipient"]}"@{rcpt_domain}>').startswith("250")
    assert raw.cmd("DATA").startswith("354")
    raw.send(content + b".\r\n")
    return raw.reply()


def _send_hostile_messages(web, tls_sink) -> None:
    """Script in every field, through four paths: a delivered message (message log), one refused for its
    attachment name (reply text), a quarantined one with a hostile HTML body (Message Center) and a spooled
    one (spool pages)."""
    api = web.api(web.admin_key)
    api.post("/domains", json={"name": "example.com", "servers": [tls_sink.address]})
    api.post("/domains", json={"name": "down.example.com", "servers": [f"127.0.0.1:{free_port()}"]})
    tls_sink.rcpt_replies["refused@example.com"] = f"550 5.1.1 {PAYLOADS['reply']} no such user"
    head = (b"From: a@sender.test\r\nSubject: " + PAYLOADS["subject"].encode() + b"\r\nMessage-ID: "
            + PAYLOADS["message_id"].encode() + b"\r\n")
    raw = Raw(web.gw.port)
    raw.cmd(f"EHLO {PAYLOADS['helo']}")
    assert raw.cmd(f'MAIL FROM:<"{PAYLOADS["sender"]}"@sender.test>').startswith("250")
    assert raw.cmd(f'RCPT TO:<"{PAYLOADS["recipient"]}"@example.com>').startswith("250")
    assert raw.cmd("RCPT TO:<refused@example.com>").startswith("550")
    raw.cmd("DATA")
    raw.send(head + b"\r\nbody\r\n.\r\n")
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
    # GTUBE: held in quarantine, with a hostile HTML body and a hostile (but allowed) attachment name.
    junk = (head + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=j\r\n\r\n"
            b"--j\r\nContent-Type: text/plain\r\n\r\n" + mail.GTUBE + b"\r\n"
            b"--j\r\nContent-Type: text/html\r\n\r\n<p>hi</p><script>alert('html')</script>"
            b"<img src=x onerror=alert('htmlimg')><a href=\"javascript:alert('href')\">x</a>\r\n"
            b"--j\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=\""
            + PAYLOADS["filename"].removesuffix(".exe").encode() + b".txt\"\r\n\r\nnote\r\n--j--\r\n")
    assert _hostile_transaction(raw, "example.com", junk).startswith("250")
    assert _hostile_transaction(raw, "down.example.com", head + b"\r\nheld\r\n").startswith("250")
    raw.close()
    web.gw.wait_records(4)
    web.gw.flush_log()


def _no_raw_markup(html: str, where: str) -> None:
    for marker in RAW_MARKERS:
        assert marker not in html, f"{marker!r} unescaped in {where}"


def _pages(client) -> list[str]:
    """Every page that shows something a message brought."""
    log_ids = re.findall(r'href="/log/(\d+)"', client.get("/log").text)
    mc_ids = sorted(set(re.findall(r'/mc/messages/([A-Za-z0-9]+)', client.get("/mc").text)))
    spool_ids = sorted(set(re.findall(r'href="/spool/(\d+)"', client.get("/spool").text)))
    assert len(log_ids) == 4 and len(mc_ids) == 1 and len(spool_ids) == 1, (log_ids, mc_ids, spool_ids)
    return (["/log", "/mc", "/spool", "/", "/tls", "/audit", "/domains", "/orgs"] + [f"/log/{i}" for i in log_ids]
            + [f"/mc/messages/{i}" for i in mc_ids] + [f"/spool/{i}" for i in spool_ids]
            + [f"/spool/{i}/delete" for i in spool_ids])


def test_script_in_every_message_field_is_escaped_on_every_page(web, tls_sink):
    _send_hostile_messages(web, tls_sink)
    client, _ = web.login("admin@gw.test")
    everything = ""
    for path in _pages(client):
        reply = client.get(path)
        assert reply.status_code == 200, path
        _no_raw_markup(reply.text, path)
        everything += reply.text
    for field, payload in PAYLOADS.items():
        escaped = payload.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        variants = {escaped, escaped.replace('"', "&#34;").replace("'", "&#39;"),
                    escaped.replace('"', "&#34;"), escaped.replace("'", "&#39;")}
        assert any(v in everything for v in variants), f"{field} is shown (escaped) somewhere"
    qid = re.search(r"/mc/messages/([A-Za-z0-9]+)", client.get("/mc").text).group(1)
    frame = client.get(f"/mc/messages/{qid}/frame")
    assert "<p>hi</p>" in frame.text, "the HTML body is shown, sanitized"
    for bad in ("<script", "onerror", "javascript:"):
        assert bad not in frame.text.lower(), bad
    assert "script-src" not in frame.headers["content-security-policy"] or \
        "'none'" in frame.headers["content-security-policy"]
    assert PAYLOADS["subject"] in [r["subject"] for r in web.api(web.admin_key).get("/messages").json()], \
        "the API returns the data as data (JSON), unchanged"


def test_no_script_runs_in_a_real_browser(web, tls_sink):
    _send_hostile_messages(web, tls_sink)
    client, _ = web.login("admin@gw.test")
    pages = _pages(client)
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
        for path in pages:
            page.goto(web.url + path)
            page.wait_for_load_state("load")  # frames (the message's HTML body) included
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
                          "page", "direction"],
    ("/api/v1/messages", "api"): ["sender", "recipient", "subject", "client_ip", "disposition", "tls", "since",
                                  "until", "limit", "offset", "direction"],
    ("/api/v1/audit", "api"): ["action", "target", "limit", "offset"],
    ("/audit", "console"): ["page"],
    ("/spool", "console"): ["domain", "status", "retried", "delivered", "deleted"],
    ("/api/v1/spool", "api"): ["domain", "status", "limit"],
    ("/mc", "console"): ["q", "category", "sort", "order", "page", "done"],
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
            # Flags after a redirect, not searches (sni_saved and acme_saved pick one of fixed notices,
            # never echoed).
            assert not params - {"next", "saved", "sni_saved", "acme_saved"}, f"{path} takes {params}: add it to SEARCH_FIELDS"
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
                # 404: a spool filter naming a domain that is not there (the spool's own tenancy rule).
                allowed = (200, 404, 422) if path.endswith("/spool") and field == "domain" else (200, 422)
                assert reply.status_code in allowed, (path, field, payload, reply.status_code)
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
