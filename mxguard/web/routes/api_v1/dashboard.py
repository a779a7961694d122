"""``/dashboard``: the figures behind the dashboard charts."""

from dataclasses import asdict

from fastapi import APIRouter, Depends

from mxguard.services import spool, stats, status
from mxguard.services.access import Actor
from mxguard.web.context import WebContext
from mxguard.web.deps import api_actor, get_ctx
from mxguard.web.routes.api_v1.schemas import DashboardOut
from mxguard.web.routes.api_v1.tls import share_out

router = APIRouter(tags=["dashboard"])


@router.get("/dashboard", response_model=DashboardOut, summary="Messages per hour, TLS shares, spool, engines")
async def dashboard(actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    labels, series = await stats.hourly_dispositions(ctx.store, actor)
    engines = await status.engine_health()
    return DashboardOut(hours=labels, messages_per_hour=series,
                        tls_24h=share_out(await stats.overall_tls(ctx.store, actor)),
                        spool_depth=await spool.visible_depth(ctx.store, actor),
                        engines=[asdict(e) for e in engines] if engines is not None else None)
