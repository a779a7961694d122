"""The Message Center: recipients (and administrators) work through the quarantine.

* ``/mc`` — the held messages the signed-in person may see (a user: their own;
  an org-admin: their organization's; an admin: all), searchable and
  sortable, with **deliver**, **delete**, **not junk** and (message links on)
  **view** per message.
* ``/mc/messages/{id}`` — the view page (headers, text, sanitized HTML in a
  sandboxed frame from ``/mc/messages/{id}/frame``, attachments listed).
* ``/mc/lists`` — the person's allow and block lists.
* ``/mc/signin`` — password sign-in, or a one-time sign-in link by mail.
* ``/mc/link/{token}`` — a mailed link (sign-in, or a summary's deliver/view):
  ``GET`` shows what it will do, ``POST`` does it, so a mail scanner that
  fetches links cannot use them up or release mail.

Another person's message id answers 404, like an id that does not exist.
With the organization's message links off, view answers 403 (and so do old
deliver/view links); deliver from the list still works.
"""

from __future__ import annotations

import asyncio

import structlog
from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from mxguard.errors import AlreadyExists, NotFound, PermissionDenied, ValidationFailed
from mxguard.quarantine import links as link_service
from mxguard.quarantine import senderlists
from mxguard.quarantine import service as qservice
from mxguard.quarantine.render import FRAME_CSP, frame_document, render
from mxguard.quarantine.signin import send_signin_link
from mxguard.quarantine.summary import message_center_url
from mxguard.services import users
from mxguard.services.access import SYSTEM, Actor, Role
from mxguard.services.orgsettings import settings_for_domain
from mxguard.web.context import WebContext
from mxguard.web.deps import (ConsoleUser, PasswordChangeRequired, client_ip, get_ctx, optional_session,
                               require_form_csrf)
from mxguard.web.security import LOGIN_CSRF_COOKIE, SESSION_COOKIE, new_token, set_cookie, tokens_match

log = structlog.get_logger("mxguard.web.mc")
router = APIRouter(include_in_schema=False)
PAGE = 50
_background: set[asyncio.Task] = set()


class SignInRequired(Exception):
    """No session: the Message Center sends the browser to its sign-in page."""

    def __init__(self, next_path: str):
        self.next_path = next_path


async def mc_user(request: Request, current: ConsoleUser | None = Depends(optional_session)) -> ConsoleUser:
    """Any signed-in person (every role may use the Message Center); a one-time password is replaced first."""
    if current is None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(path)
    if current.user.must_change_password:
        raise PasswordChangeRequired()
    return current


async def mc_csrf(request: Request, current: ConsoleUser = Depends(mc_user)) -> ConsoleUser:
    """POST handlers: the form's ``csrf_token`` must be the session's (403 otherwise)."""
    return await require_form_csrf(request, current)


def _page(request: Request, template: str, values: dict, status: int = 200):
    return request.app.state.templates.TemplateResponse(request, template, values, status_code=status)


def _link_page(request: Request, message: str, status: int, *, title: str = "Link cannot be used"):
    return _page(request, "mc_link_error.html", {"me": None, "title": title, "message": message}, status)


def _center(ctx: WebContext) -> str:
    return message_center_url(ctx.settings, ctx.public_url() if ctx.public_url else None)


async def _links_on(ctx: WebContext, recipient: str) -> bool:
    return (await settings_for_domain(ctx.store, qservice.recipient_domain(recipient))).message_links


def _sealer(ctx: WebContext):
    return ctx.keyring.get()


# -- sign-in ---------------------------------------------------------------------------------

def _signin_page(request: Request, *, sent_to: str | None = None, next_path: str = "/mc", status: int = 200):
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or new_token()
    response = _page(request, "mc_signin.html", {"me": None, "csrf_token": token, "sent_to": sent_to,
                                                 "next": next_path}, status)
    set_cookie(response, LOGIN_CSRF_COOKIE, token, max_age=3600)
    return response


@router.get("/mc/signin")
async def signin_form(request: Request, next: str = "/mc", current: ConsoleUser | None = Depends(optional_session)):
    """Sign in with a password, or ask for a one-time link by mail."""
    if current is not None:
        return RedirectResponse("/mc", status_code=303)
    return _signin_page(request, next_path=next if next.startswith("/mc") else "/mc")


@router.post("/mc/signin")
async def request_link(request: Request, email: str = Form(""), csrf_token: str = Form(""),
                       ctx: WebContext = Depends(get_ctx)):
    """Mail a sign-in link (in the background); the answer is the same whether the address exists or not."""
    if not tokens_match(request.cookies.get(LOGIN_CSRF_COOKIE), csrf_token):
        raise HTTPException(403, "CSRF token missing or wrong; reload the page and try again")
    address = email.strip()[:320]
    task = asyncio.get_running_loop().create_task(
        send_signin_link(ctx.store, ctx.settings, ctx.links, address, _center(ctx)))
    _background.add(task)
    task.add_done_callback(_background.discard)
    return _signin_page(request, sent_to=address or "(no address)")


# -- mailed links ----------------------------------------------------------------------------

def _lifetime(ctx: WebContext, purpose: str) -> float:
    q = ctx.settings.quarantine
    return q.signin_link_lifetime if purpose == "signin" else q.link_lifetime


async def _claim(ctx: WebContext, token: str) -> link_service.LinkClaim:
    purpose = ctx.links.purpose_of(token)
    if purpose not in link_service.SINGLE_USE:
        raise link_service.InvalidLink("invalid")
    return ctx.links.load(token, purpose, _lifetime(ctx, purpose))


def _link_actor(recipient: str) -> Actor:
    # Whoever holds a summary link acts as the recipient it was mailed to (their view, their rights).
    return Actor(f"link:{recipient}", Role.USER, email=recipient.lower())


async def _message_for_link(ctx: WebContext, claim: link_service.LinkClaim):
    """The held message a deliver/view link names (refused when the organization turned links off)."""
    row = await qservice.get_visible(ctx.store, SYSTEM, claim.subject)
    if not await _links_on(ctx, row.recipient):
        raise PermissionDenied("Message links are switched off for your organization: sign in to the Message "
                               "Center and deliver the message to your inbox from there.")
    return row


@router.get("/mc/link/{token}")
async def link_page(request: Request, token: str, ctx: WebContext = Depends(get_ctx)):
    """What a mailed link will do, with a button to do it (nothing happens on GET)."""
    try:
        claim = await _claim(ctx, token)
        if await link_service.is_used(ctx.store, claim):
            raise link_service.InvalidLink("used")
        row = None if claim.purpose == "signin" else await _message_for_link(ctx, claim)
    except link_service.InvalidLink as exc:
        return _link_page(request, str(exc), 400 if exc.reason == "invalid" else 410)
    except NotFound:
        return _link_page(request, "The message this link is for is no longer in the quarantine.", 404)
    # The confirmation form carries a CSRF token (double-submit cookie, as the sign-in forms):
    # another site must not post its own link from this browser, e.g. to sign it in to
    # someone else's quarantine (login CSRF).
    csrf = request.cookies.get(LOGIN_CSRF_COOKIE) or new_token()
    response = _page(request, "mc_link.html", {"me": None, "token": token, "purpose": claim.purpose,
                                               "subject": claim.subject, "row": row, "csrf_token": csrf})
    set_cookie(response, LOGIN_CSRF_COOKIE, csrf, max_age=3600)
    return response


@router.post("/mc/link")
async def use_link(request: Request, token: str = Form(""), csrf_token: str = Form(""),
                   ctx: WebContext = Depends(get_ctx)):
    """Use a mailed link once: sign in, deliver the message, or show it (403 without the form's CSRF token)."""
    if not tokens_match(request.cookies.get(LOGIN_CSRF_COOKIE), csrf_token):
        return _link_page(request, "This confirmation did not come from this site's page. Open the link from "
                                   "your mail again; it has not been used.", 403)
    try:
        claim = await _claim(ctx, token)
        row = None if claim.purpose == "signin" else await _message_for_link(ctx, claim)
        await link_service.consume(ctx.store, claim, _lifetime(ctx, claim.purpose))
    except link_service.InvalidLink as exc:
        return _link_page(request, str(exc), 400 if exc.reason == "invalid" else 410)
    except NotFound:
        return _link_page(request, "The message this link is for is no longer in the quarantine.", 404)
    if claim.purpose == "signin":
        return await _sign_in_by_link(request, ctx, claim)
    actor = _link_actor(row.recipient)
    if claim.purpose == "view":
        rendered_row, content = await qservice.open_visible(ctx.store, _sealer(ctx), actor, row.id)
        frame_token = ctx.links.make("frame", row.id)
        return _page(request, "mc_view.html", {"me": None, "row": rendered_row, "msg": render(content),
                                               "frame_url": f"/mc/frame/{frame_token}", "actions": False})
    try:
        result = await qservice.release(ctx.store, _sealer(ctx), ctx.settings, row.id, actor=actor, via="link")
    except qservice.AlreadyHandled as exc:
        return _link_page(request, str(exc), 410)
    except qservice.ReleaseFailed as exc:
        await link_service.unconsume(ctx.store, claim)  # the link works again once the server is back
        return _link_page(request, str(exc), 503, title="Not delivered yet")
    return _page(request, "mc_done.html", {"me": None, "row": row, "result": result})


async def _sign_in_by_link(request: Request, ctx: WebContext, claim: link_service.LinkClaim):
    user = await qservice.ensure_recipient_user(ctx.store, claim.subject)
    if user is None:
        return _link_page(request, "This address cannot use the Message Center.", 403)
    view = await users.get_user(ctx.store, user.email)
    token, _csrf = await users.create_session(ctx.store, view, client_ip(request), ctx.settings.web.session_lifetime)
    response = RedirectResponse("/mc", status_code=303)
    set_cookie(response, SESSION_COOKIE, token, max_age=int(ctx.settings.web.session_lifetime))
    return response


@router.get("/mc/frame/{token}")
async def frame_by_token(token: str, ctx: WebContext = Depends(get_ctx)):
    """The sanitized HTML of a message shown through a view link (a short-lived frame capability)."""
    try:
        claim = ctx.links.load(token, "frame", link_service.FRAME_LIFETIME)
    except link_service.InvalidLink:
        raise HTTPException(404, "not found") from None
    row = await _message_for_link(ctx, claim)
    _, content = await qservice.open_visible(ctx.store, _sealer(ctx), _link_actor(row.recipient), row.id)
    return _frame(render(content).html or "")


def _frame(html: str) -> HTMLResponse:
    response = HTMLResponse(frame_document(html))
    response.headers["Content-Security-Policy"] = FRAME_CSP
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    return response


# -- the list and its actions ----------------------------------------------------------------

@router.get("/mc")
async def index(request: Request, q: str = Query("", max_length=200), category: str = Query(""),
                sort: str = Query("date"), order: str = Query("desc"), page: int = Query(1, ge=1, le=10000),
                done: str = Query("", max_length=40), me: ConsoleUser = Depends(mc_user),
                ctx: WebContext = Depends(get_ctx)):
    """The held messages the signed-in person may see."""
    if category not in ("", "junk", "virus", "policy"):
        raise ValidationFailed("category", "must be junk, virus or policy")
    rows = await qservice.search(ctx.store, me.actor, text=q, sort=sort, descending=order != "asc",
                                 category=category, limit=PAGE + 1, offset=(page - 1) * PAGE)
    links = {}
    for row in rows[:PAGE]:
        domain = qservice.recipient_domain(row.recipient)
        if domain not in links:
            links[domain] = await _links_on(ctx, row.recipient)
    form = {"q": q, "category": category, "sort": sort, "order": order}
    return _page(request, "mc_index.html", {
        "me": me, "rows": rows[:PAGE], "more": len(rows) > PAGE, "page": page, "form": form,
        "links_on": links, "sorts": list(qservice.SORTS), "done": done,
        "many": me.user.role != Role.USER, "active": "/mc"})


@router.get("/mc/messages/{qid}")
async def view(request: Request, qid: str, me: ConsoleUser = Depends(mc_user), ctx: WebContext = Depends(get_ctx)):
    """One message: headers, text, sanitized HTML in a sandboxed frame, attachments (403 with links off)."""
    row = await qservice.get_visible(ctx.store, me.actor, qid)
    if not await _links_on(ctx, row.recipient):
        raise PermissionDenied("Viewing messages is switched off for your organization (message links off): "
                               "deliver the message to your inbox to read it there.")
    row, content = await qservice.open_visible(ctx.store, _sealer(ctx), me.actor, qid)
    return _page(request, "mc_view.html", {"me": me, "row": row, "msg": render(content),
                                           "frame_url": f"/mc/messages/{row.id}/frame", "actions": True,
                                           "active": "/mc"})


@router.get("/mc/messages/{qid}/frame")
async def frame(qid: str, me: ConsoleUser = Depends(mc_user), ctx: WebContext = Depends(get_ctx)):
    """The sanitized HTML body alone, with its own Content-Security-Policy (for the sandboxed frame)."""
    row = await qservice.get_visible(ctx.store, me.actor, qid)
    if not await _links_on(ctx, row.recipient):
        raise PermissionDenied("viewing is switched off (message links off)")
    _, content = await qservice.open_visible(ctx.store, _sealer(ctx), me.actor, qid)
    return _frame(render(content).html or "")


def _back(done: str) -> RedirectResponse:
    return RedirectResponse(f"/mc?done={done}", status_code=303)


async def _act(request: Request, coro, me: ConsoleUser, qid: str, done: str):
    try:
        await coro
    except (qservice.AlreadyHandled, qservice.ReleaseFailed) as exc:
        return _page(request, "error.html", {"me": me, "status": 409 if isinstance(exc, qservice.AlreadyHandled)
                                             else 503, "message": str(exc)},
                     409 if isinstance(exc, qservice.AlreadyHandled) else 503)
    return _back(done)


@router.post("/mc/messages/{qid}/deliver")
async def deliver(request: Request, qid: str, me: ConsoleUser = Depends(mc_csrf), ctx: WebContext = Depends(get_ctx)):
    """Release the message to the recipient's inbox through the delivery path."""
    return await _act(request, qservice.release(ctx.store, _sealer(ctx), ctx.settings, qid, actor=me.actor),
                      me, qid, "delivered")


@router.post("/mc/messages/{qid}/delete")
async def delete(request: Request, qid: str, me: ConsoleUser = Depends(mc_csrf), ctx: WebContext = Depends(get_ctx)):
    """Delete the message (its sealed copy is erased)."""
    return await _act(request, qservice.delete_message(ctx.store, me.actor, qid), me, qid, "deleted")


@router.post("/mc/messages/{qid}/notjunk")
async def not_junk(request: Request, qid: str, me: ConsoleUser = Depends(mc_csrf),
                   ctx: WebContext = Depends(get_ctx)):
    """Not junk: the sender goes on the recipient's allow list, and the message is delivered."""
    result = await _act(request, qservice.not_junk(ctx.store, _sealer(ctx), ctx.settings, qid, actor=me.actor),
                        me, qid, "allowed")
    await ctx.config_changed()  # the allow list applies to this process's next transaction at once
    return result


# -- allow and block lists -------------------------------------------------------------------

@router.get("/mc/lists")
async def lists(request: Request, me: ConsoleUser = Depends(mc_user), ctx: WebContext = Depends(get_ctx)):
    """The signed-in person's allow and block lists."""
    entries = await senderlists.list_entries(ctx.store, me.user.id)
    return _page(request, "mc_lists.html", {"me": me, "entries": entries, "error": None, "active": "/mc/lists"})


@router.post("/mc/lists")
async def add_to_list(request: Request, me: ConsoleUser = Depends(mc_csrf), ctx: WebContext = Depends(get_ctx)):
    """Add an address or domain to the allow or block list."""
    form = await request.form()
    try:
        await senderlists.add_entry(ctx.store, me.user.id, str(form.get("kind", "")), str(form.get("pattern", "")),
                                    actor=me.actor)
    except (ValidationFailed, AlreadyExists) as exc:
        entries = await senderlists.list_entries(ctx.store, me.user.id)
        return _page(request, "mc_lists.html", {"me": me, "entries": entries, "error": str(exc),
                                                "active": "/mc/lists"}, 422)
    await ctx.config_changed()
    return RedirectResponse("/mc/lists", status_code=303)


@router.post("/mc/lists/{entry_id}/delete")
async def remove_from_list(entry_id: int, me: ConsoleUser = Depends(mc_csrf), ctx: WebContext = Depends(get_ctx)):
    """Remove an entry from the person's lists."""
    await senderlists.remove_entry(ctx.store, me.user.id, entry_id, actor=me.actor)
    await ctx.config_changed()
    return RedirectResponse("/mc/lists", status_code=303)


__all__ = ["router", "SignInRequired"]
