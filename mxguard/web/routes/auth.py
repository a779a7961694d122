"""Login and logout.

The login form carries a CSRF token that must match a ``__Host-`` cookie set
with the form (double submit). A successful login always starts a new session
with a new random token (no session fixation) and follows ``next`` only when
it is a relative path on this site (no open redirect).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse

from mxguard.services import users
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, client_ip, get_ctx, optional_session
from mxguard.web.security import (LOGIN_CSRF_COOKIE, SESSION_COOKIE, clear_cookie, new_token, safe_next, set_cookie,
                                  tokens_match)

router = APIRouter(include_in_schema=False)


def _login_page(request: Request, *, next_path: str, error: str | None = None, status: int = 200, email: str = ""):
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or new_token()
    response = request.app.state.templates.TemplateResponse(
        request, "login.html", {"me": None, "csrf_token": token, "next": next_path, "error": error, "email": email},
        status_code=status)
    set_cookie(response, LOGIN_CSRF_COOKIE, token, max_age=3600)
    return response


@router.get("/login")
async def login_form(request: Request, next: str = "/", current: ConsoleUser | None = Depends(optional_session)):
    """The login page (signed-in users go straight to ``next``)."""
    if current is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, next_path=safe_next(next))


@router.post("/login")
async def login(request: Request, email: str = Form(""), password: str = Form(""), csrf_token: str = Form(""),
                next: str = Form("/"), ctx: WebContext = Depends(get_ctx)):
    """Check the login form; start a new session and follow ``next`` (same-site paths only)."""
    if not tokens_match(request.cookies.get(LOGIN_CSRF_COOKIE), csrf_token):
        raise HTTPException(403, "CSRF token missing or wrong; reload the login page and try again")
    target = safe_next(next)
    ip = client_ip(request)
    try:
        user = await users.authenticate(ctx.store, email, password, ip, ctx.login_policy)
    except users.LoginRefused as refused:
        status = {"rate_limited": 429, "locked": 403}.get(refused.reason, 401)
        response = _login_page(request, next_path=target, error=str(refused), status=status, email=email)
        if refused.retry_after:
            response.headers["Retry-After"] = str(refused.retry_after)
        return response
    # A new session every login; any session cookie the browser brought is ignored and replaced.
    await users.end_session(ctx.store, request.cookies.get(SESSION_COOKIE))
    token, _csrf = await users.create_session(ctx.store, user, ip, ctx.settings.web.session_lifetime)
    if user.role == "user" and not target.startswith("/mc") and not target.startswith("/account"):
        target = "/mc"  # the Message Center is all a plain user may use
    response = RedirectResponse(target, status_code=303)
    set_cookie(response, SESSION_COOKIE, token, max_age=int(ctx.settings.web.session_lifetime))
    clear_cookie(response, LOGIN_CSRF_COOKIE)
    return response


@router.post("/logout")
async def logout(request: Request, csrf_token: str = Form(""), ctx: WebContext = Depends(get_ctx),
                 current: ConsoleUser | None = Depends(optional_session)):
    """End the session on the server and in the browser."""
    if current is not None and not tokens_match(current.csrf_token, csrf_token):
        raise HTTPException(403, "CSRF token missing or wrong")
    await users.end_session(ctx.store, request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    clear_cookie(response, SESSION_COOKIE)
    return response
