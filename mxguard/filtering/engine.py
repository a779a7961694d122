"""The one small interface every filter engine implements.

An engine looks at a :class:`~mxguard.filtering.message.ParsedMessage` and
returns an :class:`EngineOutput`; it raises :class:`EngineUnavailable` when it
cannot give an answer (daemon down, bad reply). The pipeline enforces each
engine's timeout, so engines need not.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mxguard.filtering.verdict import JunkResult, PolicyHit, VirusHit

if TYPE_CHECKING:
    from mxguard.filtering.message import ParsedMessage
    from mxguard.filtering.verdict import AuthResults


class EngineUnavailable(Exception):
    """The engine could not scan this message (down, refused, answered nonsense)."""


@dataclass
class EngineOutput:
    """What one engine found; engines fill the fields of their kind."""

    viruses: list[VirusHit] = field(default_factory=list)
    junk: JunkResult | None = None
    policy: list[PolicyHit] = field(default_factory=list)
    attachments: list[dict] = field(default_factory=list)


@dataclass
class EngineStatus:
    """For ``mxguard engines``: is it there, and which version."""

    name: str
    kind: str
    address: str
    reachable: bool
    version: str = ""
    error: str = ""
    latency_ms: float | None = None


class ScanContext:
    """Shared by the engines scanning one message.

    Attributes:
        auth: awaitable giving the sender authentication results, or ``None``
            when the checks are off (the built-in scorer scores them).
    """

    def __init__(self, auth=None):
        self._auth = auth

    async def auth_results(self) -> "AuthResults | None":
        if self._auth is None:
            return None
        try:
            return await self._auth
        except Exception:  # noqa: BLE001 - failures are reported by the pipeline itself
            return None


class Engine(abc.ABC):
    """Base class. Subclasses set ``name`` and ``kind`` and implement :meth:`scan`.

    Attributes:
        name: ``yara``, ``clamd``, ``builtin``, ``rspamd``, ``spamd``, ``policy``.
        kind: ``virus``, ``junk`` or ``policy``.
        timeout: seconds allowed per message (enforced by the pipeline for remote engines).
        remote: True for engines that wait on a daemon (clamd, Rspamd, spamd); the
            pipeline runs those concurrently under their timeout, and the in-process
            ones directly (a timeout cannot interrupt in-process work anyway).
    """

    name = "engine"
    kind = "virus"
    remote = False

    def __init__(self, timeout: float = 20.0):
        self.timeout = timeout

    @property
    def address(self) -> str:
        """Where the engine runs (``embedded`` for in-process engines)."""
        return "embedded"

    @abc.abstractmethod
    async def scan(self, message: "ParsedMessage", ctx: ScanContext) -> EngineOutput:
        """Scan one message.

        Raises:
            EngineUnavailable: no answer could be had.
        """

    async def probe(self) -> EngineStatus:
        """Reachability and version (never raises)."""
        return EngineStatus(self.name, self.kind, self.address, True, self.version())

    def version(self) -> str:
        return ""

    async def close(self) -> None:
        """Release connections (HTTP clients)."""
