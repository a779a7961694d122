"""ClamAV through clamd's ``INSTREAM`` command, over TCP or a unix socket.

The whole message goes to clamd as it was received; clamd decodes MIME
(base64, quoted-printable, uuencode) and opens archives itself, so a second
parser, independent of Python's, reads every message. What only *other*
readings of the message found (:mod:`mxguard.filtering.readings`: parts
hidden in a preamble, an epilogue, a text body or behind an ambiguous
boundary) goes to clamd too, each part as a stream of its own, since clamd's
MIME parser may pick the same reading as Python's. Protocol
(clamd(8)): ``zINSTREAM\\0``, then chunks as ``<4-byte big-endian length><data>``,
then a zero length; the reply ends with ``\\0`` and reads ``stream: OK``,
``stream: <name> FOUND`` or ``<reason> ERROR``.
"""

from __future__ import annotations

import asyncio
import struct
import time

from mxguard.filtering.engine import Engine, EngineOutput, EngineStatus, EngineUnavailable, ScanContext
from mxguard.filtering.message import ParsedMessage
from mxguard.filtering.verdict import VirusHit
from mxguard.netaddr import parse_host_port

CHUNK = 64 * 1024
#: Most parts of other readings sent to clamd per message (each is one more INSTREAM).
MAX_READING_STREAMS = 32


class ClamdEngine(Engine):
    """A clamd client.

    Args:
        address: ``HOST:PORT`` (TCP, port 3310 by default) or ``unix:/path`` /
            an absolute socket path.
        timeout: seconds per message.
    """

    remote = True

    name = "clamd"
    kind = "virus"

    def __init__(self, address: str, timeout: float = 20.0):
        super().__init__(timeout)
        self._address = address
        if address.startswith("unix:") or address.startswith("/"):
            self.socket_path: str | None = address.removeprefix("unix:")
            self.host, self.port = "", 0
        else:
            self.socket_path = None
            self.host, self.port = parse_host_port(address, default_port=3310)

    @property
    def address(self) -> str:
        return self._address

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            if self.socket_path:
                return await asyncio.open_unix_connection(self.socket_path)
            return await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise EngineUnavailable(f"clamd at {self._address}: {exc.strerror or exc}") from None

    async def _command(self, command: bytes, payload: bytes | None = None) -> str:
        reader, writer = await self._open()
        try:
            writer.write(b"z" + command + b"\0")
            if payload is not None:
                view = memoryview(payload)
                for start in range(0, len(view), CHUNK):
                    chunk = view[start:start + CHUNK]
                    writer.write(struct.pack(">I", len(chunk)))
                    writer.write(chunk)
                    await writer.drain()
                writer.write(struct.pack(">I", 0))
            await writer.drain()
            reply = await reader.readuntil(b"\0")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise EngineUnavailable(f"clamd at {self._address}: connection broke: {exc}") from None
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        return reply.rstrip(b"\0").decode("utf-8", "replace").strip()

    async def scan(self, message: ParsedMessage, ctx: ScanContext) -> EngineOutput:
        reply = await self._command(b"INSTREAM", message.raw)
        viruses = parse_reply(reply)
        for part in reading_parts(message)[:MAX_READING_STREAMS]:
            for hit in parse_reply(await self._command(b"INSTREAM", part.data)):
                viruses.append(VirusHit(hit.engine, hit.name, part.label))
        return EngineOutput(viruses=viruses)

    async def probe(self) -> EngineStatus:
        started = time.perf_counter()
        try:
            version = await asyncio.wait_for(self._command(b"VERSION"), self.timeout)
        except (EngineUnavailable, asyncio.TimeoutError) as exc:
            return EngineStatus(self.name, self.kind, self.address, False, error=str(exc) or "timeout")
        return EngineStatus(self.name, self.kind, self.address, True, version,
                            latency_ms=(time.perf_counter() - started) * 1000)


def reading_parts(message: ParsedMessage) -> list:
    """The parts only another reading found (``origin="reading"``, with content), largest first.

    Text bodies (``text/*`` without a file name) are left out: their bytes are
    in the message clamd scans whole (a delimiter-like line in prose, such as
    ``-----Original Message-----``, gives such readings). Archive members of
    such parts are not sent on their own: clamd opens the archive itself.
    """
    found = [p for p in message.parts if p.origin == "reading" and p.data
             and not (p.content_type.startswith("text/") and p.filename is None)]
    return sorted(found, key=lambda p: -len(p.data))


def parse_reply(reply: str) -> list[VirusHit]:
    """Threats named in an INSTREAM reply.

    Raises:
        EngineUnavailable: clamd reported an error (size limit, bad request).
    """
    _, _, result = reply.partition(": ") if ": " in reply else ("", "", reply)
    if result == "OK":
        return []
    if result.endswith(" FOUND"):
        name = result[: -len(" FOUND")].strip()
        return [VirusHit("clamd", name)]
    raise EngineUnavailable(f"clamd: {reply[:200]}")
