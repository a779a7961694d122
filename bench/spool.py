#!/usr/bin/env python3
"""Spool benchmark (issue 4): hold 10,000 messages while the downstream server is down, then drain.

For each database (SQLite in the data dir, and PostgreSQL in a private
cluster started here):

1. ``mxguard serve`` with a domain whose only server is down (nothing
   listens on its port); the first retry is set an hour away so the intake
   is measured on its own.
2. The compiled load client sends ``--messages`` messages of ``--size``
   bytes; every one must get ``250`` (accepted into the spool, sealed).
   **In** = messages / seconds the client took.
3. The downstream server comes up (Postfix's smtp-sink on that port) and
   every held entry is made due at once (what ``mxguard spool retry`` does),
   and the gateway's own spool worker delivers them with its default batch,
   poll interval and per-route concurrency. **Out** = messages / seconds
   until the sink had them all.

Run as root with the venv that has mxguard:

    .venv/bin/python bench/spool.py [--messages 10000] [--size 10240] [--results bench/RESULTS.md]

Loopback only; bounded by message count and ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import procstat  # noqa: E402
from run import command_line, machine_description, percentile, write_results  # noqa: E402

DOMAIN = "spool.bench.test"


def mxguard(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run an ``mxguard`` CLI command for ``data_dir``; return stdout. Raises RuntimeError on failure."""
    proc = subprocess.run([sys.executable, "-m", "mxguard", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"mxguard {' '.join(args)}: {proc.stderr[-2000:]}")
    return proc.stdout


async def make_all_due(database_url: str) -> int:
    """Make every held entry due now (the server is back); return how many."""
    from mxguard.spool import queue
    from mxguard.storage.db import Store
    store = Store(database_url)
    try:
        return len(await queue.make_due_now(store))
    finally:
        await store.close()


def one_backend(name: str, workdir: Path, database_url: str | None, args) -> dict:
    data_dir = workdir / f"data-{name}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXGUARD_")}
    env.update({"MXGUARD_SPOOL__FIRST_RETRY": "3600", "MXGUARD_SPOOL__JITTER": "0"})
    init = ["init", "--hostname", "mx.bench.test"] + (["--database-url", database_url] if database_url else [])
    mxguard(data_dir, *init, env=env)
    down_port = peers.free_port()  # nothing listens here until the drain
    mxguard(data_dir, "domain", "add", DOMAIN, "--server", f"127.0.0.1:{down_port}", "--downstream-tls", "off",
            "--on-unreachable", "spool", env=env)
    port = peers.free_port()
    log = open(workdir / f"serve-{name}.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "mxguard", "--data-dir", str(data_dir), "serve", "--smtp",
                              f"127.0.0.1:{port}"], env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    sink = None
    try:
        peers.wait_port(port, 60, serve, "mxguard serve")
        cpu0 = procstat.cpu_seconds([serve.pid])
        client = peers.run_loadclient(port, tls=args.tls, sessions=args.sessions, messages=args.messages,
                                      per_conn=1, size=args.size, rcpt=f"user@{DOMAIN}",
                                      time_limit=args.timeout, workdir=workdir)
        cpu_in = procstat.cpu_seconds([serve.pid]) - cpu0
        if client.errors:
            print(f"  intake errors: {client.stderr.strip()[:500]}", file=sys.stderr)
        sink = peers.SmtpSink(port=down_port).start()
        settings_url = database_url or f"sqlite+aiosqlite:///{(data_dir / 'mxguard.db').resolve()}"
        cpu1 = procstat.cpu_seconds([serve.pid])
        t0 = time.monotonic()
        due = asyncio.run(make_all_due(settings_url))
        deadline = t0 + args.timeout
        while sink.count < client.sent and time.monotonic() < deadline:
            time.sleep(0.02)
        drain_s = time.monotonic() - t0
        cpu_out = procstat.cpu_seconds([serve.pid]) - cpu1
        row = {
            "database": name, "messages": client.sent, "size": args.size, "tls": args.tls,
            "in_msgs_per_s": client.sent / client.elapsed_s if client.elapsed_s else 0.0,
            "in_cpu_ms_per_msg": cpu_in * 1000 / max(client.sent, 1),
            "in_p50_ms": percentile(client.latencies_ms, 0.5),
            "in_p99_ms": percentile(client.latencies_ms, 0.99),
            "held": due, "delivered": sink.count,
            "out_msgs_per_s": sink.count / drain_s if drain_s else 0.0,
            "out_cpu_ms_per_msg": cpu_out * 1000 / max(sink.count, 1),
            "errors": client.errors + client.not_attempted + max(0, client.sent - sink.count),
        }
        print(f"  {name}: in {row['in_msgs_per_s']:.0f} msg/s, out {row['out_msgs_per_s']:.0f} msg/s "
              f"({sink.count}/{client.sent} delivered)", file=sys.stderr)
        return row
    finally:
        peers.stop_process(serve, 30)
        log.close()
        if sink is not None:
            sink.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--size", type=int, default=10240, help="message size in bytes (default 10240)")
    p.add_argument("--sessions", type=int, default=20, help="concurrent sending sessions (default 20)")
    p.add_argument("--tls", action="store_true", help="senders use STARTTLS")
    p.add_argument("--databases", default="sqlite,postgresql", help="comma list of sqlite,postgresql")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for the intake and for the drain")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--results", metavar="FILE", help="write a section to this Markdown file (bench/RESULTS.md)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/spool.py must run as root (smtp-sink, private PostgreSQL)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(peers.REPO))
    from tests.support.postgres import PostgresCluster
    workdir = Path(tempfile.mkdtemp(prefix="mxguard-spool-bench-"))
    os.chmod(workdir, 0o755)
    rows = []
    started = time.monotonic()
    try:
        for name in args.databases.split(","):
            if name == "sqlite":
                rows.append(one_backend("sqlite", workdir, None, args))
            elif name == "postgresql":
                cluster = PostgresCluster(workdir / "pg").start()
                try:
                    rows.append(one_backend("postgresql", workdir, cluster.create_database("spoolbench"), args))
                finally:
                    cluster.stop()
            else:
                raise SystemExit(f"unknown database {name!r}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    head = "| database | messages | size | in msg/s | in CPU ms/msg | in p50 ms | in p99 ms | out msg/s | " \
           "out CPU ms/msg | delivered | errors |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['database']} | {r['messages']} | {r['size']} | {r['in_msgs_per_s']:.0f} | "
                     f"{r['in_cpu_ms_per_msg']:.2f} | {r['in_p50_ms']:.1f} | {r['in_p99_ms']:.1f} | "
                     f"{r['out_msgs_per_s']:.0f} | {r['out_cpu_ms_per_msg']:.2f} | {r['delivered']} | "
                     f"{r['errors']} |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.results:
        text = [f"## Spool (issue 4) — {dt.date.today().isoformat()}", "",
                command_line("bench/spool.py", argv if argv is not None else sys.argv[1:]), "",
                *[f"- {line}" for line in machine_description()],
                f"- {args.sessions} sending sessions, {'STARTTLS' if args.tls else 'plain'}; downstream down "
                "during the intake (first retry an hour away), then smtp-sink comes up and every entry is made "
                "due at once; the gateway's spool worker drains with its defaults (batch 100, poll 1 s, "
                f"4 deliveries per route at a time, one connection per message); took "
                f"{(time.monotonic() - started) / 60:.1f} min", "",
                "In = accepted into the spool (sealed, committed before the 250); out = delivered by the "
                "worker once the server is back. CPU = mxguard serve's own.", "", table]
        write_results(Path(args.results), "spool", "\n".join(text))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
