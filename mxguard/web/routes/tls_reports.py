"""A domain's received TLS-RPT reports (RFC 8460): totals, failures by result type, reporters, per day."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from mxguard.netaddr import parse_host_port
from mxguard.services import tls_reports
from mxguard.web import charts
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, console_user, get_ctx

router = APIRouter(include_in_schema=False)


@router.get("/domains/{name}/tls-reports")
async def page(request: Request, name: str, days: int = Query(30, ge=1, le=366),
               me: ConsoleUser = Depends(console_user), ctx: WebContext = Depends(get_ctx)):
    """Sessions, failures by result type, sending organizations and the newest reports of one domain."""
    summary = await tls_reports.domain_reports(ctx.store, name, actor=me.actor, days=days)
    s = ctx.settings
    return request.app.state.templates.TemplateResponse(request, "tls_reports.html", {
        "me": me, "summary": summary, "window": days, "known_types": tls_reports.RESULT_TYPES,
        "ingest": s.tls_reports.ingest, "address": f"{s.tls_reports.ingest_local_part}@{summary.domain}",
        "https_url": intake_url(ctx)})


def intake_url(ctx: WebContext) -> str:
    """Where reporters POST (an ``rua`` https URI): the public console URL if set, else this listener."""
    s = ctx.settings
    if s.quarantine.public_url:
        return s.quarantine.public_url + "/tlsrpt"
    _, port = parse_host_port(s.web.listen, default_port=8443, allow_zero=True)
    return f"https://{s.hostname}{'' if port in (0, 443) else f':{port}'}/tlsrpt"


@router.get("/domains/{name}/tls-reports/chart.svg")
async def chart(name: str, days: int = Query(30, ge=1, le=366), me: ConsoleUser = Depends(console_user),
                ctx: WebContext = Depends(get_ctx)):
    """SVG: successful and failed sessions per day, as the reports say."""
    summary = await tls_reports.domain_reports(ctx.store, name, actor=me.actor, days=days)
    return Response(charts.tls_report_sessions(summary.days, summary.successful, summary.failed),
                    media_type="image/svg+xml")
