"""``mxguard spool list|show|retry|delete|stats`` as a real process, through the same service as the console."""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import subprocess
import sys

from mxguard.services import audit
from mxguard.services.access import SYSTEM
from mxguard.spool import queue
from mxguard.storage.sealing import KeyRing
from tests.support.gateway import in_store
from tests.support.smtp import message, send


def _cli(data_dir, *args):
    proc = subprocess.run([sys.executable, "-m", "mxguard", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, COLUMNS="200"))
    return proc.returncode, proc.stdout + proc.stderr



def _hold(data_dir, rcpts: list[str], subject: str) -> list[int]:
    async def enqueue(store, settings):
        entries = [queue.NewSpoolEntry(txn_id=f"CLI{i}", domain="example.com", mail_from="a@sender.test",
                                       recipients=[rcpt], message=message(subject=f"{subject} {i}", to=rcpt),
                                       subject=f"{subject} {i}", first_reply="451 4.4.1 connect failed")
                   for i, rcpt in enumerate(rcpts)]
        return await queue.enqueue(store, entries, KeyRing(settings.path(settings.sealing_key_file)).get(),
                                   settings.spool)
    return in_store(data_dir, enqueue)


def test_spool_commands_list_show_retry_delete_stats(data_dir, plain_sink):
    assert _cli(data_dir, "domain", "add", "example.com", "--server", plain_sink.address)[0] == 0
    first, second = _hold(data_dir, ["alice@example.com", "bob@example.com"], "CLI held")

    code, out = _cli(data_dir, "spool", "list")
    assert code == 0 and "Spool (2 held)" in out and "alice@example.com" in out and "451 4.4.1" in out
    code, out = _cli(data_dir, "spool", "list", "--json")
    rows = json.loads(out)
    assert [(r["id"], r["status"], r["recipients"][0]["status"]) for r in rows] == [
        (first, "queued", "pending"), (second, "queued", "pending")]
    code, out = _cli(data_dir, "spool", "show", str(first))
    assert code == 0 and "CLI held 0" in out and "alice@example.com  pending" in out and "Attempts" in out
    code, out = _cli(data_dir, "spool", "stats", "--json")
    stats = json.loads(out)
    assert stats["held"] == 2 and stats["by_domain"][0]["domain"] == "example.com"
    assert stats["by_domain"][0]["messages"] == 2 and stats["by_domain"][0]["oldest_age_seconds"] >= 0

    # retry delivers in this process, at once, to the downstream server
    code, out = _cli(data_dir, "spool", "retry", str(first))
    assert code == 0 and f"#{first} delivered: alice@example.com: 250" in out, out
    assert [m.rcpt_tos for m in plain_sink.messages] == [["alice@example.com"]]
    code, out = _cli(data_dir, "spool", "retry", str(first))
    assert code == 1 and f"spool entry {first} is delivered" in out and "Traceback" not in out

    code, out = _cli(data_dir, "spool", "delete", str(second))
    assert code == 0 and f"Deleted spool entry #{second} (a@sender.test → example.com)" in out
    code, out = _cli(data_dir, "spool", "delete", str(second))
    assert code == 1 and f"spool entry {second} does not exist" in out
    code, out = _cli(data_dir, "spool", "retry")
    assert code == 0 and "Nothing to retry" in out
    assert [m.rcpt_tos for m in plain_sink.messages] == [["alice@example.com"]], "the deleted one never went out"
    code, out = _cli(data_dir, "spool", "list", "--domain", "not a domain")
    assert code == 2 and "domain: " in out and "Traceback" not in out

    entries = in_store(data_dir, lambda store, s: audit.list_entries(store, SYSTEM))
    spool_entries = [e for e in entries if e.action.startswith("spool.")]
    assert [e.action for e in spool_entries] == ["spool.delete", "spool.retry"]
    assert {e.actor for e in spool_entries} == {f"cli:{getpass.getuser()}"}
    assert spool_entries[1].changes["status"] == ("queued", "delivered")


def _dead_server() -> str:
    """A loopback address where nothing listens (connection refused): the route is unreachable."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_the_transaction_id_the_sender_was_given_names_the_spool_entry(gateway, add_domain, data_dir):
    """``queued as TXN`` works with spool show/retry/delete, spool list shows it, and a transaction
    with several entries (one per route) is refused with the entries listed."""
    add_domain("example.com", [_dead_server()])
    add_domain("example.net", [_dead_server()])
    out = send(gateway.port, ["alice@example.com"])
    m = re.fullmatch(r"2\.0\.0 Ok: queued as ([0-9A-F]{16}) \(held for delivery\)", out.data[1])
    assert out.data[0] == 250 and m, out.data
    txn = m.group(1)

    code, text = _cli(data_dir, "spool", "list")
    assert code == 0 and txn in text and "transaction" in text, text
    code, text = _cli(data_dir, "spool", "list", "--json")
    (entry,) = [r for r in json.loads(text) if r["txn_id"] == txn]
    for ref in (txn, txn.lower()):
        code, text = _cli(data_dir, "spool", "show", ref)
        assert code == 0 and f"{entry['id']}" in text and txn in text and "alice@example.com" in text, text
    code, text = _cli(data_dir, "spool", "show", str(entry["id"]))
    assert code == 0 and txn in text
    code, text = _cli(data_dir, "spool", "retry", txn)
    assert code == 0 and f"#{entry['id']} still held" in text, text
    code, text = _cli(data_dir, "spool", "show", "0123456789ABCDEF")
    assert code == 1 and "no spool entry has the ID or transaction ID '0123456789ABCDEF'" in text, text
    assert "Traceback" not in text

    # One transaction, two routes: two entries under one transaction ID.
    out = send(gateway.port, ["bob@example.com", "carol@example.net"])
    two = re.search(r"queued as ([0-9A-F]{16})", out.data[1]).group(1)
    ids = sorted(r["id"] for r in json.loads(_cli(data_dir, "spool", "list", "--json")[1]) if r["txn_id"] == two)
    assert len(ids) == 2
    for command in ("show", "retry", "delete"):
        code, text = _cli(data_dir, "spool", command, two)
        assert code == 2 and "Traceback" not in text, (command, text)
        assert f"ID: transaction {two} has 2 spool entries: #{ids[0]} (example.com: bob@example.com; queued)" in text
        assert f"#{ids[1]} (example.net: carol@example.net; queued); give one of their numeric IDs" in text
    code, text = _cli(data_dir, "spool", "delete", str(ids[0]))
    assert code == 0, text
    code, text = _cli(data_dir, "spool", "delete", two)
    assert code == 0 and f"Deleted spool entry #{ids[1]} (a@sender.test → example.net)" in text, text
    code, text = _cli(data_dir, "spool", "delete", txn)
    assert code == 0 and f"Deleted spool entry #{entry['id']}" in text, text
