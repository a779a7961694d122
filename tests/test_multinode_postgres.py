"""Several gateways on one PostgreSQL, as the README says they may run: proven with two real
``mxguard serve`` processes, each with its own data dir, sharing the database and the sealing keys."""

from __future__ import annotations

import collections
import shutil
import signal
import smtplib
import time

from mxguard.config import SpoolSettings
from mxguard.sink import ThreadedSink
from tests.support.gateway import init_data_dir
from tests.support.smtp import send
from tests.test_cli_filters import mx
from tests.test_spool_durability import _free_port, _ids, _msg, _serve

N = 200


def _wait_ids(sink: ThreadedSink, want: int, timeout: float) -> collections.Counter:
    deadline = time.monotonic() + timeout
    while len(_ids(sink)) < want and time.monotonic() < deadline:
        time.sleep(0.05)
    return _ids(sink)


def _rcpt_code(port: int, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.sender.test", timeout=10) as client:
        client.ehlo()
        client.mail("a@sender.test")
        return client.rcpt(rcpt)[0]


def test_two_nodes_share_spool_takeover_and_configuration(tmp_path, pg_url):
    dirs = [tmp_path / "node-a", tmp_path / "node-b"]
    for i, d in enumerate(dirs):
        init_data_dir(d, hostname=f"mx{i + 1}.gw.test", database_url=pg_url)
    # One spool, one set of keys: what one node sealed, the other must open.
    shutil.copy(dirs[0] / "keys" / "sealing.keys", dirs[1] / "keys" / "sealing.keys")
    sink_port = _free_port()
    added = mx(dirs[0], "domain", "add", "example.com", "--server", f"127.0.0.1:{sink_port}")
    assert added.returncode == 0, added.stderr
    ports = [_free_port(), _free_port()]
    nodes = [_serve(d, p) for d, p in zip(dirs, ports)]
    try:
        # 1. The downstream is down: 200 messages through both nodes, all spooled.
        started = time.monotonic()
        for i in range(N):
            out = send(ports[i % 2], ["alice@example.com"], _msg(i))
            assert out.data[0] == 250 and "held" in out.data[1], out.data
        spool_s = time.monotonic() - started
        # 2. It comes back: every message exactly once, whichever node delivers it.
        with ThreadedSink(port=sink_port) as sink:
            started = time.monotonic()
            counts = _wait_ids(sink, N, 60)
            drain_s = time.monotonic() - started
            assert len(counts) == N and set(counts.values()) == {1}, "each message exactly once"
        # 3. Mid-delivery SIGKILL of one node: the other takes its leased entries over.
        for i in range(N, N + 40):
            assert send(ports[i % 2], ["alice@example.com"], _msg(i)).data[0] == 250
        with ThreadedSink(port=sink_port) as sink:
            sink.data_delay = 0.2
            deadline = time.monotonic() + 20
            while len(sink.messages) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            nodes[0].send_signal(signal.SIGKILL)
            nodes[0].wait(10)
            killed_at = time.monotonic()
            at_kill = len(sink.messages)
            assert at_kill < 40, "the kill must land mid-delivery"
            sink.data_delay = 0
            counts = _wait_ids(sink, 40, 40)
            takeover_s = time.monotonic() - killed_at
        assert len(counts) == 40, "the survivor delivered what the killed node had leased"
        duplicates = sum(c - 1 for c in counts.values())
        # Only a message the downstream had taken when the node died, before its spool row said so,
        # can arrive twice: at most one per delivery in flight (spool.route_concurrency).
        assert max(counts.values()) <= 2 and duplicates <= SpoolSettings().route_concurrency
        # 4. A change made through one node's data dir applies on the other within 2 s.
        assert _rcpt_code(ports[1], "bob@new.example") == 550
        added = mx(dirs[0], "domain", "add", "new.example", "--server", f"127.0.0.1:{sink_port}")
        assert added.returncode == 0, added.stderr
        changed = time.monotonic()
        while _rcpt_code(ports[1], "bob@new.example") != 250 and time.monotonic() - changed < 5:
            time.sleep(0.05)
        config_s = time.monotonic() - changed
        assert config_s < 2.0, f"the other node saw the new domain after {config_s:.2f}s"
        print(f"two nodes, one PostgreSQL: {N} messages spooled through both in {spool_s:.1f}s, delivered once "
              f"each in {drain_s:.1f}s after the downstream came back; after SIGKILL of one node mid-delivery "
              f"({at_kill} of 40 arrived) the other finished in {takeover_s:.1f}s with {duplicates} duplicates; "
              f"a new domain applied on the other node in {config_s:.2f}s")
    finally:
        for node in nodes:
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
                try:
                    node.wait(20)
                except Exception:  # noqa: BLE001 - a node that does not stop is killed
                    node.kill()
