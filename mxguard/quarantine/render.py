"""Showing a held message safely: headers, the text part, sanitized HTML, the attachment list.

The message is parsed with the stdlib ``email`` package (``policy.default``).
HTML is passed through ``nh3`` (the Ammonia sanitizer): no script, no event
handlers, no ``style`` elements, no forms or frames, links get
``rel="noopener noreferrer"``, and every ``src`` that is not a ``data:`` URL
is dropped, so nothing is fetched from the sender's servers. The page shows
it in a sandboxed frame (no ``allow-scripts``, no ``allow-same-origin``) from
its own response, whose Content-Security-Policy (:data:`FRAME_CSP`) blocks
scripts and remote content again. Attachments are only listed, never served.

A broken message is shown as far as it can be read: an undecodable part
says so instead of failing the page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import nh3

#: The frame's policy: nothing but inline styles and data: images (no script, no remote anything).
FRAME_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src 'none'; "
             "form-action 'none'; base-uri 'none'; frame-ancestors 'self'")
#: Header fields shown above the message.
SHOWN_FIELDS = ("From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID")
MAX_TEXT = 512 * 1024


@dataclass
class Attachment:
    filename: str
    content_type: str
    size: int


@dataclass
class RenderedMessage:
    """What the view page shows.

    Attributes:
        headers: ``(name, decoded value)`` of :data:`SHOWN_FIELDS` present.
        text: the ``text/plain`` body (or ``None``).
        html: the sanitized ``text/html`` body (or ``None``).
        attachments: name, type and size (bytes, decoded) of each attachment.
        problems: parts that could not be decoded.
    """

    headers: list[tuple[str, str]] = field(default_factory=list)
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _keep_src(tag: str, attribute: str, value: str) -> str | None:
    # Remote images (tracking pixels, web bugs) never load: only data: URLs stay.
    if attribute in ("src", "srcset", "background", "poster"):
        return value if value.strip().lower().startswith("data:image/") and attribute == "src" else None
    return value


def sanitize_html(html: str) -> str:
    """HTML safe to show in the sandboxed frame (see the module docstring)."""
    return nh3.clean(html, clean_content_tags={"script", "style", "title", "noscript", "template", "iframe",
                                               "object", "embed", "svg", "math", "form"},
                     attribute_filter=_keep_src, url_schemes={"http", "https", "mailto", "data"},
                     strip_comments=True)


def _content(part: EmailMessage, problems: list[str], label: str) -> str | None:
    try:
        text = part.get_content()
    except (LookupError, ValueError, AssertionError, UnicodeError) as exc:
        problems.append(f"{label} could not be decoded ({type(exc).__name__})")
        payload = part.get_payload(decode=True) or b""
        text = payload.decode("utf-8", "replace")
    if not isinstance(text, str):
        return None
    return text[:MAX_TEXT]


def render(raw: bytes) -> RenderedMessage:
    """Parse ``raw`` (RFC 5322 bytes) into what the view page shows. Never raises for a bad message."""
    out = RenderedMessage()
    try:
        msg = BytesParser(policy=policy.default).parsebytes(raw)
    except Exception as exc:  # noqa: BLE001 - show what we can
        out.problems.append(f"the message could not be parsed ({type(exc).__name__})")
        out.text = raw[:MAX_TEXT].decode("utf-8", "replace")
        return out
    for name in SHOWN_FIELDS:
        try:
            value = msg.get(name)
        except Exception:  # noqa: BLE001 - a malformed field
            value = None
            out.problems.append(f"the {name} field could not be read")
        if value is not None:
            out.headers.append((name, str(value)))
    try:
        text_part = msg.get_body(preferencelist=("plain",))
        html_part = msg.get_body(preferencelist=("html",))
    except Exception as exc:  # noqa: BLE001 - broken MIME structure
        out.problems.append(f"the MIME structure could not be read ({type(exc).__name__})")
        text_part = html_part = None
    if text_part is not None:
        out.text = _content(text_part, out.problems, "the text part")
    if html_part is not None:
        html = _content(html_part, out.problems, "the HTML part")
        out.html = sanitize_html(html) if html is not None else None
    try:
        for part in msg.walk():
            if part.is_multipart() or part in (text_part, html_part):
                continue
            filename = part.get_filename()
            if filename is None and part.get_content_disposition() != "attachment":
                continue
            payload = part.get_payload(decode=True) or b""
            out.attachments.append(Attachment(filename or "(no name)", part.get_content_type(), len(payload)))
    except Exception as exc:  # noqa: BLE001
        out.problems.append(f"the attachments could not be listed ({type(exc).__name__})")
    return out


def frame_document(html: str) -> str:
    """The frame's whole document around sanitized HTML (already safe)."""
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><base target=\"_blank\"></head><body>"
            + html + "</body></html>")
