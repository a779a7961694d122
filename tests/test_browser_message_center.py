"""The Message Center in a real browser (Debian's Chromium via Playwright).

A user signs in with a password, sees only their own held messages, views one
whose subject and HTML carry script and remote images (nothing runs, nothing
is fetched: a web server on loopback counts requests for the images, and the
browser's requests, dialogs and console are watched), delivers one, marks one
"not junk" and then sees the next mail from that sender delivered.
Screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import http.server
import threading
from email.message import EmailMessage

import pytest
from playwright.sync_api import expect, sync_playwright

from mxguard.services import domains as domain_service
from tests.support import mail
from tests.support.browser import ARTIFACTS, CHROMIUM_ARGS, chromium_path
from tests.support.smtp import send
from tests.support.web import PASSWORD


class PixelServer:
    """An HTTP server on loopback standing in for the sender's tracking-pixel host: it counts requests."""

    def __init__(self):
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.end_headers()
                self.wfile.write(b"GIF89a")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pixel_server():
    server = PixelServer()
    yield server
    server.close()


def hostile_message(pixel_url: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Mallory <mallory@sender.test>"
    msg["To"] = "bob@example.com"
    msg["Subject"] = '<script>alert("subject")</script><img src=x onerror=alert(1)> Your invoice'
    msg["Date"] = "Sun, 29 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<hostile@sender.test>"
    msg.set_content("Your invoice is ready.\n\n" + mail.GTUBE.decode() + "\n")
    msg.add_alternative(
        "<html><head><script>alert('head')</script><link rel=stylesheet href='" + pixel_url + "/style.css'>"
        "</head><body onload=\"alert('onload')\"><p id=greeting>Hello Bob, your invoice is ready.</p>"
        "<img src='" + pixel_url + "/pixel.gif?id=bob'><img src=x onerror=\"alert('onerror')\">"
        "<iframe src='" + pixel_url + "/frame'></iframe><a href=\"javascript:alert('link')\">pay</a>"
        "<div style=\"background:url(" + pixel_url + "/bg.png)\">styled</div>"
        "<script>document.body.innerHTML='pwned';</script><p>" + mail.GTUBE.decode() + "</p></body></html>",
        subtype="html")
    return mail.crlf(msg.as_bytes())


def test_message_center_in_a_real_browser(web, tls_sink, ca_file, pixel_server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    web.add_org("Example Corp")
    web.run(domain_service.add_domain(web.gw.store, "example.com", [tls_sink.address], downstream_tls="verify",
                                      tls_ca_file=str(ca_file), org="Example Corp"))
    web.gw.reload()
    web.add_user("bob@example.com", "user", "Example Corp")
    for rcpt, data, sender in [
        ("bob@example.com", hostile_message(pixel_server.url), "mallory@sender.test"),
        ("bob@example.com", mail.gtube(subject="Deliver me", to="bob@example.com"), "a@sender.test"),
        ("bob@example.com", mail.gtube(subject="Weekly offers", to="bob@example.com"), "promo@shop.test"),
        ("carol@example.com", mail.gtube(subject="For carol only", to="carol@example.com"), "a@sender.test"),
    ]:
        out = send(web.gw.port, [rcpt], data, sender=sender)
        assert out.data[0] == 250, out.data
    assert tls_sink.messages == []

    requests: list[str] = []
    dialogs: list[str] = []
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
        context.on("request", lambda r: requests.append(r.url))
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

        # 1. Sign in: the Message Center sends a stranger to its sign-in page.
        page.goto(web.url + "/mc")
        expect(page.locator("h1")).to_have_text("Message Center")
        page.screenshot(path=str(ARTIFACTS / "mc-01-signin.png"), full_page=True)
        page.fill("#password-form input[name=email]", "bob@example.com")
        page.fill("#password-form input[name=password]", PASSWORD)
        page.click("#password-form button")
        expect(page.locator("h1")).to_have_text("Quarantine")

        # 2. Only bob's own messages; the hostile subject is text, not markup.
        rows = page.locator("#quarantine tbody tr")
        expect(rows).to_have_count(3)
        expect(page.locator("#quarantine")).not_to_contain_text("For carol only")
        expect(page.locator("#quarantine")).to_contain_text('<script>alert("subject")</script>')
        expect(page.locator("nav")).not_to_contain_text("Domains")
        page.screenshot(path=str(ARTIFACTS / "mc-02-list.png"), full_page=True)

        # 3. View the hostile message: nothing runs, nothing is fetched.
        hostile = page.locator("#quarantine tbody tr", has_text="Your invoice")
        hostile.locator("a.view").click()
        expect(page.locator("h1")).to_have_text("Held message")
        expect(page.locator("td.h-subject")).to_contain_text('<script>alert("subject")</script>')
        frame_el = page.locator("#html-body")
        assert frame_el.get_attribute("sandbox") == ""
        body = page.frame_locator("#html-body").locator("body")
        expect(body).to_contain_text("Hello Bob, your invoice is ready.")
        expect(body).to_contain_text("styled")
        inner = body.inner_html()
        assert "<script" not in inner and "onerror" not in inner and "pixel.gif" not in inner and "pwned" not in inner
        assert "javascript:" not in inner and "<iframe" not in inner and "bg.png" not in inner
        expect(page.locator("#text-body")).to_contain_text("Your invoice is ready.")
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "mc-03-view-hostile.png"), full_page=True)
        assert pixel_server.hits == [], "no remote content was fetched"
        assert not [u for u in requests if u.startswith(pixel_server.url)], requests
        assert dialogs == [], "no script ran"
        frame = page.frame(url=lambda u: "/frame" in u)
        assert frame is not None and frame.evaluate("() => document.title") == "", "the frame ran no script"

        # 4. Deliver one.
        page.goto(web.url + "/mc")
        page.locator("#quarantine tbody tr", has_text="Deliver me").locator("button.deliver").click()
        expect(page.locator("#done")).to_contain_text("delivered")
        expect(page.locator("#quarantine")).not_to_contain_text("Deliver me")
        assert tls_sink.wait_for(1)
        assert b"Subject: Deliver me" in tls_sink.messages[0].data and tls_sink.messages[0].tls_version == "TLSv1.3"
        page.screenshot(path=str(ARTIFACTS / "mc-04-delivered.png"), full_page=True)

        # 5. Not junk: the message is delivered and its sender allowed ...
        page.locator("#quarantine tbody tr", has_text="Weekly offers").locator("button.notjunk").click()
        expect(page.locator("#done")).to_contain_text("allow list")
        assert tls_sink.wait_for(2)
        assert b"Subject: Weekly offers" in tls_sink.messages[1].data
        page.click("nav >> text=Allow and block lists")
        expect(page.locator("#lists")).to_contain_text("promo@shop.test")
        page.screenshot(path=str(ARTIFACTS / "mc-05-lists.png"), full_page=True)

        # ... so the next mail from that sender, junk by every measure, is delivered.
        out = send(web.gw.port, ["bob@example.com"], mail.gtube(subject="More offers", to="bob@example.com"),
                   sender="promo@shop.test")
        assert out.data[0] == 250
        assert tls_sink.wait_for(3)
        assert b"Subject: More offers" in tls_sink.messages[2].data
        page.goto(web.url + "/mc")
        expect(page.locator("#quarantine")).not_to_contain_text("More offers")
        expect(rows).to_have_count(1)
        page.screenshot(path=str(ARTIFACTS / "mc-06-after.png"), full_page=True)

        context.close()
        browser.close()
    assert pixel_server.hits == []
    assert dialogs == []
    assert problems == [], problems
