"""Quarantine summaries, their links, release over TLS, the links switch, and tenancy in the Message Center.

A real gateway (SMTP and HTTPS console on loopback), a real downstream server
with STARTTLS and a CA-signed certificate (domain policy ``verify``), real
HTTPS clients. GTUBE makes the built-in scorer quarantine a message.
"""

from __future__ import annotations

import email
import re
import time
from email import policy
from pathlib import Path

import pytest

from mxguard.quarantine.store import get_quarantined, list_quarantine
from mxguard.quarantine.summary import send_summaries
from mxguard.services import domains as domain_service
from mxguard.services import orgsettings
from mxguard.storage.models import AuditEntry, MessageLogEntry
from mxguard.web.security import LOGIN_CSRF_COOKIE
from sqlalchemy import select
from tests.support import mail
from tests.support.smtp import send
from tests.support.web import PASSWORD, csrf_token

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LINK = re.compile(r"https://127\.0\.0\.1:\d+/mc/link/[A-Za-z0-9_.\-]+")


@pytest.fixture
def mc(web, tls_sink, ca_file):
    """The console gateway serving example.com (organization Example Corp) with downstream TLS 'verify'."""
    web.add_org("Example Corp")
    web.run(domain_service.add_domain(web.gw.store, "example.com", [tls_sink.address], downstream_tls="verify",
                                      tls_ca_file=str(ca_file), org="Example Corp"))
    web.gw.reload()
    web.sink = tls_sink
    return web


def summaries(web):
    gw = web.gw.gateway
    return web.run(send_summaries(gw.store, gw.settings, gw.links, web_url=gw.web_url))


def hold_gtube(web, rcpt: str = "bob@example.com", subject: str = "GTUBE test", sender: str = "a@sender.test"):
    out = send(web.gw.port, [rcpt], mail.gtube(subject=subject, to=rcpt), sender=sender)
    assert out.data[0] == 250 and out.data[1].startswith("2.0.0"), out.data
    held = [h for h in web.run(list_quarantine(web.gw.store, recipient=rcpt)) if h.subject == subject]
    assert len(held) == 1
    return held[0]


def stored_copy(web, qid: str) -> bytes:
    return web.run(get_quarantined(web.gw.store, web.gw.gateway.keyring.get(), qid))[1]


def parts(data: bytes) -> tuple[str, str]:
    msg = email.message_from_bytes(data, policy=policy.default)
    return msg.get_body(("plain",)).get_content(), msg.get_body(("html",)).get_content()


def follow(client, url: str):
    """What a person does with a mailed link: open it, then press the confirmation button."""
    page = client.get(url)
    if page.status_code != 200:
        return page, None
    token = re.search(r'name="token" value="([^"]+)"', page.text).group(1)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return page, client.post("/mc/link", data={"token": token, "csrf_token": csrf})


def post_link(client, token: str):
    """Post a link token directly (as a replaying client would), with this browser's CSRF cookie."""
    return client.post("/mc/link", data={"token": token, "csrf_token": client.cookies.get(LOGIN_CSRF_COOKIE)})


def test_gtube_summary_deliver_link_releases_the_original_byte_identical_over_tls(mc):
    web, sink = mc, mc.sink
    held = hold_gtube(web)
    time.sleep(0.2)
    assert sink.messages == [], "the GTUBE message was held, not delivered"

    report = summaries(web)
    assert report.delivered == 1 and report.sent[0][1] == 1
    assert sink.wait_for(1)
    summary = sink.messages[0]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "summary-as-received.eml").write_bytes(summary.data)  # for people to read
    assert summary.tls_version == "TLSv1.3" and summary.rcpt_tos == ["bob@example.com"]
    assert summary.mail_from in ("", "<>"), "sent with the null reverse-path"
    assert b"Auto-Submitted: auto-generated" in summary.data
    text, html = parts(summary.data)
    assert "Quarantine summary for bob@example.com" in text and "GTUBE test" in text and "a@sender.test" in text
    links = LINK.findall(text)
    assert len(links) == 2, text  # deliver and view
    deliver_url, view_url = links
    assert deliver_url in html and view_url in html
    record = web.run(_log(web, "summary"))
    assert record and record[0].downstream_tls and record[0].downstream_verified

    web.run(web.gw.gateway.message_log.flush())
    before = web.run(_tls_sessions(web))

    client = web.client()
    page, done = follow(client, deliver_url.replace(web.url, ""))
    assert page.status_code == 200 and "Deliver this message to your inbox?" in page.text and "GTUBE test" in page.text
    assert done.status_code == 200 and "Delivered" in done.text and "over TLSv1.3" in done.text
    assert sink.wait_for(2)
    delivered = sink.messages[1]
    original = stored_copy(web, held.id)
    assert delivered.data == original, "the released message is byte-identical to the stored copy"
    assert delivered.data.endswith(mail.gtube()), "and that copy is the sender's message under our trace fields"
    assert delivered.tls_version == "TLSv1.3" and delivered.rcpt_tos == ["bob@example.com"]
    assert delivered.mail_from == "a@sender.test"

    # The link works once: neither opening it again nor re-posting it delivers again.
    again, _ = follow(client, deliver_url.replace(web.url, ""))
    assert again.status_code == 410 and "already been used" in again.text
    token = deliver_url.rsplit("/", 1)[1]
    replay = post_link(client, token)
    assert replay.status_code == 410 and "already been used" in replay.text
    time.sleep(0.3)
    assert len(sink.messages) == 2

    # Logged: a message-log record 'released' with the downstream TLS, and an audit entry.
    released = web.run(_log(web, "released"))
    assert released and released[0].downstream_tls_version == "TLSv1.3" and released[0].rcpt_to == "bob@example.com"
    audit = web.run(_audit(web, "quarantine.release"))
    assert audit and audit[0].target == held.id and audit[0].actor == "link:bob@example.com"
    row, _ = web.run(get_quarantined(web.gw.store, web.gw.gateway.keyring.get(), held.id))
    assert row.released_at is not None and row.summarized_at is not None
    # TLS-RPT (RFC 8460) counts the release's session for example.com: one more successful session.
    assert web.run(_tls_sessions(web)) == (before[0] + 1, before[1])

    # A second summary run has nothing new for bob.
    assert summaries(web).sent == []


def test_links_cannot_be_used_expired_or_altered(mc):
    web, sink = mc, mc.sink
    held = hold_gtube(web)
    signer = web.gw.gateway.links
    client = web.client()
    client.get("/mc/signin")  # this browser's CSRF cookie, so the posts below are judged on their tokens
    lifetime = web.gw.gateway.settings.quarantine.link_lifetime

    expired = signer.make("deliver", held.id, issued_at=time.time() - lifetime - 60)
    page, _ = follow(client, f"/mc/link/{expired}")
    assert page.status_code == 410 and "expired" in page.text
    assert post_link(client, expired).status_code == 410

    good = signer.make("deliver", held.id)
    i = len(good) // 2
    altered = good[:i] + ("A" if good[i] != "A" else "B") + good[i + 1:]
    page, _ = follow(client, f"/mc/link/{altered}")
    assert page.status_code == 400 and "not valid" in page.text and "Traceback" not in page.text
    assert post_link(client, altered).status_code == 400
    assert client.get("/mc/link/not-a-token").status_code == 400

    # A view link cannot be used to deliver: the purpose is signed too.
    view = signer.make("view", held.id)
    page, shown = follow(client, f"/mc/link/{view}")
    assert page.status_code == 200 and "View the message" in page.text
    assert shown.status_code == 200 and "GTUBE" in shown.text
    time.sleep(0.3)
    assert sink.messages == [], "nothing was delivered by the expired, altered or view links"

    # The unaltered link still works.
    _, done = follow(client, f"/mc/link/{good}")
    assert done.status_code == 200 and sink.wait_for(1)


def test_a_link_posted_from_another_site_is_refused_and_stays_usable(mc):
    """Login CSRF: a page elsewhere must not make this browser use a link (e.g. sign it in as someone else)."""
    web, sink = mc, mc.sink
    held = hold_gtube(web)
    good = web.gw.gateway.links.make("deliver", held.id)
    client = web.client()
    forged = client.post("/mc/link", data={"token": good})
    assert forged.status_code == 403 and "has not been used" in forged.text
    assert client.post("/mc/link", data={"token": good, "csrf_token": "guessed"}).status_code == 403
    time.sleep(0.2)
    assert sink.messages == [], "nothing was delivered"
    page, done = follow(client, f"/mc/link/{good}")
    assert page.status_code == 200 and done.status_code == 200 and "Delivered" in done.text


def test_links_switched_off_no_links_view_forbidden_deliver_still_works(mc):
    web, sink = mc, mc.sink
    web.run(orgsettings.update_settings(web.gw.store, "Example Corp", message_links="off"))
    web.add_user("bob@example.com", "user", "Example Corp")
    held = hold_gtube(web)

    assert summaries(web).delivered == 1 and sink.wait_for(1)
    summary = sink.messages[0]
    assert summary.tls_version == "TLSv1.3"
    text, html = parts(summary.data)
    assert "GTUBE test" in text and "/mc/link/" not in text and "/mc/link/" not in html
    assert f"Message Center: {web.url}/mc" in text and "sign in to the Message Center" in text

    client, reply = web.login("bob@example.com", next_path="/mc")
    assert reply.status_code == 303 and reply.headers["location"] == "/mc"
    listing = client.get("/mc")
    assert listing.status_code == 200 and held.id in listing.text
    assert f'href="/mc/messages/{held.id}"' not in listing.text, "no View with links off"
    assert client.get(f"/mc/messages/{held.id}").status_code == 403
    assert client.get(f"/mc/messages/{held.id}/frame").status_code == 403
    old_link = web.gw.gateway.links.make("view", held.id)
    assert client.get(f"/mc/link/{old_link}").status_code == 403

    done = client.post(f"/mc/messages/{held.id}/deliver", data={"csrf_token": csrf_token(listing.text)})
    assert done.status_code == 303 and done.headers["location"] == "/mc?done=delivered"
    assert sink.wait_for(2)
    assert sink.messages[1].data == stored_copy(web, held.id) and sink.messages[1].tls_version == "TLSv1.3"
    # Delivering twice does not deliver twice.
    again = client.post(f"/mc/messages/{held.id}/deliver", data={"csrf_token": csrf_token(listing.text)})
    assert again.status_code == 409
    time.sleep(0.3)
    assert len(sink.messages) == 2


def test_a_user_cannot_see_or_act_on_another_users_message(mc):
    web = mc
    web.add_user("bob@example.com", "user", "Example Corp")
    web.add_user("carol@example.com", "user", "Example Corp")
    bobs = hold_gtube(web, "bob@example.com", subject="for bob")
    carols = hold_gtube(web, "carol@example.com", subject="for carol")
    client, _ = web.login("bob@example.com", next_path="/mc")
    listing = client.get("/mc")
    assert bobs.id in listing.text and carols.id not in listing.text and "for carol" not in listing.text
    token = csrf_token(listing.text)
    assert client.get(f"/mc/messages/{bobs.id}").status_code == 200
    assert client.get(f"/mc/messages/{carols.id}").status_code == 404
    assert client.get(f"/mc/messages/{carols.id}/frame").status_code == 404
    for action in ("deliver", "delete", "notjunk"):
        reply = client.post(f"/mc/messages/{carols.id}/{action}", data={"csrf_token": token})
        assert reply.status_code == 404, action
    assert client.get("/mc/messages/QDOESNOTEXIST").status_code == 404
    # Carol's message is untouched; an org-admin of another organization sees neither.
    assert [h.id for h in web.run(list_quarantine(web.gw.store, recipient="carol@example.com"))] == [carols.id]
    web.tenant("Other Org", "boss@other.test")
    other, _ = web.login("boss@other.test", next_path="/mc")
    assert bobs.id not in other.get("/mc").text
    assert other.get(f"/mc/messages/{bobs.id}").status_code == 404
    # The gateway admin sees both.
    admin, _ = web.login("admin@gw.test", next_path="/mc")
    page = admin.get("/mc").text
    assert bobs.id in page and carols.id in page


def test_signin_link_request_answers_the_same_and_signs_in_once(mc):
    web, sink = mc, mc.sink
    held = hold_gtube(web, "dana@example.com")
    client = web.client()
    form = client.get("/mc/signin")
    assert form.status_code == 200
    answers = []
    for address in ("dana@example.com", "nobody@not-served.test"):
        reply = client.post("/mc/signin", data={"email": address, "csrf_token": csrf_token(form.text)})
        answers.append((reply.status_code, reply.text.replace(address, "ADDRESS")))
    assert answers[0] == answers[1], "the answer does not tell whether an address may sign in"
    assert sink.wait_for(1)
    time.sleep(0.3)
    assert len(sink.messages) == 1 and sink.messages[0].rcpt_tos == ["dana@example.com"]
    assert sink.messages[0].tls_version == "TLSv1.3"
    body = email.message_from_bytes(sink.messages[0].data, policy=policy.default).get_content()
    assert "works once" in body
    link = LINK.search(body).group(0).replace(web.url, "")
    browser = web.client()
    _, signed_in = follow(browser, link)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/mc"
    assert held.id in browser.get("/mc").text
    again, _ = follow(web.client(), link)
    assert again.status_code == 410
    # The account was made on demand, as a user of the domain's organization.
    assert "dana@example.com" in web.api(web.admin_key).get("/users").text


def test_not_junk_allows_the_sender_and_block_list_holds(mc):
    web, sink = mc, mc.sink
    web.add_user("bob@example.com", "user", "Example Corp")
    held = hold_gtube(web, sender="promo@shop.test")
    client, _ = web.login("bob@example.com", next_path="/mc")
    listing = client.get("/mc")
    done = client.post(f"/mc/messages/{held.id}/notjunk", data={"csrf_token": csrf_token(listing.text)})
    assert done.status_code == 303
    assert sink.wait_for(1), "not junk also delivers the message"
    lists = client.get("/mc/lists")
    assert "promo@shop.test" in lists.text and "allow" in lists.text
    # The next GTUBE from that sender is delivered, marked as allowed; a virus would still be refused.
    out = send(web.gw.port, ["bob@example.com"], mail.gtube(subject="again"), sender="promo@shop.test")
    assert out.data[0] == 250 and sink.wait_for(2)
    assert b"X-MXGuard-Verdict: allowed; action=deliver" in sink.messages[1].data
    out = send(web.gw.port, ["bob@example.com"], mail.eicar_variants()["base64"], sender="promo@shop.test")
    assert out.data[0] == 554
    # Block a domain: clean mail from it is held.
    client.post("/mc/lists", data={"csrf_token": csrf_token(lists.text), "kind": "block", "pattern": "spam.test"})
    out = send(web.gw.port, ["bob@example.com"], mail.plain(subject="hello", sender="x@news.spam.test"),
               sender="x@news.spam.test")
    assert out.data[0] == 250
    held = web.run(list_quarantine(web.gw.store, recipient="bob@example.com"))
    assert [h.reason for h in held] == ["block list: x@news.spam.test"]
    bad = client.post("/mc/lists", data={"csrf_token": csrf_token(lists.text), "kind": "allow", "pattern": "not an"})
    assert bad.status_code == 422 and "pattern" in bad.text


async def _tls_sessions(web) -> tuple[int, int]:
    """Today's TLS-RPT ``(successful, failed)`` session counts of example.com, all policy types."""
    import datetime as dt

    from mxguard.tls.reporting import collect, day_window
    start, end = day_window(dt.datetime.now(dt.timezone.utc).date())
    tallies = (await collect(web.gw.store, start, end)).get("example.com", {})
    return (sum(t.successful for t in tallies.values()), sum(sum(t.failures.values()) for t in tallies.values()))


async def _log(web, disposition_or_kind: str):
    async with web.gw.store.session() as session:
        q = select(MessageLogEntry).order_by(MessageLogEntry.id.desc())
        rows = (await session.execute(q)).scalars().all()
    return [r for r in rows if r.disposition == disposition_or_kind
            or (r.verdict or {}).get("own_message") == disposition_or_kind]


async def _audit(web, action: str):
    async with web.gw.store.session() as session:
        return (await session.execute(select(AuditEntry).where(AuditEntry.action == action))).scalars().all()


def test_organizations_page_switches_links_and_alerts(mc):
    web = mc
    web.tenant("Other Org", "boss@other.test")
    admin, _ = web.login("admin@gw.test")
    page = admin.get("/orgs")
    assert page.status_code == 200 and "Example Corp" in page.text and "Other Org" in page.text
    reply = admin.post("/orgs/Example Corp", data={"csrf_token": csrf_token(page.text), "notify_route_down": "on",
                                                   "alert_address": "sec@example.com", "route_down_minutes": "15"})
    assert reply.status_code == 303
    view = web.run(orgsettings.get_settings(web.gw.store, "Example Corp"))
    assert not view.message_links and view.notify_route_down and not view.notify_cert_expiry
    assert view.alert_address == "sec@example.com" and view.route_down_minutes == 15
    bad = admin.post("/orgs/Example Corp", data={"csrf_token": csrf_token(page.text), "route_down_minutes": "x"})
    assert bad.status_code == 422 and "route_down_minutes" in bad.text
    assert admin.post("/orgs/Example Corp", data={"route_down_minutes": "5"}).status_code == 403  # no CSRF token
    boss, _ = web.login("boss@other.test")
    own = boss.get("/orgs")
    assert "Other Org" in own.text and "Example Corp" not in own.text
    assert boss.post("/orgs/Example Corp", data={"csrf_token": csrf_token(own.text)}).status_code == 404
    audit = web.run(_audit(web, "org.settings"))
    assert audit and audit[0].actor == "user:admin@gw.test" and audit[0].before["message_links"] is True
