"""The FastAPI application: console pages, REST API under ``/api/v1``, ``/metrics`` and ``/healthz``.

:func:`create_app` takes the shared :class:`~mxguard.web.context.WebContext`;
every page and endpoint calls the same service functions as the CLI.
"""

from __future__ import annotations

from urllib.parse import quote

import structlog
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from mxguard import __version__
from mxguard.errors import AlreadyExists, ConfigError, Conflict, NotFound, PermissionDenied, ValidationFailed
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleForbidden, LoginRequired, PasswordChangeRequired
from mxguard.web.mta_sts_host import PolicyHost
from mxguard.web.security import SecurityHeaders
from mxguard.web.templating import make_templates

log = structlog.get_logger("mxguard.web")

API_PREFIX = "/api/v1"


def _is_api(request: Request) -> bool:
    """JSON errors: the REST API, and the TLS-RPT intake reporters POST to."""
    return request.url.path.startswith(API_PREFIX) or request.url.path == "/tlsrpt"


def _page_error(request: Request, status: int, message: str) -> object:
    templates = request.app.state.templates
    return templates.TemplateResponse(request, "error.html", {"status": status, "message": message, "me": None},
                                      status_code=status)


def create_app(ctx: WebContext) -> FastAPI:
    """Build the ASGI application.

    Args:
        ctx: settings, store, metrics and the gateway hooks.
    """
    from mxguard.web.routes import (account, audit, auth, dashboard, domains, messagecenter, messagelog, orgs,
                                    outbound, partners, relay, spool, system, tls, tls_reports, tlsrpt_intake)
    from mxguard.web.routes.api_v1 import router as api_router

    app = FastAPI(
        title="mxguard REST API", version=__version__,
        description="Administration of an mxguard gateway: organizations, users, domains and their TLS policy, "
                    "the message log, the spool (held mail), the gateway certificate and the audit log. "
                    "Authenticate with `Authorization: Bearer <API key>` (`mxguard apikey create`).",
        docs_url=None, redoc_url=None, openapi_url=f"{API_PREFIX}/openapi.json",
    )
    app.state.ctx = ctx
    app.state.templates = make_templates()
    # Added first, so it runs inside SecurityHeaders and before any route: a request for
    # mta-sts.<domain> gets the hosted policy or 404, never the console (or its login redirect).
    app.add_middleware(PolicyHost, ctx=ctx)
    app.add_middleware(SecurityHeaders, hsts=not ctx.settings.web.plain_http)
    app.mount("/static", StaticFiles(packages=[("mxguard.web", "static")]), name="static")
    # One router per resource.
    for module in (auth, account, dashboard, domains, partners, tls_reports, tls, messagelog, spool, audit, system,
                   messagecenter, orgs, relay, tlsrpt_intake, outbound):
        app.include_router(module.router)
    app.include_router(api_router, prefix=API_PREFIX)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired):
        return RedirectResponse(f"/login?next={quote(exc.next_path, safe='/')}", status_code=303)

    @app.exception_handler(PasswordChangeRequired)
    async def _password_change(request: Request, exc: PasswordChangeRequired):
        return RedirectResponse("/account/password", status_code=303)

    @app.exception_handler(messagecenter.SignInRequired)
    async def _mc_signin(request: Request, exc: messagecenter.SignInRequired):
        return RedirectResponse(f"/mc/signin?next={quote(exc.next_path, safe='/')}", status_code=303)

    @app.exception_handler(ConsoleForbidden)
    async def _forbidden_role(request: Request, exc: ConsoleForbidden):
        if request.url.path == "/":
            return RedirectResponse("/mc", status_code=303)  # a plain user's home is the Message Center
        return _page_error(request, 403, "Your account may use the Message Center only; the Administration "
                                         "Console needs the admin or org-admin role.")

    @app.exception_handler(ValidationFailed)
    async def _invalid(request: Request, exc: ValidationFailed):
        if _is_api(request):
            return JSONResponse({"detail": [{"loc": ["body", field], "msg": message, "type": "value_error"}
                                            for field, message in exc.errors]}, status_code=422)
        return _page_error(request, 422, str(exc))

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        if _is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return _page_error(request, 404, str(exc))

    @app.exception_handler(AlreadyExists)
    async def _exists(request: Request, exc: AlreadyExists):
        if _is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=409)
        return _page_error(request, 409, str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict):
        if _is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=409)
        return _page_error(request, 409, str(exc))

    @app.exception_handler(PermissionDenied)
    async def _denied(request: Request, exc: PermissionDenied):
        if _is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=403)
        return _page_error(request, 403, str(exc))

    @app.exception_handler(ConfigError)
    async def _config(request: Request, exc: ConfigError):
        if _is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=500)
        return _page_error(request, 500, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if _is_api(request) or request.url.path in ("/metrics", "/healthz"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return _page_error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        if _is_api(request):
            return JSONResponse({"detail": errors}, status_code=422)
        text = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in errors)
        return _page_error(request, 422, text)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # The trace goes to the process log; the user gets a plain message.
        log.error("web request failed", path=request.url.path, error=repr(exc)[:300], exc_info=exc)
        if _is_api(request):
            return JSONResponse({"detail": "internal error; see the gateway log"}, status_code=500)
        return _page_error(request, 500, "Internal error; see the gateway log.")

    return app


__all__ = ["create_app", "HTTPException"]
