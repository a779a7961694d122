"""What the filter pipeline found in one message: the verdict.

A :class:`Verdict` collects every engine's result (virus names, junk scores
with matched rules, content-policy hits), the sender authentication results
(SPF, DKIM, DMARC) and the engines that failed. It decides nothing per
recipient: :mod:`mxguard.filtering.disposition` turns it into a disposition
with each recipient domain's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

#: Actions a content-policy rule (or a disposition) can name, mildest first.
POLICY_ACTIONS = ("deliver", "quarantine", "reject")

#: The virus engines (:func:`mxguard.filtering.pipeline.build_engines`). A message one of them
#: could not scan is never delivered or held on the strength of the other engines alone.
VIRUS_ENGINES = frozenset({"yara", "clamd"})


@dataclass
class VirusHit:
    """One threat found by a virus engine.

    Attributes:
        engine: ``yara`` or ``clamd``.
        name: the signature or rule name (``Eicar-Test-Signature``).
        part: where it was found (file name or MIME part path), ``""`` when
            the engine scanned the whole message.
    """

    engine: str
    name: str
    part: str = ""


@dataclass
class JunkResult:
    """One junk engine's opinion.

    Attributes:
        engine: ``builtin``, ``rspamd`` or ``spamd``.
        score: the engine's score, on its own scale.
        threshold: the engine's own spam threshold (same scale).
        is_spam: the engine's own verdict (built-in: score >= threshold;
            Rspamd: action is ``add header``, ``rewrite subject`` or ``reject``;
            spamd: its ``Spam: True``).
        rules: matched rule or symbol name -> score.
        action: the engine's recommended action when it has one (Rspamd).
    """

    engine: str
    score: float
    threshold: float
    is_spam: bool
    rules: dict[str, float] = field(default_factory=dict)
    action: str | None = None


@dataclass
class PolicyHit:
    """A content-policy rule that matched.

    Attributes:
        rule: the rule's name (``executable-extension``, ``mime-depth``...).
        action: ``reject``, ``quarantine`` or ``deliver``.
        part: the file name or MIME part path that matched.
        detail: why, for the log (``extension .exe``, ``detected executable``).
    """

    rule: str
    action: str
    part: str = ""
    detail: str = ""


@dataclass
class AuthResults:
    """Sender authentication (RFC 7208 SPF, RFC 6376 DKIM, RFC 7489 DMARC).

    Results use the RFC 8601 words: ``pass``, ``fail``, ``softfail``,
    ``neutral``, ``none``, ``temperror``, ``permerror``.

    Attributes:
        spf: the SPF result for the envelope sender (or the HELO name for ``<>``).
        spf_domain: the domain SPF was checked for.
        dkim: one ``{"result", "domain", "selector"}`` per DKIM-Signature field.
        dmarc: the DMARC result for the From domain.
        dmarc_policy: the published ``p=`` (``none``, ``quarantine``, ``reject``).
        from_domain: the RFC 5322.From domain.
        sender_aligned: True when the envelope sender's domain is
            authenticated: SPF passed for it, or a DKIM signature passed whose
            ``d=`` is that domain or shares its organizational domain. The
            spool reads this to decide whether a DSN may go to the sender
            (no backscatter to forged senders).
    """

    spf: str = "none"
    spf_domain: str = ""
    dkim: list[dict[str, str]] = field(default_factory=list)
    dmarc: str = "none"
    dmarc_policy: str | None = None
    from_domain: str = ""
    sender_aligned: bool = False

    @property
    def dkim_result(self) -> str:
        """The summary DKIM result: ``pass`` if any signature passed, else the first result, else ``none``."""
        if any(d["result"] == "pass" for d in self.dkim):
            return "pass"
        return self.dkim[0]["result"] if self.dkim else "none"


@dataclass
class EngineError:
    """An engine that was down, too slow or answered nonsense: the message was not fully scanned."""

    engine: str
    reason: str


@dataclass
class Verdict:
    """Everything the pipeline found in one message.

    Attributes:
        viruses: threats found (any virus engine).
        junk: one result per junk engine that answered.
        policy: content-policy hits that apply whatever the domain (MIME structure).
        attachments: what the per-domain attachment rules look at (name,
            extension, claimed and detected type, size, origin).
        auth: sender authentication results (``None`` when the checks are off).
        errors: engines that failed; the message is then "not fully scanned".
        engines: names of the engines that ran.
        timings_ms: per engine, milliseconds.
        scanned: False when filtering is switched off.
        defects: MIME defects the parser tolerated (names), for the log.
        findings: structural ambiguities (``{"name", "path", "detail"}``; names in
            :mod:`mxguard.filtering.structure`), for the log and the console.
        subject, message_id: decoded from the one parse, for the message log (``None``: not parsed).
    """

    viruses: list[VirusHit] = field(default_factory=list)
    junk: list[JunkResult] = field(default_factory=list)
    policy: list[PolicyHit] = field(default_factory=list)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    auth: AuthResults | None = None
    errors: list[EngineError] = field(default_factory=list)
    engines: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    scanned: bool = True
    defects: list[str] = field(default_factory=list)
    findings: list[dict[str, str]] = field(default_factory=list)
    subject: str | None = None
    message_id: str | None = None

    @property
    def is_virus(self) -> bool:
        return bool(self.viruses)

    @property
    def failed(self) -> bool:
        """True when at least one engine could not give a result."""
        return bool(self.errors)

    @property
    def virus_unscanned(self) -> list[str]:
        """The virus engines that could not scan the message (sorted names; empty: none failed)."""
        return sorted({e.engine for e in self.errors if e.engine in VIRUS_ENGINES})

    @property
    def virus_names(self) -> list[str]:
        seen: list[str] = []
        for hit in self.viruses:
            if hit.name not in seen:
                seen.append(hit.name)
        return seen

    def junk_summary(self) -> str:
        """``builtin=6.5/5.0 rspamd=15.0/15.0`` for headers and tables."""
        return " ".join(f"{j.engine}={j.score:.1f}/{j.threshold:.1f}" for j in self.junk)

    def matched_rules(self, limit: int = 12) -> list[str]:
        """The highest-scoring junk rules and every policy rule, for headers and tables."""
        rules: list[tuple[float, str]] = []
        for j in self.junk:
            rules += [(score, name) for name, score in j.rules.items() if score]
        names = [name for _, name in sorted(rules, key=lambda r: -abs(r[0]))[:limit]]
        names += [f"policy:{hit.rule}" for hit in self.policy]
        return names

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the message log's ``verdict`` column and ``--json`` output."""
        # Field by field, one level deep: dataclasses.asdict's recursive deep copy was a
        # measurable cost on every message, and every value here is plain data already.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("viruses", "junk", "policy", "errors"):
            data[key] = [dict(vars(item)) for item in data[key]]
        data["attachments"] = [dict(a) for a in self.attachments]
        data["findings"] = [dict(f) for f in self.findings]
        data["engines"], data["defects"] = list(self.engines), list(self.defects)
        data["timings_ms"] = dict(self.timings_ms)
        if self.auth is not None:
            data["auth"] = dict(vars(self.auth), dkim=[dict(d) for d in self.auth.dkim],
                                dkim_result=self.auth.dkim_result)
        return data
