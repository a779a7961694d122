"""Health of the parts the dashboard and ``/metrics`` report on, through small provider hooks.

Filtering engines and the spool are built separately; each registers a
provider here when it exists. With none registered the console says so
instead of showing invented numbers.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineHealth:
    """One filtering engine's state.

    Attributes:
        name: e.g. ``clamd``, ``rspamd``.
        ok: the last check succeeded.
        detail: version or error text.
        errors: errors since start (a counter).
    """

    name: str
    ok: bool
    detail: str = ""
    errors: int = 0


EngineHealthProvider = Callable[[], "list[EngineHealth] | Awaitable[list[EngineHealth]]"]
SpoolDepthProvider = Callable[[], "dict[str, int] | Awaitable[dict[str, int]]"]

_engine_providers: list[EngineHealthProvider] = []
_spool_provider: list[SpoolDepthProvider] = []


def register_engine_health(provider: EngineHealthProvider) -> None:
    """Add a function returning :class:`EngineHealth` items (sync or async)."""
    _engine_providers.append(provider)


def register_spool_depth(provider: SpoolDepthProvider) -> None:
    """Set the function returning held messages per domain (sync or async).

    The latest registration is used; :func:`unregister_spool_depth` goes back
    to the one before (several gateways in one process, as in tests).
    """
    _spool_provider.append(provider)


def unregister_spool_depth(provider: SpoolDepthProvider) -> None:
    """Forget ``provider`` (a stopping gateway); unknown providers are ignored."""
    _spool_provider[:] = [p for p in _spool_provider if p is not provider]


def clear_providers() -> None:
    """Forget every provider (tests)."""
    _engine_providers.clear()
    _spool_provider.clear()


async def _call(provider):
    value = provider()
    return await value if inspect.isawaitable(value) else value


async def engine_health() -> list[EngineHealth] | None:
    """Every registered engine's health; ``None`` when no engine provider is registered."""
    if not _engine_providers:
        return None
    out: list[EngineHealth] = []
    for provider in _engine_providers:
        out.extend(await _call(provider))
    return out


async def spool_depth() -> dict[str, int] | None:
    """Held messages per domain; ``None`` when no spool is registered."""
    if not _spool_provider:
        return None
    return dict(await _call(_spool_provider[-1]))
