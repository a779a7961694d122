"""The quarantine and organization commands as an operator runs them (the real ``mxguard`` in a subprocess),
next to a running gateway on the same data dir."""

from __future__ import annotations

import json
import re

import pytest

from mxguard.quarantine.store import list_quarantine
from mxguard.services import orgs
from tests.support import mail
from tests.support.smtp import send
from tests.test_cli_filters import mx


@pytest.fixture
def held(gateway, tls_sink, add_domain, ca_file, data_dir):
    gateway.run(orgs.add_org(gateway.store, "Example Corp"))
    add_domain("example.com", [tls_sink.address], downstream_tls="verify", tls_ca_file=str(ca_file),
               org="Example Corp")
    out = send(gateway.port, ["bob@example.com"], mail.gtube())
    assert out.data[0] == 250
    rows = gateway.run(list_quarantine(gateway.store))
    assert len(rows) == 1
    return rows[0]


def test_summary_send_release_purge_and_signin_link(gateway, tls_sink, held, data_dir):
    preview = mx(data_dir, "quarantine", "summary")
    assert preview.returncode == 0 and "bob@example.com" in preview.stdout and tls_sink.messages == []
    sent = mx(data_dir, "quarantine", "summary", "--send", "--domain", "example.com")
    assert sent.returncode == 0, sent.stderr
    assert "bob@example.com" in sent.stdout and "TLSv1.3" in sent.stdout and "250" in sent.stdout
    assert tls_sink.wait_for(1) and tls_sink.messages[0].tls_version == "TLSv1.3"
    assert b"Quarantine summary: 1 new message held for you" in tls_sink.messages[0].data
    again = mx(data_dir, "quarantine", "summary", "--send")
    assert again.returncode == 0 and "nothing sent" in again.stdout

    link = mx(data_dir, "quarantine", "signin-link", "bob@example.com")
    assert link.returncode == 0 and re.search(r"^https://\S+/mc/link/\S+$", link.stdout.strip())
    nobody = mx(data_dir, "quarantine", "signin-link", "nobody@elsewhere.test")
    assert nobody.returncode == 1 and "cannot use the Message Center" in nobody.stderr

    released = mx(data_dir, "quarantine", "release", held.id)
    assert released.returncode == 0, released.stderr
    assert f"Delivered {held.id} to bob@example.com" in released.stdout and "TLSv1.3" in released.stdout
    # Command output and the process log are separate streams: stdout holds only the answer.
    assert len(released.stdout.strip().splitlines()) == 1, released.stdout
    assert "quarantine_released" in released.stderr or "released" in released.stderr.lower(), released.stderr
    assert tls_sink.wait_for(2) and tls_sink.messages[1].data.endswith(mail.gtube())
    twice = mx(data_dir, "quarantine", "release", held.id)
    assert twice.returncode == 1 and "not sent again" in twice.stderr and "Traceback" not in twice.stderr
    assert mx(data_dir, "quarantine", "release", "QNOPE").returncode == 1

    purge = mx(data_dir, "quarantine", "purge")
    assert purge.returncode == 0 and "Purged 0 expired" in purge.stdout


def test_org_and_domain_settings_from_the_cli(gateway, held, data_dir):
    out = mx(data_dir, "org", "set", "Example Corp", "--message-links", "off", "--alert-address",
             "sec@example.com", "--notify-virus-admin", "on", "--route-down-minutes", "45")
    assert out.returncode == 0, out.stderr
    shown = json.loads(mx(data_dir, "org", "show", "Example Corp", "--json").stdout)
    assert shown["message_links"] is False and shown["alert_address"] == "sec@example.com"
    assert shown["notify_virus_admin"] is True and shown["route_down_minutes"] == 45
    bad = mx(data_dir, "org", "set", "Example Corp", "--message-links", "perhaps")
    assert bad.returncode == 2 and "message_links" in bad.stderr
    assert mx(data_dir, "org", "show", "No Such Org").returncode == 1
    out = mx(data_dir, "domain", "set", "example.com", "--summary-interval", "6", "--summary-hour", "7",
             "--block-action", "reject")
    assert out.returncode == 0 and "summary_interval: 24 → 6" in out.stdout
    bad = mx(data_dir, "domain", "set", "example.com", "--summary-hour", "24")
    assert bad.returncode == 2 and "summary_hour" in bad.stderr
    bad = mx(data_dir, "domain", "set", "example.com", "--block-action", "bounce")
    assert bad.returncode == 2 and "block_action" in bad.stderr


def test_domain_add_without_org_says_the_message_center_needs_one(tmp_path):
    from tests.support.gateway import init_data_dir
    data = tmp_path / "data"
    init_data_dir(data)
    out = mx(data, "domain", "add", "noorg.example", "--server", "127.0.0.1:2525")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Added noorg.example")
    assert "noorg.example has no organization" in out.stderr and "--org ORG" in out.stderr
    link = mx(data, "quarantine", "signin-link", "bob@noorg.example")
    assert link.returncode == 1 and "has no organization" in link.stderr
    assert mx(data, "org", "add", "Example Corp").returncode == 0
    assert mx(data, "domain", "set", "noorg.example", "--org", "Example Corp").returncode == 0
    link = mx(data, "quarantine", "signin-link", "bob@noorg.example")
    assert link.returncode == 0 and "/mc/link/" in link.stdout
    with_org = mx(data, "domain", "add", "org.example", "--server", "127.0.0.1:2525", "--org", "Example Corp")
    assert with_org.returncode == 0 and "no organization" not in with_org.stderr


def test_the_transaction_id_the_sender_was_given_names_the_quarantined_copy(gateway, tls_sink, held, data_dir):
    """``accepted as TXN`` works with quarantine release/delete when the transaction left one copy;
    with one copy per recipient it is refused and the copies are listed; quarantine list shows it."""
    one = held  # bob@example.com alone: one copy
    out = send(gateway.port, ["alice@example.com", "carol@example.com"], mail.gtube())
    m = re.fullmatch(r"2\.0\.0 Ok: accepted as ([0-9A-F]{16})", out.data[1])
    assert out.data[0] == 250 and m, out.data
    two = m.group(1)
    copies = sorted((r.recipient, r.id) for r in gateway.run(list_quarantine(gateway.store)) if r.txn_id == two)
    assert [rcpt for rcpt, _ in copies] == ["alice@example.com", "carol@example.com"]

    listed = mx(data_dir, "quarantine", "list")
    assert listed.returncode == 0 and "transaction" in listed.stdout
    assert one.txn_id in listed.stdout and two in listed.stdout, listed.stdout
    for command in ("release", "delete"):
        refused = mx(data_dir, "quarantine", command, two)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert f"ID: transaction {two} has 2 quarantined copies:" in refused.stderr
        assert all(f"{qid} ({rcpt}; held)" in refused.stderr for rcpt, qid in copies), refused.stderr
        assert "give one of their quarantine IDs" in refused.stderr
    assert tls_sink.messages == [], "nothing was released"

    released = mx(data_dir, "quarantine", "release", one.txn_id.lower())
    assert released.returncode == 0, released.stderr
    assert f"Delivered {one.id} to bob@example.com" in released.stdout
    assert tls_sink.wait_for(1) and tls_sink.messages[0].rcpt_tos == ["bob@example.com"]
    again = mx(data_dir, "quarantine", "release", one.txn_id)
    assert again.returncode == 1 and "not sent again" in again.stderr
    deleted = mx(data_dir, "quarantine", "delete", copies[0][1])
    assert deleted.returncode == 0 and f"Deleted {copies[0][1]}" in deleted.stdout
    unknown = mx(data_dir, "quarantine", "delete", "0123456789ABCDEF")
    assert unknown.returncode == 1 and "no quarantined message has the ID or transaction ID" in unknown.stderr
