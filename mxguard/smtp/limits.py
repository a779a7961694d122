"""Resource limits of the front door: connection counts, and checks on a received message.

The limits and their replies follow what Postfix does (anvil connection
counts, ``smtpd_junk_command_limit``, ``smtpd_hard_error_limit``,
``header_size_limit``) and RFC 5321 (loop detection, section 6.3; no bare CR
or LF, section 2.3.8).
"""

from __future__ import annotations

import collections
import re

from mxguard.config import SmtpSettings
from mxguard.smtp.headers import header_block_end
from mxguard.smtp.replies import TOO_MANY_RECIPIENTS, Reply

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_CLIENT = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_MESSAGES = Reply(421, "4.7.0", "Too many messages in one session; reconnect to send more")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session time limit reached, closing")
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands without mail, closing")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing")
BARE_LINE_END = Reply(554, "5.6.0", "Message contains a bare CR or LF (RFC 5321 2.3.8); refused")
HEADER_TOO_LARGE = Reply(552, "5.3.4", "Message header too large")
TOO_MANY_FIELDS = Reply(552, "5.3.4", "Too many header fields")
MAIL_LOOP = Reply(554, "5.4.6", "Too many Received fields: mail loop detected (RFC 5321 6.3)")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing (RFC 5321 4.5.3.2)")
#: The message data must arrive within ``command_timeout`` of the DATA command (a trickling sender).
DATA_TIMEOUT = Reply(421, "4.4.2", "Message data too slow, closing (RFC 5321 4.5.3.2)")
#: RFC 1870 section 6.1: 552 for a message over the fixed maximum size (RFC 3463 5.3.4: too big for system).
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
#: RFC 5321 4.5.3.1.6 (text line: 1000 octets with CRLF) and 4.5.3.1.10 ("500 Line too long").
LINE_TOO_LONG = Reply(500, "5.6.0", "Line too long: a text line may hold 1000 octets with CRLF (RFC 5321 4.5.3.1.6)")
#: RFC 5321 4.5.3.1.4 (command line: 512 octets with CRLF, more with extensions).
COMMAND_TOO_LONG = Reply(500, "5.5.2", "Command line too long (RFC 5321 4.5.3.1.4)")
TOO_MANY_UNRECOGNIZED = Reply(421, "4.7.0", "Too many unrecognized commands, closing")

#: The setting (or RFC limit) behind each refusal, for the process log's ``limit=`` key.
LIMIT_NAMES: dict[Reply, str] = {
    TOO_MANY_CONNECTIONS: "max_connections",
    TOO_MANY_FROM_CLIENT: "max_connections_per_client",
    TOO_MANY_MESSAGES: "max_messages_per_connection",
    SESSION_TOO_LONG: "max_session_time",
    TOO_MANY_COMMANDS: "junk_command_limit",
    TOO_MANY_ERRORS: "hard_error_limit",
    BARE_LINE_END: "bare_line_endings",
    HEADER_TOO_LARGE: "max_header_size",
    TOO_MANY_FIELDS: "max_header_fields",
    MAIL_LOOP: "max_received_headers",
    IDLE_TIMEOUT: "command_timeout",
    DATA_TIMEOUT: "command_timeout",
    MESSAGE_TOO_BIG: "max_message_size",
    LINE_TOO_LONG: "line_length",
    COMMAND_TOO_LONG: "command_line_length",
    TOO_MANY_UNRECOGNIZED: "unrecognized_commands",
    TOO_MANY_RECIPIENTS: "max_recipients",
}


def limit_name(reply: Reply) -> str:
    """The limit a refusal enforces (``max_header_size``...), ``"other"`` when it is none of ours."""
    return LIMIT_NAMES.get(reply, "other")

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_FIELD_START = re.compile(rb"^[^ \t\r\n]", re.MULTILINE)
_RECEIVED = re.compile(rb"^received[ \t]*:", re.MULTILINE | re.IGNORECASE)


class ConnectionCounter:
    """Open inbound connections, in all and per client address."""

    def __init__(self, settings: SmtpSettings):
        self.settings = settings
        self.total = 0
        self.per_client: collections.Counter[str] = collections.Counter()

    def admit(self, client: str) -> Reply | None:
        """Count a new connection, or return the ``421`` reply that refuses it."""
        if self.total >= self.settings.max_connections:
            return TOO_MANY_CONNECTIONS
        if self.per_client[client] >= self.settings.max_connections_per_client:
            return TOO_MANY_FROM_CLIENT
        self.total += 1
        self.per_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]


def has_bare_line_ends(content: bytes) -> bool:
    """True when ``content`` holds a CR not followed by LF, or an LF not preceded by CR."""
    # Three counts in C are much cheaper than a regular expression over the whole message.
    crlf = content.count(b"\r\n")
    return content.count(b"\n") != crlf or content.count(b"\r") != crlf


def normalize_line_ends(content: bytes) -> bytes:
    """Every bare CR or LF becomes CRLF."""
    return _BARE.sub(b"\r\n", content)


def check_message(content: bytes, settings: SmtpSettings, *,
                  bare_line_ends: bool | None = None) -> tuple[Reply | None, bytes]:
    """Header limits, loop detection and bare line ends on a received message.

    Args:
        content: the message (dot-unstuffed).
        settings: the ``[smtp]`` limits.
        bare_line_ends: whether ``content`` holds a bare CR or LF, when the caller
            already knows (the DATA reader finds out while reading); ``None``: look.

    Returns:
        ``(refusal, content)``: ``refusal`` is the reply for the sender when the
        message must be refused; ``content`` is normalised when
        ``bare_line_endings = "normalize"``.
    """
    if has_bare_line_ends(content) if bare_line_ends is None else bare_line_ends:
        if settings.bare_line_endings == "reject":
            return BARE_LINE_END, content
        content = normalize_line_ends(content)
    head = content[:header_block_end(content)]
    if len(head) > settings.max_header_size:
        return HEADER_TOO_LARGE, content
    if len(_FIELD_START.findall(head)) > settings.max_header_fields:
        return TOO_MANY_FIELDS, content
    if len(_RECEIVED.findall(head)) > settings.max_received_headers:
        return MAIL_LOOP, content
    return None, content
