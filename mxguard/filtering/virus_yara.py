"""Embedded virus engine: YARA rules shipped in the package (``rules/*.yar``).

Works right after ``pip install`` (yara-python bundles libyara). Each part of
the message is matched separately with its file name as the ``filename``
external, so rules can look at content and name together. The rules cover
the EICAR test file, executables and scripts disguised by double
extensions, renamed Windows executables, Office macro containers and HTML
smuggling of executables. It is a safety net, not a replacement for ClamAV's
signature database.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import yara

from mxguard.errors import ConfigError
from mxguard.filtering.engine import Engine, EngineOutput, EngineUnavailable, ScanContext
from mxguard.filtering.message import ParsedMessage
from mxguard.filtering.verdict import VirusHit

RULES_DIR = Path(__file__).with_name("rules")
#: Messages with more decoded bytes than this are matched in a worker thread.
THREAD_THRESHOLD = 256 * 1024


def compile_rules(paths: list[Path] | None = None) -> "yara.Rules":
    """Compile the shipped rules (or ``paths``).

    Raises:
        ConfigError: a rules file does not compile (names the file).
    """
    paths = paths or sorted(RULES_DIR.glob("*.yar"))
    if not paths:
        raise ConfigError(f"filters.virus_engines: no YARA rules found in {RULES_DIR}")
    try:
        return yara.compile(filepaths={p.stem: str(p) for p in paths}, externals={"filename": ""})
    except yara.Error as exc:
        raise ConfigError(f"filters.virus_engines: YARA rules do not compile: {exc}") from None


class YaraEngine(Engine):
    """YARA over every decoded part.

    Args:
        timeout: seconds per message.
        rules: compiled rules (the shipped ones when ``None``).
    """

    name = "yara"
    kind = "virus"

    def __init__(self, timeout: float = 20.0, rules: "yara.Rules | None" = None):
        super().__init__(timeout)
        self.rules = rules or compile_rules()

    def version(self) -> str:
        return f"YARA {yara.__version__}"

    def _match(self, message: ParsedMessage) -> list[VirusHit]:
        hits: list[VirusHit] = []
        seen: set[tuple[str, str]] = set()
        for part in message.parts:
            if not part.data and not part.filename:
                continue
            try:
                matches = self.rules.match(data=part.data, externals={"filename": part.filename or ""},
                                           timeout=max(1, int(self.timeout)))
            except yara.TimeoutError:
                raise EngineUnavailable(f"yara: scanning {part.label} took longer than {self.timeout:g} s") from None
            except yara.Error as exc:
                raise EngineUnavailable(f"yara: {exc}") from None
            for m in matches:
                threat = str(m.meta.get("threat") or m.rule)
                if (threat, part.label) not in seen:
                    seen.add((threat, part.label))
                    hits.append(VirusHit(self.name, threat, part.label))
        return hits

    async def scan(self, message: ParsedMessage, ctx: ScanContext) -> EngineOutput:
        total = sum(len(p.data) for p in message.parts)
        if total > THREAD_THRESHOLD:
            hits = await asyncio.to_thread(self._match, message)
        else:
            hits = self._match(message)
        return EngineOutput(viruses=hits)
