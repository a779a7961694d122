"""One organization's admin cannot read or release another organization's quarantine, through an
address or a domain it does not own: end to end over the real web server, the CLI, and a
hypothesis class test over random organizations, domains, users and held messages."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import select

from mxguard.errors import Conflict, NotFound, ValidationFailed
from mxguard.quarantine.service import get_visible, search
from mxguard.quarantine.store import quarantine_message
from mxguard.services import domains as domain_service
from mxguard.services import orgs, users
from mxguard.services.access import Actor, Role
from mxguard.services.tenancy import find_violations, overlaps
from mxguard.storage.db import Store
from mxguard.storage.models import AuditEntry, Organization, User
from mxguard.storage.sealing import Sealer, create_key_file
from tests.support.smtp import send
from tests.support.web import PASSWORD, csrf_token
from tests.test_cli_filters import mx
from tests.support import mail


def two_tenants(web, sink):
    for org, domain, admin in (("OrgA", "a.test", "admin@a.test"), ("OrgB", "b.test", "admin@b.test")):
        web.add_org(org)
        web.run(domain_service.add_domain(web.gw.store, domain, [sink.address], org=org, downstream_tls="off"))
        web.add_user(admin, "org-admin", org)
    web.gw.reload()
    return web.api(web.api_key("admin@a.test")), web.api(web.api_key("admin@b.test"))


def audit_actions(web) -> list[str]:
    async def read():
        async with web.gw.store.session() as session:
            return [r.action for r in (await session.execute(select(AuditEntry))).scalars()]
    return web.run(read())


def test_an_org_admin_cannot_create_a_user_in_another_orgs_domain(web, plain_sink):
    a, b = two_tenants(web, plain_sink)
    reply = a.post("/users", json={"email": "dave@b.test", "role": "user", "org": "OrgA", "password": PASSWORD})
    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert [e["loc"] for e in detail] == [["body", "email"]] and "b.test is not a domain of" in detail[0]["msg"]
    # An org-admin login in the other organization's domain is refused as well; one outside any is fine.
    assert a.post("/users", json={"email": "eve@b.test", "role": "org-admin", "org": "OrgA"}).status_code == 422
    assert a.post("/users", json={"email": "helper@outside.test", "role": "org-admin", "org": "OrgA"}).status_code == 201
    assert a.post("/users", json={"email": "dave@a.test", "role": "user", "org": "OrgA"}).status_code == 201
    assert "dave@b.test" not in [u["email"] for u in web.api(web.admin_key).get("/users").json()]
    assert audit_actions(web).count("user.add.refused") == 2


def test_an_org_admin_cannot_add_a_subdomain_or_parent_of_another_orgs_domain(web, plain_sink):
    a, b = two_tenants(web, plain_sink)
    for name in ("sub.b.test", "deep.sub.b.test"):
        reply = a.post("/domains", json={"name": name, "servers": ["mail.a.test"]})
        assert reply.status_code == 409 and "b.test" in reply.json()["detail"], reply.text
    assert a.post("/domains", json={"name": "b.test", "servers": ["mail.a.test"]}).status_code == 409
    assert a.post("/domains", json={"name": "ab.test", "servers": ["mail.a.test"]}).status_code == 201  # not b.test's
    assert a.post("/domains", json={"name": "sub.a.test", "servers": ["mail.a.test"]}).status_code == 201  # own parent
    # The console's form goes through the same check.
    client, login = web.login("admin@a.test")
    assert login.status_code == 303
    page = client.get("/domains/new")
    form = client.post("/domains/new", data={"name": "mail.b.test", "servers": "mx.a.test",
                                             "csrf_token": csrf_token(page.text)})
    assert form.status_code == 409 and "overlaps b.test" in form.text
    assert audit_actions(web).count("domain.add.refused") == 4
    # A global administrator may (a deliberate hand-over).
    admin = web.api(web.admin_key)
    assert admin.post("/domains", json={"name": "sub.b.test", "servers": ["x.test"], "org": "OrgA"}).status_code == 201


def test_a_user_in_another_orgs_domain_sees_and_releases_nothing(web, plain_sink, data_dir):
    """Data from before the rule: the account exists; the Message Center still shows it nothing."""
    two_tenants(web, plain_sink)

    async def plant():
        async with web.gw.store.session() as session:
            org_a = (await session.execute(select(Organization).where(Organization.name == "OrgA"))).scalar_one()
            session.add(User(email="dave@b.test", password_hash=users._hasher.hash(PASSWORD), role="user",
                             org_id=org_a.id, failed_logins=0, must_change_password=False))
            await session.commit()
    web.run(plant())
    out = send(web.gw.port, ["dave@b.test"], mail.gtube(to="dave@b.test"), starttls=False)
    assert out.data[0] == 250
    held = web.run(search(web.gw.store, Actor("t"), text="dave@b.test"))
    assert len(held) == 1
    client, login = web.login("dave@b.test")
    assert login.status_code == 303
    listing = client.get("/mc")
    assert listing.status_code == 200 and held[0].id not in listing.text
    assert client.get(f"/mc/messages/{held[0].id}").status_code == 404
    page = client.get("/mc")
    deliver = client.post(f"/mc/messages/{held[0].id}/deliver", data={"csrf_token": csrf_token(page.text)})
    assert deliver.status_code == 404
    assert plain_sink.messages == []
    # B, the organization owning b.test, sees it.
    assert [r.id for r in web.run(search(web.gw.store, users_actor(web, "admin@b.test")))] == [held[0].id]
    # The operator can find the old account.
    report = mx(data_dir, "doctor", "--json")
    assert report.returncode == 1, report.stderr
    problems = [json.loads(line) for line in report.stdout.splitlines()]
    assert {"kind": "user", "target": "dave@b.test"}.items() <= problems[0].items()
    assert "served for 'OrgB'" in problems[0]["problem"]


def users_actor(web, email: str) -> Actor:
    return web.run(users.get_user(web.gw.store, email)).actor()


def test_cli_refuses_the_same_address(web, plain_sink, data_dir):
    two_tenants(web, plain_sink)
    out = mx(data_dir, "user", "add", "dave@b.test", "--role", "user", "--org", "OrgA", "--generate-password")
    assert out.returncode == 2 and "email: b.test is not a domain of organization 'OrgA'" in out.stderr, out.stderr
    ok = mx(data_dir, "doctor")
    assert ok.returncode == 0 and "No tenancy problems found" in ok.stdout


# -- the class: random tenants, never a message of another organization ----------------------

labels = st.sampled_from(["a", "b", "c", "sub.a", "sub.b", "x.sub.a", "ab"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(domain_owner=st.dictionaries(labels, st.sampled_from([0, 1, 2, None]), min_size=1, max_size=6),
       people=st.lists(st.tuples(labels, st.sampled_from(["user", "org-admin"]), st.sampled_from([0, 1, 2]),
                                 st.booleans()), min_size=1, max_size=6),
       recipients=st.lists(labels, min_size=1, max_size=6))
def test_no_user_ever_sees_another_organizations_message(domain_owner, people, recipients):
    asyncio.run(_scenario(domain_owner, people, recipients))


async def _scenario(domain_owner, people, recipients):
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite+aiosqlite:///{Path(tmp) / 'db.sqlite'}")
        await store.migrate()
        create_key_file(Path(tmp) / "keys")
        sealer = Sealer.from_file(Path(tmp) / "keys")
        try:
            org_names = ["Org0", "Org1", "Org2"]
            for name in org_names:
                await orgs.add_org(store, name)
            owner_of: dict[str, str | None] = {}
            for label, owner in sorted(domain_owner.items(), key=lambda kv: kv[0].count(".")):
                name = f"{label}.test"
                org = org_names[owner] if owner is not None else None
                org_admin = Actor("t", Role.ORG_ADMIN, org_id=owner + 1, org=org) if owner is not None else None
                try:
                    # Half the domains come through an org-admin, who may not claim overlapping ones.
                    await domain_service.add_domain(store, name, ["mx.test"], org=org,
                                                    actor=org_admin if org_admin and len(label) % 2 else Actor("a"))
                    owner_of[name] = org
                except Conflict:
                    assert org_admin is not None and any(overlaps(name, d) for d in owner_of)
            for i, (label, role, org_index, planted) in enumerate(people):
                email, org = f"p{i}@{label}.test", org_names[org_index]
                if planted:  # data from before the rules, written straight into the table
                    async with store.session() as session:
                        session.add(User(email=email, password_hash="x", role=role, org_id=org_index + 1,
                                         failed_logins=0, must_change_password=False))
                        await session.commit()
                    continue
                try:
                    await users.add_user(store, email, role, org=org, password="x" * 12)
                except ValidationFailed as exc:
                    assert exc.field == "email"
                    domain = f"{label}.test"
                    assert owner_of.get(domain, "-") != org
            ids = []
            for i, label in enumerate(recipients):
                for j in range(len(people)):
                    rcpt = f"p{j}@{label}.test" if i % 2 else f"other{i}@{label}.test"
                    ids.append(await quarantine_message(store, sealer, txn_id=f"T{i}{j}", recipient=rcpt, sender="",
                                                        subject="s", reason="junk", category="junk", content=b"x",
                                                        verdict={}))
            for view in await users.list_users(store):
                actor = view.actor()
                visible = {row.id: row for row in await search(store, actor, limit=1000)}
                for qid in ids:
                    try:
                        row = await get_visible(store, actor, qid)
                    except NotFound:
                        assert qid not in visible
                        continue
                    domain = row.recipient.rpartition("@")[2]
                    assert owner_of.get(domain) == view.org, (view, row.recipient, owner_of)
                    if view.role == "user":
                        assert row.recipient == view.email
            # Whatever was planted, the doctor names every user whose address is not their organization's.
            flagged = {v.target for v in await find_violations(store) if v.kind == "user"}
            for view in await users.list_users(store):
                domain = view.email.rpartition("@")[2]
                if view.role == "user" and owner_of.get(domain, "-") != view.org:
                    assert view.email in flagged
        finally:
            await store.close()


async def test_sender_lists_of_an_account_in_another_orgs_domain_are_ignored(store):
    from mxguard.quarantine import senderlists
    for org, domain in (("OrgA", "a.test"), ("OrgB", "b.test")):
        await orgs.add_org(store, org)
        await domain_service.add_domain(store, domain, ["mx.test"], org=org)
    legit, _ = await users.add_user(store, "carol@b.test", "user", org="OrgB", password="x" * 12)
    async with store.session() as session:  # an account from before the rules
        org_a = (await session.execute(select(Organization).where(Organization.name == "OrgA"))).scalar_one()
        session.add(User(email="dave@b.test", password_hash="x", role="user", org_id=org_a.id, failed_logins=0,
                         must_change_password=False))
        await session.commit()
        dave = (await session.execute(select(User).where(User.email == "dave@b.test"))).scalar_one()
    await senderlists.add_entry(store, dave.id, "allow", "spam.example", actor=Actor("t"))
    await senderlists.add_entry(store, legit.id, "allow", "shop.example", actor=Actor("t"))
    cache = senderlists.SenderLists(store)
    await cache.load()
    assert cache.lookup("dave@b.test", "x@spam.example") is None
    assert cache.lookup("carol@b.test", "x@shop.example") == "allow"
