"""Dashboard: messages per hour by disposition, TLS shares, spool depth, engine health."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from mxguard.services import spool, stats, status
from mxguard.web import charts
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, console_user, get_ctx

router = APIRouter(include_in_schema=False)


@router.get("/")
async def dashboard(request: Request, me: ConsoleUser = Depends(console_user), ctx: WebContext = Depends(get_ctx)):
    """Messages and TLS shares of the last 24 h, spool depth and engine health."""
    labels, series = await stats.hourly_dispositions(ctx.store, me.actor)
    totals = {name: sum(values) for name, values in series.items()}
    share = await stats.overall_tls(ctx.store, me.actor)
    return request.app.state.templates.TemplateResponse(request, "dashboard.html", {
        "me": me, "totals": totals, "total": sum(totals.values()), "share": share,
        "spool": await spool.visible_depth(ctx.store, me.actor), "engines": await status.engine_health(),
    })


def _svg(body: bytes) -> Response:
    return Response(body, media_type="image/svg+xml")


@router.get("/charts/messages.svg")
async def messages_chart(me: ConsoleUser = Depends(console_user), ctx: WebContext = Depends(get_ctx)):
    """SVG: messages per hour by disposition."""
    labels, series = await stats.hourly_dispositions(ctx.store, me.actor)
    return _svg(charts.messages_per_hour(labels, series))


@router.get("/charts/tls.svg")
async def tls_chart(me: ConsoleUser = Depends(console_user), ctx: WebContext = Depends(get_ctx)):
    """SVG: inbound, downstream and verified TLS shares."""
    return _svg(charts.tls_shares(await stats.overall_tls(ctx.store, me.actor)))
