"""From a verdict and a domain's settings to what happens to that domain's recipients.

One message can go to recipients of several domains with different
settings; each recipient gets the disposition of its own domain:

* **virus** -> the domain's ``virus_action``: ``reject`` (default) or ``quarantine``.
* **policy** -> the most severe action of the matching rules (MIME structure
  limits always reject).
* **junk** -> per junk engine, on that engine's own score scale:
  ``junk_reject`` (off by default) -> reject; ``junk_quarantine`` -> quarantine,
  or, when not set, the engine's own verdict (built-in threshold, Rspamd's
  action, spamd's ``Spam: True``); ``junk_tag`` (off by default) -> deliver
  with ``X-Spam-Flag: YES`` and a subject tag.
* **engine failure** (down or timed out) -> the domain's ``engine_failure``:
  ``defer`` (default, the sender gets ``451 4.3.0`` and retries) or ``tag``
  (deliver with a header saying the message was not fully scanned). When a
  *virus* engine failed and the domain says ``defer``, only a refusal found by
  the engines that did answer still applies: a quarantine (junk, a content
  rule, a virus under ``virus_action = quarantine``), a tag or a delivery
  becomes ``defer``, because held mail is later released and must not reach
  anyone unscanned. When only a *junk* engine failed, a quarantine found by
  the others still applies too (nothing unscanned for viruses is held).

The most severe action wins: reject > quarantine > tag > deliver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mxguard.filtering.policy_content import DEFAULT_ATTACHMENT_RULES, match_rules, severity
from mxguard.filtering.verdict import PolicyHit, Verdict

ACTIONS = ("deliver", "tag", "quarantine", "reject", "defer")
_RANK = {"deliver": 0, "tag": 1, "quarantine": 2, "reject": 3}
SUBJECT_TAG = "[SPAM]"


@dataclass(frozen=True)
class DomainFilterPolicy:
    """A domain's filtering settings.

    Attributes:
        junk_quarantine: score at or above which junk is quarantined; ``None``:
            each engine's own verdict.
        junk_reject: score at or above which junk is refused (``550 5.7.1``); ``None``: never.
        junk_tag: score at or above which junk is tagged and delivered; ``None``: never.
        virus_action: ``reject`` or ``quarantine``.
        engine_failure: ``defer`` or ``tag``.
        attachment_rules: content-policy rules (see :mod:`mxguard.filtering.policy_content`).
    """

    junk_quarantine: float | None = None
    junk_reject: float | None = None
    junk_tag: float | None = None
    virus_action: str = "reject"
    engine_failure: str = "defer"
    attachment_rules: tuple = ()

    @classmethod
    def of(cls, domain: Any) -> "DomainFilterPolicy":
        """From a :class:`~mxguard.services.domains.DomainView` (or anything with the same attributes)."""
        rules = getattr(domain, "attachment_rules", None)
        return cls(getattr(domain, "junk_quarantine", None), getattr(domain, "junk_reject", None),
                   getattr(domain, "junk_tag", None), getattr(domain, "virus_action", "reject") or "reject",
                   getattr(domain, "engine_failure", "defer") or "defer",
                   _freeze(DEFAULT_ATTACHMENT_RULES if rules is None else rules))

    @classmethod
    def defaults(cls) -> "DomainFilterPolicy":
        """The settings a new domain gets (default rules, engine verdicts, reject viruses, defer on failure)."""
        return cls.of(None)

    def rules(self) -> list[dict[str, Any]]:
        return [_thaw(r) for r in self.attachment_rules]


def _freeze(rules: list[dict[str, Any]]) -> tuple:
    return tuple(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in r.items())) for r in rules)


def _thaw(rule: tuple) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in rule}


@dataclass(frozen=True)
class Disposition:
    """What happens to one recipient's copy.

    Attributes:
        action: ``deliver``, ``tag`` (deliver with spam headers), ``quarantine``,
            ``reject`` or ``defer`` (the message could not be scanned).
        category: ``clean``, ``virus``, ``junk``, ``policy`` or ``unscanned``.
        reason: one line for replies, the log and the quarantine list.
        policy_hits: the domain's attachment-rule hits plus the structure hits.
    """

    action: str
    category: str
    reason: str
    policy_hits: tuple[PolicyHit, ...] = field(default=())

    @property
    def delivers(self) -> bool:
        return self.action in ("deliver", "tag")


def _junk_action(verdict: Verdict, policy: DomainFilterPolicy) -> tuple[str, str]:
    best, why = "deliver", ""
    for j in verdict.junk:
        action, reason = "deliver", ""
        if policy.junk_reject is not None and j.score >= policy.junk_reject:
            action, reason = "reject", f"junk: {j.engine} score {j.score:g} >= {policy.junk_reject:g}"
        elif policy.junk_quarantine is not None and j.score >= policy.junk_quarantine:
            action, reason = "quarantine", f"junk: {j.engine} score {j.score:g} >= {policy.junk_quarantine:g}"
        elif policy.junk_quarantine is None and j.is_spam:
            action = "quarantine"
            reason = f"junk: {j.engine} score {j.score:g}" + (f" ({j.action})" if j.action else
                                                               f" >= {j.threshold:g}")
        elif policy.junk_tag is not None and j.score >= policy.junk_tag:
            action, reason = "tag", f"junk: {j.engine} score {j.score:g} >= {policy.junk_tag:g}"
        if _RANK[action] > _RANK[best]:
            best, why = action, reason
    return best, why


def decide(verdict: Verdict, policy: DomainFilterPolicy) -> Disposition:
    """The disposition of one recipient domain's copy of a message."""
    if not verdict.scanned:
        return Disposition("deliver", "unscanned", "filtering is switched off")
    hits = list(verdict.policy) + match_rules(verdict.attachments, policy.rules())
    hits_t = tuple(hits)
    # A virus engine that could not scan: only an outright refusal stands (see the module docstring).
    hold_back = bool(verdict.virus_unscanned) and policy.engine_failure != "tag"
    if verdict.viruses:
        names = ", ".join(verdict.virus_names[:3])
        action = "quarantine" if policy.virus_action == "quarantine" else "reject"
        if action == "reject" or not hold_back:
            return Disposition(action, "virus", f"virus: {names}", hits_t)
        return _not_scanned(verdict, policy, hits_t)
    candidates: list[tuple[str, str, str]] = []
    acting = [h for h in hits if h.action != "deliver"]
    if acting:
        worst = max(acting, key=lambda h: severity(h.action))
        label = f" ({worst.part})" if worst.part else ""
        candidates.append((worst.action, "policy", f"policy: {worst.rule}{label}: {worst.detail}"))
    junk_action, junk_reason = _junk_action(verdict, policy)
    if junk_action != "deliver":
        candidates.append((junk_action, "junk", junk_reason))
    if candidates:
        action, category, reason = max(candidates, key=lambda c: _RANK[c[0]])
        if action == "reject" or not verdict.errors or (action == "quarantine" and not hold_back):
            return Disposition(action, category, reason, hits_t)
    if verdict.errors:
        return _not_scanned(verdict, policy, hits_t)
    if candidates:
        action, category, reason = candidates[0]
        return Disposition(action, category, reason, hits_t)
    return Disposition("deliver", "clean", "clean", hits_t)


def _not_scanned(verdict: Verdict, policy: DomainFilterPolicy, hits: tuple[PolicyHit, ...]) -> Disposition:
    """The disposition of a message some engine could not scan: the domain's ``engine_failure``."""
    failed = ", ".join(sorted({e.engine for e in verdict.errors}))
    if policy.engine_failure == "tag":
        return Disposition("deliver", "unscanned", f"not fully scanned: {failed} unavailable", hits)
    return Disposition("defer", "unscanned", f"not scanned: {failed} unavailable", hits)


def verdict_header_value(verdict: Verdict, disposition: Disposition, txn_id: str = "") -> str:
    """The value of ``X-MXGuard-Verdict``: category, action, scores, matched rules, threats.

    Example: ``junk; action=tag; builtin=6.5/5.0; rules=MISSING_DATE,HTML_ONLY; id=9F3A...``
    """
    items = [disposition.category, f"action={disposition.action}"]
    if verdict.junk:
        items.append(" ".join(f"{j.engine}={j.score:.1f}/{j.threshold:.1f}" for j in verdict.junk))
    rules = verdict.matched_rules(8)
    rules = [r for r in rules if not r.startswith("policy:")] + [f"policy:{h.rule}" for h in disposition.policy_hits]
    if rules:
        items.append("rules=" + ",".join(dict.fromkeys(rules)))
    if verdict.viruses:
        items.append("virus=" + ",".join(verdict.virus_names[:5]))
    if verdict.errors:
        items.append("unscanned=" + ",".join(sorted({e.engine for e in verdict.errors})))
    if txn_id:
        items.append(f"id={txn_id}")
    return "; ".join(items)
