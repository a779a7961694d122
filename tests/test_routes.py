"""Failover between downstream servers, an unreachable route, several routes in one transaction."""

from __future__ import annotations

import socket
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxguard.errors import AlreadyExists
from tests.support.smtp import Raw, message, send


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_failover_to_the_second_server(gateway, tls_sink, add_domain):
    dead = f"127.0.0.1:{_dead_port()}"
    add_domain("example.com", [dead, tls_sink.address])
    out = send(gateway.port, ["alice@example.com"])
    assert out.data[0] == 250
    assert tls_sink.wait_for(1)
    rec = gateway.wait_records(1)[-1]
    assert rec.downstream_host == tls_sink.address


def test_every_server_down_defers_with_451_4_4_1(gateway, add_domain):
    add_domain("example.com", [f"127.0.0.1:{_dead_port()}", f"127.0.0.1:{_dead_port()}"], on_unreachable="defer")
    out = send(gateway.port, ["alice@example.com"])
    code, text = out.rcpt["alice@example.com"]
    assert code == 451 and text.startswith("4.4.1")
    rec = gateway.wait_records(1)[-1]
    assert rec.disposition == "deferred"
    assert rec.downstream[0]["failure"].count("connect failed") == 2


def test_a_server_that_greets_with_554_is_skipped(gateway, tls_sink, add_domain):
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def greet_and_close():
        for _ in range(2):
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"554 5.3.2 Not accepting mail\r\n")
            conn.close()

    threading.Thread(target=greet_and_close, daemon=True).start()
    add_domain("example.com", [f"127.0.0.1:{srv.getsockname()[1]}", tls_sink.address])
    try:
        out = send(gateway.port, ["alice@example.com"])
        assert out.data[0] == 250
        assert tls_sink.wait_for(1)
    finally:
        srv.close()


def test_two_routes_in_one_transaction(gateway, tls_sink, plain_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    add_domain("example.org", [plain_sink.address])
    body = message(subject="two routes")
    out = send(gateway.port, ["alice@example.com", "bob@example.org", "carol@example.com"], body)
    assert out.data[0] == 250
    assert tls_sink.wait_for(1) and plain_sink.wait_for(1)
    assert tls_sink.messages[0].rcpt_tos == ["alice@example.com", "carol@example.com"]
    assert plain_sink.messages[0].rcpt_tos == ["bob@example.org"]
    for sink in (tls_sink, plain_sink):
        assert sink.messages[0].data.endswith(body)
    # "for <...>" appears only when the copy has one recipient.
    assert b"for <bob@example.org>" in plain_sink.messages[0].data
    assert b"for <" not in tls_sink.messages[0].data.split(b"\r\n\r\n")[0]
    rec = gateway.wait_records(1)[-1]
    assert rec.disposition == "delivered" and len(rec.downstream) == 2


def test_one_route_down_others_fine_at_rcpt(gateway, tls_sink, add_domain):
    add_domain("example.com", [tls_sink.address])
    add_domain("down.example", [f"127.0.0.1:{_dead_port()}"], on_unreachable="defer")
    out = send(gateway.port, ["alice@example.com", "bob@down.example"])
    assert out.rcpt["bob@down.example"][0] == 451
    assert out.data[0] == 250
    assert tls_sink.wait_for(1) and tls_sink.messages[0].rcpt_tos == ["alice@example.com"]
    rec = gateway.wait_records(1)[-1]
    assert rec.disposition == "partial"
    by_rcpt = {r["rcpt"]: r for r in rec.results}
    assert by_rcpt["alice@example.com"]["disposition"] == "delivered"
    assert by_rcpt["bob@down.example"]["disposition"] == "deferred"


def test_downstream_connection_is_reopened_after_it_idled_out(gateway, tls_sink, add_domain):
    """The downstream drops the idle connection between two transactions of one inbound session."""
    import smtplib
    import ssl
    add_domain("example.com", [tls_sink.address])
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
        c.ehlo()
        c.starttls(context=ctx)
        c.ehlo()
        c.sendmail("a@sender.test", ["alice@example.com"], message(subject="one"))
        assert tls_sink.wait_for(1)
        tls_sink.drop_connections()  # the downstream's idle timeout
        time.sleep(0.2)
        c.sendmail("a@sender.test", ["alice@example.com"], message(subject="two"))
    assert tls_sink.wait_for(2)
    assert tls_sink.connections == 2, "a fresh downstream connection replaced the dropped one"



def test_downstream_connections_are_reused_across_sessions(gateway, tls_sink, add_domain):
    """The connection cache: the next session for a route takes the idle connection of the last."""
    add_domain("example.com", [tls_sink.address], downstream_tls="required")
    for i in range(3):
        assert send(gateway.port, ["alice@example.com"], message(subject=f"pooled {i}")).data[0] == 250
        time.sleep(0.05)
    assert tls_sink.wait_for(3)
    assert tls_sink.connections == 1, "one downstream TLS connection carried all three sessions"
    assert all(m.tls for m in tls_sink.messages)
    recs = gateway.wait_records(3)
    assert [r.downstream[0]["reused"] for r in recs[-3:]] == [False, True, True]
    # The server drops idle connections: the next session notices at MAIL and opens a fresh one.
    tls_sink.drop_connections()
    time.sleep(0.2)
    assert send(gateway.port, ["alice@example.com"], message(subject="after drop")).data[0] == 250
    assert tls_sink.wait_for(4) and tls_sink.connections == 2


def test_a_policy_change_never_reuses_a_connection_made_under_the_old_one(gateway, tls_sink, add_domain, ca_file):
    from mxguard.services.domains import update_domain
    add_domain("example.com", [tls_sink.address], downstream_tls="opportunistic")
    assert send(gateway.port, ["alice@example.com"]).data[0] == 250
    gateway.run(update_domain(gateway.store, "example.com", downstream_tls="verify", tls_ca_file=str(ca_file)))
    gateway.reload()
    assert send(gateway.port, ["alice@example.com"]).data[0] == 250
    assert tls_sink.wait_for(2) and tls_sink.connections == 2
    assert gateway.wait_records(2)[-1].downstream_verified is True


_ACCEPTED, _REFUSED = "alice@example.com", "mallory@elsewhere.test"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rcpts=st.lists(st.sampled_from([_ACCEPTED, _REFUSED]), min_size=1, max_size=5),
       ending=st.sampled_from(["QUIT", "RSET", "disconnect"]))
def test_a_transaction_ended_before_data_is_never_logged_as_partly_delivered(gateway, tls_sink, add_domain,
                                                                             rcpts, ending):
    """Accepted and refused recipients, then QUIT, RSET or a dropped connection before DATA: nothing
    was delivered, so the transaction is ``aborted`` when any recipient was accepted (never
    ``partial``, which reads as partly delivered), and each recipient keeps its own outcome."""
    try:
        add_domain("example.com", [tls_sink.address])
    except AlreadyExists:  # an earlier example of this test added it
        pass
    before = len(gateway.records)
    raw = Raw(gateway.port)
    try:
        raw.cmd("EHLO client.sender.test")
        assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
        codes = [raw.cmd(f"RCPT TO:<{rcpt}>")[:3] for rcpt in rcpts]
        assert codes == ["250" if rcpt == _ACCEPTED else "550" for rcpt in rcpts]
        if ending != "disconnect":
            raw.cmd(ending)
    finally:
        raw.sock.close()
    rec = gateway.wait_records(before + 1)[before]
    outcomes = {r["rcpt"]: r["disposition"] for r in rec.results}
    if _ACCEPTED in rcpts:
        assert rec.disposition == "aborted", (rcpts, ending, rec.results)
        assert outcomes[_ACCEPTED] == "aborted"
    else:
        assert rec.disposition not in ("aborted", "partial", "delivered")
    if _REFUSED in rcpts:
        assert outcomes[_REFUSED] != "aborted"
