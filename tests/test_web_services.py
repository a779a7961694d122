"""Tenancy, users, API keys, audit and statistics services on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import secrets

import pytest

from mxguard.errors import AlreadyExists, NotFound, PermissionDenied, ValidationFailed
from mxguard.services import apikeys, audit, domains, orgs, stats, users
from mxguard.services.access import Actor
from mxguard.storage.messagelog import LogRecord, MessageLogWriter

PW = "a sufficiently long password"


async def _tenant(store, org: str, email: str) -> Actor:
    await orgs.add_org(store, org)
    view, _ = await users.add_user(store, email, "org-admin", org=org, password=PW)
    return view.actor()


async def test_schema_is_current_and_domains_carry_their_org(store):
    assert await store.schema_is_current()
    acme = await _tenant(store, "Acme", "ops@acme.test")
    view = await domains.add_domain(store, "acme.test", ["mx.acme.test"], actor=acme)
    assert view.org == "Acme"
    other = await domains.add_domain(store, "free.test", ["mx.free.test"])
    assert other.org is None
    assert [d.name for d in await domains.list_domains(store, actor=acme)] == ["acme.test"]
    with pytest.raises(NotFound):
        await domains.get_domain(store, "free.test", actor=acme)
    with pytest.raises(NotFound):
        await domains.update_domain(store, "free.test", actor=acme, downstream_tls="off")
    with pytest.raises(NotFound):
        await domains.remove_domain(store, "free.test", actor=acme)
    before, after = await domains.update_domain(store, "free.test", org="Acme")
    assert (before.org, after.org) == (None, "Acme")
    assert [d.name for d in await domains.list_domains(store, actor=acme)] == ["acme.test", "free.test"]
    with pytest.raises(ValidationFailed) as err:
        await domains.update_domain(store, "free.test", org="Nobody")
    assert err.value.field == "org"


async def test_every_domain_change_is_audited_with_before_and_after(store):
    actor = Actor("cli:root")
    await domains.add_domain(store, "example.com", ["mail.example.com"], actor=actor)
    await domains.update_domain(store, "example.com", actor=actor, downstream_tls="required", servers=["a.test"])
    await domains.update_domain(store, "example.com", actor=actor, downstream_tls="required")  # no change, no entry
    await domains.remove_domain(store, "example.com", actor=actor)
    entries = await audit.list_entries(store, actor)
    assert [e.action for e in entries] == ["domain.remove", "domain.update", "domain.add"]
    assert all(e.actor == "cli:root" and e.target == "example.com" for e in entries)
    update = entries[1]
    assert update.changes == {"downstream_tls": ("opportunistic", "required"),
                              "servers": (["mail.example.com:25"], ["a.test:25"])}
    assert entries[0].before["downstream_tls"] == "required" and entries[0].after is None


async def test_roles_and_org_admin_limits(store):
    acme = await _tenant(store, "Acme", "ops@acme.test")
    await _tenant(store, "Globex", "ops@globex.test")
    await domains.add_domain(store, "acme.test", ["a.test"], org="Acme")  # the clerk's address is Acme's
    with pytest.raises(PermissionDenied):
        await orgs.add_org(store, "Mine", actor=acme)
    with pytest.raises(PermissionDenied):
        await users.add_user(store, "root@acme.test", "admin", actor=acme)
    with pytest.raises(PermissionDenied):
        await users.add_user(store, "spy@globex.test", "user", org="Globex", actor=acme)
    clerk, generated = await users.add_user(store, "clerk@acme.test", "user", org="Acme", actor=acme)
    assert generated and len(generated) >= 16
    with pytest.raises(PermissionDenied):
        await domains.list_domains(store, actor=clerk.actor())
    with pytest.raises(AlreadyExists):
        await orgs.add_org(store, "Acme")
    assert [u.email for u in await users.list_users(store, actor=acme)] == ["clerk@acme.test", "ops@acme.test"]
    with pytest.raises(NotFound):
        await users.get_user(store, "ops@globex.test", actor=acme)
    with pytest.raises(NotFound):
        await orgs.get_org(store, "Globex", actor=acme)


async def test_an_unknown_address_locks_like_an_account(store):
    """Lockout must not tell which addresses have an account: the same replies, in the same order."""
    await users.add_user(store, "admin@gw.test", "admin", password=PW)
    policy = users.LoginPolicy(max_failures=3, lockout_seconds=60, ip_max_failures=100, ip_window_seconds=60)
    seen = {}
    for email in ("admin@gw.test", "nobody@gw.test"):
        reasons = []
        for _ in range(4):
            with pytest.raises(users.LoginRefused) as refused:
                await users.authenticate(store, email, "wrong", "192.0.2.9", policy)
            reasons.append((refused.value.reason, bool(refused.value.retry_after) and refused.value.retry_after > 50))
        seen[email] = reasons
    assert seen["admin@gw.test"] == seen["nobody@gw.test"] == [
        ("invalid", False), ("invalid", False), ("locked", True), ("locked", True)]


async def test_login_lockout_rate_limit_and_rehash(store):
    await users.add_user(store, "admin@gw.test", "admin", password=PW)
    policy = users.LoginPolicy(max_failures=3, lockout_seconds=60, ip_max_failures=100, ip_window_seconds=60)
    user = await users.authenticate(store, "Admin@GW.test", PW, "192.0.2.1", policy)
    assert user.email == "admin@gw.test" and user.last_login_at is not None
    for _ in range(2):
        with pytest.raises(users.LoginRefused) as refused:
            await users.authenticate(store, "admin@gw.test", "wrong", "192.0.2.1", policy)
        assert refused.value.reason == "invalid"
    with pytest.raises(users.LoginRefused) as refused:
        await users.authenticate(store, "admin@gw.test", "wrong", "192.0.2.1", policy)
    assert refused.value.reason == "locked" and refused.value.retry_after == 60
    with pytest.raises(users.LoginRefused) as refused:
        await users.authenticate(store, "admin@gw.test", PW, "192.0.2.1", policy)
    assert refused.value.reason == "locked"
    assert (await users.get_user(store, "admin@gw.test")).locked_until is not None
    await users.set_password(store, "admin@gw.test", PW)
    assert (await users.authenticate(store, "admin@gw.test", PW, "192.0.2.1", policy)).locked_until is None
    tight = users.LoginPolicy(max_failures=100, ip_max_failures=2, ip_window_seconds=60)
    for _ in range(2):
        with pytest.raises(users.LoginRefused):
            await users.authenticate(store, "nobody@gw.test", "x", "198.51.100.7", tight)
    with pytest.raises(users.LoginRefused) as refused:
        await users.authenticate(store, "admin@gw.test", PW, "198.51.100.7", tight)
    assert refused.value.reason == "rate_limited"
    assert (await users.authenticate(store, "admin@gw.test", PW, "192.0.2.9", tight)).email == "admin@gw.test"


async def test_sessions_expire_and_end(store):
    user, _ = await users.add_user(store, "admin@gw.test", "admin", password=PW)
    token, csrf = await users.create_session(store, user, "127.0.0.1", lifetime_seconds=3600)
    info = await users.session_for(store, token, idle_seconds=600)
    assert info.user.email == "admin@gw.test" and info.csrf_token == csrf
    assert await users.session_for(store, token + "x", idle_seconds=600) is None
    await users.end_session(store, token)
    assert await users.session_for(store, token, idle_seconds=600) is None
    short, _ = await users.create_session(store, user, "127.0.0.1", lifetime_seconds=-1)
    assert await users.session_for(store, short, idle_seconds=600) is None


async def test_api_keys_hash_only_and_revocation(store):
    from sqlalchemy import select
    from mxguard.storage.models import ApiKey
    await users.add_user(store, "admin@gw.test", "admin", password=PW)
    key, view = await apikeys.create_api_key(store, "admin@gw.test", name="monitoring")
    assert key.startswith(f"mxg_{view.prefix}_")
    async with store.session() as session:
        stored = (await session.execute(select(ApiKey))).scalar_one()
    assert key.split("_", 2)[2] not in stored.secret_hash
    user, prefix = await apikeys.authenticate_key(store, key)
    assert user.email == "admin@gw.test" and prefix == view.prefix
    for bad in (key[:-1] + ("A" if key[-1] != "A" else "B"), "mxg_nope", "", "Bearer " + key):
        with pytest.raises(apikeys.InvalidApiKey):
            await apikeys.authenticate_key(store, bad)
    await apikeys.revoke_api_key(store, view.prefix)
    with pytest.raises(apikeys.InvalidApiKey):
        await apikeys.authenticate_key(store, key)
    assert (await apikeys.list_api_keys(store))[0].revoked


def _record(ts: dt.datetime, rcpt: str, disposition: str, tls: bool, down_tls: bool | None, verified=None):
    return LogRecord(txn_id=secrets.token_hex(8), ts=ts, client_ip="192.0.2.1", inbound_tls=tls,
                     tls_version="TLSv1.3" if tls else None, rcpt_to=rcpt, disposition=disposition,
                     downstream_tls=down_tls, downstream_verified=verified)


async def test_hourly_and_tls_statistics(store):
    acme = await _tenant(store, "Acme", "ops@acme.test")
    await domains.add_domain(store, "acme.test", ["mx.acme.test"], actor=acme)
    await domains.add_domain(store, "example.com", ["mx.example.com"])
    now = dt.datetime(2026, 11, 29, 10, 30, tzinfo=dt.timezone.utc)
    writer = MessageLogWriter(store)
    for rec in (
        _record(now - dt.timedelta(minutes=10), "a@acme.test", "delivered", True, True, True),
        _record(now - dt.timedelta(minutes=20), "b@acme.test x@example.com", "delivered", False, True, False),
        _record(now - dt.timedelta(hours=2, minutes=5), "c@example.com", "deferred", True, None),
        _record(now - dt.timedelta(hours=30), "d@acme.test", "delivered", True, False),       # outside 24 h
        _record(now - dt.timedelta(minutes=5), "e@notacme.test", "rejected", True, None),     # not acme.test
    ):
        writer.submit(rec)
    await writer.flush()
    labels, series = await stats.hourly_dispositions(store, Actor("t"), now=now)
    assert labels[-1] == "2026-11-29 10:00" and len(labels) == 24
    assert series["delivered"][-1] == 2 and series["rejected"][-1] == 1 and series["deferred"][-3] == 1
    assert sum(series["delivered"]) == 2
    _, mine = await stats.hourly_dispositions(store, acme, now=now)
    assert mine == {"delivered": [0] * 23 + [2]}
    share = await stats.tls_share(store, now - dt.timedelta(hours=24), domains=["acme.test"])
    assert (share.transactions, share.inbound_tls, share.downstream, share.downstream_tls,
            share.downstream_verified) == (2, 1, 2, 2, 1)
    assert share.inbound_pct == 50.0 and share.verified_pct == 50.0
    month = await stats.tls_share(store, now - dt.timedelta(days=30), domains=["acme.test"])
    assert month.transactions == 3 and month.downstream_pct == pytest.approx(66.7)


async def test_only_admins_point_at_a_ca_file_on_the_gateway(store, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not used here\n")
    acme = await _tenant(store, "Acme", "ops@acme.test")
    with pytest.raises(PermissionDenied):
        await domains.add_domain(store, "acme.test", ["mx.acme.test"], actor=acme, downstream_tls="verify",
                                 tls_ca_file=str(ca))
    await domains.add_domain(store, "acme.test", ["mx.acme.test"], actor=acme)
    with pytest.raises(PermissionDenied):
        await domains.update_domain(store, "acme.test", actor=acme, downstream_tls="verify", tls_ca_file="/etc/passwd")
    await domains.update_domain(store, "acme.test", downstream_tls="verify", tls_ca_file=str(ca))  # admin
    # The org-admin saving the form unchanged keeps the administrator's CA file.
    _, after = await domains.update_domain(store, "acme.test", actor=acme, tls_ca_file=str(ca), inbound_tls="required")
    assert after.tls_ca_file == str(ca) and after.inbound_tls == "required"
