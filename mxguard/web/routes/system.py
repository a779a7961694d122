"""``/metrics`` (Prometheus text format) and ``/healthz`` (database reachable)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from mxguard.metrics import CONTENT_TYPE_LATEST
from mxguard.services import status
from mxguard.services.domains import current_generation
from mxguard.storage.db import SQLAlchemyError
from mxguard.web.context import WebContext
from mxguard.web.deps import get_ctx

router = APIRouter(tags=["system"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(ctx: WebContext = Depends(get_ctx)) -> Response:
    """Messages by disposition, inbound and downstream TLS counts, latency histograms,
    configuration generation, spool depth (when a spool is registered), engine errors."""
    if ctx.metrics is None:
        return Response("no metrics outside a gateway process\n", status_code=404, media_type="text/plain")

    async def generation() -> int:
        return await current_generation(ctx.store)

    body = await ctx.metrics.render(generation=generation, spool=status.spool_depth)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", summary="Health check")
async def healthz(ctx: WebContext = Depends(get_ctx)) -> JSONResponse:
    """200 ``{"status": "ok"}`` when the database answers, else 503."""
    try:
        await ctx.store.ping()
    except (SQLAlchemyError, OSError) as exc:
        return JSONResponse({"status": "error", "database": str(exc).splitlines()[0][:200]}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})
