"""The connection table that ``serve --workers N`` shares between its processes, as a state machine.

Simulated workers (one :class:`SharedConnectionCounter` per slot, in this process, on the
one shared map) admit, release and crash in random order; a plain model of the open
connections says what the limits allow.
"""

from __future__ import annotations

import collections

from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mxguard.config import SmtpSettings
from mxguard.smtp.limits import (TOO_MANY_CONNECTIONS, TOO_MANY_FROM_CLIENT, ConnectionCounter, ConnectionTable)

WORKERS = 3
CLIENTS = ["127.0.0.1", "127.0.0.2", "192.0.2.7", "2001:db8::1", "::1", "198.51.100.20"]
KEY = bytes(range(16))


class Table(RuleBasedStateMachine):
    """Admissions one after the other (no race): the limits hold exactly, release undoes admit."""

    def __init__(self):
        super().__init__()
        self.limits = SmtpSettings(max_connections=7, max_connections_per_client=3)
        self.table = ConnectionTable(WORKERS, buckets=64, key=KEY)
        self.counters = [self.table.counter(w, self.limits) for w in range(WORKERS)]
        # The model: open connections per (worker, client).
        self.open: collections.Counter[tuple[int, str]] = collections.Counter()
        self.buckets = {c: self.table.bucket(c) for c in CLIENTS}

    def _model_total(self) -> int:
        return sum(self.open.values())

    def _model_client(self, client: str) -> int:
        return sum(n for (_, c), n in self.open.items() if c == client)

    def _bucket_mates_elsewhere(self, worker: int, client: str) -> int:
        """Other workers' connections from clients in ``client``'s bucket (what the table may count)."""
        return sum(n for (w, c), n in self.open.items()
                   if w != worker and self.buckets[c] == self.buckets[client])

    @rule(worker=st.integers(0, WORKERS - 1), client=st.sampled_from(CLIENTS))
    def admit(self, worker, client):
        before = bytes(self.table._map)
        reply = self.counters[worker].admit(client)
        if self._model_total() >= self.limits.max_connections:
            assert reply is TOO_MANY_CONNECTIONS
        else:
            counted = self.open[(worker, client)] + self._bucket_mates_elsewhere(worker, client)
            refused = counted >= self.limits.max_connections_per_client
            assert (reply is TOO_MANY_FROM_CLIENT) == refused, (reply, counted)
            if self._model_client(client) >= self.limits.max_connections_per_client:
                assert reply is TOO_MANY_FROM_CLIENT  # never late
        if reply is None:
            self.open[(worker, client)] += 1
            # release undoes admit, byte for byte; then admit again to keep the connection.
            self.counters[worker].release(client)
            assert bytes(self.table._map) == before
            assert self.counters[worker].admit(client) is None
        else:
            assert bytes(self.table._map) == before  # a refusal writes nothing

    @precondition(lambda self: bool(+self.open))
    @rule(data=st.data())
    def release(self, data):
        worker, client = data.draw(st.sampled_from(sorted(+self.open)))
        self.counters[worker].release(client)
        self.open[(worker, client)] -= 1

    @rule(worker=st.integers(0, WORKERS - 1), client=st.sampled_from(CLIENTS))
    def release_unknown(self, worker, client):
        """A release without an admission (cannot happen in the front door) changes nothing."""
        if self.open[(worker, client)] == 0:
            before = bytes(self.table._map)
            self.counters[worker].release(client)
            assert bytes(self.table._map) == before

    @rule(worker=st.integers(0, WORKERS - 1))
    def crash(self, worker):
        """The supervisor clears a dead worker's slots and starts a fresh one in its place."""
        self.table.clear(worker)
        self.counters[worker] = self.table.counter(worker, self.limits)
        for key in [k for k in self.open if k[0] == worker]:
            del self.open[key]

    @invariant()
    def sums_match_the_model(self):
        for w in range(WORKERS):
            assert self.table.worker_total(w) == sum(n for (ow, _), n in self.open.items() if ow == w)
            for b in range(self.table.buckets):
                count = self.table.bucket_count(w, b)
                assert count >= 0
                assert count == sum(n for (ow, c), n in self.open.items() if ow == w and self.buckets[c] == b)
        total = self.table.total()
        assert 0 <= total <= self.limits.max_connections
        for client in CLIENTS:
            assert self._model_client(client) <= self.limits.max_connections_per_client


TestTable = Table.TestCase
TestTable.settings = hsettings(max_examples=150, stateful_step_count=60, deadline=None)


class Colliding(Table):
    """Two buckets only: clients share buckets, so refusals may come early but never late."""

    def __init__(self):
        super().__init__()
        self.table = ConnectionTable(WORKERS, buckets=2, key=KEY)
        self.counters = [self.table.counter(w, self.limits) for w in range(WORKERS)]
        self.buckets = {c: self.table.bucket(c) for c in CLIENTS}


TestColliding = Colliding.TestCase
TestColliding.settings = hsettings(max_examples=80, stateful_step_count=60, deadline=None)


def test_one_slot_behaves_as_the_process_counter():
    """``ConnectionTable(1)`` and the in-process :class:`ConnectionCounter` give the same answers."""
    limits = SmtpSettings(max_connections=4, max_connections_per_client=2)
    shared = ConnectionTable(1).counter(0, limits)
    alone = ConnectionCounter(limits)
    steps = [("a", "10.0.0.1")] * 3 + [("a", "10.0.0.2")] * 3 + [("r", "10.0.0.1"), ("a", "10.0.0.3"),
                                                                  ("a", "10.0.0.3"), ("r", "10.0.0.9")]
    for op, client in steps:
        if op == "a":
            assert shared.admit(client) == alone.admit(client), client
        else:
            shared.release(client)
            alone.release(client)
    assert shared.table.total() == alone.total == 4


def test_the_bucket_hash_is_keyed():
    """Without knowing the random key a sender cannot choose colliding addresses: two tables differ."""
    addresses = [f"203.0.113.{i}" for i in range(64)]
    a, b = ConnectionTable(1), ConnectionTable(1)
    assert [a.bucket(x) for x in addresses] != [b.bucket(x) for x in addresses]
    same = ConnectionTable(1, key=KEY), ConnectionTable(1, key=KEY)
    assert [same[0].bucket(x) for x in addresses] == [same[1].bucket(x) for x in addresses]
