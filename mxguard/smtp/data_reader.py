"""The message data of DATA, read in chunks (RFC 5321 4.5.2, 4.5.3.1.6, 2.3.8).

aiosmtpd reads the data one line at a time (a ``readuntil`` and a few list
operations per line: about 1,400 of each for a 100 KiB message). Here the
data is read in the chunks the transport delivers and each chunk is looked
at with a handful of C-level byte searches:

* the end of data is the first ``CRLF.CRLF``, the data's first line counting
  as preceded by a CRLF (so ``.CRLF`` at once is an empty message) and a
  terminator split across chunks found all the same;
* the dot a sender added in front of a line that begins with a dot is
  removed (RFC 5321 4.5.2, "transparency");
* a text line longer than the line limit, or data beyond the size limit, is
  noted, the rest of the data is read and dropped, and the transfer is then
  refused (RFC 5321 4.2.5: the reply comes after the end of data);
* CR and LF that are not part of a CRLF (bare, RFC 5321 2.3.8) are counted
  in the same pass.

Lines end in CRLF only: a bare LF, or a bare CR, is part of a line, so
``LF.CRLF`` does not end the data (the ambiguity behind SMTP smuggling).

:class:`DataReader` is the pure core (bytes in, state out) and decides
exactly as aiosmtpd 1.4's ``smtp_DATA`` does, including which of the two
refusals wins when a message has both; :func:`receive` feeds it from an
:class:`asyncio.StreamReader`.
"""

from __future__ import annotations

import asyncio
import enum

#: The end of the message data: a line holding a single dot (RFC 5321 4.1.1.4).
TERMINATOR = b"\r\n.\r\n"
_CRLF = b"\r\n"
_CR, _LF = 13, 10

#: Bytes asked of the stream per read: more than a transport delivers at once.
READ_SIZE = 256 * 1024


class Outcome(enum.Enum):
    """What became of the data: taken, or refused for which limit."""

    OK = "ok"
    #: A text line longer than the line limit (RFC 5321 4.5.3.1.6).
    LINE_TOO_LONG = "line_too_long"
    #: More data than the size limit (RFC 1870 6.1).
    TOO_BIG = "too_big"


class DataReader:
    """The state of one DATA transfer, fed chunk by chunk with :meth:`feed`.

    Args:
        size_limit: largest message in bytes, counted as sent (dot-stuffed,
            CRLF included, the final ``.CRLF`` not); ``None`` or ``0``: no limit.
        line_limit: longest text line in bytes with its CRLF; aiosmtpd's
            ``line_length_limit`` (1001), which is also its stream limit: a
            line whose text alone exceeds it is "too long" as soon as that is
            known, before the size is counted (aiosmtpd's ``LimitOverrunError``).

    After :attr:`done`, :attr:`outcome` says whether the message was taken;
    :meth:`content` gives it, unstuffed, and :attr:`bare_line_ends` whether it
    holds a CR or LF outside a CRLF. Once a limit is passed the data read so
    far is dropped and only the end is looked for, so memory stays bounded
    by the size limit plus one line.
    """

    __slots__ = ("size_limit", "line_limit", "outcome", "done", "received", "_pieces", "_tail", "_counted",
                 "_line", "_cr", "_n_cr", "_n_lf", "_n_crlf")

    def __init__(self, size_limit: int | None, line_limit: int = 1001):
        if line_limit < 3:
            raise ValueError("line_limit must be at least 3 (a dot and CRLF)")
        self.size_limit = size_limit or 0
        self.line_limit = line_limit
        self.outcome = Outcome.OK
        #: True once the terminator has been seen.
        self.done = False
        #: Bytes of data received before the terminator (as sent, dot-stuffed).
        self.received = 0
        self._pieces: list[bytes] = []
        # The last (at most four) bytes seen, after a virtual CRLF standing for the DATA line's.
        self._tail = _CRLF
        self._counted = 0  # bytes of complete lines so far (what aiosmtpd checks against the size limit)
        self._line = 0  # bytes of the current, unfinished line
        self._cr = False  # the data so far ends in CR (a CRLF may be split across chunks)
        self._n_cr = self._n_lf = self._n_crlf = 0

    def feed(self, chunk: bytes) -> int:
        """Take the next bytes of the stream.

        Args:
            chunk: the bytes that follow those already fed (any length).

        Returns:
            How many bytes of ``chunk`` belong to the message data, the
            terminator included; after :attr:`done` the rest of ``chunk`` is
            the client's next command (pipelining, RFC 2920) and must be kept.
        """
        if self.done or not chunk:
            return 0
        tail = self._tail
        # A terminator that starts in the bytes already seen, or one wholly in this chunk.
        at = (tail + chunk[:4]).find(TERMINATOR)
        if at >= 0:
            at -= len(tail)
        else:
            at = chunk.find(TERMINATOR)
            if at < 0:
                self._take(chunk)
                self.received += len(chunk)
                self._tail = chunk[-4:] if len(chunk) >= 4 else (tail + chunk)[-4:]
                return len(chunk)
        end = at + 2  # the data ends with the CRLF that starts the terminator
        if end > 0:
            self._take(chunk[:end] if end < len(chunk) else chunk)
        elif end < 0:
            self._untake(-end)  # the terminator's dot (and CR) came with the previous chunk
        self.received += end
        self.done = True
        return at + len(TERMINATOR)

    @property
    def bare_line_ends(self) -> bool:
        """True when the data holds a CR not followed by LF or an LF not preceded by CR."""
        return self._n_cr != self._n_crlf or self._n_lf != self._n_crlf

    def content(self) -> bytes:
        """The message as the sender meant it: each line's added leading dot removed (RFC 5321 4.5.2).

        Raises:
            RuntimeError: the data has not ended, or was refused.
        """
        if not self.done or self.outcome is not Outcome.OK:
            raise RuntimeError(f"no content: done={self.done}, outcome={self.outcome.value}")
        data = b"".join(self._pieces)
        self._pieces = [data]
        if data[:1] == b".":
            data = data[1:]
        return data.replace(b"\r\n.", _CRLF)

    # -- the line accounting ------------------------------------------------------------------

    def _refuse(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self._pieces = []  # the data is not kept once it is refused

    def _take(self, seg: bytes) -> None:
        """Account for ``seg``, the next bytes of the data proper (no terminator in it)."""
        if self.outcome is not Outcome.OK:
            return
        n = len(seg)
        self._n_cr += seg.count(b"\r")
        self._n_lf += seg.count(b"\n")
        self._n_crlf += seg.count(_CRLF)
        if self._cr and seg[0] == _LF:
            self._n_crlf += 1
            first = 1  # the CRLF split across the chunks ends the current line
        else:
            at = seg.find(_CRLF)
            first = at + 2 if at >= 0 else 0  # the end of the current line, 0: not in this segment
        limit, size_limit = self.line_limit, self.size_limit
        if first:
            # Complete lines end in this segment: the current line, then [first, last).
            at = seg.rfind(_CRLF, first)
            last = at + 2 if at >= 0 else first
            if not (self._line + first <= limit and (not size_limit or self._counted + self._line + last <= size_limit)
                    and self._lines_fit(seg, first, last)):
                self._lines_exactly(seg, first)
                if self.outcome is not Outcome.OK:
                    return
            self._counted += self._line + last
            self._line = n - last
        else:
            self._line += n
        if self._line > limit + 2:
            # The text of the unfinished line alone is longer than the limit: too long, whatever the
            # size (aiosmtpd's stream limit trips before it counts the line).
            self._refuse(Outcome.LINE_TOO_LONG)
            return
        self._cr = seg[-1] == _CR
        self._pieces.append(seg)

    def _lines_fit(self, seg: bytes, start: int, end: int) -> bool:
        """True when no line of ``seg[start:end]`` (whole lines) is longer than the line limit.

        Jumps from a line start to the last CRLF within one line limit: a few
        searches per kilobyte instead of one per line.
        """
        limit = self.line_limit
        while end - start > limit:
            at = seg.rfind(_CRLF, start, start + limit)
            if at < 0:
                return False
            start = at + 2
        return True

    def _complete_line(self, length: int) -> bool:
        """aiosmtpd's checks on one complete line of ``length`` bytes (CRLF included); False once refused."""
        if length > self.line_limit + 2:
            self._refuse(Outcome.LINE_TOO_LONG)  # the stream limit: the text alone is longer than the limit
        elif self.size_limit and self._counted + length > self.size_limit:
            self._refuse(Outcome.TOO_BIG)
        elif length > self.line_limit:
            self._refuse(Outcome.LINE_TOO_LONG)
        else:
            self._counted += length
            return True
        return False

    def _lines_exactly(self, seg: bytes, first: int) -> None:
        """Check the complete lines of ``seg`` one by one, in order: a limit is passed in here.

        On success the counters are left as they were (the caller adds the lines in one step).
        """
        counted = self._counted
        if self._complete_line(self._line + first):
            pos = first
            while True:
                at = seg.find(_CRLF, pos)
                if at < 0 or not self._complete_line(at + 2 - pos):
                    break
                pos = at + 2
        if self.outcome is Outcome.OK:
            self._counted = counted

    def _untake(self, count: int) -> None:
        """Forget the last ``count`` (1 or 2) bytes taken: the dot (and CR) of a split terminator."""
        if self.outcome is not Outcome.OK:
            return
        # They were an unfinished line (".", ".\r") that no limit can have decided on.
        removed = b""
        while len(removed) < count:
            piece = self._pieces.pop()
            keep = len(piece) - (count - len(removed))
            if keep > 0:
                removed = piece[keep:] + removed
                self._pieces.append(piece[:keep])
            else:
                removed = piece + removed
        self._n_cr -= removed.count(b"\r")
        self._line -= count


async def receive(reader: asyncio.StreamReader, data: DataReader, unread) -> None:
    """Feed ``data`` from ``reader`` until the end of the message data.

    Args:
        reader: the session's stream, just after the ``354`` reply.
        data: a fresh :class:`DataReader`.
        unread: ``callable(bytes)`` that puts bytes back at the front of ``reader``: what
            followed the terminator in the last chunk (pipelined commands).

    Raises:
        asyncio.IncompleteReadError: the stream ended before the terminator.
    """
    while not data.done:
        chunk = await reader.read(READ_SIZE)
        if not chunk:
            raise asyncio.IncompleteReadError(b"", None)
        used = data.feed(chunk)
        if used < len(chunk):
            unread(chunk[used:])
