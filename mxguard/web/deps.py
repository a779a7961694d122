"""FastAPI dependencies: the shared context, the console user, the API caller, CSRF."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mxguard.services import users
from mxguard.services.access import Actor, Role
from mxguard.services.apikeys import InvalidApiKey, authenticate_key
from mxguard.web.context import WebContext
from mxguard.web.security import SESSION_COOKIE, tokens_match


def get_ctx(request: Request) -> WebContext:
    return request.app.state.ctx


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class LoginRequired(Exception):
    """No valid session: the console redirects to the login page."""

    def __init__(self, next_path: str):
        self.next_path = next_path


class PasswordChangeRequired(Exception):
    """Signed in with a one-time password: the console asks for a new one first."""


class ConsoleForbidden(Exception):
    """Signed in, but the role may not use the Administration Console (a ``user``)."""


@dataclass(frozen=True)
class ConsoleUser:
    """The signed-in console user: who, as an :class:`Actor`, and the session's CSRF token."""

    user: users.UserView
    actor: Actor
    csrf_token: str


async def optional_session(request: Request, ctx: WebContext = Depends(get_ctx)) -> ConsoleUser | None:
    info = await users.session_for(ctx.store, request.cookies.get(SESSION_COOKIE),
                                   ctx.settings.web.session_idle_timeout)
    if info is None:
        return None
    return ConsoleUser(info.user, info.user.actor(), info.csrf_token)


async def console_user(request: Request, current: ConsoleUser | None = Depends(optional_session)) -> ConsoleUser:
    """A signed-in admin or org-admin; otherwise redirect to login (or 403 for plain users)."""
    if current is None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(path)
    if current.user.must_change_password:
        raise PasswordChangeRequired()
    if current.user.role not in (Role.ADMIN, Role.ORG_ADMIN):
        raise ConsoleForbidden()
    return current


async def signed_in(request: Request, current: ConsoleUser | None = Depends(optional_session)) -> ConsoleUser:
    """Any signed-in user, whatever the role (the account page)."""
    if current is None:
        raise LoginRequired(request.url.path)
    return current


async def require_form_csrf(request: Request, current: ConsoleUser) -> ConsoleUser:
    """The posted form's ``csrf_token`` must be ``current``'s session token.

    Raises:
        HTTPException: 403 when it is missing or wrong.
    """
    form = await request.form()
    if not tokens_match(current.csrf_token, form.get("csrf_token")):
        raise HTTPException(403, "CSRF token missing or wrong; reload the page and try again")
    return current


async def csrf_checked(request: Request, current: ConsoleUser = Depends(console_user)) -> ConsoleUser:
    """For console POST handlers: a console user, with the form's CSRF token checked (403 otherwise)."""
    return await require_form_csrf(request, current)


_bearer = HTTPBearer(auto_error=False, description="API key from `mxguard apikey create`")


async def api_actor(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                    ctx: WebContext = Depends(get_ctx)) -> Actor:
    """The caller of a REST API endpoint, from ``Authorization: Bearer mxg_…`` (401 otherwise)."""
    if credentials is None:
        raise HTTPException(401, "an API key is required (Authorization: Bearer mxg_...)",
                            headers={"WWW-Authenticate": "Bearer"})
    try:
        user, prefix = await authenticate_key(ctx.store, credentials.credentials)
    except InvalidApiKey:
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"}) from None
    return user.actor(via=f"apikey:{prefix}")
