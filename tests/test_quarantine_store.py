"""The quarantine store on SQLite and PostgreSQL: sealed at rest, listed, opened."""

from __future__ import annotations

import pytest

from mxguard.errors import NotFound
from mxguard.quarantine.store import get_quarantined, list_quarantine, quarantine_message, row_as_dict
from mxguard.storage.models import QuarantinedMessage
from mxguard.storage.sealing import Sealer, SealingError, create_key_file


@pytest.fixture
def sealer(tmp_path) -> Sealer:
    create_key_file(tmp_path / "keys")
    return Sealer.from_file(tmp_path / "keys")


async def test_store_list_and_open(store, sealer):
    body = b"Subject: win\r\n\r\nXJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE\r\n"
    qid = await quarantine_message(store, sealer, txn_id="T1", recipient="bob@example.com", sender="a@x.test",
                                   subject="win", reason="junk: builtin score 1000 >= 5", category="junk",
                                   content=body, verdict={"junk": [{"engine": "builtin", "score": 1000}]},
                                   score=1000.0, retention_days=7)
    await quarantine_message(store, sealer, txn_id="T2", recipient="carol@example.com", sender="", subject="x",
                             reason="virus: EICAR-Test-File", category="virus", content=b"x", verdict={})
    rows = await list_quarantine(store)
    assert len(rows) == 2 and {r.recipient for r in rows} == {"bob@example.com", "carol@example.com"}
    mine = await list_quarantine(store, recipient="BOB@example.com")
    assert [r.id for r in mine] == [qid]
    row, opened = await get_quarantined(store, sealer, qid)
    assert opened == body and row.score == 1000.0 and row.size == len(body)
    assert (row.expires_at - row.created).days == 7
    assert b"GTUBE" not in row.sealed and row.key_id == sealer.current_key_id
    data = row_as_dict(row)
    assert "sealed" not in data and data["reason"].startswith("junk")


async def test_a_blob_moved_to_another_row_does_not_open(store, sealer):
    a = await quarantine_message(store, sealer, txn_id="T1", recipient="a@example.com", sender="", subject="",
                                 reason="r", category="junk", content=b"one", verdict={})
    b = await quarantine_message(store, sealer, txn_id="T2", recipient="b@example.com", sender="", subject="",
                                 reason="r", category="junk", content=b"two", verdict={})
    async with store.session() as s:
        row_a, row_b = await s.get(QuarantinedMessage, a), await s.get(QuarantinedMessage, b)
        row_b.sealed = row_a.sealed
        await s.commit()
    with pytest.raises(SealingError):
        await get_quarantined(store, sealer, b)
    with pytest.raises(NotFound):
        await get_quarantined(store, sealer, "Q0000")
