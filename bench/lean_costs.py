"""Where the time goes: the cost of each thing the daemon does, alone, at N processes.

In one process, timed with thread CPU time (time.thread_time, so other users' load on
this shared machine counts little), each activity repeated and the median kept:

* the look: /proc/meminfo read and parsed, opened every time (before) and pread
  through a kept descriptor (now); the PSI file the same way;
* the process table: its first fill (every static fact: a full scan), a refresh when
  nothing changed (statm + oom_score per process), the incremental ranking when nothing
  changed, a full policy.rank of the same candidates (what every refresh did before);
* the decision's extra: listing /proc and reading the PIDs the table does not hold.

With --counts 0,10000 it spawns N sleeping processes (decision_scale.Sleepers, in a
bounded memory cgroup, removed at the end) before measuring.  Needs root for the
cgroup.  Usage: .venv/bin/python bench/lean_costs.py [--counts 0,10000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from decision_scale import Sleepers
from mreaper import policy
from mreaper.config import Config
from mreaper.linux import procfs
from mreaper.proctable import IncrementalRanking, ProcTable


def cpu_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median thread CPU time of one call, in ms."""
    times = []
    for _ in range(repeat):
        t = time.thread_time()
        fn()
        times.append((time.thread_time() - t) * 1000)
    return statistics.median(times)


def measure(n: int) -> dict[str, float | int]:
    cfg = Config()
    out: dict[str, float | int] = {"extra_processes": n}
    out["look: meminfo open+read+parse (before)"] = cpu_ms(procfs.read_meminfo, 2000)
    reader = procfs.MemInfoReader()
    out["look: meminfo pread+parse (now)"] = cpu_ms(reader, 2000)
    reader.close()

    def psi_open() -> bytes:
        with open("/proc/pressure/memory", "rb") as f:
            return f.read()

    fd = os.open("/proc/pressure/memory", os.O_RDONLY)
    out["look: PSI file open+read (before)"] = cpu_ms(psi_open, 2000)
    out["look: PSI file pread (now)"] = cpu_ms(lambda: procfs.pread_all(fd), 2000)
    os.close(fd)

    repeat = 3 if n >= 5000 else 10
    out["full scan (before: every 5 s, calm or not)"] = cpu_ms(policy.scan, repeat)
    table = ProcTable()
    out["table: first fill (now: once, at start-up)"] = cpu_ms(
        lambda: ProcTable().refresh(), repeat)
    table.refresh()
    out["processes in the table"] = len(table)
    out["table: refresh, nothing changed (now: only near a level)"] = cpu_ms(
        table.refresh, repeat)
    candidates = table.candidates()
    out["policy.rank of every candidate (before: every scan)"] = cpu_ms(
        lambda: policy.rank(candidates, cfg.rules, sort_by=cfg.sort_by), repeat)
    ranking = IncrementalRanking(cfg.rules, sort_by=cfg.sort_by, min_rss=cfg.min_rss)
    ranking.update(table)
    out["incremental ranking, nothing changed (now)"] = cpu_ms(
        lambda: ranking.update(table), repeat)
    known = table.listed
    out["decision: list /proc, read the new PIDs (none new; before, and the fallback)"] = \
        cpu_ms(lambda: table.read_new(known=known), repeat)
    out["decision: PIDs after /proc/loadavg's last PID (none new; now)"] = cpu_ms(
        lambda: table.read_new(known=known, since=procfs.read_last_pid()), 100)
    return out


def markdown(rows: Sequence[dict[str, float | int]]) -> str:
    keys = [k for k in rows[0] if k != "extra_processes"]
    head = "| activity | " + " | ".join(f"N={r['extra_processes']}" for r in rows) + " |"
    lines = ["# Where the time goes: CPU per activity (ms, median of thread CPU time)", "",
             head, "|---|" + "---|" * len(rows)]
    for k in keys:
        cells = []
        for r in rows:
            v = r[k]
            cells.append(str(v) if isinstance(v, int) else f"{v:.3f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="0,10000")
    p.add_argument("--out", help="directory for lean_costs.json and lean_costs.md")
    args = p.parse_args(argv)
    rows = []
    for n in [int(x) for x in args.counts.split(",") if x]:
        sleepers = Sleepers(n)
        try:
            rows.append(measure(n))
        finally:
            sleepers.stop()
    text = markdown(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lean_costs.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "lean_costs.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
