#!/usr/bin/env python3
"""Benchmark mxguard side by side with Postfix and Haraka on the same load (issue 5).

Every target relays to the same downstream sinks (Postfix's smtp-sink for
plain SMTP; ``bench/tlssink.c``, a small threaded OpenSSL sink, for
STARTTLS) and is driven by the same compiled load client
(``bench/loadclient.c``). For each row of the matrix

    target × plain/STARTTLS (both hops) × sessions × message size × messages per connection

it reports, as the median of ``--runs`` runs:

* ``msgs_per_s``: messages the sink received / seconds from the client's
  start until the sink had them all (end to end, store-and-forward included);
* ``cpu_ms_per_msg``: CPU (user+system) of all the target's processes per
  message (for ``direct``: the sink's own);
* ``p50_ms`` / ``p99_ms``: the latency the target adds over direct delivery
  for the same load (client-side, MAIL FROM to the reply after the final dot);
* ``rss_mb``: peak memory of the target's processes (PSS summed over the tree);
* errors (summed over runs), the load client's own CPU per message, the sink's.

Run as root (private Postfix instances), with the venv that has mxguard:

    .venv/bin/python bench/run.py --quick --json out.json
    .venv/bin/python bench/run.py --json bench/out/full.json --results bench/RESULTS.md

Not a test: CI does not run it (``tests/test_bench_smoke.py`` runs ``--quick``
with a tiny count). Loopback only; every run is bounded in messages and time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import procstat  # noqa: E402

JSON_KEYS = ("target", "tls", "concurrency", "size", "per_conn", "filters", "msgs_per_s", "cpu_ms_per_msg",
             "p50_ms", "p99_ms", "rss_mb")


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def wait_sink(sink, target_count: int, timeout: float) -> bool:
    """Poll the sink until it has received ``target_count`` messages in all; False on timeout."""
    deadline = time.monotonic() + timeout
    while sink.count < target_count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def measure(target: peers.Target, sink, *, tls: bool, sessions: int, size: int, per_conn: int, messages: int,
            time_limit: float, drain_timeout: float, workdir: Path, rate: float | None = None) -> dict:
    """One run: drive ``target`` with the load client, wait until the sink has everything, read the figures.

    ``rate``: offered messages per second (fixed-rate run), None for as fast as the sessions go.
    """
    rcpt = f"user@{peers.TLS_DOMAIN if tls else peers.PLAIN_DOMAIN}"
    base = sink.count
    roots = target.pids
    cpu0, sink_cpu0 = procstat.cpu_seconds(roots), procstat.cpu_seconds(sink.pids)
    wakeups0 = procstat.wakeups(roots)
    with procstat.PeakMemory(roots) as mem:
        t0 = time.monotonic()
        client = peers.run_loadclient(target.port, tls=tls, sessions=sessions, messages=messages,
                                      per_conn=per_conn, size=size, rcpt=rcpt, time_limit=time_limit,
                                      workdir=workdir, rate=rate)
        drained = wait_sink(sink, base + client.sent, drain_timeout)
        elapsed = time.monotonic() - t0
    cpu1, sink_cpu1 = procstat.cpu_seconds(roots), procstat.cpu_seconds(sink.pids)
    wakeups1 = procstat.wakeups(roots)
    delivered = min(client.sent, sink.count - base)
    errors = client.errors + (client.sent - delivered if not drained else 0)
    if client.errors:
        print(f"    load client errors: {client.stderr.strip()[:500]}", file=sys.stderr)
    if not drained:
        print(f"    the sink got {delivered} of {client.sent} within {drain_timeout:.0f} s", file=sys.stderr)
    per = max(delivered, 1)
    return {
        "msgs_per_s": delivered / elapsed if elapsed > 0 else 0.0,
        "cpu_ms_per_msg": (cpu1 - cpu0) * 1000 / per,
        "p50_abs": percentile(client.latencies_ms, 0.50),
        "p99_abs": percentile(client.latencies_ms, 0.99),
        "rss_mb": mem.peak,
        "errors": errors,
        "client_cpu_ms": client.cpu_s * 1000 / max(client.sent, 1),
        "sink_cpu_ms": (sink_cpu1 - sink_cpu0) * 1000 / per,
        "wakeups_per_msg": (wakeups1 - wakeups0) / per,
        "delivered": delivered,
        "late": client.late,
    }


def median_row(runs: list[dict]) -> dict:
    """Median of each figure over the runs; errors are summed."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in ("errors", "delivered", "late")}
    out["errors"] = sum(r["errors"] for r in runs)
    out["delivered"] = sum(r["delivered"] for r in runs)
    out["late"] = sum(r.get("late", 0) for r in runs)
    return out


def build_targets(names: list[str], workdir: Path, cert: tuple[Path, Path], args) -> list[peers.Target]:
    cores = os.cpu_count() or 1
    out: list[peers.Target] = []
    for name in names:
        if name == "direct":
            out.append(peers.DirectTarget())
        elif name == "postfix":
            out.append(peers.PostfixTarget(workdir, cert))
        elif name == "haraka":
            out.append(peers.HarakaTarget(workdir, cert, nodes=1))
        elif name == "haraka-cores":
            out.append(peers.HarakaTarget(workdir, cert, nodes=cores))
        elif name in ("mxguard", "mxguard-filters"):
            out.append(peers.MxguardTarget(workdir, cert, filters=True, env=args.mxguard_env))
        elif name == "aiosmtpd-bare":
            out.append(peers.BareForwarderTarget(workdir, cert))
        elif name == "mxguard-nofilters":
            out.append(peers.MxguardTarget(workdir, cert, filters=False, env=args.mxguard_env))
        elif name == "mxguard-dane":
            out.append(peers.MxguardDaneTarget(workdir, cert, env=args.mxguard_env))
        elif name == "mxguard-cores":
            # serve --workers N: one gateway process per core sharing the listener (issue 5 goal 2)
            target = peers.MxguardTarget(workdir, cert, filters=True, env=args.mxguard_env)
            target.serve_args = ["--workers", str(cores)]
            target.label = f"mxguard +filters x{cores}"
            out.append(target)
        else:
            raise SystemExit(f"unknown target {name!r}")
    return out


def command_line(script: str, argv: list[str]) -> str:
    """The command as recorded in RESULTS.md: output files outside the repository by name only
    (a path of the machine that ran it means nothing to a reader)."""
    repo = Path(__file__).resolve().parents[1]
    shown = []
    for arg in argv:
        path = Path(arg)
        if path.is_absolute() and repo not in path.resolve().parents:
            arg = path.name
        shown.append(arg)
    return f"Command: `{script} " + " ".join(shown) + "`"


def machine_description() -> list[str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    postfix = subprocess.run(["postconf", "-dh", "mail_version"], capture_output=True, text=True).stdout.strip()
    node = shutil.which("node") and subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    return [f"CPU: {cpu}, {os.cpu_count()} cores (shared by the load client, the target and the sinks)",
            f"Memory: {mem_gb:.0f} GiB; kernel {platform.release()}; Debian {debian}",
            f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}; Postfix {postfix}; Node.js {node}"]


def fmt_table(rows: list[dict]) -> str:
    head = ("target", "tls", "sess", "size", "per", "msg/s", "cpu ms", "+p50 ms", "+p99 ms", "p50 ms", "p99 ms",
            "rss MB", "err", "client ms", "sink ms", "wakeups")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["label"], "yes" if r["tls"] else "no", str(r["concurrency"]), f"{r['size'] // 1024}K",
            str(r["per_conn"]), f"{r['msgs_per_s']:.0f}", f"{r['cpu_ms_per_msg']:.2f}", f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}", f"{r['p50_abs']:.1f}", f"{r['p99_abs']:.1f}", f"{r['rss_mb']:.0f}",
            str(r["errors"]), f"{r['client_cpu_ms']:.2f}", f"{r['sink_cpu_ms']:.2f}",
            f"{r['wakeups_per_msg']:.1f}" if "wakeups_per_msg" in r else "-"]) + " |")
    return "\n".join(lines)


def goal1(rows: list[dict]) -> list[str]:
    """Goal 1 of issue 5: mxguard (filters on) vs Postfix at 20 sessions, 4 KiB, 1 per connection.

    One line per mxguard variant with filters (one process, and ``--workers`` per core when run).
    """
    out = []
    for tls in (False, True):
        def find(target, filters, label=None):
            for r in rows:
                if (r["target"], r["filters"], r["tls"], r["concurrency"], r["size"], r["per_conn"]) == (
                        target, filters, tls, 20, 4096, 1) and (label is None or r.get("label") == label):
                    return r
            return None
        pf = find("postfix", False)
        labels = sorted({r.get("label") for r in rows if r["target"] == "mxguard" and r["filters"]} - {None})
        for label in labels:
            mx = find("mxguard", True, label)
            if not (mx and pf and pf["msgs_per_s"] and pf["cpu_ms_per_msg"]):
                continue
            out.append(f"{'STARTTLS' if tls else 'plain'} ({label}): messages/s {mx['msgs_per_s']:.0f} / "
                       f"{pf['msgs_per_s']:.0f}"
                       f" = {mx['msgs_per_s'] / pf['msgs_per_s']:.2f}x Postfix (goal >= 1.0); CPU/msg "
                       f"{mx['cpu_ms_per_msg']:.2f} / {pf['cpu_ms_per_msg']:.2f} ms = "
                       f"{mx['cpu_ms_per_msg'] / pf['cpu_ms_per_msg']:.2f}x Postfix (goal <= 1.0)")
    return out


def added_latency(rows: list[dict]) -> None:
    """Set ``p50_ms``/``p99_ms``: the latency each row adds over direct delivery of the same load."""
    base = {(r["tls"], r["concurrency"], r["size"], r["per_conn"]): r for r in rows if r["target"] == "direct"}
    for r in rows:
        d = base.get((r["tls"], r["concurrency"], r["size"], r["per_conn"]))
        if r["target"] == "direct" or d is None:
            r["p50_ms"] = r["p99_ms"] = 0.0 if r["target"] == "direct" else float("nan")
        else:
            r["p50_ms"], r["p99_ms"] = r["p50_abs"] - d["p50_abs"], r["p99_abs"] - d["p99_abs"]


def fixed_rate_goal(rows: list[dict]) -> list[str]:
    """Issue 17's latency goal, read at the fixed rate: added p50 <= 2 ms, p99 <= 10 ms.

    One line per mxguard row; ``late`` counts transactions that started more than
    10 ms behind the schedule (the rate was not held when it is not 0).
    """
    out = []
    for r in rows:
        if r["target"] != "mxguard":
            continue
        out.append(f"{r['label']}, {'STARTTLS' if r['tls'] else 'plain'} c={r['concurrency']} "
                   f"{r['size'] // 1024} KiB at {r['rate']:.0f} msg/s: added p50 {r['p50_ms']:.1f} ms (goal <= 2), "
                   f"p99 {r['p99_ms']:.1f} ms (goal <= 10); late starts {r['late']}")
    return out


def dane_cost(rows: list[dict]) -> list[str]:
    """Issue 14's budget: ``dane`` mode (cached lookups) adds at most 0.1 ms CPU per message.

    Compares ``mxguard +filters dane`` with ``mxguard +filters`` row by row (same load, same run).
    """
    out = []
    by_key = {(r.get("label"), r["tls"], r["concurrency"], r["size"], r["per_conn"]): r for r in rows}
    for (label, tls, sessions, size, per_conn), dane in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        if label != "mxguard +filters dane":
            continue
        base = by_key.get(("mxguard +filters", tls, sessions, size, per_conn))
        if base is None:
            continue
        delta = dane["cpu_ms_per_msg"] - base["cpu_ms_per_msg"]
        out.append(f"{'STARTTLS, DANE-verified' if tls else 'plain, unsigned zone (fallback)'} "
                   f"c={sessions} {size // 1024} KiB: CPU/msg {dane['cpu_ms_per_msg']:.2f} with dane vs "
                   f"{base['cpu_ms_per_msg']:.2f} ms without = {delta:+.2f} ms (budget <= 0.1 ms; row noise about "
                   f"10 %)")
    return out


def write_results(path: Path, section: str, text: str) -> None:
    """Replace (or add) the ``section`` block of ``path``, keeping the other blocks."""
    begin, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    current = path.read_text() if path.exists() else "# Benchmark results\n\nWritten by `bench/run.py --results`.\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in current and end in current:
        before, rest = current.split(begin, 1)
        after = rest.split(end, 1)[1]
        current = before + block + after
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)


def start_profiler(pid: int, out: Path) -> tuple[subprocess.Popen, Path]:
    """``py-spy record`` of ``pid`` (sampling, non-blocking) into ``out`` as collapsed stacks."""
    out.parent.mkdir(parents=True, exist_ok=True)
    pyspy = Path(sys.executable).with_name("py-spy")
    proc = subprocess.Popen([str(pyspy if pyspy.exists() else "py-spy"), "record", "--pid", str(pid), "--rate", "250",
                             "--nonblocking", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    return proc, out


def stop_profiler(proc: subprocess.Popen, out: Path) -> None:
    """Stop py-spy (SIGINT writes the file) and print the top costs, self and inclusive."""
    proc.send_signal(2)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    if out.exists():
        print(summarize_profile(out), file=sys.stderr)
        out.with_suffix(".top.txt").write_text(summarize_profile(out))


def summarize_profile(path: Path, top: int = 25) -> str:
    """Top frames of a py-spy collapsed-stack file: by own samples and by inclusive samples."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        # "func (path/file.py:123)": aggregate by function and file, not by line.
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    lines = [f"profile {path.name}: {total} samples", "  own time:"]
    for f, n in sorted(own.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"    {100 * n / max(total, 1):5.1f}%  {f}")
    lines.append("  inclusive:")
    for f, n in sorted(incl.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"    {100 * n / max(total, 1):5.1f}%  {f}")
    return "\n".join(lines)


def run_pass(modes: list[bool], target_objs: list, combos: list[tuple[int, int, int]], args, workdir: Path,
             plain_sink, tls_sink, descriptions: dict[str, str], rate_for=None) -> list[dict]:
    """Every target x TLS mode x (sessions, size, per-connection) combination, ``args.runs`` runs each.

    ``rate_for(tls, sessions, size, per_conn)``: the fixed offered rate (messages per
    second) of that combination, or None to skip it; without it, every run is at
    saturation (each session as fast as it can). Returns one median row per combination.
    """
    rows: list[dict] = []
    for tls in modes:
        sink = tls_sink if tls else plain_sink
        for target in target_objs:
            t_start = time.monotonic()
            target.start(tls, plain_sink, tls_sink)
            descriptions[target.label] = target.describe()
            profiler = None
            if args.profile and target.name == "mxguard" and rate_for is None:
                profiler = start_profiler(target.pids[0], Path(args.profile) /
                                          f"{target.label.replace(' ', '')}-{'tls' if tls else 'plain'}.txt")
            try:
                if args.warmup:
                    measure(target, sink, tls=tls, sessions=min(20, args.warmup), size=4096, per_conn=1,
                            messages=args.warmup, time_limit=args.time_limit, drain_timeout=args.drain_timeout,
                            workdir=workdir)
                for sessions, size, per_conn in combos:
                    rate = rate_for(tls, sessions, size, per_conn) if rate_for else None
                    if rate_for and not rate:
                        continue
                    messages = max(args.messages, sessions * per_conn)
                    runs = []
                    for i in range(args.runs):
                        r = measure(target, sink, tls=tls, sessions=sessions, size=size,
                                    per_conn=per_conn, messages=messages, time_limit=args.time_limit,
                                    drain_timeout=args.drain_timeout, workdir=workdir, rate=rate)
                        paced = f"rate {rate:.0f} (late {r['late']}) " if rate else ""
                        print(f"  {target.label:18} tls={tls!s:5} c={sessions:<3} s={size:<6} "
                              f"k={per_conn:<2} {paced}run {i + 1}: "
                              f"{r['msgs_per_s']:7.0f} msg/s {r['cpu_ms_per_msg']:5.2f} ms cpu  "
                              f"p50 {r['p50_abs']:6.1f} ms p99 {r['p99_abs']:6.1f} ms  "
                              f"wakeups {r['wakeups_per_msg']:4.1f}/msg  err {r['errors']}",
                              file=sys.stderr)
                        runs.append(r)
                    row = median_row(runs)
                    row.update(target=target.name, label=target.label, tls=tls, concurrency=sessions,
                               size=size, per_conn=per_conn, filters=target.filters, rate=rate)
                    rows.append(row)
            finally:
                if profiler is not None:
                    stop_profiler(*profiler)
                target.stop()
            print(f"  {target.label} ({'STARTTLS' if tls else 'plain'}) took "
                  f"{time.monotonic() - t_start:.0f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="direct, postfix, haraka, mxguard (filters on); 20 sessions, 4 KiB, 1 per connection; "
                        "plain and STARTTLS")
    p.add_argument("--json", metavar="FILE", help="write the rows (the issue's schema) to FILE")
    p.add_argument("--json-all", metavar="FILE", help="write the rows with every figure (labels, errors, absolute "
                                                      "latency, client and sink CPU) to FILE")
    p.add_argument("--section", metavar="NAME", help="the section of --results to replace (default: quick or "
                                                     "full, by mode), e.g. dane for a run of the DANE rows only")
    p.add_argument("--results", metavar="FILE", help="write the table and the machine to this Markdown file "
                                                     "(e.g. bench/RESULTS.md), replacing this mode's section")
    p.add_argument("--runs", type=int, default=3, help="runs per row; the figures are medians (default 3)")
    p.add_argument("--messages", type=int, default=2000,
                   help="messages per run (at least one connection per session is made) (default 2000)")
    p.add_argument("--warmup", type=int, default=200, help="messages sent to each target before measuring")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds: no new message after this, per run")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for the sink per run")
    p.add_argument("--targets", help="comma list of direct,postfix,haraka,haraka-cores,mxguard-nofilters,"
                                     "mxguard-filters,mxguard-dane,mxguard-cores,aiosmtpd-bare (default: all but aiosmtpd-bare; "
                                     "--quick: direct,postfix,haraka,mxguard-filters,mxguard-dane,mxguard-cores)")
    p.add_argument("--tls", default="plain,starttls", help="comma list of plain,starttls")
    p.add_argument("--concurrency", help="comma list of concurrent sessions (default 20,200; --quick 20)")
    p.add_argument("--sizes", help="comma list of message sizes in bytes (default 4096,102400; --quick 4096)")
    p.add_argument("--per-conn", help="comma list of messages per connection (default 1,10; --quick 1)")
    p.add_argument("--cert", choices=["rsa", "ec"], default="rsa",
                   help="the targets' certificate: RSA-2048 (the anchors') or ECDSA P-256 (default rsa)")
    p.add_argument("--tls-sink", choices=["tlssink", "postfix"], default="tlssink",
                   help="STARTTLS sink: bench/tlssink.c, or a Postfix smtpd with a discard transport (costs "
                        "about 2.4 ms CPU per message: a bottleneck on 2 cores) (default tlssink)")
    p.add_argument("--mxguard-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra MXGUARD_* setting for mxguard serve (repeatable)")
    p.add_argument("--profile", metavar="DIR", help="record mxguard with py-spy (collapsed stacks) into DIR and "
                                                    "print its top costs")
    p.add_argument("--fixed-rate", type=float, metavar="FRACTION",
                   help="then run every row again at this fraction of Postfix's saturation rate in the same run "
                        "(issue 17 reads latency at 0.5); needs the postfix target")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs and logs) for inspection")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py runs private Postfix instances and must run as root", file=sys.stderr)
        return 2
    args.mxguard_env = dict(item.split("=", 1) for item in args.mxguard_env)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    targets = (args.targets or ("direct,postfix,haraka,mxguard-filters,mxguard-dane,mxguard-cores" if args.quick else
                                "direct,postfix,haraka,haraka-cores,mxguard-nofilters,mxguard-filters,"
                                "mxguard-dane,mxguard-cores")).split(",")
    if "direct" in targets:
        targets = ["direct"] + [t for t in targets if t != "direct"]  # the latency baseline comes first
    concurrency = ints(args.concurrency or ("20" if args.quick else "20,200"))
    sizes = ints(args.sizes or ("4096" if args.quick else "4096,102400"))
    per_conns = ints(args.per_conn or ("1" if args.quick else "1,10"))
    modes = [m == "starttls" for m in args.tls.split(",") if m]

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mxguard-bench-"))
    os.chmod(workdir, 0o755)
    print(f"bench: temp dir {workdir}", file=sys.stderr)
    cert = peers.make_certificate(workdir / "certs", args.cert)
    peers.build_loadclient()
    plain_sink = peers.SmtpSink().start()
    tls_sink = (peers.DiscardSink(*cert) if args.tls_sink == "postfix" else peers.TlsSink(*cert)).start()
    target_objs = build_targets(targets, workdir, cert, args)
    rows: list[dict] = []
    fixed_rows: list[dict] = []
    descriptions: dict[str, str] = {}
    combos = [(c, size, k) for c in concurrency for size in sizes for k in per_conns]
    try:
        rows = run_pass(modes, target_objs, combos, args, workdir, plain_sink, tls_sink, descriptions)
        if args.fixed_rate:
            saturation = {(r["tls"], r["concurrency"], r["size"], r["per_conn"]): r["msgs_per_s"]
                          for r in rows if r["target"] == "postfix"}
            if not saturation:
                print("bench: --fixed-rate needs the postfix target (its saturation rate)", file=sys.stderr)
            else:
                def rate_for(tls: bool, sessions: int, size: int, per_conn: int) -> float | None:
                    found = saturation.get((tls, sessions, size, per_conn))
                    return args.fixed_rate * found if found else None

                print(f"bench: fixed-rate pass at {args.fixed_rate:g} x Postfix's saturation rate", file=sys.stderr)
                fixed_rows = run_pass(modes, target_objs, combos, args, workdir, plain_sink, tls_sink,
                                      descriptions, rate_for=rate_for)
    finally:
        plain_sink.stop()
        tls_sink.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    added_latency(rows)
    added_latency(fixed_rows)
    table = fmt_table(rows)
    fixed_table = fmt_table(fixed_rows) if fixed_rows else ""
    fixed_lines = fixed_rate_goal(fixed_rows)
    ratios = goal1(rows)
    duration = time.monotonic() - started
    print()
    print(table)
    print()
    for line in ratios:
        print("goal 1, " + line)
    dane_lines = dane_cost(rows)
    for line in dane_lines:
        print("dane cost, " + line)
    if fixed_rows:
        print(f"\nAt {args.fixed_rate:g} x Postfix's saturation rate:\n")
        print(fixed_table)
        for line in fixed_lines:
            print("fixed rate, " + line)
    print(f"\n{len(rows)} rows, {args.runs} run(s) each, in {duration / 60:.1f} min")
    if args.json:
        # Only the keys; a second Haraka row (nodes = cores) would be indistinguishable there.
        data = [{k: r[k] for k in JSON_KEYS} for r in rows if r["label"] != f"haraka x{os.cpu_count()}"
                or os.cpu_count() == 1]
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    if args.json_all:
        Path(args.json_all).write_text(json.dumps(rows + fixed_rows, indent=1) + "\n")
    if args.results:
        mode = args.section or ("quick" if args.quick else "full")
        title = f"Section '{args.section}'" if args.section else ("Quick run" if args.quick else "Full matrix")
        text = [f"## {title} — {dt.date.today().isoformat()}", "",
                command_line("bench/run.py", argv if argv is not None else sys.argv[1:]), "",
                *[f"- {line}" for line in machine_description()],
                f"- {args.runs} run(s) per row, medians; {args.messages} messages per run (at least one connection "
                f"per session); {args.cert.upper()} certificate; took {duration / 60:.1f} min", "",
                "Targets:", "", *[f"- **{label}**: {desc}" for label, desc in descriptions.items()], "",
                "Columns: msg/s end to end (until the sink had every message); cpu ms = CPU of all the target's "
                "processes per message (direct: the sink's); +p50/+p99 = latency added over direct delivery of "
                "the same load; p50/p99 = the client's own latency, MAIL FROM to the reply after the dot; rss MB = "
                "peak PSS of the target's processes; err = errors summed over runs; client ms / sink ms = CPU per "
                "message of the load client and of the sink; wakeups = voluntary context switches of the target's "
                "live threads per message (each block in epoll_wait, a lock or a disk write; Postfix's exited "
                "processes are not counted).", "", table, ""]
        if ratios:
            text += ["Goal 1 (mxguard with filters and message log vs Postfix, 20 sessions, 4 KiB, 1 per "
                     "connection):", "", *[f"- {line}" for line in ratios], ""]
        if fixed_rows:
            text += [f"Fixed rate: every row again at {args.fixed_rate:g} x Postfix's saturation rate of the same "
                     "combination (open-loop schedule shared by the sessions; msg/s is then the offered rate "
                     "held):", "", fixed_table, "", *[f"- {line}" for line in fixed_lines], ""]
        if dane_lines:
            text += ["DANE (issue 14: cached lookups add at most 0.1 ms CPU per message):", "",
                     *[f"- {line}" for line in dane_lines], ""]
        write_results(Path(args.results), mode, "\n".join(text))
    total_errors = sum(r["errors"] for r in rows + fixed_rows)
    return 1 if total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
