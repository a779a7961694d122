"""Resource limits of the front door: connection counts, and checks on a received message.

The limits and their replies follow what Postfix does (anvil connection
counts, ``smtpd_junk_command_limit``, ``smtpd_hard_error_limit``,
``header_size_limit``) and RFC 5321 (loop detection, section 6.3; no bare CR
or LF, section 2.3.8).
"""

from __future__ import annotations

import collections
import hashlib
import mmap
import os
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
    """Open inbound connections of one process, in all and per client address.

    This is the counter of a single gateway process (``serve --workers 1``, the
    test gateways). ``serve --workers N`` shares one :class:`ConnectionTable`
    between its processes instead (:class:`SharedConnectionCounter`).

    Args:
        settings: the ``[smtp]`` section; ``max_connections`` and
            ``max_connections_per_client`` are read at each :meth:`admit`.
    """

    def __init__(self, settings: SmtpSettings):
        self.settings = settings
        self.total = 0
        self.per_client: collections.Counter[str] = collections.Counter()

    def admit(self, client: str) -> Reply | None:
        """Count a new connection from ``client`` (its address as text), or return the reply that refuses it.

        Returns:
            ``None`` when admitted (the caller must :meth:`release` it later);
            :data:`TOO_MANY_CONNECTIONS` or :data:`TOO_MANY_FROM_CLIENT`
            (``421 4.7.0``, sent instead of the greeting, RFC 5321 3.1) when not.
        """
        if self.total >= self.settings.max_connections:
            return TOO_MANY_CONNECTIONS
        if self.per_client[client] >= self.settings.max_connections_per_client:
            return TOO_MANY_FROM_CLIENT
        self.total += 1
        self.per_client[client] += 1
        return None

    def release(self, client: str) -> None:
        """Uncount a connection from ``client`` that :meth:`admit` admitted; a client with none is ignored."""
        if self.per_client[client] <= 0:
            del self.per_client[client]
            return
        self.total -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]


#: Per-client buckets of each worker's slot in a :class:`ConnectionTable`.
CLIENT_BUCKETS = 4096


class ConnectionTable:
    """Open-connection counts shared by the worker processes of one ``serve --workers N``.

    The supervisor creates the table before it forks (an anonymous shared
    ``mmap``, inherited by every worker); each worker counts through its own
    :class:`SharedConnectionCounter` (:meth:`counter`). The table holds, per
    worker, one slot for its open connections in all and a fixed row of
    :data:`CLIENT_BUCKETS` per-client counts indexed by a keyed hash of the
    client address. A worker writes only its own slots (aligned 64-bit
    integers, no lock), so a worker that dies leaves nothing half-written for
    the others: the supervisor zeroes the dead worker's slots (:meth:`clear`)
    before it starts the replacement, and the dead worker's connections stop
    counting.

    The limits therefore hold for the gateway as a whole, as Postfix's anvil
    counts for all ``smtpd`` processes. Two known inexactnesses, both documented
    for operators:

    * Workers admitting at the same moment each read the sums before the other
      has written its own count, so ``max_connections`` and
      ``max_connections_per_client`` can be overshot by at most ``workers - 1``
      connections (one per other worker). Within one worker the event loop
      admits one connection at a time, so sequential admissions never overshoot.
    * Other workers' connections from a client are counted by bucket: addresses
      whose hash shares a bucket add up, so a client can be refused a little
      early (never late). The hash is keyed with a random key chosen when the
      table is made, so a sender cannot pick addresses that collide on purpose.

    Args:
        workers: number of worker slots, at least 1.
        buckets: per-client buckets per worker.
        key: the hash key (16 bytes); a random one when ``None`` (tests pass one
            to get the same buckets every run).

    Raises:
        ValueError: ``workers`` or ``buckets`` below 1.
    """

    def __init__(self, workers: int, *, buckets: int = CLIENT_BUCKETS, key: bytes | None = None):
        if workers < 1 or buckets < 1:
            raise ValueError("a connection table needs at least one worker and one bucket")
        self.workers = workers
        self.buckets = buckets
        self._key = os.urandom(16) if key is None else key
        self._stride = 1 + buckets
        # fileno -1: anonymous memory, MAP_SHARED by default, so forked workers see each other's writes.
        self._map = mmap.mmap(-1, 8 * self._stride * workers)
        self._slots = memoryview(self._map).cast("q")

    def bucket(self, client: str) -> int:
        """The per-client bucket (``0 <= bucket < buckets``) of ``client``, the address as text."""
        digest = hashlib.blake2b(client.encode(errors="surrogateescape"), digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "little") % self.buckets

    def total(self) -> int:
        """Open connections of every worker together."""
        slots, stride = self._slots, self._stride
        return sum(slots[w * stride] for w in range(self.workers))

    def worker_total(self, worker: int) -> int:
        """Open connections counted in ``worker``'s slot (``0 <= worker < workers``)."""
        return self._slots[worker * self._stride]

    def bucket_count(self, worker: int, bucket: int) -> int:
        """``worker``'s open connections from the clients of ``bucket``."""
        return self._slots[worker * self._stride + 1 + bucket]

    def clear(self, worker: int) -> None:
        """Zero ``worker``'s slots: the supervisor calls it for a worker that has died, before replacing it.

        Only call it when that worker no longer runs (it would keep writing).
        """
        start = worker * self._stride
        self._slots[start:start + self._stride] = memoryview(bytes(8 * self._stride)).cast("q")

    def counter(self, worker: int, settings: SmtpSettings) -> "SharedConnectionCounter":
        """The counter for the process that owns slot ``worker`` (see :class:`SharedConnectionCounter`).

        Raises:
            ValueError: ``worker`` is not a slot of this table.
        """
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} is not a slot of a {self.workers}-worker connection table")
        return SharedConnectionCounter(self, worker, settings)

    def _add(self, worker: int, bucket: int, delta: int) -> None:
        start = worker * self._stride
        self._slots[start] += delta
        self._slots[start + 1 + bucket] += delta


class SharedConnectionCounter:
    """One worker's view of a :class:`ConnectionTable`, with :class:`ConnectionCounter`'s interface.

    ``admit`` refuses when the open connections of all workers reach
    ``max_connections``, or when this worker's exact count for the address plus
    the other workers' bucket counts reach ``max_connections_per_client``; it
    then writes only this worker's slots. See :class:`ConnectionTable` for the
    overshoot of at most ``workers - 1`` when workers admit at the same moment.

    Args:
        table: the table the supervisor created before forking.
        worker: this process's slot (its worker index).
        settings: the ``[smtp]`` section; the limits are read at each :meth:`admit`.
    """

    def __init__(self, table: ConnectionTable, worker: int, settings: SmtpSettings):
        self.table = table
        self.worker = worker
        self.settings = settings
        self.per_client: collections.Counter[str] = collections.Counter()

    def admit(self, client: str) -> Reply | None:
        """Count a new connection from ``client`` (its address as text), or return the reply that refuses it.

        Returns:
            ``None`` when admitted (the caller must :meth:`release` it later);
            :data:`TOO_MANY_CONNECTIONS` or :data:`TOO_MANY_FROM_CLIENT`
            (``421 4.7.0``, sent instead of the greeting, RFC 5321 3.1) when not.
        """
        table = self.table
        if table.total() >= self.settings.max_connections:
            return TOO_MANY_CONNECTIONS
        bucket = table.bucket(client)
        others = sum(table.bucket_count(w, bucket) for w in range(table.workers) if w != self.worker)
        if self.per_client[client] + others >= self.settings.max_connections_per_client:
            return TOO_MANY_FROM_CLIENT
        self.per_client[client] += 1
        table._add(self.worker, bucket, 1)
        return None

    def release(self, client: str) -> None:
        """Uncount a connection from ``client`` that :meth:`admit` admitted; a client with none is ignored."""
        if self.per_client[client] <= 0:
            del self.per_client[client]
            return
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]
        self.table._add(self.worker, self.table.bucket(client), -1)


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
