"""Trace and verdict headers, added to the raw message without re-serialising it.

mxguard never rewrites a message through a MIME library on the way out: the
bytes the sender sent go downstream unchanged, except that header fields are
prepended (``Received``, ``Authentication-Results``, verdict headers) and a
few named fields that only mxguard may set are removed. These helpers work on
the header block as lines (RFC 5322 section 2.2: a field is a line plus its
folded continuation lines), which is all that is needed for that.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable

_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def header_block_end(raw: bytes) -> int:
    """Offset where the header block ends (the start of the blank line), or len(raw).

    Accepts CRLF or bare LF line ends; a message without a body ends at len(raw).
    """
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    crlf = raw.find(b"\r\n\r\n")
    best = len(raw) if crlf < 0 else crlf + 2
    # An LF LF can end the block only before that CRLF CRLF: no need to search the whole body.
    lf = raw.find(b"\n\n", 0, best)
    return best if lf < 0 else min(best, lf + 1)


def remove_fields(raw: bytes, names: Iterable[str]) -> bytes:
    """Remove every header field whose name is in ``names`` (case-insensitive), with its continuations."""
    wanted = {n.lower().encode() for n in names}
    end = header_block_end(raw)
    head, rest = raw[:end], raw[end:]
    out: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        dropping = name in wanted
        if not dropping:
            out.append(line)
    return b"".join(out) + rest


def prepend_fields(raw: bytes, fields: list[str]) -> bytes:
    """Put header fields (already folded, without line ends) in front of the message."""
    if not fields:
        return raw
    return "".join(f + "\r\n" for f in fields).encode("utf-8") + raw


def safe_helo(name: str) -> str:
    """A HELO name as it may appear inside a Received comment (no parentheses, no controls)."""
    cleaned = _HELO_UNSAFE.sub("?", name or "")[:200]
    return cleaned or "unknown"


def received_field(*, helo: str, client_ip: str, hostname: str, txn_id: str, tls_version: str | None,
                   cipher: str | None, bits: int | None, smtputf8: bool, recipient: str | None,
                   timestamp: float | None = None, client_cert: tuple[str, str] | None = None,
                   authenticated: bool = False) -> str:
    """The ``Received`` field mxguard adds (RFC 5321 section 4.4).

    The protocol word follows RFC 3848 / RFC 6531: ``ESMTP``, ``ESMTPS`` when
    the sender used STARTTLS, ``UTF8SMTP``/``UTF8SMTPS`` with SMTPUTF8. The TLS
    version and cipher go in a comment, as Postfix writes them.

    Args:
        recipient: added as ``for <...>`` only when the copy has one recipient.
        client_cert: ``(subject, sha256 hex)`` of the client certificate shown at STARTTLS; added
            to the TLS comment (the subject with comment-breaking characters replaced).
        authenticated: the client used SMTP AUTH: ``ESMTPA``/``ESMTPSA`` (RFC 3848), ``UTF8SMTPA``/
            ``UTF8SMTPSA`` (RFC 6531).
    """
    with_ = ("UTF8SMTP" if smtputf8 else "ESMTP") + ("S" if tls_version else "") + ("A" if authenticated else "")
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    parts = [f"Received: from {safe_helo(helo)} ([{ip}])", f"\tby {hostname} (mxguard)"]
    if tls_version:
        parts.append(f"\t(using {tls_version} with cipher {cipher} ({bits}/{bits} bits))")
        if client_cert is not None:
            subject = _COMMENT_UNSAFE.sub("?", client_cert[0])[:200]
            parts.append(f"\t(client certificate {subject}; sha256 {client_cert[1]})")
    parts.append(f"\twith {with_} id {txn_id}")
    # "+0000": UTC known; formatdate's "-0000" means "no zone information" (RFC 5322 3.3).
    date = email.utils.formatdate(timestamp, localtime=False, usegmt=False)[:-5] + "+0000"
    if recipient:
        parts.append(f"\tfor <{recipient}>; {date}")
    else:
        parts[-1] += f"; {date}"
    return "\r\n".join(parts)


#: What may not stand in a comment (RFC 5322 3.2.2 ctext) unescaped, or breaks the header line.
_COMMENT_UNSAFE = re.compile(r"[()\\\x00-\x1f\x7f-\U0010ffff]")


def summarize(raw: bytes) -> tuple[str, str]:
    """``(subject, message_id)`` of a raw message, decoded, for the message log.

    Reads only the header block; never raises on malformed input.
    """
    from email.header import decode_header, make_header
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    try:
        headers = BytesHeaderParser(policy=compat32).parsebytes(raw[:header_block_end(raw)])
        subject_raw = headers.get("Subject", "") or ""
        try:
            subject = str(make_header(decode_header(str(subject_raw))))
        except (UnicodeError, LookupError, ValueError, TypeError):
            subject = str(subject_raw)
        message_id = str(headers.get("Message-ID", "") or "").strip()
    except Exception:  # noqa: BLE001 - a log summary must never fail a delivery
        return "", ""
    return _displayable(" ".join(subject.split()))[:500], _displayable(message_id)[:500]


_NOT_DISPLAYABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def _displayable(text: str) -> str:
    """Control characters (NUL...) and undecodable bytes become U+FFFD: the summary is shown and stored."""
    return _NOT_DISPLAYABLE.sub("\ufffd", text)


def remove_fields_where(raw: bytes, predicate) -> bytes:
    """Remove every header field for which ``predicate(name, value)`` is true.

    Args:
        raw: the message.
        predicate: called with the lower-case field name (``str``) and the
            unfolded value (``bytes``, without the line end).
    """
    end = header_block_end(raw)
    head, rest = raw[:end], raw[end:]
    fields: list[list[bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    out: list[bytes] = []
    for lines in fields:
        name, _, value = b"".join(lines).partition(b":")
        unfolded = b" ".join(part.strip() for part in value.splitlines())
        if not predicate(name.strip().lower().decode("ascii", "replace"), unfolded.strip()):
            out.extend(lines)
    return b"".join(out) + rest


def authserv_id(value: bytes) -> str:
    """The authserv-id of an ``Authentication-Results`` value (RFC 8601 2.2), normalized.

    Lower case, without quotes (it may be a quoted-string) and without a
    trailing dot, so ``"MX.Example.COM."`` compares equal to ``mx.example.com``.
    """
    text = value.decode("utf-8", "replace")
    while text.lstrip().startswith("("):  # a leading comment
        text = text.lstrip()
        depth = 0
        for i, ch in enumerate(text):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                text = text[i + 1:]
                break
        else:
            return ""
    token = text.strip().split(";", 1)[0].split()
    return token[0].strip('"').lower().rstrip(".") if token else ""


def strip_gateway_fields(raw: bytes, hostname: str) -> bytes:
    """Remove fields that only this gateway may set, when they arrived from outside.

    Removes every ``X-MXGuard-*`` field, ``X-Spam-Flag`` (mxguard sets it; a
    forged ``NO`` must not reach a downstream filter that trusts it), and
    every ``Authentication-Results`` that claims our hostname as its
    authserv-id (RFC 8601 section 5: a forged result must not reach the user
    looking like ours). Results from other authserv-ids are kept.
    """
    head = raw[:header_block_end(raw)].lower()
    if b"x-mxguard-" not in head and b"x-spam-flag" not in head and b"authentication-results" not in head:
        return raw  # the usual case, decided without splitting the header block into fields
    ours = hostname.lower().rstrip(".")

    def forged(name: str, value: bytes) -> bool:
        if name.startswith("x-mxguard-") or name == "x-spam-flag":
            return True
        return name == "authentication-results" and authserv_id(value) == ours

    return remove_fields_where(raw, forged)


def fold(name: str, items: list[str], separator: str = ";", width: int = 78) -> str:
    """``Name: item; item; ...`` folded with CRLF + tab before lines grow past ``width`` (RFC 5322 2.2.3)."""
    lines: list[str] = []
    current = f"{name}:"
    for i, item in enumerate(items):
        text = item + (separator if i < len(items) - 1 else "")
        if len(current) + 1 + len(text) > width and current != f"{name}:":
            lines.append(current)
            current = "\t" + text
        else:
            current += " " + text
    lines.append(current)
    return "\r\n".join(lines)


def authentication_results_field(hostname: str, auth, *, sender: str = "", helo: str = "") -> str:
    """``Authentication-Results`` (RFC 8601) for SPF, DKIM and DMARC.

    Args:
        hostname: our authserv-id.
        auth: :class:`~mxguard.filtering.verdict.AuthResults`, or ``None`` when
            the checks did not run (gives ``none``).
        sender: the envelope sender (``smtp.mailfrom``); ``helo`` is used for ``<>``.
    """
    if auth is None:
        return f"Authentication-Results: {hostname}; none"
    items = [hostname]
    if sender:
        items.append(f"spf={auth.spf} smtp.mailfrom={_ar_value(sender)}")
    elif helo:
        items.append(f"spf={auth.spf} smtp.helo={_ar_value(helo)}")
    else:
        items.append(f"spf={auth.spf}")
    if auth.dkim:
        for sig in auth.dkim[:5]:
            reason = f" reason={_ar_value(sig['reason'])}" if sig.get("reason") else ""
            items.append(f"dkim={sig['result']}{reason} header.d={_ar_value(sig['domain'] or 'unknown')}"
                         f" header.s={_ar_value(sig['selector'] or 'unknown')}")
    else:
        items.append("dkim=none")
    dmarc = f"dmarc={auth.dmarc}"
    if auth.dmarc_policy:
        dmarc += f" (p={auth.dmarc_policy})"
    if auth.from_domain:
        dmarc += f" header.from={_ar_value(auth.from_domain)}"
    items.append(dmarc)
    return fold("Authentication-Results", items)


def _ar_value(value: str) -> str:
    """A property value: a token, or a quoted string when it holds specials (RFC 8601 2.2, RFC 2045 token)."""
    cleaned = "".join(ch for ch in value if ch.isprintable() and ch not in "\r\n")[:200]
    if cleaned and all(ch.isalnum() or ch in "!#$%&'*+-.^_`{|}~@" for ch in cleaned):
        return cleaned
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def tag_subject(raw: bytes, tag: str) -> bytes:
    """Put ``tag`` in front of the Subject, on the header bytes (the rest is untouched).

    A message without a Subject gets ``Subject: <tag>``. A subject that
    already starts with the tag is left alone.
    """
    end = header_block_end(raw)
    head, rest = raw[:end], raw[end:]
    lines = head.splitlines(keepends=True)
    encoded = tag.encode("ascii")
    for i, line in enumerate(lines):
        if line[:1] in (b" ", b"\t"):
            continue
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"subject":
            if value.strip().startswith(encoded):
                return raw
            lines[i] = name + b": " + encoded + b" " + value.lstrip(b" \t") if value.strip() else \
                name + b": " + encoded + value.lstrip(b" \t")
            return b"".join(lines) + rest
    return b"Subject: " + encoded + b"\r\n" + raw
