"""The HTTP-01 challenge responder (RFC 8555 8.3): plain HTTP on port 80, one path, nothing else.

``GET /.well-known/acme-challenge/<token>`` answers the key authorization of a
token published for the request's ``Host`` (from the shared database, so any
node can answer); every other path, method, host or token gets 404. It is a
separate listener from the console: no session, no redirect, no console route
is reachable over plain HTTP.
"""

from __future__ import annotations

import structlog
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from mxguard.storage.db import Store
from mxguard.tls import acme_store
from mxguard.web.server import WebServer

log = structlog.get_logger("mxguard.acme")

PREFIX = "/.well-known/acme-challenge/"


def request_host(scope: Scope) -> str | None:
    """The one ``Host`` header's host name (lower-case, no port, no trailing dot), else ``None``."""
    hosts = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"host"]
    if len(hosts) != 1:
        return None  # RFC 9112 3.2: none or several is a bad request; never a match
    host = hosts[0].strip().lower()
    if host.startswith("["):
        return None  # an IPv6 literal: HTTP-01 validates host names only
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


class Http01Responder:
    """ASGI app serving HTTP-01 key authorizations from the store.

    Args:
        store: the database holding the published tokens (:mod:`mxguard.tls.acme_store`).
    """

    def __init__(self, store: Store):
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are never accepted
        response = await self._respond(scope)
        await response(scope, receive, send)

    async def _respond(self, scope: Scope) -> Response:
        path, method = scope.get("path", ""), scope.get("method", "")
        token = path[len(PREFIX):] if path.startswith(PREFIX) else ""
        host = request_host(scope)
        if method not in ("GET", "HEAD") or not token or host is None:
            return PlainTextResponse("not found\n", status_code=404)
        key_authorization = await acme_store.key_authorization_for(self.store, token, host)
        if key_authorization is None:
            log.info("HTTP-01 request for no published token", host=host[:100], token=token[:64])
            return PlainTextResponse("not found\n", status_code=404)
        log.info("HTTP-01 challenge answered", host=host, token=token)
        # RFC 8555 8.3: the body is the key authorization itself.
        return Response(key_authorization.encode("ascii"), media_type="application/octet-stream")


def responder_server(store: Store, listen: str) -> WebServer:
    """The responder's listener (plain HTTP, ``acme.http_listen``); ``await .start()`` binds it.

    Raises (from ``start``):
        ConfigError: naming ``acme.http_listen`` when it is invalid or in use.
    """
    return WebServer(Http01Responder(store), listen, None, setting="acme.http_listen", default_port=80,
                     label="ACME HTTP-01 responder")
