"""A route that leads back to this gateway: refused as a mail loop (``554 5.4.6``), never spooled.

The downstream server's greeting or EHLO reply naming the gateway's own host
name identifies it (as Postfix does: "mail for X loops back to myself").
"""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from mxguard.sink import ThreadedSink
from mxguard.smtp import delivery
from mxguard.spool import queue
from tests.support.smtp import message, send


def test_a_domain_pointed_at_the_gateway_itself_is_refused_as_a_loop(gateway, add_domain, tls_sink):
    add_domain("loop.test", [f"127.0.0.1:{gateway.port}"])
    add_domain("example.com", [tls_sink.address])
    started = time.monotonic()
    out = send(gateway.port, ["bob@loop.test"], message(to="bob@loop.test"))
    code, text = out.rcpt["bob@loop.test"]
    assert code == 554 and text.startswith("5.4.6") and "loops back to myself" in text, out.rcpt
    assert time.monotonic() - started < 10, "one hop, not a chain of connections to itself"
    assert gateway.run(queue.list_entries(gateway.store, limit=None)) == [], "not spooled"
    rec = gateway.wait_records(1)[-1]
    assert rec.results[0]["code"] == 554
    # The same session still serves other domains, and the next loop is refused the same way.
    out = send(gateway.port, ["bob@loop.test", "alice@example.com"], message(to="alice@example.com"))
    assert out.rcpt["bob@loop.test"][0] == 554 and out.rcpt["alice@example.com"][0] == 250
    assert out.data[0] == 250 and tls_sink.wait_for(1)
    assert tls_sink.messages[0].rcpt_tos == ["alice@example.com"]


def test_a_loop_server_is_skipped_for_the_next_server_of_the_route(gateway, add_domain, tls_sink):
    add_domain("example.com", [f"127.0.0.1:{gateway.port}", tls_sink.address])
    out = send(gateway.port, ["alice@example.com"], message(to="alice@example.com"))
    assert out.rcpt["alice@example.com"][0] == 250 and out.data[0] == 250
    assert tls_sink.wait_for(1) and tls_sink.messages[0].rcpt_tos == ["alice@example.com"]
    time.sleep(0.3)
    assert len(gateway.records) == 1, "one transaction: the gateway did not relay to itself"
    assert gateway.run(queue.list_entries(gateway.store, limit=None)) == []


def test_a_server_greeting_with_our_name_is_a_loop_and_a_similar_name_is_not(gateway, add_domain):
    with ThreadedSink(hostname="MX.GW.TEST.") as same, ThreadedSink(hostname="mx.gw.test.example") as other:
        add_domain("same.test", [same.address])
        add_domain("other.test", [other.address])
        out = send(gateway.port, ["a@same.test", "b@other.test"], message(to="b@other.test"))
        assert out.rcpt["a@same.test"][0] == 554 and out.rcpt["b@other.test"][0] == 250
        assert out.data[0] == 250 and other.wait_for(1)
        time.sleep(0.2)
        assert same.messages == []


@given(st.sampled_from(["mx.gw.test", "MX.gw.Test", "mx.gw.test."]), st.sampled_from(["", " ESMTP", " Hello x"]))
def test_names_host_ignores_case_and_a_trailing_dot(name, rest):
    assert delivery._names_host(name + rest, "mx.gw.test")
    assert not delivery._names_host("x" + name + rest, "mx.gw.test")
    assert not delivery._names_host(name + "x" + rest, "mx.gw.test")
    assert not delivery._names_host(name + rest, "")


def test_domain_add_and_set_warn_when_the_server_is_the_gateways_own_listener(tmp_path):
    from tests.test_cli import mx

    d = tmp_path / "d"
    mx("init", "--hostname", "mx.loop.test", data_dir=d)
    toml = d / "mxguard.toml"
    toml.write_text(toml.read_text().replace('"0.0.0.0:25"', '"0.0.0.0:2525"'))
    out = mx("domain", "add", "loop.test", "--server", "127.0.0.1:2525", data_dir=d)
    assert "loop" in out.stderr and "554 5.4.6" in out.stderr and "Traceback" not in out.stderr
    out = mx("domain", "add", "fine.test", "--server", "127.0.0.1:2526", data_dir=d)
    assert "554 5.4.6" not in out.stderr
    out = mx("domain", "set", "fine.test", "--server", "mx.loop.test:2525", data_dir=d)
    assert "554 5.4.6" in out.stderr
    out = mx("domain", "set", "fine.test", "--server", "mail.other.test:2525", data_dir=d)
    assert "554 5.4.6" not in out.stderr
