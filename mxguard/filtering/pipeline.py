"""The filter pipeline: parse once, run every engine concurrently, return one verdict.

It runs at the end of DATA, in memory, the same way for TLS and non-TLS
sessions. Each engine has its own timeout; an engine that fails or times out
is recorded in ``verdict.errors`` and the message counts as not fully
scanned (the caller fails it closed). Sender authentication runs alongside
and feeds the built-in scorer; its DNS failures are results, never errors.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from mxguard.config import FilterSettings, Settings
from mxguard.filtering.engine import Engine, EngineOutput, EngineStatus, EngineUnavailable, ScanContext
from mxguard.filtering.message import Envelope, ParsedMessage, parse_message
from mxguard.filtering.sender_auth import SenderAuth
from mxguard.filtering.verdict import AuthResults, EngineError, PolicyHit, Verdict

log = structlog.get_logger("mxguard.filtering")

#: Messages bigger than this (bytes) are parsed in a worker thread.
PARSE_THREAD_THRESHOLD = 1024 * 1024


def unreadable(exc: Exception) -> PolicyHit:
    """The policy hit for a message the MIME parser cannot read (it is refused, never passed).

    Python's parser recurses once per nesting level (and per nested comment in
    a structured header), so a ``RecursionError`` means a structure hundreds
    of levels deep, far beyond ``filters.max_mime_depth``.
    """
    if isinstance(exc, RecursionError):
        return PolicyHit("unreadable-mime", "reject", "", "MIME structure nested too deep to read")
    return PolicyHit("unreadable-mime", "reject", "", f"message could not be parsed ({type(exc).__name__})")


def build_engines(f: FilterSettings) -> list[Engine]:
    """The engines ``[filters]`` asks for, in a stable order: virus, junk, policy.

    Raises:
        ConfigError: the embedded YARA rules do not compile.
    """
    engines: list[Engine] = []
    for name in dict.fromkeys(f.virus_engines):
        if name == "yara":
            from mxguard.filtering.virus_yara import YaraEngine
            engines.append(YaraEngine(f.timeout_for("yara")))
        elif name == "clamd":
            from mxguard.filtering.virus_clamd import ClamdEngine
            engines.append(ClamdEngine(f.clamd_address, f.timeout_for("clamd")))
    for name in dict.fromkeys(f.junk_engines):
        if name == "builtin":
            from mxguard.filtering.junk_builtin import BuiltinJunkEngine
            engines.append(BuiltinJunkEngine(f.builtin_threshold, f.timeout_for("builtin")))
        elif name == "rspamd":
            from mxguard.filtering.junk_rspamd import RspamdEngine
            engines.append(RspamdEngine(f.rspamd_url, f.timeout_for("rspamd")))
        elif name == "spamd":
            from mxguard.filtering.junk_spamd import SpamdEngine
            engines.append(SpamdEngine(f.spamd_address, f.timeout_for("spamd")))
    if f.content_policy:
        from mxguard.filtering.policy_content import ContentPolicyEngine
        engines.append(ContentPolicyEngine(f.max_mime_parts, f.max_mime_depth, f.timeout_for("policy"),
                                           f.ambiguous_structure, tuple(f.ambiguous_structure_ignore),
                                           conflicting_names=f.conflicting_names))
    return engines


class FilterPipeline:
    """Runs the configured engines on one message at a time (safe to share across sessions).

    Args:
        engines: the engines to run.
        sender_auth: the SPF/DKIM/DMARC checker, or ``None`` to skip it.
        settings: the ``[filters]`` settings (timeouts, limits).
    """

    def __init__(self, engines: list[Engine], sender_auth: SenderAuth | None, settings: FilterSettings):
        self.engines = engines
        self.sender_auth = sender_auth
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: Settings) -> "FilterPipeline":
        """Build the pipeline of a gateway's settings (``[filters]`` and ``hostname``)."""
        f = settings.filters
        auth = SenderAuth(f.dns_servers, f.dns_timeout, settings.hostname, body_length=f.dkim_body_length) if f.sender_auth else None
        return cls(build_engines(f), auth, f)

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    async def _auth(self, message: ParsedMessage, verdict: Verdict) -> AuthResults:
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: no extra task per message (3.11's wait_for makes one).
            async with asyncio.timeout(self.settings.timeout_for("sender_auth")):
                return await self.sender_auth.check(message)
        except asyncio.TimeoutError:
            return AuthResults(spf="temperror", dmarc="temperror")
        except Exception as exc:  # noqa: BLE001 - never let the checks fail a delivery
            log.warning("sender authentication failed", error=repr(exc)[:200])
            return AuthResults(spf="temperror", dmarc="temperror")
        finally:
            verdict.timings_ms["sender_auth"] = round((time.perf_counter() - started) * 1000, 2)

    async def _run(self, engine: Engine, message: ParsedMessage, ctx: ScanContext,
                   verdict: Verdict) -> EngineOutput | None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(engine.timeout):
                return await engine.scan(message, ctx)
        except asyncio.TimeoutError:
            verdict.errors.append(EngineError(engine.name, f"no answer within {engine.timeout:g} s"))
        except EngineUnavailable as exc:
            verdict.errors.append(EngineError(engine.name, str(exc)[:300]))
        except Exception as exc:  # noqa: BLE001 - an engine bug must fail closed, not crash the session
            log.exception("filter engine crashed", engine=engine.name)
            verdict.errors.append(EngineError(engine.name, f"internal error: {type(exc).__name__}"))
        finally:
            verdict.timings_ms[engine.name] = round((time.perf_counter() - started) * 1000, 2)
        return None

    async def _run_local(self, engine: Engine, message: ParsedMessage, ctx: ScanContext,
                         verdict: Verdict) -> EngineOutput | None:
        """An in-process engine: called directly; a failure is recorded, never raised."""
        started = time.perf_counter()
        try:
            return await engine.scan(message, ctx)
        except EngineUnavailable as exc:
            verdict.errors.append(EngineError(engine.name, str(exc)[:300]))
        except Exception as exc:  # noqa: BLE001 - an engine bug must fail closed, not crash the session
            log.exception("filter engine crashed", engine=engine.name)
            verdict.errors.append(EngineError(engine.name, f"internal error: {type(exc).__name__}"))
        finally:
            verdict.timings_ms[engine.name] = round((time.perf_counter() - started) * 1000, 2)
        return None

    async def scan(self, raw: bytes, envelope: Envelope | None = None, *, check_sender: bool = True) -> Verdict:
        """Filter one message.

        Args:
            raw: the message as received.
            envelope: SMTP context (client IP, HELO, sender, recipients).
            check_sender: run the sender checks (SPF, DKIM, DMARC); ``False`` for mail the
                organization's own servers relay out, whose sender the relay has authorized.

        Returns:
            the verdict; ``verdict.errors`` lists engines that gave no answer.
            Never raises for a bad message: one the parser cannot read gets
            the ``unreadable-mime`` policy hit (refused) and no engine runs.
        """
        verdict = Verdict(engines=[e.name for e in self.engines])
        if not self.enabled:
            verdict.scanned = False
            return verdict
        started = time.perf_counter()
        try:
            if len(raw) > PARSE_THREAD_THRESHOLD:
                message = await asyncio.to_thread(parse_message, raw, envelope,
                                                  max_archive_member=self.settings.max_archive_member)
            else:
                message = parse_message(raw, envelope, max_archive_member=self.settings.max_archive_member)
        except Exception as exc:  # noqa: BLE001 - fail closed on a message the parser cannot read
            # The same bytes would fail again on every retry, so this is a permanent
            # refusal (a policy hit), not an engine error that defers.
            log.warning("message could not be parsed", error=repr(exc)[:200])
            verdict.policy.append(unreadable(exc))
            return verdict
        verdict.timings_ms["parse"] = round((time.perf_counter() - started) * 1000, 2)
        verdict.defects = message.defects
        verdict.findings = [f.as_dict() for f in message.findings]
        if message.findings:
            log.info("ambiguous MIME structure", txn=message.envelope.txn_id,
                     findings=sorted({f.name for f in message.findings}))
        # The message log takes these from this parse instead of reading the headers again.
        verdict.subject = " ".join(message.header("Subject").split())[:500]
        verdict.message_id = message.header("Message-ID").strip()[:500]
        auth_task = None
        if self.sender_auth is not None and check_sender:
            auth_task = asyncio.ensure_future(self._auth(message, verdict))
        ctx = ScanContext(auth_task)
        # Daemons (clamd, Rspamd, spamd) work concurrently under their timeouts while the
        # in-process engines run directly: no task and timer per engine and message.
        remote = [e for e in self.engines if e.remote]
        waiting = asyncio.gather(*(self._run(e, message, ctx, verdict) for e in remote)) if remote else None
        local_outputs = [await self._run_local(e, message, ctx, verdict) for e in self.engines if not e.remote]
        outputs = local_outputs + (list(await waiting) if waiting is not None else [])
        if auth_task is not None:
            verdict.auth = await auth_task
        for output in outputs:
            if output is None:
                continue
            verdict.viruses += output.viruses
            if output.junk is not None:
                verdict.junk.append(output.junk)
            verdict.policy += output.policy
            verdict.attachments += output.attachments
        verdict.timings_ms["total"] = round((time.perf_counter() - started) * 1000, 2)
        return verdict

    async def probe(self) -> list[EngineStatus]:
        """Every engine's reachability and version (for ``mxguard engines``)."""
        return list(await asyncio.gather(*(e.probe() for e in self.engines)))

    async def close(self) -> None:
        for engine in self.engines:
            await engine.close()
        if self.sender_auth is not None:
            self.sender_auth.close()
