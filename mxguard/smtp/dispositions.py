"""Turning a verdict into an SMTP outcome: which copies go downstream, which are held, the sender's reply.

The proxy calls :func:`plan` once per message, after the filters and before
anything is sent downstream. Each accepted recipient gets its domain's
:class:`~mxguard.filtering.disposition.Disposition`; recipients of one route
whose copies would carry the same headers form one *copy* (one downstream
transaction). The sender gets one reply for the whole transaction:

==========================================  =====================================================
recipients' dispositions                    reply to the sender
==========================================  =====================================================
any ``defer`` (an engine failed)            ``451 4.3.0``; nothing delivered, nothing held
all ``reject``                              ``554 5.7.1`` naming the virus, else ``550 5.7.1``
some held or delivered, none deferred       ``250``; a recipient whose domain said ``reject``
                                            is held with reason ``reject (mixed transaction)``
==========================================  =====================================================

A reply after DATA cannot refuse some recipients and accept others (RFC 5321
has one reply per DATA), and a bounce to an unauthenticated sender would be
backscatter, so the "reject" copy of a mixed transaction is held in
quarantine instead of being silently dropped — except when a virus engine
could not scan the message and that recipient's domain defers on engine
failure: then the whole message is deferred (``451 4.3.0``), because nothing
unscanned is held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mxguard.filtering.disposition import SUBJECT_TAG, Disposition, DomainFilterPolicy, decide, verdict_header_value
from mxguard.filtering.verdict import Verdict
from mxguard.smtp import headers
from mxguard.smtp.legs import RouteLeg
from mxguard.smtp.replies import Reply


DEFER_REPLY = Reply(451, "4.3.0", "Temporary filtering failure; nothing was delivered, try again later")


@dataclass
class Copy:
    """One downstream transaction: a route's recipients whose copies are identical."""

    leg: RouteLeg
    rcpts: list[str]
    disposition: Disposition
    verdict_value: str


@dataclass
class HeldCopy:
    """One recipient's copy to hold, as the quarantine stores it
    (input of :func:`mxguard.quarantine.store.quarantine_many`).

    Attributes:
        recipient: the envelope recipient.
        reason: why it is held (shown to the recipient).
        category: ``junk``, ``virus`` or ``policy``.
        content: the message as the recipient would receive it, bytes.
        requiretls: the sender asked for REQUIRETLS (RFC 8689): released only over verified TLS.
    """

    recipient: str
    reason: str
    category: str
    content: bytes
    requiretls: bool = False


@dataclass
class Held:
    """One recipient's copy to hold in quarantine."""

    leg: RouteLeg
    rcpt: str
    disposition: Disposition
    reason: str


@dataclass
class FilterPlan:
    """What the filters decided for one transaction.

    Attributes:
        verdict: the pipeline's verdict.
        by_rcpt: each accepted recipient's disposition.
        copies: downstream transactions to run, grouped per route.
        held: copies to quarantine.
        rejected: ``(leg, rcpt, disposition)`` refused outright (only when all are refused).
        deferred: an engine failed and some recipient's domain says ``defer``.
    """

    verdict: Verdict
    by_rcpt: dict[str, Disposition] = field(default_factory=dict)
    copies: list[Copy] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)
    rejected: list[tuple[RouteLeg, str, Disposition]] = field(default_factory=list)
    deferred: bool = False

    def leg_is_whole(self, copy: Copy) -> bool:
        """True when ``copy`` carries every recipient the leg's open transaction has (send as is)."""
        return copy.rcpts == copy.leg.accepted

    def as_log(self) -> dict:
        """The verdict plus per-recipient dispositions, for the message log's ``verdict`` column."""
        data = self.verdict.as_dict()
        data["dispositions"] = {r: {"action": d.action, "category": d.category, "reason": d.reason}
                                for r, d in self.by_rcpt.items()}
        return data


def apply_sender_list(disposition: Disposition, kind: str | None, sender: str, block_action: str) -> Disposition:
    """A recipient's allow/block list entry applied to its domain's disposition.

    ``allow`` turns a junk verdict (quarantine, tag, reject) into a delivery; it
    never overrides a virus, a content-policy hit or an engine failure.
    ``block`` holds (or, with ``block_action`` ``reject``, refuses) anything
    that was not refused already, except that a message deferred because it
    could not be scanned is refused or stays deferred, never held (a held copy
    can be released, and must not be released unscanned).
    See :mod:`mxguard.quarantine.senderlists`.
    """
    if kind == "allow" and disposition.category == "junk" and disposition.action in ("quarantine", "tag", "reject"):
        return Disposition("deliver", "allowed", f"allow list: {sender} ({disposition.reason})",
                           disposition.policy_hits)
    if kind == "block" and disposition.action == "defer" and block_action != "reject":
        return disposition
    if kind == "block" and disposition.action in ("deliver", "tag", "defer"):
        action = "reject" if block_action == "reject" else "quarantine"
        return Disposition(action, "junk", f"block list: {sender}", disposition.policy_hits)
    return disposition


def plan(verdict: Verdict, legs: list[RouteLeg], txn_id: str, *, sender: str = "", lists=None) -> FilterPlan:
    """Dispositions per recipient and the copies to send (see the module docstring).

    Args:
        sender: the envelope sender (MAIL FROM), matched against the recipients' lists.
        lists: the recipients' allow/block lists (:class:`~mxguard.quarantine.senderlists.SenderLists`), if any.
    """
    result = FilterPlan(verdict)
    policies: dict[str, Disposition] = {}
    entries = []
    for leg in legs:
        for rcpt in leg.accepted:
            # A route can serve several domains: each recipient has its own domain's settings.
            domain = leg.rcpt_domains.get(rcpt, leg.domain)
            disposition = policies.get(domain.name)
            if disposition is None:
                disposition = policies[domain.name] = decide(verdict, DomainFilterPolicy.of(domain))
            if lists is not None and verdict.scanned:
                kind = lists.lookup(rcpt, sender)
                if kind is not None:
                    disposition = apply_sender_list(disposition, kind, sender,
                                                    getattr(domain, "block_action", "quarantine"))
            entries.append((leg, rcpt, disposition))
    for leg, rcpt, disposition in entries:
        result.by_rcpt[rcpt] = disposition
    actions = {d.action for _, _, d in entries}
    if "defer" in actions:
        result.deferred = True
        return result
    if actions == {"reject"}:
        result.rejected = entries
        return result
    if verdict.virus_unscanned and any(d.action == "reject" and _strict(leg, rcpt) for leg, rcpt, d in entries):
        # A refusal that a mixed transaction would turn into a held copy, of a message a virus
        # engine could not scan: only an outright refusal may stand, so the sender retries.
        result.deferred = True
        return result
    for leg, rcpt, disposition in entries:
        if disposition.action == "quarantine":
            result.held.append(Held(leg, rcpt, disposition, disposition.reason))
        elif disposition.action == "reject":
            result.held.append(Held(leg, rcpt, disposition, f"reject (mixed transaction): {disposition.reason}"))
    groups: dict[tuple, Copy] = {}
    for leg, rcpt, disposition in entries:
        if not disposition.delivers:
            continue
        value = verdict_header_value(verdict, disposition, txn_id)
        key = (id(leg), disposition.action, value)
        if key not in groups:
            groups[key] = Copy(leg, [], disposition, value)
            result.copies.append(groups[key])
        groups[key].rcpts.append(rcpt)
    return result


def _strict(leg: RouteLeg, rcpt: str) -> bool:
    """The recipient's domain defers mail an engine could not scan (``engine_failure = defer``)."""
    return getattr(leg.rcpt_domains.get(rcpt, leg.domain), "engine_failure", "defer") != "tag"


def reject_reply(dispositions: list[Disposition], txn_id: str) -> Reply:
    """The refusal when every recipient's copy is refused: a virus wins (``554 5.7.1``), else ``550 5.7.1``."""
    for d in dispositions:
        if d.category == "virus":
            return Reply(554, "5.7.1", f"Message refused: {d.reason} [{txn_id}]")
    first = dispositions[0]
    what = "junk" if first.category == "junk" else "content policy"
    return Reply(550, "5.7.1", f"Message refused by {what}: {first.reason.split(': ', 1)[-1]} [{txn_id}]")


def filter_fields(hostname: str, verdict: Verdict, copy_value: str, *, sender: str, helo: str,
                  tagged: bool) -> list[str]:
    """The fields mxguard adds below ``Received``: Authentication-Results, X-MXGuard-Verdict, X-Spam-Flag."""
    fields = [headers.authentication_results_field(hostname, verdict.auth, sender=sender, helo=helo),
              headers.fold("X-MXGuard-Verdict", copy_value.split("; "))]
    if tagged:
        fields.append("X-Spam-Flag: YES")
    return fields


def prepare(stripped: bytes, fields: list[str], tagged: bool) -> bytes:
    """The message for one copy: tagged subject (when tagged), our fields on top, body unchanged."""
    content = headers.tag_subject(stripped, SUBJECT_TAG) if tagged else stripped
    return headers.prepend_fields(content, fields)
