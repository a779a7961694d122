"""Every other reading of a message: what one parser calls text, another may call an attachment.

The ``email`` package reads a message one way. Where its reading leaves raw
bytes that another parser could split differently (a multipart's preamble
and epilogue, a part's undecoded body, a multipart whose boundary was never
found), those bytes are read again here:

* **split again** at every delimiter-like line: for each boundary value such
  a line names (and each boundary the part's own Content-Type gives, matched
  as a prefix the way lenient parsers do), the segments between its
  delimiters are parsed as MIME entities, each with its own decoding;
* **decoded again**: a body that looks like base64 or quoted-printable but
  was not decoded as such (an unknown, malformed or missing
  Content-Transfer-Encoding) is decoded, and the result read again too.

What comes out becomes :class:`~mxguard.filtering.message.Part` objects with
``origin="reading"`` (archive members keep ``origin="archive"``) and a path
that says where the reading started (``"1~r2.1/2"``: part 1, second boundary
candidate, first segment, its part 2). The attachment, archive and virus
rules see them like any other part: a hit in any reading counts.

The work is bounded: readings of readings stop at :data:`MAX_LEVEL`, at most
:data:`MAX_CANDIDATES` boundary values per source, :data:`MAX_SEGMENTS`
segments per value, and a byte budget shared by the whole message.
"""

from __future__ import annotations

import base64
import binascii
import functools
import quopri
import re
from dataclasses import dataclass
from email.message import EmailMessage
from types import SimpleNamespace

from mxguard.filtering.structure import DELIMITER_LIKE

#: The message parser's pieces (``parse_message``, ``Part``, ``zip_members``, ``detect``), handed
#: over by :mod:`mxguard.filtering.message` when it is imported: a reading is parsed by the same
#: parser, and this way the import goes one way (message -> readings).
_parser = SimpleNamespace()


def use_parser(**pieces) -> None:
    """Called once by :mod:`mxguard.filtering.message` with its parser functions and ``Part``."""
    _parser.__dict__.update(pieces)

MAX_LEVEL = 3
MAX_CANDIDATES = 16
MAX_SEGMENTS = 200
MAX_PARTS = 1000
_DECODED_CTE = frozenset({"base64", "quoted-printable", "x-uuencode", "uuencode", "x-uue", "uue"})
#: Lines of base64 alphabet (padding only at a line's end), blank lines and spaces around them.
_B64_BODY = re.compile(rb"(?:[ \t]*(?:[A-Za-z0-9+/]+={0,2})?[ \t]*(?:\r?\n|\Z))+")
_NOT_B64 = re.compile(rb"[^A-Za-z0-9+/]")
#: A header field naming how a part is read, in a segment's header block: a segment without
#: one is 7bit text/plain to every reader (RFC 2045 5.2, 6.1), bytes already scanned in its source.
_CONTENT_FIELD = re.compile(rb"(?im)^content-[a-z-]*[ \t]*:")
_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")
#: ``boundary=value`` anywhere in a Content-Type field, value up to ";" or white space, or quoted.
_LENIENT_BOUNDARY = re.compile(r'(?i)(?:^|[;\s])boundary[ \t]*=[ \t]*(?:"([^"\r\n]*)"?|([^;\s"]+))')
_QP_ESCAPE = re.compile(rb"=[0-9A-Fa-f]{2}")
_QP_SOFT_BREAK = re.compile(rb"[^=]=\r?\n")


@dataclass
class Budget:
    """What the readings of one message may still use.

    Attributes:
        bytes: bytes that may still be read again (split sources and decoded candidates).
        parts: parts that may still be added.
    """

    bytes: int
    parts: int = MAX_PARTS

    @classmethod
    def for_message(cls, size: int) -> "Budget":
        """Four times the message's size (each reading re-reads a share of it), at least 1 MiB."""
        return cls(bytes=max(4 * size, 1024 * 1024))


def _raw(text: str) -> bytes:
    # BytesParser keeps undecodable bytes as surrogate escapes: this gives the bytes back.
    return text.encode("utf-8", "surrogateescape")


def _declared_boundaries(node: EmailMessage) -> list[bytes]:
    """Every boundary value the part's Content-Type fields give, as any parser might read them."""
    from mxguard.filtering.structure import read_field
    out: list[bytes] = []
    for name, value in node.raw_items():
        if name.lower() != "content-type":
            continue
        for p in read_field("content-type", str(value)).params:
            if p.name == "boundary":
                for candidate in (p.value, p.raw, p.raw.strip('"')):
                    if candidate:
                        out.append(_raw(candidate))
        # As readers that split the field at ";" and "=" take it: a value the tokenizer calls an
        # invalid parameter (an unquoted "'" in it, say) is still a boundary to them.
        for m in _LENIENT_BOUNDARY.finditer(str(value)):
            candidate = m.group(2) if m.group(2) is not None else m.group(1)
            if candidate:
                out.append(_raw(candidate))
        try:
            legacy = node.get_boundary()  # the stdlib's own (first, RFC 2231-decoded) value
        except Exception:  # noqa: BLE001 - an unreadable parameter gives no candidate
            legacy = None
        if legacy:
            out.append(_raw(legacy))
    return list(dict.fromkeys(out))


def _candidates(source: bytes, declared: list[bytes]) -> list[tuple[bytes, bool]]:
    """``(boundary, prefix match)`` pairs to split ``source`` at, most frequent first."""
    counts: dict[bytes, int] = {}
    for m in DELIMITER_LIKE.finditer(source):
        value = m.group(0)[2:].rstrip()
        for v in (value, value[:-2] if value.endswith(b"--") else b""):
            if v:
                counts[v] = counts.get(v, 0) + 1
    found = sorted(counts, key=lambda v: -counts[v])[:MAX_CANDIDATES]
    out = [(b, True) for b in declared if any(line.startswith(b) for line in counts)]
    out += [(b, False) for b in found if (b, True) not in out]
    # A value that also closes: a reader that does not stop at the close delimiter reads on past it.
    out += [(b, True) for b in found if b + b"--" in counts and (b, True) not in out]
    return out[:MAX_CANDIDATES]


def split_at(source: bytes, boundary: bytes, prefix: bool) -> list[bytes]:
    """The segments between ``--boundary`` delimiter lines (RFC 2046 5.1.1), up to the close delimiter.

    The line break before a delimiter belongs to the delimiter. With
    ``prefix``, any line starting with ``--boundary`` counts, as lenient
    parsers match it. What precedes the first delimiter (the preamble) is
    not a segment.
    """
    tail = rb"[^\r\n]*" if prefix else rb"(--)?[ \t]*"
    line = re.compile(rb"^--" + re.escape(boundary) + tail + rb"\r?$", re.M)
    segments: list[bytes] = []
    start = None
    for m in line.finditer(source):
        if start is not None:
            segments.append(source[start:m.start()].removesuffix(b"\n").removesuffix(b"\r"))
            if len(segments) >= MAX_SEGMENTS:
                return segments
        if not prefix and m.group(1):  # the close delimiter: what follows is the epilogue
            return segments
        start = m.end() + (2 if source[m.end():m.end() + 2] == b"\r\n" else 1)
    if start is not None and start < len(source):
        segments.append(source[start:])
    return segments


def looks_base64(data: bytes) -> bool:
    """Every non-empty line is base64 alphabet only, with at least 16 characters in all."""
    return _B64_BODY.fullmatch(data) is not None and len(_NOT_B64.sub(b"", data)) >= 16


def decoded_candidates(node: EmailMessage, body: bytes) -> list[tuple[str, bytes]]:
    """``(encoding, decoded bytes)`` for each encoding the body looks like but was not decoded with.

    Lenient decoding, as mail clients do it: base64 ignores characters outside
    its alphabet, quoted-printable leaves bad escapes as they are.
    """
    cte = str(node.get("content-transfer-encoding", "") or "").strip().lower()
    if cte in _DECODED_CTE and len(node.get_all("content-transfer-encoding") or []) == 1:
        return []
    out = []
    b64 = looks_base64(body)
    if b64:
        try:
            out.append(("base64", base64.b64decode(re.sub(rb"[^A-Za-z0-9+/]", b"", body) + b"==", validate=False)))
        except (binascii.Error, ValueError):
            pass
    # Base64 padding at a line end looks like a soft line break: soft breaks alone count only
    # where an encoding was declared and not applied (misspelt, malformed, given twice).
    declared = bool(cte) and not b64
    if _QP_ESCAPE.search(body) or (declared and _QP_SOFT_BREAK.search(body)):
        out.append(("quoted-printable", quopri.decodestring(body)))
    return [(name, data) for name, data in out if data and data != body]


def worth_parsing(segment: bytes) -> bool:
    """True when a segment starts with header fields and one of them is a Content-* field,
    or it holds a uuencoded block: anything else reads as the plain text it already was."""
    if b"\nbegin " in segment or segment.startswith(b"begin "):
        return True
    if not _HEADER_LINE.match(segment):
        return False
    end = re.search(rb"\r?\n\r?\n", segment[:65536])
    return _CONTENT_FIELD.search(segment[:end.start() if end else 65536]) is not None


def _parse_segment(segment: bytes, label: str, depth: int, level: int, budget: Budget,
                   max_archive_member: int) -> list["Part"]:
    try:
        sub = _parser.parse_message(segment, max_archive_member=max_archive_member, level=level + 1, budget=budget)
    except Exception:  # noqa: BLE001 - an unreadable segment is one reading fewer, not a failure
        return []
    out = []
    for part in sub.parts:
        part.path = f"{label}/{part.path}"
        part.depth += depth
        if part.origin == "mime":
            part.origin = "reading"
        out.append(part)
    return out


def _read_source(source: bytes, label: str, depth: int, declared, level: int, budget: Budget,
                 max_archive_member: int) -> list["Part"]:
    """``declared``: a callable giving the part's declared boundaries (asked only when needed)."""
    parts: list[Part] = []
    if b"--" not in source or not DELIMITER_LIKE.search(source):
        return parts
    for n, (boundary, prefix) in enumerate(_candidates(source, declared()), 1):
        for i, segment in enumerate(split_at(source, boundary, prefix), 1):
            if not worth_parsing(segment):
                continue
            if budget.bytes < len(segment) or budget.parts <= 0:
                return parts
            budget.bytes -= len(segment)
            found = _parse_segment(segment, f"{label}~r{n}.{i}", depth, level, budget, max_archive_member)
            budget.parts -= len(found)
            parts += found
    return parts


def other_readings(msg: EmailMessage, *, level: int = 0, budget: Budget | None = None,
                   max_archive_member: int = 10 * 1024 * 1024) -> list["Part"]:
    """The parts that readings other than the stdlib's find in ``msg``.

    Args:
        msg: the parsed message (``policy.default``).
        level: how many readings deep ``msg`` already is (0: the message as received).
        budget: shared by every reading of one message (a fresh one sized for ``msg`` when ``None``).
        max_archive_member: as for :func:`~mxguard.filtering.message.parse_message`.

    Returns:
        parts with ``origin="reading"`` (or ``archive``/``uuencode`` for what
        was found inside them), in message order; empty when no other reading exists.
    """
    Part, _zip_members, detect = _parser.Part, _parser.zip_members, _parser.detect
    if level >= MAX_LEVEL:
        return []
    if budget is None:
        budget = Budget.for_message(0)
    parts: list[Part] = []

    def read(source: bytes, label: str, depth: int, declared) -> None:
        parts.extend(_read_source(source, label, depth, declared, level, budget, max_archive_member))

    def visit(node: EmailMessage, path: str, depth: int) -> None:
        if budget.parts <= 0:
            return
        if node.is_multipart():
            label = path or "0"
            for where in ("preamble", "epilogue"):
                text = getattr(node, where, None)
                source = _raw(text) if text else b""
                if b"--" in source and DELIMITER_LIKE.search(source) and budget.parts > 0:
                    # The preamble or epilogue is a part to another reading: scanned as it is too
                    # (its header-less segments are left to this, see worth_parsing).
                    part = Part(path=f"{label}~{where}", depth=depth, content_type="text/plain", filename=None,
                                data=source, origin="reading")
                    part.detected, part.kind = detect(source)
                    parts.append(part)
                    budget.parts -= 1
                    read(source, f"{label}~{where}", depth, lambda: _declared_boundaries(node))
            children = node.get_payload()
            if isinstance(children, list):
                for i, child in enumerate(children, 1):
                    if isinstance(child, EmailMessage):
                        visit(child, f"{path}.{i}" if path else str(i), depth + 1)
            return
        payload = node.get_payload()
        if not isinstance(payload, str) or not payload:
            return
        label = path or "1"  # as the part itself is numbered in ParsedMessage.parts
        body = _raw(payload)
        declared = functools.partial(_declared_boundaries, node)
        read(body, label, depth, declared)
        container = str(node.get("content-type", "") or "").strip().lower()
        if container.startswith(("multipart", "message")):
            # A container encoded base64/QP (RFC 2045 6.4 forbids it): some readers decode, then split.
            try:
                decoded = node.get_payload(decode=True)
            except Exception:  # noqa: BLE001 - a broken encoding gives no other reading
                decoded = None
            if decoded and decoded != body and budget.bytes >= len(decoded):
                budget.bytes -= len(decoded)
                read(decoded, f"{label}~decoded", depth, declared)
                if container.startswith("message"):
                    found = _parse_segment(decoded, f"{label}~decoded", depth, level, budget, max_archive_member)
                    budget.parts -= len(found)
                    parts.extend(found)
        for encoding, data in decoded_candidates(node, body):
            if budget.bytes < len(data) or budget.parts <= 0:
                return
            budget.bytes -= len(data)
            part = Part(path=f"{label}~{encoding}", depth=depth, content_type="", filename=None, data=data,
                        origin="reading")
            part.detected, part.kind = detect(data)
            parts.append(part)
            budget.parts -= 1
            if part.kind == "archive" and part.detected == "application/zip":
                allowance = [min(budget.bytes, 100 * 1024 * 1024)]
                members = _zip_members(part, max_archive_member, allowance)
                budget.bytes -= min(budget.bytes, 100 * 1024 * 1024) - allowance[0]
                budget.parts -= len(members)
                parts.extend(members)
            read(data, part.path, depth, declared)

    try:
        visit(msg, "", 0)
    finally:
        del visit  # the recursive closure refers to itself: a reference cycle per message otherwise
    return parts
