"""``/domains/{name}/tls-reports``: the TLS-RPT reports (RFC 8460) other senders sent about a domain."""

from fastapi import APIRouter, Depends, Query

from mxguard.services import tls_reports as svc
from mxguard.services.access import Actor
from mxguard.web.context import WebContext
from mxguard.web.deps import api_actor, get_ctx
from mxguard.web.routes.api_v1.schemas import DomainTlsReportsOut, ReceivedTlsReportDetailOut

router = APIRouter(prefix="/domains", tags=["tls reports"])


@router.get("/{name}/tls-reports", response_model=DomainTlsReportsOut,
            summary="Received TLS-RPT reports: totals, per day, by result type and reporter, the newest")
async def domain_reports(name: str, days: int = Query(30, ge=1, le=366), limit: int = Query(50, ge=1, le=1000),
                         actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return (await svc.domain_reports(ctx.store, name, actor=actor, days=days, limit=limit)).as_dict()


@router.get("/{name}/tls-reports/{report_pk}", response_model=ReceivedTlsReportDetailOut,
            summary="One received report, with its JSON as received")
async def one_report(name: str, report_pk: int, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    row, report = await svc.report_json(ctx.store, name, report_pk, actor=actor)
    return {**row.as_dict(), "report": report}
