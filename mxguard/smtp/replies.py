"""SMTP replies with enhanced status codes (RFC 5321 section 4.2, RFC 3463, RFC 2034).

Every reply mxguard sends carries an enhanced status code, except where RFC
2034 says not to: the greeting, and the replies to EHLO/HELO. A reply passed
through from a downstream server keeps its text; it gets a default enhanced
code if it had none, and it is cleaned so that nothing it contains can start a
new line of the dialogue (reply injection).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
#: What a downstream server may have meant as an enhanced code, whatever its class digit (then fixed).
_DOWNSTREAM_ENHANCED_RE = re.compile(r"^(\d)\.(\d{1,3})\.(\d{1,3})(?=\s|$)")

#: Default enhanced code by basic reply code (RFC 3463 classes; RFC 5248 registry).
DEFAULT_ENHANCED: dict[int, str] = {
    211: "2.0.0", 214: "2.0.0", 220: "2.0.0", 221: "2.0.0", 250: "2.0.0", 251: "2.1.5", 252: "2.1.5",
    421: "4.3.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0", 455: "4.5.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 521: "5.3.2",
    530: "5.7.0", 534: "5.7.9", 535: "5.7.8", 550: "5.0.0", 551: "5.1.6", 552: "5.3.4",
    553: "5.1.3", 554: "5.0.0", 555: "5.5.4", 556: "5.1.10",
}

_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def clean_text(text: str, limit: int = 400) -> str:
    """Make reply text safe for one reply line: no CR, LF or other controls; bounded."""
    text = _UNSAFE.sub(" ", text.replace("\r\n", " ").replace("\n", " "))
    return text.encode("ascii", "replace").decode("ascii")[:limit].strip()


def valid_code(code: int) -> bool:
    """True for a reply code RFC 5321 defines the form of: ``2yz``-``5yz`` with ``y`` 0-5
    (4.2.1: the second digit is a category, 0 to 5; 4.3.2 lists no other)."""
    return 200 <= code <= 599 and (code // 10) % 10 <= 5


def default_enhanced(code: int) -> str:
    """The enhanced status code to use when a reply has none."""
    return DEFAULT_ENHANCED.get(code) or f"{code // 100}.0.0"


#: The code a downstream reply code of the wrong form becomes, by its class (first digit).
_INVALID_CODE_CLASS = {2: 250, 4: 451, 5: 554}


@dataclass(frozen=True)
class Reply:
    """One SMTP reply.

    Attributes:
        code: the three-digit reply code (RFC 5321 section 4.2.3).
        enhanced: ``class.subject.detail`` (RFC 3463), e.g. ``"5.7.1"``.
        text: human text; may hold several lines separated by ``\\n``.
    """

    code: int
    enhanced: str
    text: str

    @classmethod
    def make(cls, code: int, enhanced: str | None, text: str) -> "Reply":
        return cls(code, enhanced or default_enhanced(code), text)

    @classmethod
    def from_downstream(cls, code: int, message: str) -> "Reply":
        """Build from a downstream server's reply (aiosmtplib's code and message).

        Args:
            code: the reply code as the server sent it (any three digits).
            message: its text, lines separated by ``\\n``, each perhaps starting with an
                enhanced status code.

        Each line's leading enhanced code is lifted out; lines are cleaned.
        What the sender gets is always well formed:

        * a code outside the RFC 5321 4.2.1 form (second digit 6-9, e.g. ``599``, ``460``)
          becomes the usual code of its class: ``554``, ``451`` or ``250`` (the text is
          kept, the enhanced code defaults to ``x.0.0``);
        * a code of no usable class becomes ``451 4.3.0`` (a broken or hostile server):
          ``1yz``, ``6yz`` and above, and ``3yz``, which is never the answer to the commands
          this is used for (MAIL, RCPT, RSET, the end of DATA; RFC 5321 4.3.2), and has no
          enhanced code (RFC 3463 defines the classes 2, 4 and 5 only);
        * an enhanced code whose class disagrees with the reply code's (``550 4.1.1``;
          RFC 3463 2: the class digit must match the reply's) takes the reply's class and
          keeps its subject and detail (``550 5.1.1``).
        """
        fallback = None
        if not valid_code(code) or code // 100 == 3:
            fallback = _INVALID_CODE_CLASS.get(code // 100)
            if fallback is None:
                return cls(451, "4.3.0", "Downstream server sent an invalid reply")
            code = fallback
        klass = str(code)[0]
        lines = []
        enhanced = None
        for line in (message or "").split("\n"):
            line = line.strip()
            m = _DOWNSTREAM_ENHANCED_RE.match(line)
            if m:
                enhanced = enhanced or f"{klass}.{int(m.group(2))}.{int(m.group(3))}"
                line = line[m.end():].strip()
            lines.append(clean_text(line))
        text = "\n".join(line for line in lines if line) or "(no text)"
        return cls(code, enhanced or (f"{klass}.0.0" if fallback else default_enhanced(code)), text)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        """The reply as sent on the wire, without the final CRLF; multi-line uses ``code-``."""
        lines = [clean_text(line) for line in self.text.split("\n")] or [""]
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{self.enhanced} {line}".rstrip())
        return "\r\n".join(out)

    def one_line(self) -> str:
        """For logs and tables: the reply on one line."""
        return f"{self.code} {self.enhanced} " + " / ".join(self.text.split("\n"))


def with_enhanced_code(status: str) -> str:
    """Insert a default enhanced code into a reply line that lacks one.

    Used for replies aiosmtpd writes itself (``503 Error: need MAIL command``).
    Multi-line replies (``250-...``) are handled line by line. Intermediate
    replies (``354``) get none: RFC 3463 defines only the classes 2, 4 and 5,
    and RFC 2034 section 4 puts enhanced codes on 2xx, 4xx and 5xx replies only.
    """
    out = []
    for line in status.split("\r\n"):
        if len(line) >= 3 and line[:3].isdigit() and line[0] in "245":
            code = int(line[:3])
            rest = line[4:] if len(line) > 3 else ""
            if not ENHANCED_RE.match(rest):
                sep = line[3:4] or " "
                line = f"{line[:3]}{sep}{default_enhanced(code)} {rest}".rstrip()
        out.append(line)
    return "\r\n".join(out)


# Replies mxguard itself gives, in one place so tests and docs can name them.
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied: this server does not accept mail for that domain")
TLS_REQUIRED_INBOUND = Reply(530, "5.7.0", "Must issue a STARTTLS command first: this domain requires TLS")
ROUTE_UNREACHABLE = Reply(451, "4.4.1", "Downstream server unreachable, try again later")
DOWNSTREAM_TLS_UNAVAILABLE = Reply(451, "4.7.5", "TLS to the downstream server is required by policy but could not be established; nothing was sent, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
