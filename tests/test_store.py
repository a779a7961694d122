"""Domain service and message log on both databases (SQLite and a real PostgreSQL)."""

from __future__ import annotations

import datetime as dt

import pytest

from mxguard.errors import AlreadyExists, NotFound, ValidationFailed
from mxguard.services import domains as svc
from mxguard.storage.messagelog import LogRecord, MessageLogWriter, recent, search


async def test_domain_crud_and_generation(store):
    g0 = await svc.current_generation(store)
    view = await svc.add_domain(store, "Example.COM", ["mail1.example.com", "[2001:db8::1]:2525"],
                                downstream_tls="verify")
    assert view.name == "example.com"
    assert view.servers == ("mail1.example.com:25", "[2001:db8::1]:2525")
    assert view.inbound_tls == "optional" and view.downstream_tls == "verify"
    assert await svc.current_generation(store) == g0 + 1
    with pytest.raises(AlreadyExists):
        await svc.add_domain(store, "example.com", ["x.example.com"])
    before, after = await svc.update_domain(store, "example.com", downstream_tls="required", inbound_tls="required")
    assert before.downstream_tls == "verify" and after.downstream_tls == "required"
    assert (await svc.get_domain(store, "example.com")).inbound_tls == "required"
    assert [d.name for d in await svc.list_domains(store)] == ["example.com"]
    await svc.remove_domain(store, "example.com")
    with pytest.raises(NotFound):
        await svc.get_domain(store, "example.com")
    assert await svc.current_generation(store) == g0 + 3


async def test_idn_domain_is_stored_in_ascii(store):
    view = await svc.add_domain(store, "bücher.example", ["mail.example"])
    assert view.name == "xn--bcher-kva.example"


@pytest.mark.parametrize("kwargs,field", [
    (dict(name="not a domain", servers=["m.example"]), "domain"),
    (dict(name="127.0.0.1", servers=["m.example"]), "domain"),
    (dict(name="ok.example", servers=[]), "servers"),
    (dict(name="ok.example", servers=["m.example:0"]), "servers"),
    (dict(name="ok.example", servers=["m.example", "m.example:25"]), "servers"),
    (dict(name="ok.example", servers=["m.example"], downstream_tls="sometimes"), "downstream_tls"),
    (dict(name="ok.example", servers=["m.example"], inbound_tls="maybe"), "inbound_tls"),
    (dict(name="ok.example", servers=["m.example"], tls_min_version="1.0"), "tls_min_version"),
    (dict(name="ok.example", servers=["m.example"], downstream_tls="verify", tls_fingerprint="zz"), "tls_fingerprint"),
    (dict(name="ok.example", servers=["m.example"], tls_fingerprint="ab" * 32), "tls_fingerprint"),
    (dict(name="ok.example", servers=["m.example"], downstream_tls="verify", tls_ca_file="/nonexistent.pem"), "tls_ca_file"),
])
async def test_validation_names_the_field(store, kwargs, field):
    kwargs = dict(kwargs)
    with pytest.raises(ValidationFailed) as err:
        await svc.add_domain(store, kwargs.pop("name"), kwargs.pop("servers"), **kwargs)
    assert err.value.field == field


async def test_message_log_batches_and_search(store):
    writer = MessageLogWriter(store, flush_interval=60)
    now = dt.datetime.now(dt.timezone.utc)
    for i in range(5):
        writer.submit(LogRecord(txn_id=f"T{i}", ts=now, client_ip="192.0.2.7", mail_from=f"s{i}@sender.test",
                                rcpt_to="alice@example.com", subject=f"report {i} 100%_done",
                                inbound_tls=i % 2 == 0, disposition="delivered" if i < 4 else "rejected",
                                results=[{"rcpt": "alice@example.com", "code": 250}], downstream=[{"tls": True}]))
    assert await writer.flush() == 5
    rows = await recent(store, 3)
    assert [r.txn_id for r in rows] == ["T2", "T3", "T4"]
    assert rows[0].results == [{"rcpt": "alice@example.com", "code": 250}]
    assert len(await search(store, disposition="rejected")) == 1
    assert len(await search(store, tls=True)) == 3
    assert len(await search(store, subject="100%_")) == 5
    assert len(await search(store, subject="%")) == 5  # a literal percent, not a wildcard
    assert len(await search(store, sender="' OR 1=1 --")) == 0
    assert len(await search(store, sender="s3@")) == 1
