"""Jinja2 templates from the package, auto-escaped, with a few display filters."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import jinja2
from fastapi.templating import Jinja2Templates

#: The console's navigation.
NAV: list[tuple[str, str]] = [
    ("Dashboard", "/"),
    ("Domains", "/domains"),
    ("TLS", "/tls"),
    ("Outbound", "/outbound"),
    ("Message log", "/log"),
    ("Spool", "/spool"),
    ("Audit log", "/audit"),
    ("Quarantine", "/mc"),
    ("Organizations", "/orgs"),
]
#: A plain user's navigation: the Message Center only.
MC_NAV: list[tuple[str, str]] = [
    ("Quarantine", "/mc"),
    ("Allow and block lists", "/mc/lists"),
]


def _when(value: Any) -> str:
    if not value:
        return "-"
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} %"


def _fingerprint(value: str | None) -> str:
    if not value:
        return "-"
    return ":".join(value[i:i + 2] for i in range(0, len(value), 2)).upper()


def _age(seconds: float | None) -> str:
    """A duration for people: ``45 s``, ``12 min``, ``3.5 h``, ``2.1 d``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _size(value: int | None) -> str:
    """Bytes for people, in binary units: ``812 B``, ``14.2 KiB``, ``3.0 MiB``."""
    if value is None:
        return "-"
    if value < 1024:
        return f"{value} B"
    if value < 1024 * 1024:
        return f"{value / 1024:.1f} KiB"
    return f"{value / 1024 / 1024:.1f} MiB"


def _as_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def make_templates() -> Jinja2Templates:
    """Templates loaded from ``mxguard/web/templates``; autoescape is always on."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("mxguard.web", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=_when, pct=_pct, fingerprint=_fingerprint, as_json=_as_json, age=_age, size=_size)
    env.globals["NAV"] = NAV
    env.globals["MC_NAV"] = MC_NAV
    return Jinja2Templates(env=env)
