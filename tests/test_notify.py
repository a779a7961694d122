"""Notifications and alerts arrive at the downstream server over TLS, once per condition, each switchable.

A real gateway, a downstream server with STARTTLS and a CA-signed certificate
(``verify``), a second one whose certificate expires in five days, a route to
a closed port, and a clamd address nobody listens on.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from email import message_from_bytes, policy

import pytest
from sqlalchemy import select, update

from mxguard.filtering.pipeline import FilterPipeline
from mxguard.notify import Notifier
from mxguard.services import orgs, orgsettings
from mxguard.sink import ThreadedSink
from mxguard.storage.models import AlertState, SpoolEntry, utcnow
from tests.support import mail
from tests.support.smtp import send


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text_of(data: bytes) -> str:
    return message_from_bytes(data, policy=policy.default).get_content()


@pytest.fixture
def org(gateway, tls_sink, add_domain, ca_file):
    """Example Corp owns example.com (downstream 'verify'); its alerts go to security@example.com."""
    gateway.run(orgs.add_org(gateway.store, "Example Corp"))
    add_domain("example.com", [tls_sink.address], downstream_tls="verify", tls_ca_file=str(ca_file),
               org="Example Corp")
    gateway.run(orgsettings.update_settings(gateway.store, "Example Corp", alert_address="security@example.com"))
    return gateway


def test_virus_notification_to_recipient_and_admin_over_tls(org, tls_sink):
    gw = org
    out = send(gw.port, ["bob@example.com"], mail.eicar_variants()["base64"])
    assert out.data[0] == 554
    gw.run(gw.gateway.notifier.drain())
    time.sleep(0.3)
    assert tls_sink.messages == [], "virus notifications are off by default"

    gw.run(orgsettings.update_settings(gw.store, "Example Corp", notify_virus_recipient="on",
                                       notify_virus_admin="on"))
    out = send(gw.port, ["bob@example.com"], mail.eicar_variants()["base64"])
    assert out.data[0] == 554
    gw.run(gw.gateway.notifier.drain())
    assert tls_sink.wait_for(2)
    by_rcpt = {m.rcpt_tos[0]: m for m in tls_sink.messages}
    assert set(by_rcpt) == {"bob@example.com", "security@example.com"}
    for m in by_rcpt.values():
        assert m.tls_version == "TLSv1.3" and m.mail_from in ("", "<>")
        assert b"Auto-Submitted: auto-generated" in m.data
        assert b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE" not in m.data, "the virus is never attached"
    assert "EICAR-Test-File" in text_of(by_rcpt["bob@example.com"].data)
    assert "bob@example.com: virus: EICAR-Test-File (reject)" in text_of(by_rcpt["security@example.com"].data)


def test_route_down_alert_once_per_condition_over_tls(org, tls_sink, add_domain):
    gw = org
    add_domain("branch.example.com", [f"127.0.0.1:{closed_port()}"], org="Example Corp")
    out = send(gw.port, ["dana@branch.example.com"], mail.plain(to="dana@branch.example.com"))
    assert out.data[0] == 250 and "held for delivery" in out.data[1]
    notifier: Notifier = gw.gateway.notifier
    assert gw.run(notifier.check_routes()) == [], "not yet: the organization allows 30 minutes"

    later = utcnow() + dt.timedelta(minutes=31)
    alerts = gw.run(notifier.check_routes(later))
    assert [a.key for a in alerts] == ["route:branch.example.com"]
    assert tls_sink.wait_for(1)
    alert = tls_sink.messages[0]
    assert alert.rcpt_tos == ["security@example.com"] and alert.tls_version == "TLSv1.3"
    assert b"Route to branch.example.com unreachable for 3" in alert.data
    assert "1 message(s) wait in the spool" in text_of(alert.data)

    gw.run(notifier.check_routes(later + dt.timedelta(minutes=5)))
    time.sleep(0.3)
    assert len(tls_sink.messages) == 1, "no repeat while the condition lasts (until notify.repeat_after)"
    gw.run(notifier.check_routes(later + dt.timedelta(days=1, minutes=1)))
    assert tls_sink.wait_for(2), "repeated after a day"

    async def deliver_spooled():
        async with gw.store.session() as session:
            await session.execute(update(SpoolEntry).values(status="delivered"))
            await session.commit()
            return (await session.execute(select(AlertState))).scalars().all()

    gw.run(deliver_spooled())
    gw.run(notifier.check_routes(later + dt.timedelta(days=1, minutes=2)))

    async def states():
        async with gw.store.session() as session:
            return {s.key: s.active for s in (await session.execute(select(AlertState))).scalars().all()}

    assert gw.run(states()) == {"route:branch.example.com": False}

    gw.run(orgsettings.update_settings(gw.store, "Example Corp", notify_route_down="off"))
    send(gw.port, ["dana@branch.example.com"], mail.plain(to="dana@branch.example.com"))
    gw.run(notifier.check_routes(utcnow() + dt.timedelta(minutes=40)))
    time.sleep(0.3)
    assert len(tls_sink.messages) == 2, "switched off for the organization"


def test_certificate_expiry_alerts_over_tls(org, tls_sink, add_domain, ca):
    gw = org
    soon = ca.issue_cert("127.0.0.1", "soon.example.com",
                         not_after=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=5))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    soon.configure_cert(ctx)
    with ThreadedSink(tls_context=ctx, hostname="soon.example.com") as expiring:
        add_domain("soon.example.com", [expiring.address], downstream_tls="required", org="Example Corp")
        alerts = gw.run(gw.gateway.notifier.check_certificates())
    assert [a.key.split(":")[1] for a in alerts] == ["soon.example.com"]
    assert tls_sink.wait_for(1)
    alert = tls_sink.messages[0]
    assert alert.rcpt_tos == ["security@example.com"] and alert.tls_version == "TLSv1.3"
    text = text_of(alert.data)
    assert f"{expiring.address} of soon.example.com" in text and "expires on" in text
    assert b"expires in 4 days" in alert.data or b"expires in 5 days" in alert.data

    # The gateway's own certificate, with a warning window longer than its validity.
    settings = gw.gateway.settings.model_copy(deep=True)
    settings.data_dir = gw.gateway.settings.data_dir
    settings.notify.cert_warning_days = 36500
    alerts = gw.run(Notifier(gw.store, settings).check_certificates())
    assert any(a.key.startswith("cert:gateway:") for a in alerts)
    assert tls_sink.wait_for(2)
    assert any(b"The gateway certificate of mx.gw.test expires" in m.data for m in tls_sink.messages)


def test_engine_down_alert_over_tls(org, tls_sink):
    gw = org
    settings = gw.gateway.settings.model_copy(deep=True)
    settings.data_dir = gw.gateway.settings.data_dir
    settings.filters.virus_engines = ["clamd"]
    settings.filters.clamd_address = f"127.0.0.1:{closed_port()}"
    pipeline = FilterPipeline.from_settings(settings)
    notifier = Notifier(gw.store, settings, pipeline)
    try:
        alerts = gw.run(notifier.check_engines())
    finally:
        gw.run(pipeline.close())
    assert [a.key for a in alerts] == ["engine:clamd"]
    assert tls_sink.wait_for(1)
    alert = tls_sink.messages[0]
    assert alert.rcpt_tos == ["security@example.com"] and alert.tls_version == "TLSv1.3"
    assert b"Filtering engine clamd is down" in alert.data
    # The gateway's own engines (YARA, built-in scorer, policy) answer: nothing to report.
    assert gw.run(gw.gateway.notifier.check_engines()) == []
