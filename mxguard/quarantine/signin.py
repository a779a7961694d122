"""One-time sign-in links for the Message Center.

A recipient asks for a link with their address. When the address belongs to
a served domain owned by an organization, its ``user`` account is created if
missing and a signed, expiring, single-use link is mailed to it through the
delivery path. The page answers the same either way, and the mail is sent in
the background, so the answer (and its timing) does not tell whether an
address exists.
"""

from __future__ import annotations

import time

import structlog

from mxguard.config import Settings
from mxguard.errors import ValidationFailed
from mxguard.notify import own_message
from mxguard.own_mail import SendResult, send_own_message
from mxguard.quarantine.links import LinkSigner
from mxguard.quarantine.service import ensure_recipient_user
from mxguard.services.users import normalize_email
from mxguard.storage.db import Store

log = structlog.get_logger("mxguard.signin")

#: Seconds between two sign-in mails to one address (nobody can flood a mailbox through the form).
RESEND_AFTER = 60.0
_last_sent: dict[str, float] = {}


def signin_message(hostname: str, email: str, url: str, lifetime: float) -> bytes:
    """The sign-in mail: the link, how long it works, and what to do if it was not asked for."""
    minutes = int(lifetime // 60)
    text = (f"Someone (probably you) asked to sign in to the Message Center of {hostname} as {email}.\n\n"
            f"Sign in: {url}\n\nThe link works once, within {minutes} minutes. If you did not ask for it, "
            "ignore this message: nothing happens without the link.\n")
    return own_message(hostname, email, "Your Message Center sign-in link", text, kind="signin")


def signin_url(signer: LinkSigner, center_url: str, email: str) -> str:
    """A one-time sign-in link for ``email`` (the demo prints one; the mail carries one)."""
    return f"{center_url}/mc/link/{signer.make('signin', email)}"


async def send_signin_link(store: Store, settings: Settings, signer: LinkSigner, address: str,
                           center_url: str) -> SendResult | None:
    """Mail a sign-in link to ``address`` if it may have one; ``None`` when it may not (nothing is sent).

    At most one mail per address per :data:`RESEND_AFTER` seconds (per process). Never raises for an
    unknown or malformed address: the caller answers the same either way.
    """
    try:
        email = normalize_email(address)
    except ValidationFailed:
        return None
    now = time.monotonic()
    if now - _last_sent.get(email, -RESEND_AFTER) < RESEND_AFTER:
        log.info("sign-in link not sent: one was sent to this address less than a minute ago", email=email)
        return None
    if len(_last_sent) > 10000:  # bounded: forget the oldest half
        for key in sorted(_last_sent, key=_last_sent.get)[:5000]:
            del _last_sent[key]
    _last_sent[email] = now
    user = await ensure_recipient_user(store, email)
    if user is None:
        log.info("sign-in link not sent: not an address of a domain with an organization", email=email)
        return None
    message = signin_message(settings.hostname, email, signin_url(signer, center_url, email),
                             settings.quarantine.signin_link_lifetime)
    return await send_own_message(store, settings, email, message, kind="signin-link")
