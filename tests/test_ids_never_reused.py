"""IDs people see are never reused (migration 0016_ids_never_reused), on SQLite and PostgreSQL.

SQLite without ``AUTOINCREMENT`` gives a new row ``max(id) + 1``: after the newest spool entry
is delivered (its row deleted) the next message got its ID, and ``mxguard spool delete 12`` or a
log line naming entry 12 could mean another message. These tests drive the spool, the
quarantine and the allow/block lists through their own service functions with any sequence of
inserts and deletes, and upgrade a database holding rows from the previous revision.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from sqlalchemy import delete, func, inspect, select, text

from mxguard.config import SpoolSettings
from mxguard.quarantine import senderlists
from mxguard.quarantine.store import quarantine_message
from mxguard.services import orgs, users
from mxguard.services.access import SYSTEM
from mxguard.spool import queue
from mxguard.storage.db import Store, _alembic_config
from mxguard.storage.models import (AuditEntry, MessageLogEntry, QuarantinedMessage, ReceivedTlsReport,
                                    SenderListEntry, SpoolAttempt, SpoolEntry, User, utcnow)
from mxguard.storage.sealing import Sealer, create_key_file

PW = "a sufficiently long password"
PREVIOUS = "0015_spool_org"
#: Tables whose IDs must never come back, and the ORM class that fills each.
NEVER_REUSED = {"spool": SpoolEntry, "message_log": MessageLogEntry, "audit_log": AuditEntry,
                "tls_reports_received": ReceivedTlsReport, "sender_lists": SenderListEntry}


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_url(request, tmp_path) -> str:
    """A fresh database URL, SQLite file or PostgreSQL database (the suite's own cluster)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'ids.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def sealer(tmp_path) -> Sealer:
    """A sealer with a fresh key file, for spool and quarantine bodies."""
    create_key_file(tmp_path / "keys")
    return Sealer.from_file(tmp_path / "keys")


async def _user(store: Store) -> int:
    await orgs.add_org(store, "Org")
    return (await users.add_user(store, "u@example.com", "org-admin", org="Org", password=PW))[0].id


def _spool_entry(n: int) -> queue.NewSpoolEntry:
    return queue.NewSpoolEntry(txn_id=f"T{n}", domain="example.com", mail_from="a@sender.test",
                               recipients=[f"r{n}@example.com"], message=b"Subject: x\r\n\r\nbody\r\n",
                               subject=f"held {n}", first_reply="451 4.4.1 connect failed")


# (what, which): add a row, or delete the newest / the oldest / the k-th live row.
_ops = st.lists(st.one_of(st.just(("add", 0)), st.just(("add", 0)), st.just(("newest", 0)),
                          st.just(("oldest", 0)), st.tuples(st.just("nth"), st.integers(0, 20))),
                min_size=1, max_size=14)


def test_ids_of_spool_quarantine_and_lists_never_come_back(backend_url, sealer):
    """Any sequence of inserts and deletes (the newest too) through the service functions: every new
    spool and list entry ID is above every ID handed out before (so never equal to one), and a
    quarantine ID (random, 96 bits) is never one handed out before."""
    loop = asyncio.new_event_loop()
    store = Store(backend_url)
    loop.run_until_complete(store.migrate())
    spool_settings = SpoolSettings()
    user_id = loop.run_until_complete(_user(store))
    issued: dict[str, list] = {"spool": [], "quarantine": [], "sender_lists": []}
    live: dict[str, list] = {name: [] for name in issued}
    counter = iter(range(10**9))

    async def add(table: str):
        n = next(counter)
        if table == "spool":
            [new] = await queue.enqueue(store, [_spool_entry(n)], sealer, spool_settings)
        elif table == "quarantine":
            new = await quarantine_message(store, sealer, txn_id=f"T{n}", recipient=f"r{n}@example.com",
                                           sender="", subject="", reason="junk", category="junk",
                                           content=b"Subject: q\r\n\r\nq\r\n", verdict={})
        else:
            new = (await senderlists.add_entry(store, user_id, "block", f"s{n}.example", actor=SYSTEM)).id
        return new

    async def remove(table: str, entry_id) -> None:
        if table == "spool":
            await queue.delete_entry(store, entry_id)
        elif table == "quarantine":
            async with store.session() as session:
                await session.execute(delete(QuarantinedMessage).where(QuarantinedMessage.id == entry_id))
                await session.commit()
        else:
            await senderlists.remove_entry(store, user_id, entry_id, actor=SYSTEM)

    @hsettings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(issued)), _ops)
    def run(table, ops):
        # each example starts from an empty table (every row deleted, the newest too), so a
        # failing example fails again when replayed, whatever ran before it
        while live[table]:
            loop.run_until_complete(remove(table, live[table].pop()))
        for what, k in ops:
            if what == "add" or not live[table]:
                new = loop.run_until_complete(add(table))
                live[table].append(new)
                assert new not in issued[table], f"{table}: ID {new} was handed out before"
                if table != "quarantine":
                    assert new > max(issued[table], default=0), f"{table}: {new} after {issued[table][-3:]}"
                issued[table].append(new)
                continue
            victim = {"newest": -1, "oldest": 0}.get(what, k % len(live[table]))
            loop.run_until_complete(remove(table, live[table].pop(victim)))

    try:
        run()
    finally:
        loop.run_until_complete(store.close())
        loop.close()


def _factories(user_id: int, n: int) -> dict[str, object]:
    now = utcnow()
    return {
        "message_log": MessageLogEntry(txn_id=f"T{n}", ts=now, client_ip="192.0.2.1", disposition="delivered",
                                       subject=f"s{n}", results=[{"rcpt": "x@example.com", "code": 250}]),
        "audit_log": AuditEntry(actor="cli:root", action="domain.add", target=f"d{n}.example",
                                after={"n": n}),
        "tls_reports_received": ReceivedTlsReport(domain="example.com", organization="Reporter",
                                                  report_id=f"r{n}", start=now, end=now, via="https",
                                                  raw_gzip=b"\x1f\x8b" + bytes([n % 256]), failures={"x": n}),
        "sender_lists": SenderListEntry(user_id=user_id, kind="allow", pattern=f"p{n}.example"),
    }


def _schema(connection) -> dict:
    """Every index and foreign key of the tables, and every row (ordered by ID)."""
    inspector = inspect(connection)
    out = {}
    for table in [*NEVER_REUSED, "spool_attempts", "quarantine", "users", "web_sessions"]:
        indexes = sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                         for i in inspector.get_indexes(table))
        fks = sorted((tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]),
                      (f.get("options") or {}).get("ondelete")) for f in inspector.get_foreign_keys(table))
        rows = connection.execute(text(f"SELECT * FROM {table} ORDER BY 1")).all()
        out[table] = (indexes, fks, [tuple(r) for r in rows])
    return out


async def test_upgrade_keeps_every_row_and_ids_are_new_after_deleting_the_newest(backend_url, sealer):
    """A database at 0015 with rows in every affected table (and the spool's attempts, which the
    rebuild of ``spool`` would cascade away): the upgrade keeps every row, column value, index and
    foreign key; the next ID on SQLite is above the current maximum (``sqlite_sequence``), also after
    the newest row is deleted."""
    from alembic import command

    store = Store(backend_url)
    try:
        await store.migrate()
        async with store.engine.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(_alembic_config(c), PREVIOUS))
        user_id = await _user(store)
        spool_ids = []
        for n in range(4):
            [entry_id] = await queue.enqueue(store, [_spool_entry(n)], sealer, SpoolSettings())
            spool_ids.append(entry_id)
        await quarantine_message(store, sealer, txn_id="TQ", recipient="q@example.com", sender="", subject="",
                                 reason="junk", category="junk", content=b"x", verdict={})
        async with store.session() as session:
            for n in range(3):
                session.add_all(_factories(user_id, n).values())
            for entry_id in spool_ids:
                session.add(SpoolAttempt(spool_id=entry_id, server="127.0.0.1:25", reply=f"451 try {entry_id}",
                                         results={"r@example.com": 451}))
            await session.commit()
        async with store.engine.connect() as conn:
            before = await conn.run_sync(_schema)
            maxima = {t: (await conn.execute(text(f"SELECT max(id) FROM {t}"))).scalar() for t in NEVER_REUSED}
        assert all(len(before[t][2]) >= 3 for t in NEVER_REUSED) and len(before["spool_attempts"][2]) == 4

        await store.migrate()
        assert await store.schema_is_current()
        async with store.engine.connect() as conn:
            after = await conn.run_sync(_schema)
            if store.is_sqlite:
                ddl = dict((await conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))).all())
                assert [t for t in NEVER_REUSED if "AUTOINCREMENT" not in ddl[t]] == []
                seq = dict((await conn.execute(text("SELECT name, seq FROM sqlite_sequence"))).all())
                assert {t: seq.get(t) for t in NEVER_REUSED} == maxima, "next IDs start above the maximum"
        for table in before:
            assert after[table] == before[table], table

        for table, model in NEVER_REUSED.items():
            async with store.session() as session:
                newest = (await session.execute(select(func.max(model.id)))).scalar()
                await session.execute(delete(model).where(model.id == newest))
                await session.commit()
            if table == "spool":
                [new] = await queue.enqueue(store, [_spool_entry(99)], sealer, SpoolSettings())
            else:
                row = _factories(user_id, 99)[table]
                async with store.session() as session:
                    session.add(row)
                    await session.commit()
                new = row.id
            assert new > maxima[table], f"{table}: new ID {new} after deleting the newest {newest}"
    finally:
        await store.close()


async def test_downgrade_and_upgrade_again_keep_the_rows(backend_url, sealer):
    """0016 down and up: rows and the spool's attempts stay (the downgrade rebuilds too)."""
    from alembic import command

    store = Store(backend_url)
    try:
        await store.migrate()
        [entry_id] = await queue.enqueue(store, [_spool_entry(1)], sealer, SpoolSettings())
        async with store.session() as session:
            session.add(SpoolAttempt(spool_id=entry_id, reply="451 later"))
            await session.commit()

        def cycle(connection):
            command.downgrade(_alembic_config(connection), PREVIOUS)
            command.upgrade(_alembic_config(connection), "head")

        async with store.engine.begin() as conn:
            await conn.run_sync(cycle)
        entry, attempts = await queue.get_entry(store, entry_id)
        assert entry.txn_id == "T1" and [a.reply for a in attempts] == ["451 later"]
    finally:
        await store.close()
