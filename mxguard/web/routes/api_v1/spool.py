"""``/spool``: held messages, their attempts, retry now, delete, per-domain figures."""

from dataclasses import asdict

from fastapi import APIRouter, Depends, Query, Response

from mxguard.services import spool as svc
from mxguard.services.access import Actor
from mxguard.web.context import WebContext
from mxguard.web.deps import api_actor, get_ctx
from mxguard.web.routes.api_v1.schemas import (SpoolEntryDetailOut, SpoolEntryOut, SpoolRetryOut, SpoolStatsOut,
                                               SpoolStatus)

router = APIRouter(prefix="/spool", tags=["spool"])


def entry_out(view: svc.EntryView) -> dict:
    """The API form of an :class:`~mxguard.services.spool.EntryView`."""
    data = asdict(view)
    data.pop("key_id")
    return {**data, "age_seconds": view.age_seconds(), "pending": view.pending}


def _retry_out(outcomes: list[svc.RetryOutcome]) -> SpoolRetryOut:
    entries = [o.entry for o in outcomes if o.entry is not None]
    return SpoolRetryOut(
        requested=len(outcomes), delivered=sum(1 for e in entries if e.status == "delivered"),
        still_held=sum(1 for e in entries if e.status == "queued"),
        entries=[{"id": o.id, "attempted": o.attempted, "entry": entry_out(o.entry) if o.entry else None}
                 for o in outcomes])


@router.get("", response_model=list[SpoolEntryOut], summary="Spool entries, oldest first (held ones by default)")
async def list_entries(domain: str | None = Query(None, max_length=253), status: SpoolStatus = "queued",
                       limit: int = Query(500, ge=1, le=10000),
                       actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return [entry_out(v) for v in await svc.list_entries(ctx.store, actor, domain=domain, status=status, limit=limit)]


@router.get("/stats", response_model=SpoolStatsOut, summary="Held messages, bytes and oldest age per domain")
async def stats(actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return asdict(await svc.stats(ctx.store, actor))


@router.post("/retry", response_model=SpoolRetryOut,
             summary="Deliver every held message of a domain now (every visible one without 'domain')")
async def retry_domain(domain: str | None = Query(None, max_length=253), actor: Actor = Depends(api_actor),
                       ctx: WebContext = Depends(get_ctx)):
    return _retry_out(await svc.retry(ctx.store, ctx.settings, actor, domain=domain, worker=ctx.spool_worker,
                                      wait=svc.RETRY_WAIT))


@router.get("/{entry_id}", response_model=SpoolEntryDetailOut, summary="One entry and every delivery attempt")
async def get_entry(entry_id: int, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    entry, attempts = await svc.get_entry(ctx.store, actor, entry_id)
    return {**entry_out(entry), "delivery_attempts": [asdict(a) for a in attempts]}


@router.post("/{entry_id}/retry", response_model=SpoolRetryOut, summary="Deliver one held message now")
async def retry_entry(entry_id: int, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return _retry_out(await svc.retry(ctx.store, ctx.settings, actor, entry_id=entry_id, worker=ctx.spool_worker,
                                      wait=svc.RETRY_WAIT))


@router.delete("/{entry_id}", status_code=204, response_class=Response,
               summary="Delete an entry for good (never delivered, no DSN)")
async def delete_entry(entry_id: int, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    await svc.delete_entry(ctx.store, actor, entry_id)
    return Response(status_code=204)
