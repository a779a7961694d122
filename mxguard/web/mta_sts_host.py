"""The MTA-STS policy host: ``GET https://mta-sts.<domain>/.well-known/mta-sts.txt`` (RFC 8461 3.3).

An ASGI middleware in front of the console: a request whose ``Host`` starts with
``mta-sts.`` never reaches the console's routes (no login redirect, no session,
no CSRF); it gets the domain's policy as ``text/plain`` on the one path, and 404
on every other path, for a domain not served, or one whose hosted mode is ``off``.
"""

from __future__ import annotations

import structlog
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mxguard.services import hosted_sts
from mxguard.web.context import WebContext

log = structlog.get_logger("mxguard.mta_sts")


def _host_headers(scope: Scope) -> list[str]:
    # Header bytes are Latin-1 on the wire (RFC 9110 5.5); anything else stays unreadable, never matches.
    return [value.decode("latin-1") for key, value in scope.get("headers", ()) if key.lower() == b"host"]


class PolicyHost:
    """Serves hosted MTA-STS policies by ``Host`` header; passes every other request on.

    Args:
        app: the console application.
        ctx: the web context (its store, and ``settings.mx_hosts`` for the ``mx`` lines).
    """

    def __init__(self, app: ASGIApp, ctx: WebContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosts = _host_headers(scope)
        if len(hosts) > 1 and any(hosted_sts.is_policy_host(h) for h in hosts):
            # RFC 9112 section 3.2: more than one Host is a bad request.
            await PlainTextResponse("more than one Host header\n", status_code=400)(scope, receive, send)
            return
        if not hosts or not hosted_sts.is_policy_host(hosts[0]):
            await self.app(scope, receive, send)
            return
        response = await self._policy_response(scope, hosts[0])
        await response(scope, receive, send)

    async def _policy_response(self, scope: Scope, host: str) -> Response:
        path, method = scope.get("path", ""), scope.get("method", "GET")
        domain = hosted_sts.policy_domain_for_host(host)
        if path != hosted_sts.WELL_KNOWN_PATH or domain is None:
            log.debug("MTA-STS host: not the policy", host=host[:100], path=path[:100])
            return PlainTextResponse("not found\n", status_code=404)
        if method not in ("GET", "HEAD"):
            return PlainTextResponse("method not allowed\n", status_code=405, headers={"Allow": "GET, HEAD"})
        text = await hosted_sts.served_policy_text(self.ctx.store, domain, self.ctx.settings.mx_hosts)
        if text is None:
            log.info("MTA-STS policy not served", domain=domain, reason="domain not served or mode off")
            return PlainTextResponse("no MTA-STS policy for this domain\n", status_code=404)
        log.info("MTA-STS policy served", domain=domain)
        # PlainTextResponse: text/plain; charset=utf-8 (RFC 8461 section 3.3 asks for text/plain).
        return PlainTextResponse(text)
