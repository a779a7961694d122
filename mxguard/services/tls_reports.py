"""TLS-RPT reports received about the served domains (RFC 8460): storing them, and what the console,
the API and the CLI show, scoped by tenancy.

Storing: one row per report and served policy domain
(:class:`~mxguard.storage.models.ReceivedTlsReport`). A report none of whose
policy domains is served is refused (422), and so is a second copy of a
report already stored (same organization-name, report-id and policy domain:
409); either way nothing changes.

Reading: an admin sees every served domain's reports, an org-admin those of
their organization's domains; any other domain is "not found", as elsewhere
(:func:`mxguard.services.domains.get_domain`).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import select, tuple_
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from mxguard.errors import NotFound
from mxguard.services.access import SYSTEM, Actor
from mxguard.services.domains import get_domain, list_domains
from mxguard.storage.db import Store, storable
from mxguard.storage.models import Domain, ReceivedTlsReport, utcnow
from mxguard.tls.rpt_ingest import RESULT_TYPES, ParsedReport, ReportRefused

log = structlog.get_logger("mxguard.tls.ingest")

VIA = ("https", "mail")
__all__ = ["RESULT_TYPES", "Stored", "ReportRow", "DomainReports", "store_report", "domain_reports",
           "received_reports", "report_json"]


@dataclass(frozen=True)
class Stored:
    """The outcome of :func:`store_report`.

    Attributes:
        domains: the served policy domains stored, one row each.
        ignored: policy domains of the report that this gateway does not serve.
    """

    domains: list[str]
    ignored: list[str]


async def store_report(store: Store, parsed: ParsedReport, via: str, *, dkim: str | None = None) -> Stored:
    """Store a validated report: one row per policy domain that is served.

    Args:
        store: the database.
        parsed: from :func:`mxguard.tls.rpt_ingest.read_report`.
        via: ``"https"`` or ``"mail"``.
        dkim: for mail, the DKIM result to keep with it (``pass d=... s=...``, ``fail ...``, ``none``).

    Raises:
        ReportRefused: 422 no policy domain is served; 409 the report (organization-name,
            report-id, a policy domain) is stored already; 503 the database refused (retry later).
    """
    assert via in VIA
    report = parsed.report
    tallies = parsed.per_domain()
    organization, report_id = storable(report.organization_name), storable(report.report_id)
    context = {"organization": organization[:100], "report_id": report_id[:100], "via": via}
    try:
        async with store.session() as session:
            served = set((await session.execute(
                select(Domain.name).where(Domain.name.in_(list(tallies))))).scalars())
            ignored = [d for d in tallies if d not in served]
            if not served:
                log.info("TLS report refused: no served domain", domains=list(tallies)[:10], **context)
                raise ReportRefused(422, "the report is about no domain this gateway serves: "
                                         + ", ".join(list(tallies)[:10]))
            existing = (await session.execute(select(ReceivedTlsReport.domain).where(
                tuple_(ReceivedTlsReport.organization, ReceivedTlsReport.report_id, ReceivedTlsReport.domain)
                .in_([(organization, report_id, d) for d in served])))).scalars().all()
            if existing:
                log.info("TLS report refused: duplicate", domains=sorted(existing), **context)
                raise ReportRefused(409, f"report {report_id!r} of {organization!r} is stored already "
                                         f"(for {', '.join(sorted(existing))})")
            raw = gzip.compress(parsed.raw_json, mtime=0)
            now = utcnow()
            stored = [d for d in tallies if d in served]
            for name in stored:
                t = tallies[name]
                session.add(ReceivedTlsReport(
                    domain=name, organization=organization, report_id=report_id,
                    contact=storable(report.contact_info), start=report.date_range.start,
                    end=report.date_range.end, successful=t.successful, failed=t.failed,
                    failures={storable(k): v for k, v in t.failures.items()}, policy_types=t.policy_types,
                    sending_ips=storable(t.sending_ips), via=via, received_at=now, raw_gzip=raw,
                    dkim=storable(dkim)[:300] if dkim else None))
            await session.commit()
    except IntegrityError:
        # Another request stored the same report between the check and the insert.
        log.info("TLS report refused: duplicate (concurrent copy)", **context)
        raise ReportRefused(409, f"report {report_id!r} of {organization!r} is stored already") from None
    except SQLAlchemyError as exc:
        log.error("TLS report not stored: database error", error=repr(exc)[:200], **context)
        raise ReportRefused(503, "the report could not be stored now; try again later") from None
    log.info("TLS report stored", domains=stored, ignored=ignored[:10],
             successful=sum(tallies[d].successful for d in stored), failed=sum(tallies[d].failed for d in stored),
             **context)
    return Stored(stored, ignored)


# -- reading ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportRow:
    """One stored report about one domain, as shown (the raw JSON is fetched on its own)."""

    id: int
    domain: str
    organization: str
    report_id: str
    contact: str
    start: dt.datetime
    end: dt.datetime
    successful: int
    failed: int
    failures: dict[str, int]
    policy_types: list[str]
    sending_ips: list[str]
    via: str
    received_at: dt.datetime
    #: Mailed reports: the DKIM result; ``None`` for HTTPS.
    dkim: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for key in ("start", "end", "received_at"):
            out[key] = out[key].isoformat()
        return out


_COLUMNS = [getattr(ReceivedTlsReport, name) for name in ReportRow.__dataclass_fields__]


def _row(values) -> ReportRow:
    return ReportRow(*values)


@dataclass
class DomainReports:
    """A domain's received reports over a window (UTC days).

    Attributes:
        domain: the served domain.
        days: the window's days, oldest first (``YYYY-MM-DD``, by each report's start).
        successful, failed: sessions per day (lists aligned with ``days``).
        total_successful, total_failed: sums over the window.
        failures: ``{result type: failed sessions}`` over the window, largest first.
        organizations: ``{organization-name: reports}`` over the window, most first.
        newest: the newest reports (by start, then arrival), at most ``limit``.
        reports: reports in the window.
    """

    domain: str
    days: list[str] = field(default_factory=list)
    successful: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    total_successful: int = 0
    total_failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    organizations: dict[str, int] = field(default_factory=dict)
    newest: list[ReportRow] = field(default_factory=list)
    reports: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "days": self.days, "successful_per_day": self.successful,
                "failed_per_day": self.failed, "total_successful": self.total_successful,
                "total_failed": self.total_failed, "failures": self.failures, "organizations": self.organizations,
                "reports": self.reports, "newest": [r.as_dict() for r in self.newest]}


async def domain_reports(store: Store, name: str, *, actor: Actor = SYSTEM, days: int = 30, limit: int = 50,
                         now: dt.datetime | None = None) -> DomainReports:
    """A served domain's reports whose window starts in the last ``days`` UTC days.

    Args:
        name: the domain (any case).
        actor: who asks; another organization's domain is not found.
        days: window length, 1-366.
        limit: how many of the newest reports to list, 1-1000.

    Raises:
        NotFound: no such domain, or not visible to ``actor``.
        PermissionDenied: a plain user.
    """
    actor.require_console()
    view = await get_domain(store, name, actor=actor)
    days, limit = max(1, min(days, 366)), max(1, min(limit, 1000))
    today = (now or dt.datetime.now(dt.timezone.utc)).date()
    labels = [(today - dt.timedelta(days=d)).isoformat() for d in range(days - 1, -1, -1)]
    since = dt.datetime.combine(today - dt.timedelta(days=days - 1), dt.time(0), tzinfo=dt.timezone.utc)
    q = (select(*_COLUMNS).where(ReceivedTlsReport.domain == view.name, ReceivedTlsReport.start >= since)
         .order_by(ReceivedTlsReport.start.desc(), ReceivedTlsReport.id.desc()))
    out = DomainReports(view.name, labels, [0] * days, [0] * days)
    index = {label: i for i, label in enumerate(labels)}
    failures: dict[str, int] = {}
    orgs: dict[str, int] = {}
    async with store.session() as session:
        rows = await session.stream(q.execution_options(yield_per=500))  # a busy domain's month, streamed
        async for values in rows:
            row = _row(values)
            out.reports += 1
            if len(out.newest) < limit:
                out.newest.append(row)
            i = index.get(row.start.date().isoformat())
            if i is not None:
                out.successful[i] += row.successful
                out.failed[i] += row.failed
            out.total_successful += row.successful
            out.total_failed += row.failed
            for kind, count in (row.failures or {}).items():
                failures[kind] = failures.get(kind, 0) + int(count)
            orgs[row.organization] = orgs.get(row.organization, 0) + 1
    out.failures = dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0])))
    out.organizations = dict(sorted(orgs.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


async def received_reports(store: Store, *, actor: Actor = SYSTEM, domain: str | None = None,
                           limit: int = 100) -> list[ReportRow]:
    """The newest received reports the actor may see, of one domain or all of theirs.

    Raises:
        NotFound: ``domain`` is not served or not visible to ``actor``.
        PermissionDenied: a plain user.
    """
    actor.require_console()
    if domain is not None:
        names = [(await get_domain(store, domain, actor=actor)).name]
    else:
        names = [d.name for d in await list_domains(store, actor=actor)]
    if not names:
        return []
    q = (select(*_COLUMNS).where(ReceivedTlsReport.domain.in_(names))
         .order_by(ReceivedTlsReport.start.desc(), ReceivedTlsReport.id.desc()).limit(max(1, min(limit, 10000))))
    async with store.session() as session:
        return [_row(v) for v in (await session.execute(q)).all()]


async def report_json(store: Store, name: str, report_pk: int, *, actor: Actor = SYSTEM) -> tuple[ReportRow, Any]:
    """One stored report of a domain and its JSON as received (parsed).

    Raises:
        NotFound: the domain is not visible, or it has no report with that id.
    """
    actor.require_console()
    view = await get_domain(store, name, actor=actor)
    async with store.session() as session:
        found = (await session.execute(select(*_COLUMNS, ReceivedTlsReport.raw_gzip).where(
            ReceivedTlsReport.id == report_pk, ReceivedTlsReport.domain == view.name))).one_or_none()
    if found is None:
        raise NotFound(f"TLS report {report_pk} of {view.name} does not exist")
    *values, raw = found
    return _row(values), json.loads(gzip.decompress(raw))
