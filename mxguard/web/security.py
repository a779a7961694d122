"""HTTP security for the console: headers, cookies, CSRF tokens, safe redirects.

* Content-Security-Policy: only same-origin scripts, styles and images; no
  inline script or style, no plug-ins, no framing (``frame-ancestors 'none'``),
  forms post only to this origin.
* Session cookie ``__Host-mxguard_session``: ``Secure; HttpOnly;
  SameSite=Strict; Path=/`` and no ``Domain`` (RFC 6265bis ``__Host-`` prefix),
  set with a new random token at every login (no session fixation).
* CSRF: a synchronizer token per session, in a hidden field of every form and
  checked on every POST (403 without it); the login form uses a
  double-submit cookie (OWASP CSRF cheat sheet).
* After login, only same-site relative paths are followed (no open redirect).
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response

SESSION_COOKIE = "__Host-mxguard_session"
LOGIN_CSRF_COOKIE = "__Host-mxguard_login"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; font-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: Charts are SVG documents with an inner stylesheet; they never run script.
SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'"


class SecurityHeaders(BaseHTTPMiddleware):
    """Adds the security headers to every response.

    Args:
        hsts: send ``Strict-Transport-Security`` (only when serving HTTPS).
    """

    def __init__(self, app, hsts: bool = True):
        super().__init__(app)
        self.hsts = hsts

    async def dispatch(self, request: Request, call_next) -> Response:
        response = await call_next(request)
        h = response.headers
        if h.get("content-type", "").startswith("image/svg+xml"):
            h["Content-Security-Policy"] = SVG_CSP
        else:
            h.setdefault("Content-Security-Policy", CSP)
        h["X-Content-Type-Options"] = "nosniff"
        h["Referrer-Policy"] = "no-referrer"
        h.setdefault("X-Frame-Options", "DENY")  # the Message Center's sandboxed mail frame says SAMEORIGIN
        h["Cross-Origin-Opener-Policy"] = "same-origin"
        h["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
        if self.hsts:
            h["Strict-Transport-Security"] = "max-age=31536000"
        if not request.url.path.startswith("/static/"):
            h.setdefault("Cache-Control", "no-store")
        return response


def set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
    """A ``Secure; HttpOnly; SameSite=Strict; Path=/`` cookie."""
    response.set_cookie(name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="strict")


def clear_cookie(response: Response, name: str) -> None:
    response.delete_cookie(name, path="/", secure=True, httponly=True, samesite="strict")


def tokens_match(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison; empty or missing never matches."""
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


def new_token() -> str:
    return secrets.token_urlsafe(32)


def safe_next(target: str | None, default: str = "/") -> str:
    """A redirect target after login: a path on this site, else ``default``.

    Refuses absolute URLs, scheme-relative ``//host`` and ``/\\host`` forms,
    and anything with control characters.
    """
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return default
    if any(ord(c) < 32 or c == "\\" for c in target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target
