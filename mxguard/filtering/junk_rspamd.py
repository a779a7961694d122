"""Rspamd through its normal worker's HTTP protocol (``POST /checkv2``).

The message goes as the request body; the envelope and client go as request
headers (``IP``, ``Helo``, ``From``, ``Rcpt``, ``Queue-Id``), as the Rspamd
protocol documentation describes. The JSON reply gives ``score``,
``required_score``, ``action`` and ``symbols``. Rspamd's own verdict ("junk")
is an action of ``add header``, ``rewrite subject`` or ``reject``.
"""

from __future__ import annotations

import time

import httpx

from mxguard.filtering.engine import Engine, EngineOutput, EngineStatus, EngineUnavailable, ScanContext
from mxguard.filtering.message import ParsedMessage
from mxguard.filtering.verdict import JunkResult

SPAM_ACTIONS = ("add header", "rewrite subject", "reject")


class RspamdEngine(Engine):
    """An Rspamd client with a pooled HTTP connection.

    Args:
        url: the normal worker's base URL (``http://127.0.0.1:11333``).
        timeout: seconds per message.
    """

    remote = True

    name = "rspamd"
    kind = "junk"

    def __init__(self, url: str, timeout: float = 20.0):
        super().__init__(timeout)
        self.url = url.rstrip("/")
        self._client: httpx.AsyncClient | None = None

    @property
    def address(self) -> str:
        return self.url

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, trust_env=False)
        return self._client

    async def scan(self, message: ParsedMessage, ctx: ScanContext) -> EngineOutput:
        env = message.envelope
        headers = [("Pass", "all")]
        if env.client_ip:
            headers.append(("IP", env.client_ip))
        if env.helo:
            headers.append(("Helo", env.helo))
        if env.mail_from:
            headers.append(("From", env.mail_from))
        for rcpt in env.rcpts[:100]:
            headers.append(("Rcpt", rcpt))
        if env.txn_id:
            headers.append(("Queue-Id", env.txn_id))
        try:
            response = await self._http().post(f"{self.url}/checkv2", content=message.raw,
                                               headers=[(k, v.encode("utf-8", "replace").decode("latin-1"))
                                                        for k, v in headers])
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"rspamd at {self.url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise EngineUnavailable(f"rspamd at {self.url}: HTTP {response.status_code}")
        try:
            data = response.json()
            return EngineOutput(junk=parse_reply(data))
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineUnavailable(f"rspamd at {self.url}: unreadable reply: {exc}") from None

    async def probe(self) -> EngineStatus:
        started = time.perf_counter()
        try:
            response = await self._http().get(f"{self.url}/ping")
        except httpx.HTTPError as exc:
            return EngineStatus(self.name, self.kind, self.address, False, error=f"{type(exc).__name__}: {exc}")
        ok = response.status_code == 200 and response.text.strip() == "pong"
        version = response.headers.get("server", "rspamd")
        return EngineStatus(self.name, self.kind, self.address, ok, version,
                            error="" if ok else f"HTTP {response.status_code}",
                            latency_ms=(time.perf_counter() - started) * 1000)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def parse_reply(data: dict) -> JunkResult:
    """A ``/checkv2`` JSON reply as a :class:`JunkResult`.

    Raises:
        KeyError, TypeError, ValueError: not an Rspamd reply.
    """
    if "error" in data and "score" not in data:
        raise ValueError(str(data["error"])[:200])
    symbols = data.get("symbols") or {}
    rules = {name: float(sym.get("score", 0.0)) for name, sym in symbols.items() if isinstance(sym, dict)}
    action = str(data["action"])
    return JunkResult("rspamd", float(data["score"]), float(data.get("required_score") or 0.0),
                      action in SPAM_ACTIONS, rules, action)
