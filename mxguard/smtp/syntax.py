"""What a client may put in the envelope and the HELO name, beyond what aiosmtpd parses.

aiosmtpd splits command lines on LF and decodes arguments as UTF-8 with
``surrogateescape``, so an address or HELO name can still hold a bare CR, a
NUL, other control characters or bytes that are not UTF-8. None of these may
go further: they would reach the downstream dialogue (aiosmtplib refuses to
send them, RFC 5321 4.1.2 forbids them), the filter engines' protocols, the
``Received`` field and the database. They are refused at the command that
carries them, with the RFC 3463 code for that argument.
"""

from __future__ import annotations

import re

from mxguard.smtp.replies import Reply

_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")

#: Characters that route mail onwards when they appear in a local part
#: (``user@elsewhere@domain``, ``user%elsewhere@domain``, ``elsewhere!user@domain``).
ROUTING_CHARS = "@%!"


def argument_problem(text: str) -> str | None:
    """Why a command argument cannot be used, or ``None`` when it can.

    Args:
        text: the argument as aiosmtpd decoded it (UTF-8, undecodable bytes as
            lone surrogates).

    Returns:
        ``"control characters"`` for C0 controls (CR, LF, NUL...) or DEL;
        ``"not valid UTF-8"`` for bytes that are not UTF-8 (RFC 6531 3.3 asks
        for UTF-8 in SMTPUTF8 arguments); otherwise ``None``.
    """
    if _CONTROLS.search(text):
        return "control characters"
    if _SURROGATES.search(text):
        return "not valid UTF-8"
    return None


def source_routed(address: str) -> bool:
    """True when the local part holds routing characters (sender-specified routing).

    An MX relays only to the domain after the last ``@``; a local part that
    names another host would let a lax downstream server relay onwards (the
    check Postfix's ``reject_unauth_destination`` makes with
    ``allow_untrusted_routing = no``). It also keeps every envelope address
    to exactly one ``@``, which the message log's per-domain views rely on.
    """
    local, _, _ = address.rpartition("@")
    return any(ch in local for ch in ROUTING_CHARS)


def bad_sender(problem: str) -> Reply:
    """``501 5.1.7`` (RFC 3463: bad sender's mailbox address syntax)."""
    return Reply(501, "5.1.7", f"Bad sender address syntax: {problem}")


def bad_recipient(problem: str) -> Reply:
    """``501 5.1.3`` (RFC 3463: bad destination mailbox address syntax)."""
    return Reply(501, "5.1.3", f"Bad recipient address syntax: {problem}")


def bad_helo(problem: str) -> Reply:
    """``501 5.5.4`` (RFC 3463: invalid command arguments)."""
    return Reply(501, "5.5.4", f"Invalid HELO/EHLO name: {problem}")


SOURCE_ROUTING = Reply(550, "5.7.1", "Sender-specified routing (user@elsewhere@domain) is not accepted")
