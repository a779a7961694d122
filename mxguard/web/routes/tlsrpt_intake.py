"""``POST /tlsrpt``: TLS-RPT reports (RFC 8460 5.4) other senders POST about the served domains.

Public by design: reporters have no account, so there is no login and no
CSRF token (it reads no cookie and changes nothing but its own table). The
body is bounded before it is read in full: a ``Content-Length`` over the
limit is refused at once, and a streamed body as soon as it passes it.
"""

from __future__ import annotations

import asyncio

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from mxguard.services.tls_reports import store_report
from mxguard.tls.rpt_ingest import MAX_BODY, MEDIA_TYPES, ReportRefused, decode_body, media_type, parse_report
from mxguard.web.context import WebContext
from mxguard.web.deps import client_ip, get_ctx

log = structlog.get_logger("mxguard.tls.ingest")

PATH = "/tlsrpt"

router = APIRouter(tags=["tls-rpt"])


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ReportRefused(413, f"the report body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ReportRefused(413, f"the report body is larger than {limit} bytes")
    return bytes(body)


@router.post(PATH, status_code=201, summary="Submit a TLS-RPT report (RFC 8460 5.4; no API key)",
             responses={400: {"description": "malformed report"}, 409: {"description": "stored already"},
                        413: {"description": "too large"}, 415: {"description": "wrong content type"},
                        422: {"description": "about no served domain"}})
async def receive(request: Request, ctx: WebContext = Depends(get_ctx)) -> JSONResponse:
    """Take an ``application/tlsrpt+gzip`` or ``application/tlsrpt+json`` body: 201 ``{"stored": N}``
    (one per served policy domain), else the status and ``{"error": reason}``."""
    client = client_ip(request)
    if not ctx.settings.tls_reports.ingest:
        return JSONResponse({"error": "this gateway does not take TLS-RPT reports"}, status_code=404)
    content_type = request.headers.get("content-type")
    try:
        if media_type(content_type) not in MEDIA_TYPES:
            decode_body(b"", content_type)  # raises the 415 with its reason, before any body is read
        body = await _bounded_body(request, MAX_BODY)
        # Inflating and validating up to 8 MiB of JSON: off the event loop.
        parsed = await asyncio.to_thread(lambda: parse_report(decode_body(body, content_type)))
        stored = await store_report(ctx.store, parsed, "https")
    except ReportRefused as refused:
        if refused.status in (400, 413, 415):  # store_report logs its own decisions
            log.info("TLS report refused", client=client, status=refused.status, reason=refused.reason[:200])
        headers = {"Retry-After": "300"} if refused.status == 503 else None
        return JSONResponse({"error": refused.reason}, status_code=refused.status, headers=headers)
    return JSONResponse({"stored": len(stored.domains), "domains": stored.domains}, status_code=201)
