"""Content policy: attachment rules and MIME-structure limits.

The engine part runs once per message: it lists every attachment (MIME
parts with a file name or a non-text type, zip members, uuencoded blocks)
with its name, claimed type, *detected* type and size, and enforces the
structure limits (``filters.max_mime_parts``, ``filters.max_mime_depth``,
one ``Content-Type``/``Content-Transfer-Encoding``/``Content-Disposition``
per part). The attachment *rules* are per domain, so they are matched
later, for each recipient domain, by :func:`match_rules`.

A rule is a JSON object::

    {"name": "executable-extension", "action": "reject",
     "extensions": ["exe", "scr"]}

with an ``action`` (``reject``, ``quarantine`` or ``deliver``) and one or
more matchers, all of which must match one attachment:

==================  ============================================================
``extensions``      the file name's last extension (``pdf`` in ``a.b.pdf``)
``filenames``       shell patterns on the file name (``*.pdf.*``), case-insensitive
``kinds``           detected kind: executable, script, archive, office, pdf, html, image, media, other
``detected_types``  detected MIME type patterns (``application/x-msdownload``)
``content_types``   *claimed* Content-Type patterns (``application/x-ms*``)
``min_size``        size in bytes at or above which the rule matches
``encrypted``       true: a password-protected archive member
``unscanned``       true: content the filter could not read though a client may
                    (a zip compression method it lacks, a damaged member or
                    archive, archives nested too deep, the scan budget spent)
``in_archive``      true/false: only inside (or outside) archives
==================  ============================================================

Rules are tried in order for each attachment and the first match decides
that attachment (so a ``deliver`` rule placed first is an exception); the
message gets the most severe action over its attachments.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from mxguard.errors import ValidationFailed
from mxguard.filtering.engine import Engine, EngineOutput, ScanContext
from mxguard.filtering.message import ParsedMessage
from mxguard.filtering.structure import ambiguity_hits
from mxguard.filtering.verdict import POLICY_ACTIONS, PolicyHit

EXECUTABLE_EXTENSIONS = ["exe", "scr", "com", "pif", "bat", "cmd", "cpl", "vbs", "vbe", "js", "jse", "wsf", "wsh",
                         "hta", "msi", "msp", "ps1", "lnk", "reg", "jar", "scf", "dll", "iso", "img", "vhd", "vhdx"]

#: Rules a new domain gets.
DEFAULT_ATTACHMENT_RULES: list[dict[str, Any]] = [
    {"name": "executable-extension", "action": "reject", "extensions": EXECUTABLE_EXTENSIONS},
    {"name": "executable-content", "action": "reject", "kinds": ["executable"]},
    {"name": "encrypted-archive", "action": "quarantine", "encrypted": True},
    # Fail closed: what the filter could not read is held, not delivered as clean.
    {"name": "unscanned-archive", "action": "quarantine", "unscanned": True},
]

_LIST_MATCHERS = ("extensions", "filenames", "kinds", "detected_types", "content_types")
_KINDS = {"executable", "script", "archive", "office", "pdf", "html", "image", "media", "other"}


def severity(action: str) -> int:
    """Order of actions: deliver < quarantine < reject."""
    return POLICY_ACTIONS.index(action)


def validate_rules(rules: Any) -> list[dict[str, Any]]:
    """Check and normalise a rule list (from the CLI, the console or the database).

    Raises:
        ValidationFailed: field ``attachment_rules``, naming the rule and the problem.
    """
    if not isinstance(rules, list):
        raise ValidationFailed("attachment_rules", "must be a JSON list of rule objects")
    out = []
    for index, rule in enumerate(rules, 1):
        where = f"rule {index}"
        if not isinstance(rule, dict):
            raise ValidationFailed("attachment_rules", f"{where} is not an object")
        name = str(rule.get("name") or f"rule-{index}")
        where = f"rule {index} ({name})"
        unknown = set(rule) - {"name", "action", "min_size", "encrypted", "unscanned", "in_archive", *_LIST_MATCHERS}
        if unknown:
            raise ValidationFailed("attachment_rules", f"{where}: unknown key {sorted(unknown)[0]!r}")
        action = str(rule.get("action", "")).lower()
        if action not in POLICY_ACTIONS:
            raise ValidationFailed("attachment_rules", f"{where}: action must be one of {', '.join(POLICY_ACTIONS)}")
        clean: dict[str, Any] = {"name": name, "action": action}
        for key in _LIST_MATCHERS:
            if key in rule:
                values = rule[key]
                if isinstance(values, str):
                    values = [values]
                if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
                    raise ValidationFailed("attachment_rules", f"{where}: {key} must be a non-empty list of strings")
                values = [v.strip().lower().lstrip(".") if key == "extensions" else v.strip().lower() for v in values]
                if key == "kinds" and set(values) - _KINDS:
                    raise ValidationFailed("attachment_rules", f"{where}: unknown kind "
                                           f"{sorted(set(values) - _KINDS)[0]!r} (known: {', '.join(sorted(_KINDS))})")
                clean[key] = values
        if "min_size" in rule:
            if not isinstance(rule["min_size"], int) or isinstance(rule["min_size"], bool) or rule["min_size"] < 0:
                raise ValidationFailed("attachment_rules", f"{where}: min_size must be a number of bytes")
            clean["min_size"] = rule["min_size"]
        for key in ("encrypted", "unscanned", "in_archive"):
            if key in rule:
                if not isinstance(rule[key], bool):
                    raise ValidationFailed("attachment_rules", f"{where}: {key} must be true or false")
                clean[key] = rule[key]
        if len(clean) == 2:
            raise ValidationFailed("attachment_rules", f"{where}: needs at least one matcher "
                                   f"({', '.join(_LIST_MATCHERS)}, min_size, encrypted, unscanned)")
        out.append(clean)
    return out


def _matches(rule: dict[str, Any], att: dict[str, Any]) -> str | None:
    """Why ``rule`` matches attachment ``att`` (``None`` if it does not)."""
    reasons = []
    if "extensions" in rule:
        if att["extension"] not in rule["extensions"]:
            return None
        reasons.append(f"extension .{att['extension']}")
    if "filenames" in rule:
        name = (att["filename"] or "").lower()
        if not name or not any(fnmatch.fnmatchcase(name, pattern) for pattern in rule["filenames"]):
            return None
        reasons.append(f"name {att['filename']}")
    if "kinds" in rule:
        if att["kind"] not in rule["kinds"]:
            return None
        reasons.append(f"detected {att['kind']} ({att['detected']})")
    if "detected_types" in rule:
        if not att["detected"] or not any(fnmatch.fnmatchcase(att["detected"], p) for p in rule["detected_types"]):
            return None
        reasons.append(f"detected type {att['detected']}")
    if "content_types" in rule:
        if not att["content_type"] or not any(fnmatch.fnmatchcase(att["content_type"], p)
                                              for p in rule["content_types"]):
            return None
        reasons.append(f"content type {att['content_type']}")
    if "min_size" in rule:
        if att["size"] < rule["min_size"]:
            return None
        reasons.append(f"size {att['size']} >= {rule['min_size']}")
    if "encrypted" in rule:
        if att["encrypted"] != rule["encrypted"]:
            return None
        reasons.append("encrypted archive member" if att["encrypted"] else "not encrypted")
    if "unscanned" in rule:
        if bool(att.get("unscanned")) != rule["unscanned"]:
            return None
        reasons.append(f"not scanned: {att['unscanned']}" if att.get("unscanned") else "scanned")
    if "in_archive" in rule:
        if (att["origin"] == "archive") != rule["in_archive"]:
            return None
        reasons.append("inside an archive" if rule["in_archive"] else "not in an archive")
    return ", ".join(reasons)


def match_rules(attachments: list[dict[str, Any]], rules: list[dict[str, Any]]) -> list[PolicyHit]:
    """The rule hits for a message's attachments (first matching rule per attachment)."""
    hits: list[PolicyHit] = []
    for att in attachments:
        for rule in rules:
            why = _matches(rule, att)
            if why is not None:
                hits.append(PolicyHit(rule["name"], rule["action"], att["filename"] or att["path"], why))
                break
    return hits


def _extension(name: str | None) -> str:
    name = (name or "").strip().rstrip(".").lower()
    return name.rsplit(".", 1)[1] if "." in name else ""


def same_name(a: str, b: str) -> bool:
    """Two file names a client would treat as the same (case and surrounding space ignored)."""
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def distinct_names(names: tuple[str, ...] | list[str]) -> list[str]:
    """``names`` without the ones :func:`same_name` calls equal to an earlier one."""
    out: list[str] = []
    for name in names:
        if not any(same_name(name, seen) for seen in out):
            out.append(name)
    return out


def attachments_of(message: ParsedMessage) -> list[dict[str, Any]]:
    """The parts a rule can look at: anything with a name, a non-text type, or found inside another.

    A part that carries several different file names (``filename`` and ``filename*``,
    Content-Type ``name``...) is listed once per name, so every rule sees every name a
    mail client might show or save it under.
    """
    out = []
    for part in message.parts:
        is_body_text = (part.origin in ("mime", "reading") and part.filename is None and not part.names
                        and (part.content_type.startswith("text/") or part.content_type == "")
                        and part.kind in (None, "html"))
        if is_body_text:
            continue
        names = distinct_names([n for n in (part.filename, *part.names) if n]) or [None]
        for name in names:
            out.append({"path": part.path, "filename": name, "extension": _extension(name),
                        "content_type": part.content_type, "detected": part.detected, "kind": part.kind,
                        "size": part.size, "origin": part.origin, "encrypted": part.encrypted,
                        "unscanned": part.unscanned})
    return out


def conflicting_name_hits(message: ParsedMessage, action: str) -> list[PolicyHit]:
    """A ``conflicting-names`` hit for each part whose file names disagree (at most 5)."""
    hits = []
    for part in message.parts:
        names = distinct_names([n for n in (part.filename, *part.names) if n])
        if len(names) > 1:
            hits.append(PolicyHit("conflicting-names", action, part.path,
                                  "the part's file names disagree: " + ", ".join(repr(n) for n in names[:4])))
    return hits[:5]


class ContentPolicyEngine(Engine):
    """Attachment listing and structure limits (rules are matched per domain).

    Args:
        max_parts: most MIME parts allowed (containers included).
        max_depth: deepest MIME nesting allowed.
        ambiguous_action: the action of ``ambiguous-structure`` hits (``filters.ambiguous_structure``).
        ambiguous_ignore: finding names not acted on (``filters.ambiguous_structure_ignore``).
    """

    name = "policy"
    kind = "policy"

    def __init__(self, max_parts: int = 500, max_depth: int = 20, timeout: float = 20.0,
                 ambiguous_action: str = "quarantine", ambiguous_ignore: tuple[str, ...] = ("stray-delimiter",),
                 conflicting_names: str = "quarantine"):
        super().__init__(timeout)
        self.max_parts = max_parts
        self.max_depth = max_depth
        self.ambiguous_action = ambiguous_action
        self.ambiguous_ignore = frozenset(ambiguous_ignore)
        #: The action for a part whose file names disagree (``filters.conflicting_names``).
        self.conflicting_names = conflicting_names

    def version(self) -> str:
        return f"mxguard content policy (max {self.max_parts} parts, depth {self.max_depth})"

    def structure_hits(self, message: ParsedMessage) -> list[PolicyHit]:
        hits = []
        if message.mime_parts > self.max_parts:
            hits.append(PolicyHit("mime-parts", "reject", "", f"{message.mime_parts} MIME parts > {self.max_parts}"))
        if message.max_depth > self.max_depth:
            hits.append(PolicyHit("mime-depth", "reject", "", f"nesting depth {message.max_depth} > {self.max_depth}"))
        for path, name in message.duplicate_fields[:5]:
            hits.append(PolicyHit("ambiguous-mime-header", "reject", path, f"{name} given twice in one part"))
        hits.extend(conflicting_name_hits(message, self.conflicting_names))
        return hits

    async def scan(self, message: ParsedMessage, ctx: ScanContext) -> EngineOutput:
        hits = self.structure_hits(message)
        hits += ambiguity_hits(message.findings, self.ambiguous_action, self.ambiguous_ignore)
        return EngineOutput(policy=hits, attachments=attachments_of(message))
