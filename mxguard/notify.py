"""Notifications and alerts, each sent through the delivery path (so TLS applies per domain policy).

* **Virus notification** — when the filters stop a virus, the recipient
  (switch ``notify_virus_recipient``) and the organization's alert address
  (``notify_virus_admin``) are told: sender, subject, threat, what happened.
  The message itself is never attached.
* **Route unreachable** — a domain whose mail has waited in the spool longer
  than the organization's ``route_down_minutes`` (``notify_route_down``).
* **Certificate expiring** — the gateway's own certificate, each certificate
  it presents by SNI (:mod:`mxguard.services.sni_certificates`; told to the
  organization of the domain its name is under), or a downstream server's
  (read with :func:`mxguard.services.probe.probe_domain`), expiring within
  ``notify.cert_warning_days`` days (``notify_cert_expiry``).
* **Engine down** — a filtering engine that does not answer its probe
  (``notify_engine_down``).

Alerts go to each concerned organization's ``alert_address`` when its switch
is on, and always to the operator's ``notify.admin_address`` when set. They
are remembered in ``alert_state``: an alert is sent when its condition
starts, again only after ``notify.repeat_after`` seconds while it lasts, and
forgotten when the condition ends — no alert storm. Messages go out with
:func:`mxguard.own_mail.send_own_message`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from mxguard.config import Settings
from mxguard.own_mail import SendResult, send_own_message
from mxguard.services.domains import list_domains
from mxguard.services.orgsettings import DEFAULTS, OrgSettings, settings_by_domain
from mxguard.storage.db import Store
from mxguard.storage.models import AlertState, SpoolEntry, utcnow

log = structlog.get_logger("mxguard.notify")


def own_message(hostname: str, to: str, subject: str, text: str, *, kind: str) -> bytes:
    """A plain-text message from the gateway (``Auto-Submitted: auto-generated``, RFC 3834)."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"mxguard <postmaster@{hostname}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(dt.datetime.now(dt.timezone.utc))
    msg["Message-ID"] = make_msgid(domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-MXGuard-Notification"] = kind
    msg.set_content(text)
    return msg.as_bytes()


@dataclass(frozen=True)
class Alert:
    """A condition to tell people about.

    Attributes:
        key: identifies the condition (``route:example.com``, ``engine:clamd``, ``cert:...``).
        kind: ``route-down``, ``cert-expiry`` or ``engine-down`` (selects the organizations' switch).
        subject, text: the message.
        domains: the domains concerned (their organizations are told); ``None``: every organization.
    """

    key: str
    kind: str
    subject: str
    text: str
    domains: tuple[str, ...] | None = None


SWITCH_FOR = {"route-down": "notify_route_down", "cert-expiry": "notify_cert_expiry",
              "engine-down": "notify_engine_down"}


class Notifier:
    """Sends notifications and runs the alert checks.

    Args:
        store: the database.
        settings: ``notify.*``, ``tls.cert_file``, ``downstream`` timeouts, ``hostname``.
        pipeline: the filter pipeline whose engines are probed (``None``: no engine checks).
    """

    def __init__(self, store: Store, settings: Settings, pipeline=None):
        self.store = store
        self.settings = settings
        self.pipeline = pipeline
        self._tasks: set[asyncio.Task] = set()
        self.sent: list[SendResult] = []

    # -- virus notifications -----------------------------------------------------------

    def virus_found(self, tx, plan, content: bytes) -> None:
        """The proxy's hook (not awaited): notify about a transaction whose message carried a virus."""
        from mxguard.smtp.headers import summarize

        infected = [(rcpt, d) for rcpt, d in plan.by_rcpt.items() if d.category == "virus"]
        if not infected:
            return
        task = asyncio.get_running_loop().create_task(self.notify_virus(
            txn_id=tx.txn_id, sender=tx.mail_from, subject=summarize(content)[0],
            recipients=[(rcpt, d.action, d.reason) for rcpt, d in infected]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def notify_virus(self, *, txn_id: str, sender: str, subject: str,
                           recipients: list[tuple[str, str, str]]) -> list[SendResult]:
        """Tell each recipient (and their organizations' alert addresses) about a stopped virus.

        Args:
            recipients: ``(address, action, reason)``; action ``reject`` or ``quarantine``,
                reason e.g. ``virus: EICAR-Test-File``.
        """
        results: list[SendResult] = []
        try:
            orgs = await settings_by_domain(self.store)
            admins: dict[str, list[str]] = {}
            for rcpt, action, reason in recipients:
                org = orgs.get(rcpt.rpartition("@")[2].lower(), DEFAULTS)
                what = ("it was refused and not delivered" if action == "reject"
                        else "it is held in the quarantine; only an administrator can release it")
                if org.notify_virus_recipient:
                    text = (f"A message addressed to you contained a virus ({reason.removeprefix('virus: ')}).\n\n"
                            f"  From:    {sender or '<>'}\n  Subject: {subject or '(no subject)'}\n"
                            f"  Id:      {txn_id}\n\nThe mail gateway {self.settings.hostname} stopped it: {what}.\n"
                            "Nothing needs to be done; do not ask the sender to send it again unchanged.\n")
                    message = own_message(self.settings.hostname, rcpt, "Virus stopped: a message to you was "
                                          "not delivered", text, kind="virus")
                    results.append(await send_own_message(self.store, self.settings, rcpt, message,
                                                          kind="virus-notification"))
                if org.notify_virus_admin and org.alert_address:
                    admins.setdefault(org.alert_address, []).append(f"  {rcpt}: {reason} ({action})")
            for address, lines in admins.items():
                text = (f"The mail gateway {self.settings.hostname} stopped a message carrying a virus.\n\n"
                        f"  From:    {sender or '<>'}\n  Subject: {subject or '(no subject)'}\n  Id:      {txn_id}\n"
                        "  Recipients:\n" + "\n".join(lines) + "\n")
                message = own_message(self.settings.hostname, address, f"[mxguard] Virus stopped ({txn_id})", text,
                                      kind="virus")
                results.append(await send_own_message(self.store, self.settings, address, message,
                                                      kind="virus-notification"))
        except Exception as exc:  # noqa: BLE001 - a notification failure must never touch mail flow
            log.error("virus notification failed", txn=txn_id, error=repr(exc)[:300])
        self.sent += results
        return results

    # -- outbound rate limits ----------------------------------------------------------------

    def relay_rate_exceeded(self, *, org_id: int, org: str, scope: str, limit: int, window: int,
                            txn_id: str, sender: str) -> None:
        """The relay's hook (not awaited): tell the organization's admins that its outbound mail is
        over a rate limit and is being held. Called once per counter and window (see
        :mod:`mxguard.relay.ratelimit`)."""
        task = asyncio.get_running_loop().create_task(self.notify_relay_rate(
            org_id=org_id, org=org, scope=scope, limit=limit, window=window, txn_id=txn_id, sender=sender))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def notify_relay_rate(self, *, org_id: int, org: str, scope: str, limit: int, window: int,
                                txn_id: str, sender: str) -> list[SendResult]:
        """Mail the alert to the organization's alert address, its org-admins and ``notify.admin_address``."""
        from mxguard.storage.models import Organization, User

        results: list[SendResult] = []
        try:
            async with self.store.session() as session:
                alert = await session.scalar(select(Organization.alert_address).where(Organization.id == org_id))
                admins = (await session.execute(select(User.email).where(
                    User.org_id == org_id, User.role == "org-admin").order_by(User.email))).scalars().all()
            recipients = list(dict.fromkeys(
                [a for a in [alert, *admins, self.settings.notify.admin_address] if a]))
            what = (f"the sender {sender or '<>'}" if scope.startswith("sender:")
                    else f"the organization {org} (all its senders together)")
            minutes = window // 60
            text = (f"Outbound mail of {org} through {self.settings.hostname} is over its rate limit: {what} "
                    f"sent more than {limit} messages in {minutes} minutes.\n\nFurther messages in this window "
                    f"are accepted and held, not sent (the first one: {txn_id}). A burst like this usually "
                    "means a compromised account or workstation: check the sender before releasing them.\n\n"
                    "  mxguard relay held            lists them\n"
                    "  mxguard relay release ID      sends one\n"
                    "  mxguard spool delete ID       drops one\n")
            for address in recipients:
                message = own_message(self.settings.hostname, address,
                                      f"[mxguard] Outbound rate limit exceeded for {org}", text, kind="relay-rate")
                results.append(await send_own_message(self.store, self.settings, address, message, kind="alert"))
            if not recipients:
                log.warning("relay rate alert with nobody to tell (set the organization's alert address or "
                            "notify.admin_address)", org=org, scope=scope)
        except Exception as exc:  # noqa: BLE001 - an alert failure must never touch mail flow
            log.error("relay rate alert failed", org=org, error=repr(exc)[:300])
        self.sent += results
        return results

    async def drain(self) -> None:
        """Wait for notifications in flight (shutdown, tests)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30)

    # -- alerts ------------------------------------------------------------------------

    async def _recipients(self, alert: Alert, orgs: dict[str, OrgSettings]) -> list[str]:
        switch = SWITCH_FOR[alert.kind]
        out = [self.settings.notify.admin_address] if self.settings.notify.admin_address else []
        concerned = orgs.values() if alert.domains is None else [orgs.get(d, DEFAULTS) for d in alert.domains]
        for org in concerned:
            if org.alert_address and getattr(org, switch):
                out.append(org.alert_address)
        return list(dict.fromkeys(out))

    async def raise_alert(self, alert: Alert, orgs: dict[str, OrgSettings], now: dt.datetime) -> list[SendResult]:
        """Send ``alert`` if its condition is new or has lasted ``repeat_after`` seconds since the last one."""
        repeat = dt.timedelta(seconds=self.settings.notify.repeat_after)
        async with self.store.session() as session:
            row = await session.get(AlertState, alert.key)
            if row is None:
                session.add(AlertState(key=alert.key, kind=alert.kind, active=True, detail=alert.subject[:1000],
                                       first_seen_at=now))
                try:
                    await session.commit()
                except IntegrityError:
                    return []  # another node raised it
                last = None
            else:
                if row.active and row.last_notified_at is not None and now - row.last_notified_at < repeat:
                    return []
                last = row.last_notified_at
                if not row.active:
                    row.active, row.first_seen_at, last = True, now, None
                    row.last_notified_at = None
                row.detail = alert.subject[:1000]
                await session.commit()
        recipients = await self._recipients(alert, orgs)
        results = []
        for address in recipients:
            message = own_message(self.settings.hostname, address, alert.subject, alert.text, kind=alert.kind)
            results.append(await send_own_message(self.store, self.settings, address, message, kind="alert"))
        if any(r.delivered for r in results):
            async with self.store.session() as session:
                # Only the node that moves last_notified_at from what it read counts as the sender.
                await session.execute(update(AlertState).where(
                    AlertState.key == alert.key,
                    AlertState.last_notified_at.is_(None) if last is None else AlertState.last_notified_at == last)
                    .values(last_notified_at=now))
                await session.commit()
        if not recipients:
            log.warning("alert with nobody to tell (set notify.admin_address or an organization's alert address)",
                        key=alert.key, subject=alert.subject)
        self.sent += results
        return results

    async def clear_alerts(self, kind: str, still_active: set[str]) -> None:
        """The conditions of ``kind`` not in ``still_active`` have ended."""
        async with self.store.session() as session:
            await session.execute(update(AlertState).where(AlertState.kind == kind, AlertState.active.is_(True),
                                                           AlertState.key.notin_(still_active or {""}))
                                  .values(active=False))
            await session.commit()

    async def check_routes(self, now: dt.datetime | None = None) -> list[Alert]:
        """Alert for each domain whose oldest spooled message waits longer than its organization allows."""
        now = now or utcnow()
        orgs = await settings_by_domain(self.store)
        async with self.store.session() as session:
            rows = (await session.execute(
                select(SpoolEntry.domain, func.min(SpoolEntry.created_at), func.count())
                .where(SpoolEntry.status == "queued", SpoolEntry.kind == "message")
                .group_by(SpoolEntry.domain))).all()
        alerts = []
        for domain, oldest, count in rows:
            org = orgs.get(domain, DEFAULTS)
            if oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=dt.timezone.utc)
            minutes = (now - oldest).total_seconds() / 60
            if minutes < org.route_down_minutes:
                continue
            text = (f"Mail for {domain} cannot reach its downstream server: {count} message(s) wait in the spool "
                    f"of {self.settings.hostname}, the oldest for {minutes:.0f} minutes.\n\nThey are delivered "
                    "as soon as the server answers again (mxguard spool list shows the last replies).\n")
            alerts.append(Alert(f"route:{domain}", "route-down",
                                f"[mxguard] Route to {domain} unreachable for {minutes:.0f} minutes", text, (domain,)))
        for alert in alerts:
            await self.raise_alert(alert, orgs, now)
        await self.clear_alerts("route-down", {a.key for a in alerts})
        return alerts

    async def check_engines(self, now: dt.datetime | None = None) -> list[Alert]:
        """Alert for each filtering engine that does not answer its probe."""
        if self.pipeline is None:
            return []
        now = now or utcnow()
        statuses = await self.pipeline.probe()
        alerts = [Alert(f"engine:{st.name}", "engine-down", f"[mxguard] Filtering engine {st.name} is down",
                        f"The filtering engine {st.name} ({st.address}) of {self.settings.hostname} does not answer: "
                        f"{st.error or 'no reply'}.\n\nMessages are deferred (451 4.3.0) or delivered marked "
                        "unscanned, as each domain's engine_failure setting says, until it answers again.\n")
                  for st in statuses if not st.reachable]
        if alerts:
            orgs = await settings_by_domain(self.store)
            for alert in alerts:
                await self.raise_alert(alert, orgs, now)
        await self.clear_alerts("engine-down", {a.key for a in alerts})
        return alerts

    async def check_certificates(self, now: dt.datetime | None = None) -> list[Alert]:
        """Alert for the gateway's certificate, each SNI certificate and each downstream server's
        expiring within the warning days."""
        from mxguard.services.certificates import current_chain
        from mxguard.services.probe import probe_domain
        from mxguard.services.sni_certificates import list_sni_certificates

        now = now or utcnow()
        days = self.settings.notify.cert_warning_days
        alerts: list[Alert] = []
        try:
            leaf = current_chain(self.settings)[0]
            if leaf.days_left <= days:
                alerts.append(Alert(
                    f"cert:gateway:{leaf.sha256}", "cert-expiry",
                    f"[mxguard] The gateway certificate of {self.settings.hostname} expires in {leaf.days_left:.0f} days",
                    f"The certificate {leaf.subject} (SHA-256 {leaf.sha256}) that {self.settings.hostname} presents "
                    f"for STARTTLS and HTTPS expires on {leaf.not_after:%Y-%m-%d %H:%M} UTC.\n\nReplace it on the "
                    "TLS page of the console (or tls.cert_file / tls.key_file).\n"))
        except Exception as exc:  # noqa: BLE001 - report what can be read
            log.warning("gateway certificate not readable for the expiry check", error=str(exc)[:200])
        for sni in await list_sni_certificates(self.store):
            if sni.days_left > days:
                continue
            alerts.append(Alert(
                f"cert:sni:{sni.name}:{sni.fingerprint}", "cert-expiry",
                f"[mxguard] The certificate for {sni.name} on {self.settings.hostname} expires in "
                f"{sni.days_left:.0f} days",
                f"The certificate {sni.subject} (SHA-256 {sni.fingerprint}) that {self.settings.hostname} presents "
                f"to clients asking for {sni.name} (SNI) expires on {sni.not_after:%Y-%m-%d %H:%M} UTC.\n\n"
                f"Renew it: mxguard tls cert add --replace --name {sni.name} CERT KEY (or the TLS page of the "
                "console). Once expired, clients that check certificates refuse it.\n",
                (sni.domain,) if sni.domain else ()))
        for view in await list_domains(self.store):
            if view.downstream_tls == "off":
                continue
            probe = await probe_domain(view, self.settings.downstream, self.settings.hostname)
            for server in probe.servers:
                cert = server.certificate
                if cert is None or cert.days_left > days:
                    continue
                alerts.append(Alert(
                    f"cert:{view.name}:{server.server}:{cert.sha256}", "cert-expiry",
                    f"[mxguard] Certificate of {view.name}'s server {server.server} expires in {cert.days_left} days",
                    f"The downstream server {server.server} of {view.name} presents a certificate for "
                    f"{cert.subject} (SHA-256 {cert.sha256}) that expires on {cert.not_after} UTC.\n\n"
                    f"With downstream TLS '{view.downstream_tls}', an expired certificate "
                    + ("stops delivery (mail is deferred and spooled)." if view.downstream_tls == "verify" else
                       "is still used for encryption, but should be renewed.") + "\n", (view.name,)))
        if alerts:
            orgs = await settings_by_domain(self.store)
            for alert in alerts:
                await self.raise_alert(alert, orgs, now)
        await self.clear_alerts("cert-expiry", {a.key for a in alerts})
        return alerts

