"""Decision time at scale: event -> SIGKILL with 0, 1,000 and 10,000 extra processes.

mreaper keeps its victim ranking fresh in a background thread so that the time from the
pressure event to SIGKILL should not grow with the number of processes.  This benchmark
checks that claim.  For each N it starts N tiny sleeping processes (`sleep infinity`,
spawned by a helper inside a bounded memory cgroup, killed and reaped at the end), then
runs the detection-latency experiment of daemon_latency.py (same hog, same level, same
flags; 1 GiB/s in 64 MiB steps) for mreaper and, for reference, earlyoom, alternating.

Per run, from mreaper's own log: "killing <pid> ...; decided in X ms from a Y ms old
ranking" (X = the look that saw the level -> victim pinned, logged just before the
reaper pool signals) and its kill report.  Externally, as in daemon_latency.py: the
first 1 ms MemAvailable sample at or below the level (crossing), the kernel's
signal_generate timestamp of the SIGKILL, and the hog's exit on its pidfd.  And the
kernel's timestamp of mreaper's write(2) of the "killing" line (ftrace
syscalls:sys_enter_write, identified by its byte count), so that event -> SIGKILL =
X + (that write -> SIGKILL): the hand-over to the reaper thread, which the log does
not show, included, and no clock of this script involved.

Also per N: how long one full /proc scan of mreaper's policy takes (alone, in a fresh
process), and both daemons' idle CPU on their defaults with the N processes present
(mreaper rescans /proc every 5 s in the background; earlyoom only scans when it acts).

The hog starts growing 1 s + 3 scan times after the daemon is ready (its first
background scan is done by then) plus a random delay over one scan cycle (5 s + a scan
time), so that the crossing falls at a random phase of mreaper's background rescans, as
a real leak would.  pid_max and RLIMIT_NPROC are checked first.

Needs root, the memory cgroup controller, earlyoom (apt-get install earlyoom).
Usage: .venv/bin/python bench/decision_scale.py [--runs 10] [--counts 0,1000,10000]
[--quick]; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from daemon_latency import (
    MemAvailable,
    Run,
    SignalTrace,
    add_mreaper_args,
    choose_mreaper,
    command_template,
    end_cleanly_on_signals,
    environment,
    fmt,
    lower_own_oom_score_adj,
    mreaper_under_test,
    one_run,
    preflight,
    results_dir,
    stats,
    write_outputs,
)
from footprint import Result, measure_idle
from mreaper.hogs import GiB, MemoryCgroup, MiB

RATE = "1GiB/s"
COUNTS = (0, 1000, 10000)
CONTENDERS = ("mreaper", "earlyoom")
SLEEPERS_LIMIT = 6 * GiB       # the sleepers' memory cgroup (10,000 take ~2.4 GiB here)
IDLE_SECONDS = 30.0
SCAN_CYCLE_S = 5.0             # mreaper's default scan_interval: the phase is drawn over it

# Joins the cgroup, spawns N `sleep infinity` (posix_spawn: vfork + exec, cheap), says
# "ready <n> <seconds>", and on any input (or EOF: the benchmark died) SIGKILLs and
# reaps them all, then exits.
_SLEEPERS = r"""
import os, signal, sys, time
procs, n = sys.argv[1], int(sys.argv[2])
with open(procs, "w") as f:
    f.write(str(os.getpid()))
t = time.monotonic()
pids = []
try:
    for _ in range(n):
        pids.append(os.posix_spawn("/bin/sleep", ["sleep", "infinity"], {}))
    sys.stdout.write(f"ready {len(pids)} {time.monotonic() - t:.3f}\n")
    sys.stdout.flush()
    sys.stdin.readline()
finally:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        os.waitpid(pid, 0)
"""


class Sleepers:
    """N sleeping processes in their own memory cgroup; stop() leaves none behind."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.cg = MemoryCgroup.create(limit=SLEEPERS_LIMIT, prefix="mrbench-sleepers")
        self.spawn_s = 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        if n == 0:
            return
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _SLEEPERS, self.cg.procs_file,
                                          str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         close_fds=True)
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline().decode()
            parts = line.split()
            if len(parts) != 3 or parts[0] != "ready" or int(parts[1]) != n:
                raise RuntimeError(f"spawning {n} sleepers failed: {line!r}")
            self.spawn_s = float(parts[2])
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        self.cg.remove(timeout=60)  # SIGKILLs whatever is left inside


_SCAN = """
import time
from mreaper import policy
t = time.monotonic()
candidates, _ = policy.scan()
print(f"{time.monotonic() - t:.4f} {len(candidates)}")
"""


def scan_seconds(repeat: int = 3) -> tuple[float, int]:
    """Median wall time of one mreaper policy.scan() of /proc, in a fresh interpreter
    running the mreaper under test; and how many candidates it found."""
    m = mreaper_under_test()
    times, found = [], 0
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", _SCAN], env=m.env(), check=True,
                             capture_output=True, text=True).stdout.split()
        times.append(float(out[0]))
        found = int(out[1])
    return statistics.median(times), found


def limits() -> dict[str, Any]:
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    with open("/proc/sys/kernel/threads-max") as f:
        threads_max = int(f.read())
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    with open("/proc/loadavg") as f:
        running = int(f.read().split()[3].split("/")[1])
    return {"pid_max": pid_max, "threads_max": threads_max, "rlimit_nproc": [soft, hard],
            "tasks_at_start": running}


def summarize(runs: Sequence[Run], counts: Sequence[int], contenders: Sequence[str],
              per_n: dict[int, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in counts:
        for c in contenders:
            mine = [r for r in runs if r.extra.get("n") == n and r.contender == c]
            ok = [r for r in mine if r.valid]

            def col(attr: str, rs: Sequence[Run] = ok) -> dict[str, float | int | None]:
                return stats([v for r in rs if (v := getattr(r, attr)) is not None])

            cell: dict[str, Any] = {
                "n": n, "contender": c, "attempts": len(mine), "valid": len(ok),
                "victim_ok": sum(1 for r in ok if r.returncode == -9
                                 and r.victim_pid_logged == r.hog_pid),
                "crossing_to_sigkill_ms": col("crossing_to_sigkill_ms"),
                "crossing_to_exit_ms": col("crossing_to_exit_ms"),
                "crossing_to_kill_logged_ms": col("crossing_to_kill_logged_ms"),
                "invalid": [r.why_invalid for r in mine if not r.valid],
            }
            if c == "mreaper":
                cell["decided_ms"] = col("mreaper_decided_ms")
                cell["ranking_age_ms"] = col("mreaper_ranking_age_ms")
                cell["event_to_sigkill_ms"] = col("event_to_sigkill_ms")
                cell["kill_line_to_sigkill_ms"] = col("kill_line_to_sigkill_ms")
                cell["exit_after_sigkill_ms"] = col("mreaper_exit_after_sigkill_ms")
            cell["sigkill_to_exit_ms"] = col("sigkill_to_exit_ms")
            out[f"{c} @ N={n}"] = cell
        out[f"N={n}"] = per_n.get(n, {})
    return out


def markdown(env: dict[str, Any], summary: dict[str, Any], *, counts: Sequence[int],
             contenders: Sequence[str], runs_per: int, argv_of: dict[str, list[str]]) -> str:
    lines = [
        "# Decision time with 0, 1,000 and 10,000 extra processes", "",
        f"{env['date']} on `{env['hostname']}`: Linux {env['kernel']}, {env['cpus']} CPUs "
        f"({env['cpu_model']}); mreaper {env['mreaper_under_test']}, {env['earlyoom']}; "
        f"pid_max {env['limits']['pid_max']}, RLIMIT_NPROC {env['limits']['rlimit_nproc'][0]}. "
        f"{runs_per} valid runs wanted per cell, contenders alternating; hog at {RATE} in "
        "64 MiB steps past a level 1 GiB under MemAvailable (as daemon_latency.py). "
        "Shared machine (other test suites ran alongside).", "",
        "## mreaper: event -> SIGKILL (target: median < 10 ms at every N)", "",
        "decided in: from its log (the look that saw the level -> victim pinned, logged "
        "just before the hand-over to a reaper thread). event -> SIGKILL = decided in + "
        "(kernel time of the write(2) of that \"killing\" line -> kernel time of the SIGKILL, "
        "both from ftrace): the hand-over included, no clock of this script involved. "
        "The hog starts growing at a random phase of mreaper's 5 s background scan cycle. "
        "Median / p90 (max) in ms.", "",
        "| N extra | valid | decided in (log) | event -> SIGKILL | of which hand-over | "
        "ranking age | crossing -> SIGKILL | SIGKILL -> exit | /proc scan alone | "
        "idle CPU, % of a core |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in counts:
        cell = summary.get(f"mreaper @ N={n}")
        if not cell:
            continue
        info = summary.get(f"N={n}", {})
        d, e, a = cell["decided_ms"], cell["event_to_sigkill_ms"], cell["ranking_age_ms"]
        x, z = cell["crossing_to_sigkill_ms"], cell["sigkill_to_exit_ms"]
        h = cell["kill_line_to_sigkill_ms"]
        idle = info.get("idle_cpu_pct", {}).get("mreaper")
        scan_ms = info["scan_s"] * 1000 if "scan_s" in info else None
        lines.append(
            f"| {n} | {cell['valid']}/{cell['attempts']} | {fmt(d['median'])} / {fmt(d['p90'])} "
            f"({fmt(d['max'])}) | **{fmt(e['median'])}** / {fmt(e['p90'])} ({fmt(e['max'])}) | "
            f"{fmt(h['median'])} / {fmt(h['p90'])} | {fmt(a['median'], 0)} / "
            f"{fmt(a['p90'], 0)} | {fmt(x['median'])} / {fmt(x['p90'])} | "
            f"{fmt(z['median'])} / {fmt(z['p90'])} | "
            f"{fmt(scan_ms, 0)} ms | "
            f"{fmt(idle, 3)} |")
    lines += ["", "Target (median event -> SIGKILL < 10 ms): " + ", ".join(
        f"N={n}: " + ("met" if (m := summary[f'mreaper @ N={n}']['event_to_sigkill_ms']['median'])
                      is not None and m < 10 else "NOT met" if m is not None else "no data")
        for n in counts if f"mreaper @ N={n}" in summary), ""]
    if "earlyoom" in contenders:
        lines += ["## For reference: earlyoom at the same N", "",
                  "| N extra | valid | crossing -> kill logged | crossing -> SIGKILL | "
                  "SIGKILL -> exit | idle CPU, % of a core |", "|---|---|---|---|---|---|"]
        for n in counts:
            cell = summary.get(f"earlyoom @ N={n}")
            if not cell:
                continue
            k, x, z = (cell["crossing_to_kill_logged_ms"], cell["crossing_to_sigkill_ms"],
                       cell["sigkill_to_exit_ms"])
            idle = summary.get(f"N={n}", {}).get("idle_cpu_pct", {}).get("earlyoom")
            lines.append(f"| {n} | {cell['valid']}/{cell['attempts']} | {fmt(k['median'])} / "
                         f"{fmt(k['p90'])} | {fmt(x['median'])} / {fmt(x['p90'])} | "
                         f"{fmt(z['median'])} / {fmt(z['p90'])} | {fmt(idle, 3)} |")
        lines.append("")
    lines += ["Per N: " + "; ".join(
        f"N={n}: spawned in {summary[f'N={n}'].get('spawn_s', 0):.1f} s, MemAvailable "
        f"{summary[f'N={n}'].get('mem_cost_mib', 0):.0f} MiB lower, scan found "
        f"{summary[f'N={n}'].get('candidates', '?')} candidates"
        for n in counts if f"N={n}" in summary), "",
        "Idle CPU: both daemons on their defaults (mreaper `run --config <empty file> "
        "--dry-run`, earlyoom `-r 3600 --dryrun`) for "
        f"{summary.get('idle_seconds', IDLE_SECONDS):.0f} s with the N processes present "
        "(schedstat run time).", "", "Commands (kill runs):", ""]
    for c in contenders:
        lines.append(f"- {c}: `{' '.join(argv_of[c])}`")
    invalid = [(k, v["invalid"]) for k, v in summary.items()
               if isinstance(v, dict) and v.get("invalid")]
    if invalid:
        lines += ["", "Invalid runs (repeated, not counted):", ""]
        for k, whys in invalid:
            for why in whys:
                lines.append(f"- {k}: {why}")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="valid runs per contender and N")
    p.add_argument("--counts", default=",".join(map(str, COUNTS)),
                   help="extra process counts (default 0,1000,10000)")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS,
                   help="idle CPU window per N (0: skip)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 runs, N 0,1000, 10 s idle, output under results/tmp/")
    p.add_argument("--seed", type=int, default=1, help="seed of the random start phases")
    p.add_argument("--out", help="output directory (default bench/results/<date>-<host>/)")
    add_mreaper_args(p)
    args = p.parse_args(argv)
    counts = [0, 1000] if args.quick else [int(x) for x in args.counts.split(",") if x]
    contenders = [c for c in args.contenders.split(",") if c]
    if any(c not in CONTENDERS for c in contenders):
        p.error(f"contenders from {list(CONTENDERS)}")
    runs_per = 2 if args.quick else args.runs
    idle_seconds = 10.0 if args.quick else args.idle_seconds
    problems = preflight(contenders)
    lim = limits()
    need = max(counts) + lim["tasks_at_start"] + 2000
    if need > min(lim["pid_max"], lim["threads_max"]):
        problems.append(f"{max(counts)} more processes need pid_max/threads-max above {need}: "
                        f"pid_max {lim['pid_max']}, threads-max {lim['threads_max']}")
    soft = lim["rlimit_nproc"][0]
    if soft != resource.RLIM_INFINITY and need > soft:
        problems.append(f"RLIMIT_NPROC {soft} is below {need}: raise it (ulimit -u)")
    if problems:
        for problem in problems:
            print(f"decision_scale: {problem}", file=sys.stderr)
        return 1
    end_cleanly_on_signals()
    oom_note = lower_own_oom_score_adj()
    choose_mreaper(args)
    env = environment()
    env["bench_oom_score_adj"] = oom_note
    env["limits"] = lim
    mem = MemAvailable()
    trace = SignalTrace()
    if not trace.ok:
        print(f"decision_scale: {trace.error}; SIGKILL times will be missing", file=sys.stderr)
    env["signal_trace"] = trace.error or "ftrace signal:signal_generate, clock mono"
    runs: list[Run] = []
    per_n: dict[int, dict[str, Any]] = {}
    rng = random.Random(args.seed)
    try:
        for n in counts:
            before = mem.baseline()[0]
            sleepers = Sleepers(n)
            try:
                time.sleep(1.0)
                info: dict[str, Any] = {"spawn_s": sleepers.spawn_s,
                                        "mem_cost_mib": (before - mem.baseline()[0]) / MiB}
                info["scan_s"], info["candidates"] = scan_seconds()
                settle = 1.0 + 3 * info["scan_s"]
                info["settle_s"] = f"{settle:.1f} + uniform(0, {SCAN_CYCLE_S + info['scan_s']:.1f})"
                print(f"N={n}: spawned in {sleepers.spawn_s:.1f} s, scan "
                      f"{info['scan_s'] * 1000:.0f} ms ({info['candidates']} candidates)",
                      file=sys.stderr, flush=True)
                if idle_seconds > 0:
                    idle: list[Result] = measure_idle(contenders, idle_seconds, warmup=5.0)
                    info["idle_cpu_pct"] = {r.name: r.idle.cpu_sched_pct if r.idle else None
                                            for r in idle}
                    info["idle_wakeups_per_s"] = {r.name: r.idle.wakeups_per_s if r.idle
                                                  else None for r in idle}
                per_n[n] = info
                index = 0
                while index < runs_per * 6:
                    needed = False
                    order = contenders if index % 2 == 0 else list(reversed(contenders))
                    for pos, c in enumerate(order):
                        if sum(1 for r in runs if r.extra.get("n") == n and r.contender == c
                               and r.valid) >= runs_per:
                            continue
                        needed = True
                        phase = rng.uniform(0, SCAN_CYCLE_S + info["scan_s"])
                        try:
                            run = one_run(c, RATE, index=index, position=pos, mem=mem,
                                          trace=trace, settle=settle + phase)
                        except RuntimeError as e:
                            run = Run(c, RATE, index, pos, why_invalid=str(e)[:500])
                        run.extra["n"] = n
                        run.extra["phase_s"] = phase
                        run.trace = []
                        if not run.valid:
                            run.extra["log_tail"] = run.daemon_log[-15:]
                        e2k = run.event_to_sigkill_ms
                        print(f"N={n} [{index}] {c:8s} " + (
                            f"->SIGKILL {fmt(run.crossing_to_sigkill_ms)} ms, decided "
                            f"{fmt(run.mreaper_decided_ms)} ms, event->SIGKILL {fmt(e2k)} ms, "
                            f"ranking age {fmt(run.mreaper_ranking_age_ms, 0)} ms"
                            if run.valid else f"INVALID: {run.why_invalid}"),
                            file=sys.stderr, flush=True)
                        runs.append(run)
                        time.sleep(0.5)
                    if not needed:
                        break
                    index += 1
            finally:
                sleepers.stop()
    finally:
        mem.close()
        trace.close()
    with open("/proc/loadavg") as f:
        env["loadavg_at_end"] = " ".join(f.read().split()[:3])
    summary = summarize(runs, counts, contenders, per_n)
    summary["idle_seconds"] = idle_seconds
    argv_of = {c: command_template(c) for c in contenders}
    data = {"benchmark": "decision_scale", "environment": env,
            "settings": {"rate": RATE, "counts": counts, "runs_per_cell": runs_per,
                         "idle_seconds": idle_seconds, "commands": argv_of},
            "summary": summary,
            "runs": [{k: v for k, v in asdict(r).items() if k != "daemon_log" or not r.valid}
                     for r in runs]}
    md = markdown(env, summary, counts=counts, contenders=contenders, runs_per=runs_per,
                  argv_of=argv_of)
    write_outputs(results_dir(args.quick, args.out), "decision_scale", data, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
