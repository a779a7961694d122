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
    best = len(raw)
    for sep in (b"\r\n\r\n", b"\n\n"):
        pos = raw.find(sep)
        if pos != -1:
            best = min(best, pos + (2 if sep == b"\r\n\r\n" else 1))
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    return best


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
                   timestamp: float | None = None) -> str:
    """The ``Received`` field mxguard adds (RFC 5321 section 4.4).

    The protocol word follows RFC 3848 / RFC 6531: ``ESMTP``, ``ESMTPS`` when
    the sender used STARTTLS, ``UTF8SMTP``/``UTF8SMTPS`` with SMTPUTF8. The TLS
    version and cipher go in a comment, as Postfix writes them.

    Args:
        recipient: added as ``for <...>`` only when the copy has one recipient.
    """
    with_ = ("UTF8SMTP" if smtputf8 else "ESMTP") + ("S" if tls_version else "")
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    parts = [f"Received: from {safe_helo(helo)} ([{ip}])", f"\tby {hostname} (mxguard)"]
    if tls_version:
        parts.append(f"\t(using {tls_version} with cipher {cipher} ({bits}/{bits} bits))")
    parts.append(f"\twith {with_} id {txn_id}")
    date = email.utils.formatdate(timestamp, localtime=False, usegmt=False)
    if recipient:
        parts.append(f"\tfor <{recipient}>; {date}")
    else:
        parts[-1] += f"; {date}"
    return "\r\n".join(parts)


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
    return " ".join(subject.split())[:500], message_id[:500]
