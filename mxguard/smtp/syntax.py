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

#: RFC 5321 2.3.8: lines end in CRLF. A command line ended by a bare LF is refused, as Postfix's
#: ``smtpd_forbid_bare_newline`` does: servers that split on LF and servers that split on CRLF
#: would read a different dialogue (the root of SMTP smuggling).
BARE_LF_COMMAND = Reply(500, "5.5.2", "Command line ends in a bare LF; lines end in CRLF (RFC 5321 2.3.8)")


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


def path_problem(arg: str) -> str | None:
    """Why a MAIL/RCPT argument does not start with an RFC 5321 4.1.2 ``Path``, or ``None``.

    ``Path = "<" [ A-d-l ":" ] Mailbox ">"``: the angle brackets are required,
    no space or comment may stand inside them (outside a quoted local part),
    and a quoted string must end. The stdlib's RFC 5322 parser, which reads
    the mailbox itself, forgives all three (it allows folding white space and
    comments, and a missing ``>``), so they are checked here first.

    Args:
        arg: the text after ``FROM:``/``TO:``, stripped (``"<a@b.example> SIZE=10"``).

    Returns:
        ``"the path must be in angle brackets"``, ``"missing closing '>'"``,
        ``"unbalanced quotes"``, ``"spaces inside the path"``, ``"a comment inside
        the path"``, ``"'<' inside the path"`` or ``"text after the path"``; ``None`` when the path is well formed
        (or is the null path ``<>``).
    """
    if not arg.startswith("<"):
        return "the path must be in angle brackets"
    quoted = escaped = False
    for i, ch in enumerate(arg[1:], 1):
        if escaped:
            escaped = False
        elif quoted:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == ">":
            rest = arg[i + 1:]
            return None if not rest or rest[0] == " " else "text after the path"
        elif ch in " \t()":
            return "spaces inside the path" if ch in " \t" else "a comment inside the path"
        elif ch == "<":
            return "'<' inside the path"
    return "unbalanced quotes" if quoted or escaped else "missing closing '>'"


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


def malformed_sender() -> Reply:
    """``553 5.1.7``: a sender the mailbox parser cannot read (aiosmtpd words it ``553 5.1.3``,
    the recipient's code; RFC 3463 gives 5.1.7 for the sender)."""
    return Reply(553, "5.1.7", "Bad sender address syntax: malformed address")


def bad_recipient(problem: str) -> Reply:
    """``501 5.1.3`` (RFC 3463: bad destination mailbox address syntax)."""
    return Reply(501, "5.1.3", f"Bad recipient address syntax: {problem}")


def params_without_ehlo(verb: str) -> Reply:
    """``555 5.5.4`` for MAIL/RCPT parameters after HELO, where no service extension is in force.

    RFC 5321 3.3 allows parameters only for negotiated extensions (EHLO), and 4.1.1.11 answers
    parameters the server does not recognize with 555; RFC 1869 4.2 gives the same code. RFC 3463
    5.5.4: invalid command arguments.

    Args:
        verb: ``"MAIL"`` or ``"RCPT"``.
    """
    command = "MAIL FROM" if verb == "MAIL" else "RCPT TO"
    return Reply(555, "5.5.4", f"{command} parameters not recognized or not implemented: "
                               "no service extension is in force after HELO (use EHLO)")


def bad_helo(problem: str) -> Reply:
    """``501 5.5.4`` (RFC 3463: invalid command arguments)."""
    return Reply(501, "5.5.4", f"Invalid HELO/EHLO name: {problem}")


#: The routing forms a local part can hold, by the character that makes them, as the reply names them.
_ROUTING_FORMS = {
    "@": 'an address in the local part ("user@host"@domain)',
    "%": "the percent hack (user%host@domain)",
    "!": "a bang path (host!user@domain)",
}


def source_routing(address: str) -> Reply:
    """``550 5.7.1`` for sender-specified routing, naming the forms ``address`` holds.

    RFC 5321 3.6.1 lets a server refuse relaying through a local part (the
    percent hack, bang paths); RFC 3463 5.7.1: delivery not authorized. The
    reply says which form was found, so a sender can tell what to change.

    Args:
        address: the recipient, for which :func:`source_routed` is true.
    """
    local = address.rpartition("@")[0]
    forms = [text for ch, text in _ROUTING_FORMS.items() if ch in local] or [_ROUTING_FORMS["@"]]
    return Reply(550, "5.7.1", f"Sender-specified routing is not accepted: {' and '.join(forms)} (RFC 5321 3.6.1)")
