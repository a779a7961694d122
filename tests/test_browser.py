"""A real browser (Debian's Chromium, via Playwright) through the console, end to end.

Log in, add a domain, set its downstream TLS to ``required``, use Test connection,
send mail through the gateway's SMTP port to a downstream server without STARTTLS
and see it deferred, then read the message-log entry in the page; then hold a
message for a domain whose server is down and retry and delete it on the Spool
page. Screenshots of every page go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import re
import socket

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.support.browser import ARTIFACTS, CHROMIUM_ARGS, chromium_path
from tests.support.smtp import message, send
from tests.support.web import PASSWORD


@pytest.fixture
def browser_page():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        # The gateway's certificate is self-signed (as after 'mxguard init').
        context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.problems = problems
        yield page
        context.close()
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_console_in_a_real_browser(web, plain_sink, browser_page):
    page = browser_page
    url = web.url

    # 1. Log in (the dashboard asks for it first).
    page.goto(url + "/")
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    shot(page, "01-login")
    page.fill("input[name=email]", "admin@gw.test")
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    expect(page.locator("h1")).to_have_text("Dashboard")
    expect(page.locator("#engine-health")).to_contain_text("No filtering engines")
    shot(page, "02-dashboard")

    # 2. Add a domain whose downstream server offers no STARTTLS.
    page.click("nav >> text=Domains")
    expect(page.locator("#domains")).to_contain_text("No domains yet.")
    page.click("#add-domain")
    page.fill("input[name=name]", "example.com")
    page.fill("textarea[name=servers]", f"127.0.0.1:{plain_sink.port}")
    shot(page, "03-domain-new")
    page.click("#save")
    expect(page.locator("#saved")).to_be_visible()
    expect(page.locator("select[name=downstream_tls]")).to_have_value("opportunistic")

    # 3. Set its downstream TLS to 'required'.
    page.select_option("select[name=downstream_tls]", "required")
    page.click("#save")
    expect(page.locator("#saved")).to_be_visible()
    expect(page.locator("select[name=downstream_tls]")).to_have_value("required")
    policy = page.locator("#policy-1")  # the effective TLS policy: the setting decides
    expect(policy.locator("td.policy-source")).to_have_text("setting")
    expect(policy).to_contain_text("the domain's setting: required")
    shot(page, "04-domain-required")

    # 4. Test connection: reachable, no STARTTLS, and the policy would defer.
    page.click("#test-connection")
    result = page.locator("#probe-1")
    expect(result).to_contain_text(f"127.0.0.1:{plain_sink.port}")
    expect(result.locator("td.starttls")).to_have_text("no")
    expect(result.locator("td.outcome")).to_contain_text("defer")
    expect(result.locator("td.outcome")).to_contain_text("451 4.7.5")
    expect(page.locator("#route-outcome")).to_contain_text("defer")
    shot(page, "05-test-connection")

    # 5. Mail through the SMTP port is deferred, and nothing reaches the server in clear.
    out = send(web.gw.port, ["alice@example.com"], message(subject="Browser test: needs TLS", to="alice@example.com"))
    assert out.rcpt["alice@example.com"][0] == 451 and out.rcpt["alice@example.com"][1].startswith("4.7.5")
    assert plain_sink.messages == []
    web.gw.wait_records(1)
    web.gw.flush_log()

    # 6. Read the message-log entry in the page.
    page.click("nav >> text=Message log")
    page.fill("#log-search input[name=recipient]", "alice@example.com")
    page.click("#log-search button")
    row = page.locator("#log tbody tr").first
    expect(row.locator("td.disposition")).to_have_text("deferred")
    expect(row).to_contain_text("451 4.7.5")
    shot(page, "06-message-log")
    row.locator("a").first.click()
    detail = page.locator("#message-detail")
    expect(detail.locator("td.f-disposition")).to_have_text("deferred")
    expect(detail.locator("td.f-rcpt_to")).to_have_text("alice@example.com")
    expect(detail.locator("td.f-downstream")).to_contain_text("STARTTLS not offered")
    expect(detail.locator("td.f-tls_version")).to_contain_text("TLSv1.")
    shot(page, "07-message-detail")

    # 7. The other pages: TLS, audit log, domain list, dashboard with the new figures.
    page.click("nav >> text=TLS")
    expect(page.locator("#cert-1 td.subject")).to_have_text("CN=mx.gw.test")
    expect(page.locator("#tls-per-domain")).to_contain_text("example.com")
    # Certificates by SNI: one stored for a name shows in the list, with its fingerprint and a Remove button.
    from mxguard.services.sni_certificates import add_sni_certificate
    from mxguard.tls.certs import generate_self_signed
    sni_cert, sni_key = generate_self_signed("mx.example.com")
    web.run(add_sni_certificate(web.gw.store, web.gw.gateway.keyring.get(), "mx.example.com", sni_cert, sni_key))
    page.reload()
    row = page.locator("#sni-certs tr.sni-cert")
    expect(row.locator("td.sni-name")).to_have_text("mx.example.com")
    expect(row.locator("button")).to_have_text("Remove")
    expect(page.locator("#sni-form input[name=name]")).to_be_visible()
    shot(page, "08-tls")
    page.click("nav >> text=Audit log")
    expect(page.locator("#audit")).to_contain_text("opportunistic → required")
    expect(page.locator("#audit")).to_contain_text("user:admin@gw.test")
    shot(page, "09-audit")
    page.click("nav >> text=Domains")
    expect(page.locator("#domains")).to_contain_text("required")
    shot(page, "10-domains")
    page.click("nav >> text=Dashboard")
    expect(page.locator("#total-messages")).to_have_text("1")
    assert page.locator("section.charts img").count() >= 2
    # The SVG charts load and render (waited for: they are separate requests).
    page.wait_for_function("() => Array.from(document.querySelectorAll('section.charts img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    shot(page, "11-dashboard-after")

    # 8. Mail for a domain whose server is down is held: the Spool page, the entry, retry now, delete.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    web.api(web.admin_key).post("/domains", json={"name": "down.example", "servers": [f"127.0.0.1:{dead}"]})
    out = send(web.gw.port, ["carol@down.example"], message(subject="Browser test: held", to="carol@down.example"))
    assert out.data[0] == 250 and "held for delivery" in out.data[1]
    page.click("nav >> text=Spool")
    expect(page.locator('[id="depth-down.example"] td.messages')).to_have_text("1")
    row = page.locator("#spool tbody tr").first
    expect(row.locator("td.domain")).to_have_text("down.example")
    expect(row.locator("td.pending")).to_have_text("carol@down.example")
    expect(row.locator("td.attempts")).to_have_text("0")
    shot(page, "12-spool")
    row.locator("a").first.click()
    expect(page.locator("#spool-entry td.f-subject")).to_have_text("Browser test: held")
    page.click("#retry-now")   # still down: one more attempt, still held
    expect(page.locator("#retried")).to_contain_text("still held")
    expect(page.locator("#spool-attempts tbody tr")).to_have_count(1)
    expect(page.locator("#spool-attempts td.reply")).to_contain_text("4.4.1")
    shot(page, "13-spool-entry")
    page.click("#delete")
    expect(page.locator("h1")).to_contain_text("Delete spool entry")
    shot(page, "14-spool-delete")
    page.click("#delete-for-good")
    expect(page.locator("#deleted")).to_be_visible()
    expect(page.locator("#spool tbody")).to_contain_text("No messages match.")
    assert web.api(web.admin_key).get("/spool", params={"status": "all"}).json() == []

    # 9. A TLS-RPT report another sender POSTed about down.example (RFC 8460 5.4), on its page.
    import gzip
    import json

    import httpx
    import datetime as dt
    day = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)
    report = {"organization-name": "Browser Sender Inc", "contact-info": "tls@browser-sender.test",
              "report-id": "browser-1", "date-range": {"start-datetime": f"{day}T00:00:00Z",
                                                       "end-datetime": f"{day}T23:59:59Z"},
              "policies": [{"policy": {"policy-type": "no-policy-found", "policy-domain": "down.example"},
                            "summary": {"total-successful-session-count": 40, "total-failure-session-count": 2},
                            "failure-details": [{"result-type": "starttls-not-supported",
                                                 "receiving-mx-hostname": "mx.down.example",
                                                 "failed-session-count": 2}]}]}
    posted = httpx.post(url + "/tlsrpt", content=gzip.compress(json.dumps(report).encode()), verify=False,
                        headers={"Content-Type": "application/tlsrpt+gzip"}, timeout=30)
    assert posted.status_code == 201, posted.text
    page.click("nav >> text=Domains")
    page.locator('tr:has-text("down.example") a.tls-reports').click()
    expect(page.locator("h1")).to_have_text("TLS reports about down.example")
    expect(page.locator("#total-successful")).to_have_text("40")
    expect(page.locator("#total-failed")).to_have_text("2")
    expect(page.locator("#failures")).to_contain_text("starttls-not-supported")
    expect(page.locator("#organizations")).to_contain_text("Browser Sender Inc")
    page.wait_for_function("() => Array.from(document.querySelectorAll('figure img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    shot(page, "15-tls-reports")

    # 10. Log out: the console asks for a login again.
    page.click("button:has-text('Log out')")
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto(url + "/domains")
    expect(page).to_have_url(re.compile(r"/login\?next=/domains$"))

    # No CSP violation or script error on any page.
    assert page.problems == []


def test_partner_rules_form_adds_and_removes_a_rule(web, tls_sink, browser_page):
    """The domain page's link to its partner rules; the form adds a rule with a pasted CA, the list
    shows it, its Remove button removes it; the SMTP side follows each step."""
    import trustme

    page = browser_page
    api = web.api(web.admin_key)
    assert api.post("/domains", json={"name": "example.com", "servers": [tls_sink.address]}).status_code == 201
    ca = trustme.CA(organization_name="Browser Partner CA")
    page.goto(web.url + "/login")
    page.fill("input[name=email]", "admin@gw.test")
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    expect(page.locator("h1")).to_have_text("Dashboard")
    page.goto(web.url + "/domains/example.com")
    page.click("#partners-link")
    expect(page.locator("h1")).to_contain_text("Partner TLS rules")
    expect(page.locator("#no-partner-rules")).to_be_visible()

    page.fill("input[name=sender]", "partner.example")
    page.select_option("select[name=min_tls]", "1.3")
    page.check("input[name=require_cert]")
    page.fill("textarea[name=ca_pem]", ca.cert_pem.bytes().decode())
    page.fill("input[name=cert_host]", "mta.partner.example")
    shot(page, "20-partner-form")
    page.click("#add-partner")
    expect(page.locator("#partner-saved")).to_be_visible()
    row = page.locator("tr.partner-rule")
    expect(row).to_have_count(1)
    expect(row.locator("td.partner-sender")).to_have_text("partner.example")
    expect(row.locator("td.partner-requirement")).to_contain_text("over TLS 1.3+ with a client certificate")
    expect(row).to_contain_text("Browser Partner CA")
    shot(page, "21-partner-added")
    out = send(web.gw.port, ["alice@example.com"], message(sender="bob@partner.example"), sender="bob@partner.example",
               starttls=False)
    assert out.mail[0] == 530  # the rule is applied from the next transaction on

    page.click("button[aria-label='Remove the rule for partner.example']")
    expect(page.locator("#partner-saved")).to_contain_text("Rule removed")
    expect(page.locator("tr.partner-rule")).to_have_count(0)
    expect(page.locator("#no-partner-rules")).to_be_visible()
    shot(page, "22-partner-removed")
    out = send(web.gw.port, ["alice@example.com"], message(sender="bob@partner.example"), sender="bob@partner.example",
               starttls=False)
    assert out.mail[0] == 250 and out.rcpt["alice@example.com"][0] == 250
    assert api.get("/domains/example.com/partners").json() == []
    assert page.problems == []
