#!/usr/bin/env python3
"""Idle sessions benchmark (issue 17: 1,000 concurrent idle sessions in <= 150 MB RSS per process).

Starts ``mxguard serve`` (own data dir, RSA-2048 certificate), opens
``--sessions`` SMTP sessions to it that each stop after EHLO, a share of
them after STARTTLS and a second EHLO, holds them all open, and reads the
gateway process's memory (VmRSS, VmHWM and PSS from /proc) before and while
they are open. Then closes them and stops the gateway.

Run as root or not, with the venv that has mxguard:

    .venv/bin/python bench/idle.py [--sessions 1000] [--tls-share 0.3] [--results bench/RESULTS.md]

The bench raises its own open-files limit (RLIMIT_NOFILE), which the
gateway inherits: 1,000 sessions need more than the usual soft limit of 1024
descriptors in the gateway process. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import resource
import shutil
import ssl
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import procstat  # noqa: E402
from run import command_line, machine_description, write_results  # noqa: E402


def _status_mb(pid: int) -> dict[str, float]:
    out = {"VmRSS": 0.0, "VmHWM": 0.0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def memory(pid: int) -> dict[str, float]:
    """Memory of the gateway, in MiB: the largest VmRSS and VmHWM (peak RSS) of any one of
    its processes (one process, or ``serve --workers N``'s supervisor and workers), the sum
    of their VmRSS, and the PSS of the whole tree (shared pages counted once)."""
    per_process = [_status_mb(p) for p in procstat.tree(pid)]
    return {"VmRSS": max(m["VmRSS"] for m in per_process), "VmHWM": max(m["VmHWM"] for m in per_process),
            "RSS_sum": sum(m["VmRSS"] for m in per_process), "processes": len(per_process),
            "PSS": procstat.pss_mb([pid])}


async def open_session(port: int, tls: bool, ctx: ssl.SSLContext, timeout: float):
    """Connect, read the greeting, EHLO (and STARTTLS + EHLO); return the open stream pair."""
    async def reply(reader: asyncio.StreamReader) -> int:
        while True:
            line = await reader.readline()
            if len(line) < 4:
                raise ConnectionError(f"bad reply {line!r}")
            if line[3:4] != b"-":
                return int(line[:3])

    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if await reply(reader) != 220:
            raise ConnectionError("no 220 greeting")
        writer.write(b"EHLO idle.bench.test\r\n")
        if await reply(reader) != 250:
            raise ConnectionError("EHLO refused")
        if tls:
            writer.write(b"STARTTLS\r\n")
            if await reply(reader) != 220:
                raise ConnectionError("STARTTLS refused")
            await writer.start_tls(ctx, server_hostname="mx.bench.test")
            writer.write(b"EHLO idle.bench.test\r\n")
            if await reply(reader) != 250:
                raise ConnectionError("EHLO after STARTTLS refused")
        return reader, writer

    return await asyncio.wait_for(go(), timeout)


async def hold_sessions(port: int, pid: int, sessions: int, tls_share: float, hold: float) -> dict:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the bench's self-signed certificate
    n_tls = round(sessions * tls_share)
    gate = asyncio.Semaphore(50)  # opening 50 at a time keeps the accept backlog small

    async def one(i: int):
        async with gate:
            return await open_session(port, i < n_tls, ctx, 30)

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(sessions)), return_exceptions=True)
    opened = [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    open_s = time.monotonic() - started
    await asyncio.sleep(hold)  # let the gateway settle with every session open
    alive = sum(1 for _, w in opened if not w.is_closing())
    mem = memory(pid)
    for _, writer in opened:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in opened), return_exceptions=True)
    return {"opened": len(opened), "alive": alive, "failed": len(failures), "tls": n_tls, "open_s": open_s,
            "mem": mem, "first_error": repr(failures[0])[:200] if failures else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--tls-share", type=float, default=0.3, help="fraction of sessions that do STARTTLS (0..1)")
    p.add_argument("--hold", type=float, default=2.0, help="seconds to hold them all open before reading memory")
    p.add_argument("--cert", choices=["rsa", "ec"], default="rsa")
    p.add_argument("--workers", type=int, default=1,
                   help="serve --workers N: the sessions spread over N worker processes (default 1)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--results", metavar="FILE", help="write a section to this Markdown file (bench/RESULTS.md)")
    args = p.parse_args(argv)
    if not 0 <= args.tls_share <= 1 or not 1 <= args.sessions <= 20000:
        p.error("--tls-share must be within 0..1 and --sessions within 1..20000")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.sessions * 2 + 512  # our sockets plus the gateway's (it inherits this limit)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want,
                                                    hard))
    workdir = Path(tempfile.mkdtemp(prefix="mxguard-idle-bench-"))
    cert = peers.make_certificate(workdir / "certs", args.cert)
    nowhere = types.SimpleNamespace(port=peers.free_port())  # no mail is sent; the domains need a server
    target = peers.MxguardTarget(workdir, cert, filters=True)
    target.serve_args = ["--workers", str(args.workers)]
    try:
        target.start(False, nowhere, nowhere)
        # The workers accept once they are up: wait for all of them before counting.
        deadline = time.monotonic() + 60
        while len(procstat.tree(target.proc.pid)) < (args.workers + 1 if args.workers > 1 else 1):
            if time.monotonic() > deadline:
                raise RuntimeError("serve --workers did not start every worker within 60 s")
            time.sleep(0.2)
        time.sleep(1 if args.workers > 1 else 0)
        before = memory(target.proc.pid)
        result = asyncio.run(hold_sessions(target.port, target.proc.pid, args.sessions, args.tls_share, args.hold))
        after_close = memory(target.proc.pid)
    finally:
        target.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    mem = result["mem"]
    per_session_kb = (mem["RSS_sum"] - before["RSS_sum"]) * 1024 / max(result["alive"], 1)
    row = {"sessions": args.sessions, "opened": result["opened"], "alive": result["alive"],
           "failed": result["failed"], "tls_sessions": result["tls"], "rss_mb_idle_start": before["VmRSS"],
           "rss_mb": mem["VmRSS"], "peak_rss_mb": mem["VmHWM"], "pss_mb": mem["PSS"],
           "rss_mb_after_close": after_close["VmRSS"], "kb_per_session": per_session_kb,
           "open_s": result["open_s"], "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
           "workers": args.workers, "processes": mem["processes"], "rss_mb_sum": mem["RSS_sum"],
           "rss_mb_sum_idle_start": before["RSS_sum"]}
    goal = 150  # issue 17: 1,000 idle sessions in at most 150 MB RSS per process
    met = mem["VmHWM"] <= goal and result["alive"] == args.sessions
    table = "\n".join([
        "| sessions (STARTTLS) | workers | open | RSS before MB | RSS with all open MB | peak RSS MB | "
        "RSS all processes MB | PSS MB | KB/session | RSS after close MB | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {args.sessions} ({result['tls']}) | {args.workers} | {result['alive']} | {before['VmRSS']:.0f} | "
        f"{mem['VmRSS']:.0f} | {mem['VmHWM']:.0f} | {before['RSS_sum']:.0f} -> {mem['RSS_sum']:.0f} | "
        f"{mem['PSS']:.0f} | {per_session_kb:.0f} | {after_close['VmRSS']:.0f} | "
        f"{'met' if met else 'NOT met'} (<= {goal} MB per process) |"])
    print(table)
    if result["failed"]:
        print(f"{result['failed']} sessions failed to open; first: {result['first_error']}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")
    if args.results:
        text = [f"## Idle sessions ({args.workers} worker{'s' if args.workers > 1 else ''}) — {dt.date.today().isoformat()}", "",
                command_line("bench/idle.py", argv if argv is not None else sys.argv[1:]), "",
                *[f"- {line}" for line in machine_description()],
                f"- mxguard serve --workers {args.workers} (SQLite, {args.cert.upper()} certificate; RSS and peak RSS "
                f"are of the largest process, 'all processes' sums VmRSS over the supervisor and workers, PSS "
                f"counts shared pages once); sessions stop after EHLO, "
                f"{result['tls']} of them after STARTTLS + EHLO; opened in {result['open_s']:.1f} s; "
                f"open-files limit raised to {row['nofile_limit']} (the gateway inherits it: 1,000 sessions do "
                "not fit in the usual soft limit of 1024)", "", table]
        write_results(Path(args.results), "idle" if args.workers == 1 else f"idle-x{args.workers}",
                      "\n".join(text))
    return 0 if result["alive"] == args.sessions else 1


if __name__ == "__main__":
    sys.exit(main())
