"""The quarantine's services on SQLite and PostgreSQL: links, sender lists, schedule, purge, settings, rendering."""

from __future__ import annotations

import datetime as dt
import os
import stat
import time

import pytest
from sqlalchemy import select

from mxguard.errors import NotFound, ValidationFailed
from mxguard.filtering.disposition import Disposition
from mxguard.quarantine import links as link_service
from mxguard.quarantine import senderlists
from mxguard.quarantine.links import InvalidLink, LinkSigner, consume, ensure_link_key
from mxguard.quarantine.render import render, sanitize_html
from mxguard.quarantine.service import delete_message, purge_expired, search
from mxguard.quarantine.store import quarantine_message
from mxguard.quarantine.summary import next_due, run_due
from mxguard.services import domains as domain_service
from mxguard.services import orgs, orgsettings, users
from mxguard.services.access import Actor
from mxguard.smtp.dispositions import apply_sender_list
from mxguard.storage.models import QuarantinedMessage, SummarySchedule, utcnow
from mxguard.storage.sealing import Sealer
from tests.support import mail

SIGNER = LinkSigner(b"k" * 32)


# -- links ----------------------------------------------------------------------------------

def test_link_tokens_are_signed_expiring_and_purpose_bound():
    token = SIGNER.make("deliver", "Q123")
    claim = SIGNER.load(token, "deliver", 60)
    assert claim.subject == "Q123" and claim.purpose == "deliver" and len(claim.token_id) >= 16
    with pytest.raises(InvalidLink) as exc:
        SIGNER.load(token, "view", 60)
    assert exc.value.reason == "invalid"
    with pytest.raises(InvalidLink) as exc:
        SIGNER.load(SIGNER.make("deliver", "Q123", issued_at=time.time() - 120), "deliver", 60)
    assert exc.value.reason == "expired" and "expired" in str(exc.value)
    for i in range(0, len(token), 7):  # any one byte changed breaks it
        changed = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
        with pytest.raises(InvalidLink):
            SIGNER.load(changed, "deliver", 60)
    with pytest.raises(InvalidLink):
        LinkSigner(b"x" * 32).load(token, "deliver", 60)  # another gateway's secret
    assert SIGNER.make("deliver", "Q123") != token, "every token is unique"


def test_link_key_file_is_private(tmp_path):
    path = tmp_path / "keys" / "links.key"
    ensure_link_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes().strip()) == 64
    before = path.read_bytes()
    ensure_link_key(path)
    assert path.read_bytes() == before, "never replaced"
    LinkSigner.from_file(path).make("signin", "a@b.example")
    os.chmod(path, 0o644)
    with pytest.raises(Exception, match="quarantine.link_key_file"):
        LinkSigner.from_file(path)


async def test_a_link_is_used_once_on_every_database(store):
    claim = SIGNER.load(SIGNER.make("signin", "a@example.com"), "signin", 60)
    assert not await link_service.is_used(store, claim)
    await consume(store, claim, 60)
    assert await link_service.is_used(store, claim)
    with pytest.raises(InvalidLink) as exc:
        await consume(store, claim, 60)
    assert exc.value.reason == "used"
    await link_service.unconsume(store, claim)
    await consume(store, claim, 60)
    assert await link_service.purge_used(store, utcnow() + dt.timedelta(hours=1)) == 1


# -- sender lists ------------------------------------------------------------------------------

def test_list_patterns_and_matching():
    assert senderlists.normalize_pattern(" <News@Shop.Example> ") == "news@shop.example"
    assert senderlists.normalize_pattern("@Shop.Example") == "shop.example"
    for bad in ("", "not an address", "a@", "@", "x@-bad-.test"):
        with pytest.raises(ValidationFailed) as exc:
            senderlists.normalize_pattern(bad)
        assert exc.value.field == "pattern"
    entries = {"shop.example": "allow", "bad@shop.example": "block", "spam.test": "block"}
    assert senderlists._match(entries, "news@shop.example") == "allow"
    assert senderlists._match(entries, "news@mail.shop.example") == "allow", "subdomains too"
    assert senderlists._match(entries, "bad@shop.example") == "block", "an address beats its domain"
    assert senderlists._match(entries, "x@notshop.example") is None
    assert senderlists._match(entries, "") is None


def test_allow_and_block_change_only_what_they_may():
    junk = Disposition("quarantine", "junk", "junk: builtin score 1000 >= 5")
    virus = Disposition("reject", "virus", "virus: EICAR-Test-File")
    policy = Disposition("reject", "policy", "policy: executable-extension")
    defer = Disposition("defer", "unscanned", "not scanned: clamd unavailable")
    clean = Disposition("deliver", "clean", "clean")
    allowed = apply_sender_list(junk, "allow", "a@b.test", "quarantine")
    assert (allowed.action, allowed.category) == ("deliver", "allowed") and "a@b.test" in allowed.reason
    assert apply_sender_list(virus, "allow", "a@b.test", "quarantine") == virus
    assert apply_sender_list(policy, "allow", "a@b.test", "quarantine") == policy
    assert apply_sender_list(defer, "allow", "a@b.test", "quarantine") == defer
    assert apply_sender_list(clean, "block", "a@b.test", "quarantine").action == "quarantine"
    assert apply_sender_list(clean, "block", "a@b.test", "reject").action == "reject"
    assert apply_sender_list(virus, "block", "a@b.test", "quarantine") == virus


async def test_sender_list_cache_follows_changes(store):
    await orgs.add_org(store, "Acme")
    await domain_service.add_domain(store, "acme.test", ["a.test"], org="Acme")
    user, _ = await users.add_user(store, "bob@acme.test", "user", org="Acme", password="x" * 12)
    cache = senderlists.SenderLists(store)
    await cache.load()
    assert cache.lookup("bob@acme.test", "a@shop.example") is None
    actor = Actor("test")
    entry = await senderlists.add_entry(store, user.id, "allow", "shop.example", actor=actor)
    await cache.load()
    assert cache.lookup("BOB@acme.test", "a@shop.example") == "allow"
    await senderlists.add_entry(store, user.id, "block", "shop.example", actor=actor)  # changes kind
    await cache.load()
    assert cache.lookup("bob@acme.test", "a@shop.example") == "block"
    with pytest.raises(NotFound):
        await senderlists.remove_entry(store, user.id + 1, entry.id, actor=actor)
    await senderlists.remove_entry(store, user.id, entry.id, actor=actor)
    await cache.load()
    assert cache.lookup("bob@acme.test", "a@shop.example") is None


# -- organization settings ----------------------------------------------------------------------

async def test_org_settings_validation_tenancy_and_audit(store):
    await orgs.add_org(store, "Acme")
    await orgs.add_org(store, "Other")
    view = await orgsettings.get_settings(store, "Acme")
    assert view.message_links and not view.notify_virus_recipient and view.route_down_minutes == 30
    with pytest.raises(ValidationFailed) as exc:
        await orgsettings.update_settings(store, "Acme", message_links="maybe")
    assert exc.value.field == "message_links"
    with pytest.raises(ValidationFailed) as exc:
        await orgsettings.update_settings(store, "Acme", route_down_minutes="0")
    assert exc.value.field == "route_down_minutes"
    with pytest.raises(ValidationFailed) as exc:
        await orgsettings.update_settings(store, "Acme", alert_address="nobody")
    assert exc.value.field == "email"
    after = await orgsettings.update_settings(store, "Acme", message_links="off", alert_address="Sec@Acme.test")
    assert not after.message_links and after.alert_address == "sec@acme.test"
    admin_of_other = Actor("user:boss@other.test", "org-admin", (await orgs.get_org(store, "Other")).id, "Other")
    with pytest.raises(NotFound):
        await orgsettings.get_settings(store, "Acme", actor=admin_of_other)
    await domain_service.add_domain(store, "acme.test", ["127.0.0.1:25"], org="Acme")
    assert not (await orgsettings.settings_for_domain(store, "ACME.test")).message_links
    assert (await orgsettings.settings_for_domain(store, "nowhere.test")) == orgsettings.DEFAULTS


# -- schedule, search, purge -------------------------------------------------------------------

def test_summary_due_times_follow_interval_and_hour():
    daily = domain_service.DomainView("a.test", ("h:25",), "optional", "opportunistic", summary_hour=8)
    at = dt.datetime(2026, 11, 29, 7, 59, tzinfo=dt.timezone.utc)
    assert next_due(daily, at) == at.replace(hour=8, minute=0)
    assert next_due(daily, at.replace(hour=8, minute=0)) == dt.datetime(2026, 11, 30, 8, tzinfo=dt.timezone.utc)
    six = domain_service.DomainView("a.test", ("h:25",), "optional", "opportunistic", summary_interval=6,
                                    summary_hour=8)
    assert next_due(six, at) == at.replace(hour=8, minute=0)
    assert next_due(six, at.replace(hour=9)) == at.replace(hour=14, minute=0)
    assert next_due(six, at.replace(hour=23)) == dt.datetime(2026, 11, 30, 2, tzinfo=dt.timezone.utc)


async def test_run_due_schedules_then_claims_each_due_run_once(store, tmp_path):
    from mxguard.config import Settings
    await domain_service.add_domain(store, "a.test", ["127.0.0.1:9"], summary_interval=24, summary_hour=8)
    await domain_service.add_domain(store, "off.test", ["127.0.0.1:9"], summary_interval=0)
    settings = Settings(hostname="mx.test")
    now = dt.datetime(2026, 11, 29, 7, 0, tzinfo=dt.timezone.utc)
    await run_due(store, settings, SIGNER, now=now)
    async with store.session() as session:
        rows = {r.domain: r.next_due_at for r in (await session.execute(select(SummarySchedule))).scalars()}
    assert rows == {"a.test": now.replace(hour=8)}, "first sight: scheduled, nothing sent; 'off' is never scheduled"
    later = now.replace(hour=8, minute=1)
    await run_due(store, settings, SIGNER, now=later)  # nothing held: no mail, but the run is taken
    async with store.session() as session:
        row = await session.get(SummarySchedule, "a.test")
    assert row.next_due_at == dt.datetime(2026, 11, 30, 8, tzinfo=dt.timezone.utc) and row.last_run_at == later


async def test_search_scopes_sorts_and_purge_removes_expired(store):
    sealer = Sealer({"k1": b"\x01" * 32})
    await orgs.add_org(store, "Acme")
    await domain_service.add_domain(store, "acme.test", ["127.0.0.1:25"], org="Acme")
    ids = {}
    for rcpt, subject, score in (("bob@acme.test", "b-mail", 9.0), ("carol@acme.test", "c-mail", 5.0),
                                 ("dan@else.test", "d-mail", 7.0)):
        ids[subject] = await quarantine_message(store, sealer, txn_id="T", recipient=rcpt, sender="x@s.test",
                                                subject=subject, reason="junk", category="junk",
                                                content=mail.gtube(), verdict={}, score=score)
    admin = Actor("admin")
    acme_admin = Actor("user:boss@acme.test", "org-admin", (await orgs.get_org(store, "Acme")).id, "Acme")
    bob = Actor("user:bob@acme.test", "user", acme_admin.org_id, "Acme", email="bob@acme.test")
    assert [r.subject for r in await search(store, admin, sort="score")] == ["b-mail", "d-mail", "c-mail"]
    assert [r.subject for r in await search(store, admin, sort="score", descending=False)][0] == "c-mail"
    assert {r.subject for r in await search(store, acme_admin)} == {"b-mail", "c-mail"}
    assert [r.subject for r in await search(store, bob)] == ["b-mail"]
    assert [r.subject for r in await search(store, admin, text="C-MA")] == ["c-mail"]
    with pytest.raises(ValidationFailed):
        await search(store, admin, sort="size; drop table quarantine")
    with pytest.raises(NotFound):
        await delete_message(store, bob, ids["c-mail"])
    await delete_message(store, bob, ids["b-mail"])
    assert await search(store, bob) == []
    async with store.session() as session:
        row = await session.get(QuarantinedMessage, ids["b-mail"])
        assert row.sealed == b"" and row.deleted_at is not None, "a deleted message's body is erased at once"
    assert await purge_expired(store, utcnow() + dt.timedelta(days=29)) == 0
    assert await purge_expired(store, utcnow() + dt.timedelta(days=31)) == 3
    assert await search(store, admin, include_handled=True) == []


# -- rendering -------------------------------------------------------------------------------

def test_render_shows_text_sanitized_html_and_lists_attachments():
    raw = mail.with_attachment(b"%PDF-1.4 fake", "invoice.pdf", "application", "pdf", subject="Invoice <b>now</b>")
    shown = render(raw)
    assert ("Subject", "Invoice <b>now</b>") in shown.headers
    assert "Please find the file attached." in shown.text
    assert [(a.filename, a.content_type, a.size) for a in shown.attachments] == [("invoice.pdf", "application/pdf", 13)]
    clean = sanitize_html('<p style="x" onmouseover="a()">hi</p><img src="https://t.example/p.gif">'
                          '<img src="data:image/png;base64,AAAA"><svg onload=alert(1)></svg><form action=x>f</form>')
    assert "onmouseover" not in clean and "t.example" not in clean and "<svg" not in clean and "<form" not in clean
    assert 'src="data:image/png;base64,AAAA"' in clean and "<p>hi</p>" in clean
    broken = render(b"Subject: broken\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\nhello\r\n")
    assert broken.text == "hello\r\n" and broken.problems, "an undecodable part is shown as far as it goes"
    assert render(b"\x00\xff garbage without headers").text is not None


async def test_migration_0005_downgrades_and_upgrades(store):
    from alembic import command

    from mxguard.storage.db import _alembic_config

    await orgs.add_org(store, "Kept")

    def cycle(connection):
        command.downgrade(_alembic_config(connection), "0004_filtering")
        command.upgrade(_alembic_config(connection), "head")

    async with store.engine.begin() as conn:
        await conn.run_sync(cycle)
    assert await store.schema_is_current()
    view = await orgsettings.get_settings(store, "Kept")
    assert view.message_links and view.notify_route_down and not view.notify_virus_admin, "defaults after upgrade"
