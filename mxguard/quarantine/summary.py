"""Quarantine summaries: a digest to each recipient with new held messages, on a per-domain schedule.

A summary lists the messages held for one recipient that no summary listed
before (``summarized_at`` is empty), with a text and an HTML part (the
``email`` package builds the MIME, Jinja2 the HTML with auto-escaping, so a
subject carrying markup is shown, never rendered). With the organization's
message links on, each message gets a signed, expiring, single-use
**deliver** link and **view** link (:mod:`mxguard.quarantine.links`); with
them off, the summary carries the list and the Message Center address only.
Messages held for a virus are listed to administrators only (never in a
summary): a recipient cannot release them.

It is sent with :func:`mxguard.own_mail.send_own_message`, through the
recipient domain's route and downstream TLS policy. Messages are marked
summarized only once the downstream server took the summary.

Schedule: each domain has ``summary_interval`` (hours, 0 = no summaries) and
``summary_hour`` (UTC); the due times are ``summary_hour:00`` plus whole
multiples of the interval. ``summary_schedule`` keeps each domain's next due
time; a node takes a due domain with a conditional update, so with several
nodes one of them sends it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from urllib.parse import urlsplit

import jinja2
import structlog
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from mxguard.config import Settings
from mxguard.netaddr import parse_host_port
from mxguard.own_mail import SendResult, send_own_message
from mxguard.quarantine.links import LinkSigner
from mxguard.quarantine.service import mark_summarized
from mxguard.services.domains import DomainView, list_domains
from mxguard.services.orgsettings import settings_for_domain
from mxguard.storage.db import Store
from mxguard.storage.models import QuarantinedMessage, SummarySchedule, utcnow

log = structlog.get_logger("mxguard.summary")

_env = jinja2.Environment(loader=jinja2.PackageLoader("mxguard.quarantine", "templates"),
                          autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def message_center_url(settings: Settings, web_url: str | None = None) -> str:
    """The Message Center's base URL for links (no trailing slash).

    ``quarantine.public_url`` when set; else the console's own URL when it
    listens on a specific address (``web_url``, or ``web.listen``); for a
    wildcard listener, ``https://<hostname>:<port>``.
    """
    if settings.quarantine.public_url:
        return settings.quarantine.public_url
    if web_url:
        parts = urlsplit(web_url)
        host, port = parts.hostname or "", parts.port or 443
    else:
        host, port = parse_host_port(settings.web.listen, default_port=8443, allow_zero=True)
    if host in ("0.0.0.0", "::", ""):
        host = settings.hostname
    host = f"[{host}]" if ":" in host else host
    return f"https://{host}" + ("" if port == 443 else f":{port}")


@dataclass
class SummaryItem:
    qid: str
    sender: str
    subject: str
    date: str
    reason: str
    score: str | None
    deliver_url: str | None = None
    view_url: str | None = None


def build_summary(*, hostname: str, recipient: str, rows: list[QuarantinedMessage], center_url: str,
                  signer: LinkSigner | None, link_lifetime: float, retention_days: int,
                  since: dt.datetime | None = None, now: dt.datetime | None = None) -> bytes:
    """The summary message for one recipient.

    Args:
        rows: the held messages to list, newest first.
        center_url: the Message Center's base URL.
        signer: makes the deliver/view links; ``None`` when message links are off.
        link_lifetime: seconds the links stay valid (shown as an expiry date).
        retention_days: days held messages are kept (said in the text).
        since: when the previous summary went out, if known.

    Returns:
        RFC 5322 bytes with CRLF line ends: ``multipart/alternative`` (text, HTML).
    """
    now = now or utcnow()
    items = []
    for row in rows:
        item = SummaryItem(row.id, row.sender, row.subject, row.created.strftime("%Y-%m-%d %H:%M UTC"), row.reason,
                           f"{row.score:g}" if row.score is not None else None)
        if signer is not None:
            item.deliver_url = f"{center_url}/mc/link/{signer.make('deliver', row.id)}"
            item.view_url = f"{center_url}/mc/link/{signer.make('view', row.id)}"
        items.append(item)
    values = dict(recipient=recipient, hostname=hostname, items=items, links=signer is not None,
                  center_url=f"{center_url}/mc", retention_days=retention_days,
                  since=since.strftime("%Y-%m-%d %H:%M UTC") if since else None,
                  expires=(now + dt.timedelta(seconds=link_lifetime)).strftime("%Y-%m-%d %H:%M UTC"))
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"Quarantine <quarantine@{hostname}>"
    msg["To"] = recipient
    count = len(items)
    msg["Subject"] = f"Quarantine summary: {count} new message{'s' if count != 1 else ''} held for you"
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834
    msg["X-MXGuard-Summary"] = recipient
    text = _env.get_template("summary.txt").render(**values)
    # Plain ASCII goes as 7bit so the links stay whole lines for any reader (RFC 5322 allows 998 octets);
    # anything else as quoted-printable.
    ascii_ok = text.isascii() and all(len(line) < 990 for line in text.splitlines())
    msg.set_content(text, cte="7bit" if ascii_ok else "quoted-printable")
    msg.add_alternative(_env.get_template("summary.html").render(**values), subtype="html")
    return msg.as_bytes()


@dataclass
class SummaryReport:
    """What one run sent: per recipient the outcome and how many messages it listed."""

    sent: list[tuple[SendResult, int]] = field(default_factory=list)

    @property
    def delivered(self) -> int:
        return sum(1 for r, _ in self.sent if r.delivered)


async def pending_rows(store: Store, domain: str, now: dt.datetime) -> dict[str, list[QuarantinedMessage]]:
    """New held messages of ``domain`` (never summarized, not handled, not expired, not a virus), by recipient."""
    q = (select(QuarantinedMessage)
         .where(func.lower(QuarantinedMessage.recipient).like(f"%@{domain}"),
                QuarantinedMessage.summarized_at.is_(None), QuarantinedMessage.released_at.is_(None),
                QuarantinedMessage.deleted_at.is_(None), QuarantinedMessage.expires_at > now,
                QuarantinedMessage.category != "virus")
         .order_by(QuarantinedMessage.created.desc()))
    async with store.session() as session:
        rows = (await session.execute(q)).scalars().all()
    by_rcpt: dict[str, list[QuarantinedMessage]] = {}
    for row in rows:
        by_rcpt.setdefault(row.recipient.lower(), []).append(row)
    return by_rcpt


async def send_summaries(store: Store, settings: Settings, signer: LinkSigner, *, domain: str | None = None,
                         web_url: str | None = None, now: dt.datetime | None = None) -> SummaryReport:
    """Send every due recipient of ``domain`` (or of every domain) a summary now.

    Args:
        signer: makes the links (used only where the organization's message links are on).
        web_url: the running console's URL (see :func:`message_center_url`).

    Returns:
        one entry per recipient summarized. Never raises for delivery problems;
        a recipient whose summary was not taken keeps its messages "new".

    Raises:
        NotFound: ``domain`` is not served.
    """
    from mxguard.services.domains import get_domain

    now = now or utcnow()
    domains: list[DomainView] = [await get_domain(store, domain)] if domain else await list_domains(store)
    center = message_center_url(settings, web_url)
    report = SummaryReport()
    for view in domains:
        org = await settings_for_domain(store, view.name)
        for recipient, rows in (await pending_rows(store, view.name, now)).items():
            message = build_summary(hostname=settings.hostname, recipient=rows[0].recipient, rows=rows,
                                    center_url=center, signer=signer if org.message_links else None,
                                    link_lifetime=settings.quarantine.link_lifetime,
                                    retention_days=settings.filters.quarantine_days, now=now)
            result = await send_own_message(store, settings, rows[0].recipient, message, kind="summary")
            if result.delivered:
                await mark_summarized(store, [r.id for r in rows], now)
            report.sent.append((result, len(rows)))
    return report


def next_due(view: DomainView, after: dt.datetime) -> dt.datetime:
    """The first due time strictly after ``after``: ``summary_hour:00`` UTC plus multiples of the interval."""
    interval = dt.timedelta(hours=max(1, view.summary_interval))
    anchor = after.astimezone(dt.timezone.utc).replace(hour=view.summary_hour, minute=0, second=0, microsecond=0)
    while anchor > after:
        anchor -= interval
    while anchor <= after:
        anchor += interval
    return anchor


async def run_due(store: Store, settings: Settings, signer: LinkSigner, *, web_url: str | None = None,
                  now: dt.datetime | None = None) -> SummaryReport:
    """Send the summaries of every domain whose next due time has come (the scheduler's step).

    A domain seen for the first time gets its first due time and is not sent now.
    """
    now = now or utcnow()
    report = SummaryReport()
    for view in await list_domains(store):
        if view.summary_interval <= 0:
            continue
        async with store.session() as session:
            row = await session.get(SummarySchedule, view.name)
            if row is None:
                session.add(SummarySchedule(domain=view.name, next_due_at=next_due(view, now)))
                try:
                    await session.commit()
                except IntegrityError:
                    pass  # another node scheduled it first
                continue
            due = row.next_due_at
            if due > now:
                continue
            # Claim the run: only the node whose update moves this exact due time sends.
            claim = await session.execute(
                update(SummarySchedule).where(SummarySchedule.domain == view.name,
                                              SummarySchedule.next_due_at == due)
                .values(next_due_at=next_due(view, now), last_run_at=now))
            await session.commit()
        if claim.rowcount != 1:
            continue
        part = await send_summaries(store, settings, signer, domain=view.name, web_url=web_url, now=now)
        report.sent += part.sent
        log.info("quarantine summaries sent", domain=view.name, recipients=len(part.sent), delivered=part.delivered)
    return report
