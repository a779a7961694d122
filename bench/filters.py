"""Speed of the filter pipeline alone (no SMTP): messages/s and p50/p99 milliseconds, per engine.

Run from the repository root (the real engines are started the way the tests
start them, on loopback; an engine whose program is missing is reported, not
measured)::

    .venv/bin/python bench/filters.py [--rounds N] [--corpus DIR] [--embedded-only]

It prints one line per engine over every message of the corpus, then the
embedded pipeline (YARA + built-in scorer + content policy) on a ~50 KB
message pinned to one CPU core. The target for the latter: under 5 ms p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mxguard.config import Settings  # noqa: E402
from mxguard.filtering.message import Envelope, parse_message  # noqa: E402
from mxguard.filtering.pipeline import FilterPipeline  # noqa: E402

ENV = Envelope(client_ip="127.0.0.1", helo="client.sender.test", mail_from="alice@pass.test",
               rcpts=["bob@example.com"], txn_id="BENCH")


def fifty_kb_message() -> bytes:
    """A realistic ~50 KB message: text and HTML alternatives and a PDF attachment."""
    para = ("Dear customer, please find below the details of your order and the delivery schedule "
            "for the coming weeks. Do not hesitate to contact us with any question. ")
    msg = EmailMessage()
    msg["From"] = "Shop <orders@pass.test>"
    msg["To"] = "bob@example.com"
    msg["Subject"] = "Your order 2026-11-0042"
    msg["Date"] = "Sun, 29 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<order-42@pass.test>"
    msg.set_content((para * 110)[:16000])
    msg.add_alternative("<html><body>" + ("<p>" + para + "</p>") * 100 + "</body></html>", subtype="html")
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="order-0042.pdf")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def measure(pipeline: FilterPipeline, messages: list[bytes], rounds: int) -> tuple[float, float, float, int]:
    """``(messages/s, p50 ms, p99 ms, errors)`` over ``rounds`` passes of ``messages`` (bounded loop)."""
    for raw in messages[:5]:
        await pipeline.scan(raw, ENV)  # warm-up: rules compiled, connections open
    times: list[float] = []
    errors = 0
    started = time.perf_counter()
    for _ in range(rounds):
        for raw in messages:
            t = time.perf_counter()
            verdict = await pipeline.scan(raw, ENV)
            times.append((time.perf_counter() - t) * 1000)
            errors += bool(verdict.errors)
    elapsed = time.perf_counter() - started
    return len(times) / elapsed, statistics.median(times), percentile(times, 0.99), errors


def line(name: str, result: tuple[float, float, float, int], note: str = "") -> str:
    rate, p50, p99, errors = result
    return (f"{name:<34} {rate:>9.1f} msg/s   p50 {p50:>7.2f} ms   p99 {p99:>7.2f} ms"
            + (f"   errors {errors}" if errors else "") + (f"   {note}" if note else ""))


def settings(**filters) -> Settings:
    base = {"virus_engines": [], "junk_engines": [], "content_policy": False, "sender_auth": False}
    base.update(filters)
    return Settings.model_validate({"hostname": "mx.bench.test", "filters": base})


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="passes over the corpus per engine (default 10)")
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    parser.add_argument("--embedded-only", action="store_true", help="skip clamd, Rspamd and spamd")
    args = parser.parse_args()
    files = sorted(p for p in args.corpus.rglob("*") if p.is_file() and p.suffix in (".eml", ".bin", ".zip"))
    if not files:
        raise SystemExit(f"no corpus messages under {args.corpus}")
    corpus = [p.read_bytes() for p in files]
    print(f"corpus: {len(corpus)} messages, {sum(map(len, corpus)) / 1024:.0f} KiB; {args.rounds} rounds; "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")

    # Parsing alone (the pipeline parses once for every engine).
    t_parse = []
    for _ in range(args.rounds):
        for raw in corpus:
            t = time.perf_counter()
            parse_message(raw, ENV)
            t_parse.append((time.perf_counter() - t) * 1000)
    print(line("parse (stdlib email, policy.default)",
               (len(t_parse) / (sum(t_parse) / 1000), statistics.median(t_parse), percentile(t_parse, 0.99), 0)))

    from tests.support.dns import LoopbackDNS
    dns_server = LoopbackDNS().start()
    peers = []
    try:
        cases: list[tuple[str, Settings]] = [
            ("yara (embedded)", settings(virus_engines=["yara"])),
            ("builtin junk scorer (embedded)", settings(junk_engines=["builtin"])),
            ("content policy (embedded)", settings(content_policy=True)),
            ("sender auth (SPF/DKIM/DMARC)", settings(sender_auth=True, dns_servers=[dns_server.address])),
            ("embedded pipeline (all three)", settings(virus_engines=["yara"], junk_engines=["builtin"],
                                                       content_policy=True)),
        ]
        if not args.embedded_only:
            cases += await start_peers(args.corpus, dns_server, peers)
        for name, s in cases:
            if isinstance(s, str):
                print(f"{name:<34} not measured: {s}")
                continue
            pipeline = FilterPipeline.from_settings(s)
            try:
                print(line(name, await measure(pipeline, corpus, args.rounds)))
            finally:
                await pipeline.close()

        # The target: the embedded pipeline on a ~50 KB message, one core.
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        raw = fifty_kb_message()
        for name, s in [("embedded, 50 KB message, 1 core", settings(virus_engines=["yara"], junk_engines=["builtin"],
                                                                     content_policy=True)),
                        ("  + sender auth (loopback DNS)", settings(virus_engines=["yara"], junk_engines=["builtin"],
                                                                    content_policy=True, sender_auth=True,
                                                                    dns_servers=[dns_server.address]))]:
            pipeline = FilterPipeline.from_settings(s)
            try:
                result = await measure(pipeline, [raw], max(200, args.rounds * 40))
            finally:
                await pipeline.close()
            note = f"({len(raw) / 1024:.0f} KiB; target p50 < 5 ms: {'met' if result[1] < 5 else 'NOT met'})" \
                if not name.startswith(" ") else ""
            print(line(name, result, note))
    finally:
        for peer in peers:
            peer.stop()
            shutil.rmtree(peer.base, ignore_errors=True)
        dns_server.stop()


async def start_peers(corpus_dir: Path, dns_server, peers: list) -> list[tuple[str, Settings | str]]:
    """Start clamd, Rspamd and spamd on loopback (as the tests do); a missing program is reported."""
    from tests.support.clamd import ClamdInstance
    from tests.support.rspamd import RspamdInstance
    from tests.support.spamd import SpamdInstance

    out: list[tuple[str, Settings | str]] = []
    for name, start, make in [
        ("clamd (INSTREAM)", lambda: ClamdInstance(Path(tempfile.mkdtemp(prefix="bench-clamd-")), corpus_dir).start(),
         lambda p: settings(virus_engines=["clamd"], clamd_address=p.address)),
        ("rspamd (/checkv2)", lambda: RspamdInstance(Path(tempfile.mkdtemp(prefix="bench-rspamd-")),
                                                     dns_server.address).start(),
         lambda p: settings(junk_engines=["rspamd"], rspamd_url=p.url)),
        ("spamd (SYMBOLS, aiospamc)", lambda: SpamdInstance(Path(tempfile.mkdtemp(prefix="bench-spamd-"))).start(),
         lambda p: settings(junk_engines=["spamd"], spamd_address=p.address, timeout=60)),
    ]:
        try:
            peer = await asyncio.to_thread(start)
        except RuntimeError as exc:
            out.append((name, str(exc).splitlines()[0]))
            continue
        peers.append(peer)
        out.append((name, make(peer)))
    return out


if __name__ == "__main__":
    asyncio.run(main())
