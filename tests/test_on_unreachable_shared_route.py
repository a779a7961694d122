"""``--on-unreachable`` is each recipient's own domain's, also when domains share a downstream server.

Several domains point at one unreachable server (one route, one leg of the
transaction); a ``spool`` domain's recipient is accepted for the spool and a
``defer`` domain's gets ``451 4.4.1``, in whatever order the sender gives
them, and the spool holds exactly the recipients whose domains spool.
"""

from __future__ import annotations

import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings as hsettings
from hypothesis import strategies as st

from mxguard.spool import queue
from tests.support.smtp import message, send

#: domain -> its on_unreachable
DOMAINS = {"dd.test": "defer", "dd2.test": "spool", "dd3.test": "spool", "dd4.test": "defer"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def shared_down(gateway, add_domain):
    """Every domain of :data:`DOMAINS` on one closed port (one shared route)."""
    server = f"127.0.0.1:{_closed_port()}"
    for name, choice in DOMAINS.items():
        add_domain(name, [server], on_unreachable=choice)
    return gateway


def _spooled(gateway, txn_id: str) -> list[str]:
    entries = gateway.run(queue.list_entries(gateway.store, limit=None))
    return sorted(r["rcpt"] for e in entries if e.txn_id == txn_id for r in e.recipients)


def _check(gateway, rcpts: list[str]) -> None:
    out = send(gateway.port, rcpts, message(to=rcpts[0]))
    for rcpt in rcpts:
        code, text = out.rcpt[rcpt]
        if DOMAINS[rcpt.rpartition("@")[2]] == "spool":
            assert code == 250 and text.startswith("2.1.5"), (rcpts, rcpt, out.rcpt)
        else:
            assert code == 451 and text.startswith("4.4.1"), (rcpts, rcpt, out.rcpt)
    wanted = sorted(r for r in rcpts if DOMAINS[r.rpartition("@")[2]] == "spool")
    if not wanted:
        assert out.data is None, "nothing was accepted"
        return
    code, text = out.data
    assert code == 250, out.data
    txn_id = re.search(r"queued as ([0-9A-F]+)", text).group(1)
    assert _spooled(gateway, txn_id) == wanted, (rcpts, text)


def test_the_reported_orders(shared_down):
    _check(shared_down, ["a@dd.test"])
    _check(shared_down, ["a@dd2.test", "b@dd.test"])
    _check(shared_down, ["b@dd.test", "a@dd2.test"])


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(sorted(DOMAINS)), min_size=1, max_size=5))
def test_every_order_of_recipients_gets_its_own_domains_choice(shared_down, domains):
    rcpts = [f"u{i}@{d}" for i, d in enumerate(domains)]
    _check(shared_down, rcpts)


def test_spool_entry_is_filed_under_a_spooled_recipients_domain(shared_down):
    out = send(shared_down.port, ["b@dd.test", "a@dd2.test"], message(to="a@dd2.test"))
    txn_id = re.search(r"queued as ([0-9A-F]+)", out.data[1]).group(1)
    entries = [e for e in shared_down.run(queue.list_entries(shared_down.store, limit=None)) if e.txn_id == txn_id]
    assert [e.domain for e in entries] == ["dd2.test"], "not the refused first recipient's defer domain"


@pytest.mark.parametrize("choices, spooled", [(("spool", "spool"), True), (("spool", "defer"), False),
                                              (("defer", "spool"), False)])
def test_4xx_after_data_on_a_shared_server_spools_only_when_every_domain_spools(
        gateway, add_domain, tls_sink, choices, spooled):
    """One reply after DATA serves the whole copy: a ``defer`` domain among its recipients keeps
    the sender retrying (nothing lost) rather than the gateway holding that domain's mail."""
    for name, choice in zip(("x1.test", "x2.test"), choices):
        add_domain(name, [tls_sink.address], on_unreachable=choice)
    tls_sink.data_reply = "451 4.3.0 Queue full, try later"
    out = send(gateway.port, ["a@x1.test", "b@x2.test"], message(to="a@x1.test"))
    assert all(code == 250 for code, _ in out.rcpt.values())
    if spooled:
        assert out.data[0] == 250 and "held for delivery" in out.data[1], out.data
    else:
        assert out.data[0] == 451 and out.data[1].startswith("4.3.0"), out.data
        assert gateway.run(queue.list_entries(gateway.store, limit=None)) == []
