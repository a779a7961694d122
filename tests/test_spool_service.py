"""The spool service (CLI, console and API all use it) on SQLite and PostgreSQL: tenancy, retry now with
in-process delivery to a real downstream server, delete under a lease, per-domain figures, audit."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from mxguard.config import load_settings
from mxguard.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from mxguard.services import audit, domains, orgs, users
from mxguard.services import spool as spool_service
from mxguard.services.access import Actor
from mxguard.sink import DownstreamSink
from mxguard.spool import queue
from mxguard.storage.sealing import KeyRing
from tests.support.smtp import message

PW = "a sufficiently long password"
ADMIN = Actor("cli:root")


async def _tenant(store, org: str, email: str) -> Actor:
    await orgs.add_org(store, org)
    view, _ = await users.add_user(store, email, "org-admin", org=org, password=PW)
    return view.actor()


async def _hold(store, settings, domain: str, rcpt: str, subject: str = "held", sender: str = "a@sender.test") -> int:
    entry = queue.NewSpoolEntry(txn_id=f"T{abs(hash((domain, rcpt, subject))) % 10**12}", domain=domain,
                                mail_from=sender, recipients=[rcpt], message=message(subject=subject, to=rcpt),
                                subject=subject, first_reply="451 4.4.1 connect failed")
    [entry_id] = await queue.enqueue(store, [entry], KeyRing(settings.path(settings.sealing_key_file)).get(),
                                     settings.spool)
    return entry_id


@pytest.fixture
def settings(data_dir):
    return load_settings(data_dir, environ={})


async def test_org_admins_see_and_act_only_on_their_domains(store, settings):
    acme = await _tenant(store, "Acme", "ops@acme.test")
    globex = await _tenant(store, "Globex", "ops@globex.test")
    await domains.add_domain(store, "acme.test", ["127.0.0.1:9"], actor=acme)
    await domains.add_domain(store, "globex.test", ["127.0.0.1:9"], actor=globex)
    mine = await _hold(store, settings, "acme.test", "bob@acme.test")
    theirs = await _hold(store, settings, "globex.test", "eve@globex.test")
    assert [e.id for e in await spool_service.list_entries(store, acme)] == [mine]
    assert [e.id for e in await spool_service.list_entries(store, ADMIN)] == [mine, theirs]
    assert [d.domain for d in (await spool_service.stats(store, acme)).by_domain] == ["acme.test"]
    for call in (spool_service.get_entry(store, acme, theirs), spool_service.delete_entry(store, acme, theirs),
                 spool_service.retry(store, settings, acme, entry_id=theirs),
                 spool_service.retry(store, settings, acme, domain="globex.test"),
                 spool_service.list_entries(store, acme, domain="globex.test")):
        with pytest.raises(NotFound):
            await call
    # "retry all" of an org-admin takes only their own entries.
    outcomes = await spool_service.retry(store, settings, acme)
    assert [o.id for o in outcomes] == [mine]
    clerk, _ = await users.add_user(store, "clerk@acme.test", "user", org="Acme", password=PW)
    with pytest.raises(PermissionDenied):
        await spool_service.list_entries(store, clerk.actor())
    with pytest.raises(ValidationFailed) as err:
        await spool_service.list_entries(store, ADMIN, status="lost")
    assert err.value.field == "status"
    with pytest.raises(ValidationFailed) as err:
        await spool_service.list_entries(store, ADMIN, domain="not a domain")
    assert err.value.field == "domain"
    # Nothing of Globex's reached Acme: the entry is untouched (no attempt, no audit entry).
    entry, attempts = await spool_service.get_entry(store, ADMIN, theirs)
    assert entry.status == "queued" and entry.attempts == 0 and attempts == []
    assert not [e for e in await audit.list_entries(store, ADMIN) if e.target.startswith(f"spool #{theirs} ")]


async def test_retry_now_delivers_in_process_and_is_audited(store, settings):
    sink = await DownstreamSink().start()
    try:
        await domains.add_domain(store, "example.com", [sink.address])
        entry_id = await _hold(store, settings, "example.com", "alice@example.com", subject="Retry me")
        before, _ = await spool_service.get_entry(store, ADMIN, entry_id)
        assert before.next_attempt_at > before.created_at + dt.timedelta(seconds=30)  # the back-off: a minute
        [outcome] = await spool_service.retry(store, settings, ADMIN, entry_id=entry_id)
        assert outcome.attempted is True and outcome.entry.status == "delivered"
        assert len(sink.messages) == 1 and sink.messages[0].rcpt_tos == ["alice@example.com"]
        assert b"Subject: Retry me" in sink.messages[0].data
        entry, attempts = await spool_service.get_entry(store, ADMIN, entry_id)
        assert entry.status == "delivered" and entry.pending == [] and entry.attempts == 1
        assert attempts[0].server == sink.address and attempts[0].tls is False and "250" in attempts[0].reply
        with pytest.raises(Conflict, match="delivered"):
            await spool_service.retry(store, settings, ADMIN, entry_id=entry_id)
        [record] = await audit.list_entries(store, ADMIN, action="spool.retry")
        assert record.actor == "cli:root" and record.target == f"spool #{entry_id} (example.com)"
        assert record.changes["status"] == ("queued", "delivered")
        assert record.changes["attempts"] == (0, 1)
        assert record.changes["pending"] == (["alice@example.com"], [])
        assert await spool_service.retry(store, settings, ADMIN, domain="example.com") == []  # nothing held
    finally:
        await sink.stop()


async def test_a_slow_downstream_answers_after_the_wait_and_completes_in_the_background(store, settings):
    sink = await DownstreamSink().start()
    sink.data_delay = 1.0
    try:
        await domains.add_domain(store, "example.com", [sink.address])
        entry_id = await _hold(store, settings, "example.com", "alice@example.com")
        [outcome] = await spool_service.retry(store, settings, ADMIN, domain="example.com", wait=0.1)
        assert outcome.in_progress and outcome.entry.status == "queued" and outcome.entry.delivering
        for _ in range(100):   # bounded: up to 10 s
            if await audit.list_entries(store, ADMIN, action="spool.retry"):
                break
            await asyncio.sleep(0.1)
        [record] = await audit.list_entries(store, ADMIN, action="spool.retry")
        assert record.after["status"] == "delivered" and len(sink.messages) == 1
        assert (await spool_service.get_entry(store, ADMIN, entry_id))[0].status == "delivered"
    finally:
        await sink.stop()


async def test_delete_is_refused_while_a_worker_holds_the_lease(store, settings):
    acme = await _tenant(store, "Acme", "ops@acme.test")
    await domains.add_domain(store, "acme.test", ["127.0.0.1:9"], actor=acme)
    entry_id = await _hold(store, settings, "acme.test", "bob@acme.test")
    [claimed] = await queue.claim_due(store, "other-node:1", settings.spool, ids=[entry_id])
    with pytest.raises(Conflict, match="being delivered"):
        await spool_service.delete_entry(store, acme, entry_id)
    assert (await spool_service.get_entry(store, acme, entry_id))[0].delivering
    assert not await audit.list_entries(store, ADMIN, action="spool.delete")
    # The worker finishes its attempt (still unreachable) and releases the lease: now it can go.
    from mxguard.storage.models import SpoolAttempt
    await queue.record_attempt(store, claimed, SpoolAttempt(node="other-node", reply="451 4.4.1 connect failed",
                                                            results={}), settings.spool)
    removed = await spool_service.delete_entry(store, acme, entry_id)
    assert removed.id == entry_id and removed.attempts == 1
    with pytest.raises(NotFound):
        await spool_service.get_entry(store, ADMIN, entry_id)
    assert await queue.claim_due(store, "other-node:1", settings.spool, ids=[entry_id]) == []
    [record] = await audit.list_entries(store, acme, action="spool.delete")   # the org-admin sees it
    assert record.actor == "user:ops@acme.test" and record.before["pending"] == ["bob@acme.test"]
    assert record.before["mail_from"] == "a@sender.test" and record.after is None


async def test_stats_per_domain_and_the_depth_provider(store, settings):
    await domains.add_domain(store, "example.com", ["127.0.0.1:9"])
    await domains.add_domain(store, "example.net", ["127.0.0.1:9"])
    for i in range(3):
        await _hold(store, settings, "example.com", f"u{i}@example.com", subject=f"m{i}")
    await _hold(store, settings, "example.net", "x@example.net")
    await asyncio.sleep(0.2)
    data = await spool_service.stats(store, ADMIN)
    assert data.held == 4 and data.by_status == {"queued": 4}
    com, net = data.by_domain
    assert (com.domain, com.messages, net.domain, net.messages) == ("example.com", 3, "example.net", 1)
    sizes = [e.size for e in await spool_service.list_entries(store, ADMIN, domain="example.com")]
    assert com.bytes == sum(sizes) > 0
    assert 0.2 <= com.oldest_age_seconds < 60 and data.oldest_age_seconds >= net.oldest_age_seconds
    assert await spool_service.depth(store) == {"example.com": 3, "example.net": 1}


async def test_a_domain_with_queued_mail_is_removed_only_with_force(store, settings):
    await domains.add_domain(store, "held.test", ["127.0.0.1:9"])
    entry_id = await _hold(store, settings, "held.test", "bob@held.test")
    with pytest.raises(Conflict, match="1 message.*held.test.*spool"):
        await domains.remove_domain(store, "held.test", actor=ADMIN)
    assert (await domains.get_domain(store, "held.test")).name == "held.test"
    # Once the spool is empty for it (delivered or deleted), no force is needed.
    await spool_service.delete_entry(store, ADMIN, entry_id)
    await domains.remove_domain(store, "held.test", actor=ADMIN)
    with pytest.raises(NotFound):
        await domains.get_domain(store, "held.test")
    # With force the queued entry stays in the spool (the worker fails it: no route).
    await domains.add_domain(store, "forced.test", ["127.0.0.1:9"])
    kept = await _hold(store, settings, "forced.test", "eve@forced.test")
    await domains.remove_domain(store, "forced.test", actor=ADMIN, force=True)
    entry, _ = await spool_service.get_entry(store, ADMIN, kept)
    assert entry.status == "queued"
