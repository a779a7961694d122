"""The signed-in user's own account: change the password (required after a one-time password)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse

from mxguard.errors import ValidationFailed
from mxguard.services import users
from mxguard.web.context import WebContext
from mxguard.web.deps import ConsoleUser, get_ctx, signed_in
from mxguard.web.security import SESSION_COOKIE, tokens_match

router = APIRouter(include_in_schema=False)


def _page(request: Request, me: ConsoleUser, *, error: str | None = None, status: int = 200):
    return request.app.state.templates.TemplateResponse(
        request, "password.html", {"me": me, "error": error, "forced": me.user.must_change_password},
        status_code=status)


@router.get("/account/password")
async def password_form(request: Request, me: ConsoleUser = Depends(signed_in)):
    """The password form (forced after a one-time password)."""
    return _page(request, me)


@router.post("/account/password")
async def change_password(request: Request, current_password: str = Form(""), new_password: str = Form(""),
                          confirm_password: str = Form(""), csrf_token: str = Form(""),
                          me: ConsoleUser = Depends(signed_in), ctx: WebContext = Depends(get_ctx)):
    """Replace the signed-in user's password."""
    if not tokens_match(me.csrf_token, csrf_token):
        raise HTTPException(403, "CSRF token missing or wrong; reload the page and try again")
    try:
        if new_password != confirm_password:
            raise ValidationFailed("confirm_password", "does not match the new password")
        await users.change_own_password(ctx.store, me.user.id, current_password, new_password,
                                        keep_session_token=request.cookies.get(SESSION_COOKIE))
    except ValidationFailed as exc:
        return _page(request, me, error=str(exc), status=422)
    return RedirectResponse("/", status_code=303)
