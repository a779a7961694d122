"""CPU time and memory of a process tree, read from /proc (Linux).

The benchmark charges a target with the CPU of *all* its processes: the root
process and every descendant alive at a sample, plus the CPU of children that
exited and were reaped in between (``cutime``/``cstime`` of their parent,
proc(5)). So a Postfix master's short-lived smtpd/cleanup/smtp processes count.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _threads_run_seconds(pid: int) -> float:
    """Run time of the process's live threads from ``/proc/PID/task/*/schedstat`` (nanoseconds, precise)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def _stat(pid: int) -> tuple[int, float] | None:
    """``(ppid, cpu_seconds)`` of one process (own + reaped children), or ``None`` if it is gone.

    ``utime``/``stime`` are whole clock ticks (10 ms), each rounded down: summed
    over Postfix's many small processes that loses most of a short run. So a
    process's own CPU is the larger of that and its threads' precise run time
    (which misses threads that already exited; the tick figure keeps them).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it are split on the last ')'.
    rest = data[data.rindex(b")") + 2:].split()
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    own = max((utime + stime) / CLK_TCK, _threads_run_seconds(pid))
    return ppid, own + (cutime + cstime) / CLK_TCK


def tree(root: int) -> dict[int, float]:
    """``{pid: cpu_seconds}`` for ``root`` and all its descendants."""
    stats: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                stats[int(name)] = st
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in stats.items():
        children[ppid].append(pid)
    out: dict[int, float] = {}
    todo = [root] if root in stats else []
    while todo:
        pid = todo.pop()
        out[pid] = stats[pid][1]
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(roots: list[int]) -> float:
    """Total CPU seconds (user + system, own + reaped children) of the trees under ``roots``."""
    return sum(sum(tree(r).values()) for r in roots)


def _field(path: str, name: str) -> int:
    """The first number after ``name`` at the start of a line of a /proc file; 0 if gone or absent."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(name):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def wakeups(roots: list[int]) -> int:
    """Voluntary context switches of every live thread in the trees under ``roots`` (proc(5)).

    A thread switches voluntarily each time it blocks (``epoll_wait``, a lock,
    a disk write), so per message this counts the wake-ups a target needs.
    Threads and processes that already exited are not counted (Postfix's
    short-lived processes are undercounted; mxguard's are long-lived).
    """
    total = 0
    for root in roots:
        for pid in tree(root):
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tasks:
                total += _field(f"/proc/{pid}/task/{tid}/status", "voluntary_ctxt_switches:")
    return total


def pss_mb(roots: list[int]) -> float:
    """Proportional set size of the trees under ``roots``, MiB (shared pages counted once in all)."""
    total_kb = 0
    for root in roots:
        for pid in tree(root):
            total_kb += _field(f"/proc/{pid}/smaps_rollup", "Pss:")
    return total_kb / 1024


class PeakMemory:
    """Samples :func:`pss_mb` of ``roots`` every ``interval`` seconds in a thread; ``peak`` is the highest."""

    def __init__(self, roots: list[int], interval: float = 0.5):
        self.roots = roots
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, pss_mb(self.roots))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, pss_mb(self.roots))
