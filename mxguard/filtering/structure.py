"""Structural ambiguity: MIME that two parsers can read two ways, found and named.

A message whose structure can be read in more than one way is an evasion
attempt or a broken mailer; either way the gateway cannot know which reading
the recipient's client will show. Each place where readings can part is a
:class:`Finding` with one of these names:

=========================  ===================================================================
``duplicate-field``        Content-Type, Content-Transfer-Encoding or Content-Disposition
                           twice in one part (clients differ on which one wins)
``duplicate-parameter``    one parameter given twice in such a field (``boundary="a";
                           boundary="b"``; names compare case-insensitively, RFC 2045 5.1)
``encoded-parameter``      an RFC 2231 continuation (``boundary*0=``) or charset
                           (``boundary*=utf-8''...``) on a structural parameter
                           (``boundary``, ``charset``, ``type``, ``protocol``): RFC 2231 is
                           for names and text, and many parsers do not decode it there
``boundary-characters``    a boundary outside RFC 2046 5.1.1 ``bchars``, empty, longer than
                           70 characters or ending in a space
``boundary-unquoted``      a boundary with characters RFC 2045 5.1 allows only in a quoted
                           string (``tspecials``, space), not quoted
``header-defect``          a defect the ``email`` package records on a structural field
                           (trailing text after a value, a missing value...)
``boundary-missing``       a multipart whose boundary never occurs (or that has none) while
                           another delimiter-like line does
``stray-delimiter``        a delimiter-like line in a multipart's preamble or epilogue
``multipart-encoding``     a multipart with an encoding other than 7bit, 8bit or binary
                           (RFC 2045 6.4): some readers decode it, others do not
``unknown-encoding``       a Content-Transfer-Encoding that is none of RFC 2045's (or uuencode)
=========================  ===================================================================

The content policy turns findings into ``ambiguous-structure`` hits
(``filters.ambiguous_structure``, quarantine by default); whatever the
action, :mod:`mxguard.filtering.readings` scans the other readings too.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from email import _header_value_parser as hvp  # the stdlib's own MIME header tokenizer
from email.message import EmailMessage

from mxguard.filtering.verdict import POLICY_ACTIONS, PolicyHit

#: Every finding name, with one line on what it means (for the docs, the CLI and validation).
FINDINGS: dict[str, str] = {
    "duplicate-field": "a structural header field given twice in one part",
    "duplicate-parameter": "a parameter given twice in a structural header field",
    "encoded-parameter": "RFC 2231 continuation or charset on a structural parameter",
    "boundary-characters": "a boundary outside RFC 2046 bchars (or empty, too long, ending in a space)",
    "boundary-unquoted": "a boundary that must be quoted (RFC 2045 tspecials), unquoted",
    "header-defect": "the email package recorded a defect on a structural header field",
    "boundary-missing": "the declared boundary never occurs while another delimiter-like line does",
    "stray-delimiter": "a delimiter-like line in a multipart's preamble or epilogue",
    "multipart-encoding": "a multipart encoded other than 7bit, 8bit or binary",
    "unknown-encoding": "an unknown Content-Transfer-Encoding",
}

#: Parameters that decide how a part is split or decoded (RFC 2046 boundary, charset;
#: RFC 2387 type; RFC 1847 protocol). File names are not here: RFC 2231 is meant for them.
STRUCTURAL_PARAMS = frozenset({"boundary", "charset", "type", "protocol"})
#: RFC 2046 5.1.1: bcharsnospace and the space.
_BCHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
#: RFC 2045 5.1 tspecials and the space: a value with one of these must be a quoted-string.
_MUST_QUOTE = re.compile(r'[()<>@,;:\\"/\[\]?= ]')
#: A line that some parser could take for a boundary delimiter: "--" then anything but blanks
#: ("-- " alone is the usual signature separator, not a delimiter).
DELIMITER_LIKE = re.compile(rb"^--[ \t]*[^\s][^\r\n]*?\r?$", re.M)
_KNOWN_CTE = frozenset({"7bit", "8bit", "binary", "base64", "quoted-printable",
                        "x-uuencode", "uuencode", "x-uue", "uue"})
_MULTIPART_CTE = frozenset({"7bit", "8bit", "binary"})
_PARSERS = {"content-type": hvp.parse_content_type_header,
            "content-disposition": hvp.parse_content_disposition_header,
            "content-transfer-encoding": hvp.parse_content_transfer_encoding_header}


@dataclass(frozen=True)
class Finding:
    """One place where a message's structure can be read two ways.

    Attributes:
        name: one of :data:`FINDINGS` (``duplicate-parameter``...).
        path: the MIME part (``"0"`` for the top level, ``"2.1"``...).
        detail: what was seen, for the log (``boundary given 2 times``).
    """

    name: str
    path: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path, "detail": self.detail}


@dataclass(frozen=True)
class _Param:
    name: str        # lower case
    value: str       # as the stdlib reads this one token (quotes removed)
    raw: str         # the text after "=", as written
    section: int | None  # RFC 2231 continuation number (name*0=), None when not continued
    extended: bool   # RFC 2231 charset/language (name*=)
    quoted: bool


@dataclass(frozen=True)
class _FieldReading:
    params: tuple[_Param, ...]
    defects: tuple[str, ...]
    value: str       # the main value (type, disposition or encoding), lower case


#: Defects that are not a second reading: a duplicate is named on its own; a type without a
#: subtype is text/plain for every reader (RFC 2045 5.2), and its body is read again anyway.
_TOLERATED = re.compile(r"duplicate parameter|Invalid content type")
_LINE_BREAKS = re.compile(r"[\r\n]")


@functools.lru_cache(maxsize=4096)
def read_field(name: str, value: str) -> _FieldReading:
    """Tokens of one structural field as written: every parameter, duplicates and sections kept.

    The public ``email`` API merges duplicates and RFC 2231 sections away; its
    tokenizer (``email._header_value_parser``, the one ``policy.default``
    uses) keeps each parameter as given. Values recur from message to
    message, so readings are remembered (bounded, least recently used first).

    Args:
        name: ``content-type``, ``content-disposition`` or ``content-transfer-encoding``.
        value: the field's raw (folded) value.
    """
    try:
        tree = _PARSERS[name](_LINE_BREAKS.sub("", value))  # unfolded, as policy.default reads it
    except Exception as exc:  # noqa: BLE001 - the tokenizer failing is itself a defect
        return _FieldReading((), (f"unreadable ({type(exc).__name__})",), "")
    params: list[_Param] = []
    ignored: set[int] = set()  # defects of non-structural parameters (file names: not a structure question)
    for token in tree:
        if token.token_type != "mime-parameters":
            continue
        for param in token:
            if not param.token_type.endswith("parameter") or not len(param) or param[0].token_type != "attribute":
                continue
            raw = str(param).partition("=")[2].strip()
            section = param.section_number if param.sectioned else None
            pname = param[0].value.strip().lower()
            params.append(_Param(pname, str(param.param_value), raw, section, bool(param.extended),
                                 raw.startswith('"')))
            if pname not in STRUCTURAL_PARAMS:
                ignored.update(id(d) for d in param.all_defects)
    if name == "content-type":
        main = f"{tree.maintype}/{tree.subtype}"
    elif name == "content-disposition":
        main = tree.content_disposition or ""
    else:
        main = tree.cte or ""
    defects = tuple(str(d) for d in tree.all_defects if id(d) not in ignored and not _TOLERATED.match(str(d)))
    return _FieldReading(tuple(params), defects, main.lower())


def _boundary_findings(path: str, params: list[_Param]) -> list[Finding]:
    out = []
    for p in params:
        if p.name != "boundary" or p.section is not None or p.extended:
            continue
        written = p.raw[1:-1] if p.quoted and p.raw.endswith('"') and len(p.raw) >= 2 else p.raw
        if not _BCHARS.fullmatch(written):
            out.append(Finding("boundary-characters", path, f"boundary {written[:80]!r} is not RFC 2046 bchars"))
        elif not p.quoted and _MUST_QUOTE.search(written):
            out.append(Finding("boundary-unquoted", path, f"boundary {written[:80]!r} must be quoted"))
    return out


def _duplicate_params(path: str, key: str, params: tuple[_Param, ...]) -> list[Finding]:
    """A name given twice: two plain values, a plain value and continuations, or one section twice."""
    by_name: dict[str, list[_Param]] = {}
    for p in params:
        by_name.setdefault(p.name, []).append(p)
    out = []
    for pname, given in by_name.items():
        plain = [p for p in given if p.section is None]
        sections = [p.section for p in given if p.section is not None]
        if len(plain) > 1 or (plain and sections) or len(sections) != len(set(sections)):
            out.append(Finding("duplicate-parameter", path, f"{key}: {pname} given {len(given)} times"))
    return out


def field_findings(path: str, node: EmailMessage) -> list[Finding]:
    """The findings of one MIME part's own header fields (not its body).

    Args:
        path: the part's path (``"0"`` for the top level).
        node: the parsed part.
    """
    found: list[Finding] = []
    values: dict[str, list[str]] = {}
    for field_name, raw in node.raw_items():
        key = field_name.lower()
        if key in _PARSERS:
            values.setdefault(key, []).append(str(raw))
    for key, raws in values.items():
        if len(raws) > 1:
            found.append(Finding("duplicate-field", path, f"{key} given {len(raws)} times"))
        for raw in raws:
            reading = read_field(key, raw)
            found += _duplicate_params(path, key, reading.params)
            for p in reading.params:
                if p.name in STRUCTURAL_PARAMS and key == "content-type" and (p.section is not None or p.extended):
                    found.append(Finding("encoded-parameter", path, f"{key}: RFC 2231 {p.name}* parameter"))
                    break
            if key == "content-type":
                found += _boundary_findings(path, list(reading.params))
            for defect in reading.defects:
                found.append(Finding("header-defect", path, f"{key}: {defect[:120]}"))
            if key == "content-transfer-encoding" and reading.value and reading.value not in _KNOWN_CTE:
                found.append(Finding("unknown-encoding", path, f"{key}: {reading.value[:40]!r}"))
    return found


def _has_delimiter_like(text: str | None) -> bool:
    return bool(text) and "--" in text and DELIMITER_LIKE.search(text.encode("utf-8", "surrogateescape")) is not None


def body_findings(path: str, node: EmailMessage) -> list[Finding]:
    """Findings of how a part's body was split (its parser defects, preamble and epilogue).

    Args:
        path: the part's path (``"0"`` for the top level).
        node: the parsed part.
    """
    found: list[Finding] = []
    names = {type(d).__name__ for d in node.defects}
    declared = str(node.get("content-type", "") or "").strip().lower()
    if node.get_content_maintype() == "multipart" or declared.startswith("multipart"):
        payload = node.get_payload()
        if not node.is_multipart() and isinstance(payload, str) and _has_delimiter_like(payload):
            why = ("no boundary parameter" if "NoBoundaryInMultipartDefect" in names
                   else f"boundary {node.get_boundary()!r} never occurs")
            found.append(Finding("boundary-missing", path, f"{why}, other delimiter-like lines do"))
        if "InvalidMultipartContentTransferEncodingDefect" in names:
            cte = str(node.get("content-transfer-encoding", "")).strip().lower()
            if cte not in _MULTIPART_CTE:
                found.append(Finding("multipart-encoding", path, f"multipart with encoding {cte[:40]!r}"))
        if node.is_multipart():
            for where in ("preamble", "epilogue"):
                if _has_delimiter_like(getattr(node, where, None)):
                    found.append(Finding("stray-delimiter", path, f"delimiter-like line in the {where}"))
    return found


def validate_ignored(names: list[str]) -> list[str]:
    """Check a list of finding names (``filters.ambiguous_structure_ignore``).

    Raises:
        ValueError: a name that is not one of :data:`FINDINGS`.
    """
    unknown = sorted(set(names) - set(FINDINGS))
    if unknown:
        raise ValueError(f"unknown finding {unknown[0]!r} (known: {', '.join(FINDINGS)})")
    return names


def ambiguity_hits(findings: list[Finding], action: str = "quarantine",
                   ignore: frozenset[str] | set[str] = frozenset(), limit: int = 10) -> list[PolicyHit]:
    """The ``ambiguous-structure`` policy hits of a message's findings.

    Args:
        findings: what :func:`field_findings` and :func:`body_findings` found.
        action: ``deliver``, ``quarantine`` (default) or ``reject``.
        ignore: finding names not acted on (still recorded in the verdict).
        limit: most hits listed (one per finding).

    Raises:
        ValueError: ``action`` is not one of :data:`~mxguard.filtering.verdict.POLICY_ACTIONS`.
    """
    if action not in POLICY_ACTIONS:
        raise ValueError(f"action must be one of {', '.join(POLICY_ACTIONS)}")
    hits = []
    for f in findings:
        if f.name in ignore:
            continue
        hits.append(PolicyHit("ambiguous-structure", action, f.path, f"{f.name}: {f.detail}"))
        if len(hits) >= limit:
            break
    return hits
