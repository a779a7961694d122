"""TLS-RPT (RFC 8460): daily aggregate reports of the TLS outcome of every delivery to a served domain.

Every downstream session leaves an item (:func:`mxguard.smtp.delivery.attempt_item`): the
connection's TLS and the policy source, or for servers skipped for a TLS reason their RFC 8460
result type (``tls_rpt``) and the source that demanded TLS (``tls_rpt_policy``). They are kept

* for in-line deliveries and quarantine releases in the message log (``downstream``);
* for spool retries in ``spool_attempts.results["downstream"]``. A spool attempt is a session of
  its own, never the in-line one again: the spool's completion record in the message log carries
  no ``downstream`` items, so nothing is counted twice.

For one UTC day this module counts, per served domain and per policy (``tlsa`` for DANE, ``sts``
for MTA-STS, else ``no-policy-found``), the sessions that negotiated TLS and the ones that failed,
with the failure details the RFC names, and sends the JSON report (gzip,
``application/tlsrpt+gzip``) to the ``rua`` of the domain's ``_smtp._tls`` TXT record: ``mailto:``
addresses as a ``multipart/report; report-type="tlsrpt"`` message (RFC 8460 section 5.3),
DKIM-signed when ``[downstream] tls_report_dkim_*`` name a key (section 5.3: SHOULD), ``https:`` URIs with a POST
(section 5.4, httpx).

Not counted: the gateway's own mail (summaries, notifications, DSNs, these reports: their
sessions carry no policy domain), and a session that broke mid-transaction (its TLS details are
lost with the connection).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import ssl
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

import dns.exception
import dns.resolver
import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from mxguard.config import Settings
from mxguard.dkim_signing import DkimSigner, load_signer
from mxguard.netaddr import parse_host_port
from mxguard.periodic import PeriodicCheck
from mxguard.storage.db import Store
from mxguard.storage.models import SPOOL_SESSIONS_KEY, MessageLogEntry, SpoolAttempt, TlsReportRun
from mxguard.tls.resolver import dns_resolver

log = structlog.get_logger("mxguard.tls.reporting")

#: ConnectionInfo.policy -> RFC 8460 4.4 policy-type (an MTA-STS policy in testing mode is still
#: the domain's sts policy: its failures are what testing mode is for, RFC 8461 section 5).
_POLICY_TYPES = {"dane": "tlsa", "mta-sts": "sts", "mta-sts-testing": "sts"}


@dataclass
class PolicyTally:
    """Sessions of one policy of one domain in the report window."""

    policy_type: str
    mx_hosts: set[str] = field(default_factory=set)
    successful: int = 0
    #: ``{(result type, receiving host): sessions}``
    failures: dict[tuple[str, str], int] = field(default_factory=dict)

    def fail(self, result_type: str, host: str) -> None:
        self.failures[(result_type, host)] = self.failures.get((result_type, host), 0) + 1


def day_window(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """``[00:00, 24:00)`` UTC of ``day`` (RFC 8460 4.1: reports cover one UTC day)."""
    start = dt.datetime.combine(day, dt.time(0), tzinfo=dt.timezone.utc)
    return start, start + dt.timedelta(days=1)


def tally_items(items: list[tuple[str, dict]]) -> dict[str, dict[str, PolicyTally]]:
    """Count ``(policy domain, downstream item)`` pairs.

    Args:
        items: ``(domain, item)``; an item as :func:`mxguard.smtp.delivery.attempt_item` makes it.

    Returns:
        ``{domain: {policy type: PolicyTally}}``. An item that connected with TLS is a successful
        session; one that connected in clear is a ``starttls-not-supported`` failure; each
        server skipped for a TLS reason (``tls_rpt``) is a failure with its result type, under
        the policy that demanded TLS of it (``tls_rpt_policy``; RFC 8460 section 4.4). A session
        delivered under a failure to report (``report_failure``: MTA-STS testing with an MX host
        outside the policy, a policy that could not be fetched) counts as that failure.
    """
    out: dict[str, dict[str, PolicyTally]] = {}

    def tally_for(domain: str, source: object) -> PolicyTally:
        policy_type = _POLICY_TYPES.get(str(source or ""), "no-policy-found")
        return out.setdefault(domain, {}).setdefault(policy_type, PolicyTally(policy_type))

    for domain, item in items:
        sources = item.get("tls_rpt_policy") or {}
        for server, result_type in (item.get("tls_rpt") or {}).items():
            host = parse_host_port(server, default_port=25)[0]
            tally_for(domain, sources.get(server, item.get("policy"))).fail(str(result_type), host)
        if "failure" in item:
            continue
        host = item.get("host")
        if host and item.get("report_failure"):
            # Delivered, yet a policy failure to report (MTA-STS testing, a policy fetch error).
            tally = tally_for(domain, item.get("report_policy") or item.get("policy"))
            tally.mx_hosts.add(str(host))
            tally.fail(str(item["report_failure"]), str(host))
            continue
        tally = tally_for(domain, item.get("policy"))
        if host:
            tally.mx_hosts.add(str(host))
            if item.get("tls"):
                tally.successful += 1
            else:
                tally.fail("starttls-not-supported", str(host))
    return out


def _with_domain(downstream: object) -> list[tuple[str, dict]]:
    """The ``(policy domain, item)`` pairs of one row's session list (items without a domain skipped)."""
    out = []
    for item in downstream if isinstance(downstream, list) else []:
        domain = item.get("domain") if isinstance(item, dict) else None
        if domain:
            out.append((str(domain), item))
    return out


async def collect(store: Store, start: dt.datetime, end: dt.datetime) -> dict[str, dict[str, PolicyTally]]:
    """Tally the sessions with ``start <= ts < end`` (UTC): in-line deliveries and quarantine releases
    (message log) and spool attempts (``spool_attempts``); see the module docstring.

    Returns:
        as :func:`tally_items`.
    """
    items: list[tuple[str, dict]] = []
    async with store.session() as session:
        # Streamed: a busy day's log is read a thousand rows at a time, not held at once.
        rows = await session.stream(
            select(MessageLogEntry.downstream).where(MessageLogEntry.ts >= start, MessageLogEntry.ts < end)
            .execution_options(yield_per=1000))
        async for (downstream,) in rows:
            items += _with_domain(downstream)
        rows = await session.stream(
            select(SpoolAttempt.results).where(SpoolAttempt.ts >= start, SpoolAttempt.ts < end)
            .execution_options(yield_per=1000))
        async for (results,) in rows:
            items += _with_domain((results or {}).get(SPOOL_SESSIONS_KEY) if isinstance(results, dict) else None)
    return tally_items(items)


def build_report(organization: str, contact: str, domain: str, start: dt.datetime, end: dt.datetime,
                 tallies: dict[str, PolicyTally]) -> dict:
    """The RFC 8460 section 4 JSON object for one policy domain."""
    policies = []
    for tally in tallies.values():
        policy: dict = {"policy-type": tally.policy_type, "policy-domain": domain}
        if tally.mx_hosts:
            policy["mx-host"] = sorted(tally.mx_hosts)
        policies.append({
            "policy": policy,
            "summary": {"total-successful-session-count": tally.successful,
                        "total-failure-session-count": sum(tally.failures.values())},
            "failure-details": [{"result-type": rt, "receiving-mx-hostname": host, "failed-session-count": n}
                                for (rt, host), n in sorted(tally.failures.items())],
        })
    iso = "%Y-%m-%dT%H:%M:%SZ"
    return {"organization-name": organization,
            "date-range": {"start-datetime": start.strftime(iso), "end-datetime": end.strftime(iso)},
            "contact-info": contact, "report-id": f"{start:%Y%m%d}.{domain}.{uuid.uuid4().hex[:12]}@{organization}",
            "policies": policies}


async def rua_targets(domain: str, nameservers: list[str], timeout: float = 10.0) -> list[str]:
    """The ``rua`` URIs of ``_smtp._tls.<domain>`` (RFC 8460 3), ``[]`` when there is no usable record.

    Args:
        nameservers: ``HOST[:PORT]`` resolvers; the system's when empty.
        timeout: seconds for the whole lookup.
    """
    try:
        answer = await dns_resolver(nameservers, timeout).resolve(f"_smtp._tls.{domain}", "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers, dns.exception.Timeout):
        return []
    records = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    records = [r for r in records if r.replace(" ", "").startswith("v=TLSRPTv1;")]
    if len(records) != 1:
        return []  # RFC 8460 3: none, or more than one, means no reporting
    out = []
    for field_ in records[0].split(";")[1:]:
        key, _, value = field_.strip().partition("=")
        if key.strip().lower() == "rua":
            out += [u.strip() for u in value.split(",") if u.strip().lower().startswith(("mailto:", "https:"))]
    return out


def report_filename(submitter: str, domain: str, start: dt.datetime, end: dt.datetime) -> str:
    """``submitter!policy-domain!begin!end.json.gz`` (RFC 8460 5.1, Unix seconds)."""
    return f"{submitter}!{domain}!{int(start.timestamp())}!{int(end.timestamp())}.json.gz"


#: Fields a report's DKIM signature covers: RFC 8460 5.3's own and those that say what it is.
SIGNED_HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "TLS-Report-Domain", "TLS-Report-Submitter",
                  "Auto-Submitted", "MIME-Version", "Content-Type"]


def report_signer(settings: Settings) -> DkimSigner | None:
    """The DKIM signer of ``[downstream] tls_report_dkim_*``, ``None`` when they are not set.

    Raises:
        KeyFileError: the key file went missing or bad since start-up.
    """
    d = settings.downstream
    if not d.tls_report_dkim_key_file:
        return None
    return load_signer(settings.path(d.tls_report_dkim_key_file), d.tls_report_dkim_selector,
                       d.tls_report_dkim_domain)


def report_message(submitter: str, sender: str, recipient: str, domain: str, report: dict,
                   start: dt.datetime, end: dt.datetime, signer: DkimSigner | None = None) -> bytes:
    """The report as mail (RFC 8460 5.3): ``multipart/report; report-type="tlsrpt"``, CRLF bytes.

    Args:
        signer: DKIM-signs the message over :data:`SIGNED_HEADERS` (RFC 8460 5.3: SHOULD).
    """
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report['report-id']}>"
    msg["Date"] = format_datetime(dt.datetime.now(dt.timezone.utc))
    msg["Message-ID"] = make_msgid(domain=submitter)
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(f"TLS-RPT report for {domain}, {start:%Y-%m-%d} (UTC), from {submitter}.\n")
    msg.add_attachment(gzip.compress(json.dumps(report).encode()), maintype="application", subtype="tlsrpt+gzip",
                       filename=report_filename(submitter, domain, start, end))
    msg.set_type("multipart/report")
    msg.set_param("report-type", "tlsrpt")
    raw = msg.as_bytes(policy=SMTP)
    return signer.sign(raw, SIGNED_HEADERS, tlsrpt=True) if signer is not None else raw


@dataclass
class Sent:
    """One report delivery: ``target`` URI, ``ok``, and what the receiver said."""

    domain: str
    target: str
    ok: bool
    detail: str


async def send_reports(store: Store, settings: Settings, day: dt.date, *, https_verify: bool | str = True) -> list[Sent]:
    """Build and send the reports for ``day`` (UTC) to every domain that asks for them.

    Args:
        https_verify: for ``https:`` targets: ``True`` (the system trust store) or a CA bundle's path.

    Returns:
        one :class:`Sent` per target; a domain without a ``_smtp._tls`` record gets none.
    """
    from mxguard.own_mail import send_own_message  # own_mail uses smtp; imported late (layering)
    start, end = day_window(day)
    submitter = settings.hostname
    out: list[Sent] = []
    verify = ssl.create_default_context(cafile=https_verify) if isinstance(https_verify, str) else https_verify
    signer = report_signer(settings)
    for domain, tallies in sorted((await collect(store, start, end)).items()):
        targets = await rua_targets(domain, settings.downstream.dns_servers or settings.filters.dns_servers,
                                    settings.downstream.dns_timeout)
        if not targets:
            continue
        report = build_report(submitter, f"mailto:postmaster@{submitter}", domain, start, end, tallies)
        for target in targets:
            if target.lower().startswith("mailto:"):
                rcpt = target[7:].split("?")[0]
                raw = report_message(submitter, f"postmaster@{submitter}", rcpt, domain, report, start, end,
                                     signer)
                result = await send_own_message(store, settings, rcpt, raw, kind="tls-report")
                out.append(Sent(domain, target, result.reply.is_positive, result.reply.one_line()))
            else:
                import httpx  # here: only a report to an https: address needs it (memory per process)

                try:
                    async with httpx.AsyncClient(verify=verify, timeout=30, follow_redirects=False) as client:
                        resp = await client.post(target, content=gzip.compress(json.dumps(report).encode()),
                                                 headers={"Content-Type": "application/tlsrpt+gzip"})
                    out.append(Sent(domain, target, 200 <= resp.status_code < 300, f"HTTP {resp.status_code}"))
                except httpx.HTTPError as exc:
                    out.append(Sent(domain, target, False, f"{type(exc).__name__}: {exc}"[:200]))
            log.info("TLS report sent" if out[-1].ok else "TLS report not delivered", domain=domain,
                     target=target, detail=out[-1].detail,
                     dkim=f"{signer.selector}._domainkey.{signer.domain}" if signer and target.lower().startswith(
                         "mailto:") else None)
    return out


async def claim_day(store: Store, day: dt.date, node: str) -> bool:
    """Claim ``day``'s reports for this node; False when a node claimed them already."""
    try:
        async with store.session() as session:
            session.add(TlsReportRun(day=day.isoformat(), node=node[:253], outcome={}))
            await session.commit()
    except IntegrityError:
        return False
    return True


async def send_due(store: Store, settings: Settings, *, today: dt.date | None = None) -> list[Sent] | None:
    """Send yesterday's (UTC) reports unless a node already claimed that day.

    Returns:
        what was sent, or ``None`` when the day was claimed already.
    """
    day = (today or dt.datetime.now(dt.timezone.utc).date()) - dt.timedelta(days=1)
    if not await claim_day(store, day, settings.hostname):
        return None
    try:
        sent = await send_reports(store, settings, day)
    except Exception:
        async with store.session() as session:  # nothing went out: let the next check try again
            run = await session.get(TlsReportRun, day.isoformat())
            if run is not None:
                await session.delete(run)
                await session.commit()
        raise
    async with store.session() as session:
        run = await session.get(TlsReportRun, day.isoformat())
        if run is not None:
            run.outcome = {"sent": sum(s.ok for s in sent), "failed": sum(not s.ok for s in sent)}
            await session.commit()
    log.info("TLS reports for the day", day=day.isoformat(), targets=len(sent), failed=sum(not s.ok for s in sent))
    return sent


class DailyTlsReports:
    """Checks every ``downstream.tls_report_check_interval`` seconds whether yesterday's reports are due
    (a failed round gave its claim back: it is retried at the next check)."""

    def __init__(self, store: Store, settings: Settings):
        self.settings = settings
        self._check = PeriodicCheck("tls-reports", settings.downstream.tls_report_check_interval,
                                    lambda: send_due(store, settings))

    def start(self) -> None:
        if self.settings.downstream.tls_reports:
            self._check.start()

    async def stop(self) -> None:
        await self._check.stop()
