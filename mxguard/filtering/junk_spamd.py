"""SpamAssassin through spamd (SPAMC/1.5 protocol), with the aiospamc client.

``SYMBOLS`` gives spamd's verdict (``Spam: True ; 12.7 / 5.0``) and the names
of the rules that matched; spamd's own verdict ("junk") is its ``Spam: True``.
"""

from __future__ import annotations

import time

import aiospamc
from aiospamc.connections import Timeout
from aiospamc.exceptions import ClientException, ParseError, TimeoutException

from mxguard.filtering.engine import Engine, EngineOutput, EngineStatus, EngineUnavailable, ScanContext
from mxguard.filtering.message import ParsedMessage
from mxguard.filtering.verdict import JunkResult
from mxguard.netaddr import format_host_port, parse_host_port


class SpamdEngine(Engine):
    """A spamd client.

    Args:
        address: ``HOST:PORT`` (783 by default).
        timeout: seconds per message.
    """

    remote = True

    name = "spamd"
    kind = "junk"

    def __init__(self, address: str, timeout: float = 20.0):
        super().__init__(timeout)
        self.host, self.port = parse_host_port(address, default_port=783)

    @property
    def address(self) -> str:
        return format_host_port(self.host, self.port)

    async def scan(self, message: ParsedMessage, ctx: ScanContext) -> EngineOutput:
        try:
            response = await aiospamc.symbols(message.raw, host=self.host, port=self.port,
                                              timeout=Timeout(total=self.timeout, connection=min(5.0, self.timeout)))
        except (ClientException, ParseError, TimeoutException, OSError) as exc:
            raise EngineUnavailable(f"spamd at {self.address}: {type(exc).__name__}: {exc}") from None
        spam = response.headers.get("Spam") if hasattr(response.headers, "get") else None
        if spam is None:
            raise EngineUnavailable(f"spamd at {self.address}: reply without a Spam header")
        body = bytes(response.body or b"").decode("ascii", "replace").strip()
        rules = {name.strip(): 0.0 for name in body.split(",") if name.strip()}
        return EngineOutput(junk=JunkResult(self.name, float(spam.score), float(spam.threshold), bool(spam.value),
                                            rules))

    async def probe(self) -> EngineStatus:
        started = time.perf_counter()
        try:
            response = await aiospamc.ping(host=self.host, port=self.port,
                                           timeout=Timeout(total=self.timeout, connection=min(5.0, self.timeout)))
        except (ClientException, ParseError, TimeoutException, OSError) as exc:
            return EngineStatus(self.name, self.kind, self.address, False, error=f"{type(exc).__name__}: {exc}")
        return EngineStatus(self.name, self.kind, self.address, True, f"SPAMD/{response.version}",
                            latency_ms=(time.perf_counter() - started) * 1000)
