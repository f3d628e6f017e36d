"""Idle footprint: CPU and memory of mreaper, earlyoom and nohang doing nothing.

Each daemon runs on its packaged (or built-in) defaults on a calm machine, all three at
once: idle, they only read /proc and sleep, so they do not disturb each other (each
one's /proc scan sees the other two as a few more small processes).  After a warm-up
(start-up costs are reported apart), the script samples every daemon every 10 s for
`--seconds` (default 120) and reports:

* CPU: utime+stime of the whole process from /proc/<pid>/stat (clock ticks, 10 ms
  resolution), and the scheduler's own run time summed over its threads from
  /proc/<pid>/task/*/schedstat (nanoseconds), each in % of one CPU;
* wake-ups: voluntary + involuntary context switches over all threads, per second;
* memory: VmRSS and VmLck from /proc/<pid>/status, PSS and USS (private clean +
  dirty) from /proc/<pid>/smaps_rollup, at the end (and the largest VmRSS seen).

Settings: mreaper `run --config <empty file> --dry-run` = its built-in defaults (memory
10/5/2.5 %, PSI triggers on) with the kill step replaced by a log line, so that a PSI
spike from someone else's test on this shared machine cannot make it kill; earlyoom
`-r 3600 --dryrun` = Debian's /etc/default/earlyoom plus dry run; nohang as its
systemd unit runs it, `--monitor --config /etc/nohang/nohang.conf` (it has no dry
run; its default levels, 5 %/2 % of memory, are only reached near a real OOM).
The lines each daemon logged during the window are kept: a daemon that logged
pressure was not idle.

Needs root (mlockall, /proc of root processes), earlyoom and nohang
(apt-get install earlyoom nohang).  Usage: .venv/bin/python bench/footprint.py
[--seconds 120] [--quick]; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from daemon_latency import (
    LineReader,
    add_mreaper_args,
    choose_mreaper,
    empty_config,
    end_cleanly_on_signals,
    environment,
    mreaper_under_test,
    preflight,
    results_dir,
    write_outputs,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
WARMUP_S = 10.0
SAMPLE_EVERY_S = 10.0
NOHANG_CONFIG = "/etc/nohang/nohang.conf"
DAEMONS = ("mreaper", "earlyoom", "nohang")


# --near MIB: every memory level of mreaper and earlyoom at MemAvailable - MIB, as
# measured at the start (the levels "a few hundred MiB away": both poll faster there).
NEAR_KIB: list[int] = []


def idle_command(name: str) -> tuple[list[str], dict[str, str] | None, str]:
    """(argv, environment, how to type it) of one daemon on its default settings."""
    if name == "mreaper":
        m = mreaper_under_test()
        argv = [*m.prefix, "run", "--config", empty_config(), "--dry-run"]
        if NEAR_KIB:
            lvl = f"{NEAR_KIB[0]}K"
            argv += ["--memory-warn", lvl, "--memory-term", lvl, "--memory-kill", lvl]
            return argv, m.env(), ("mreaper run --config <empty file> --dry-run --memory-warn "
                                   "L --memory-term L --memory-kill L")
        return argv, m.env(), "mreaper run --config <empty file> --dry-run"
    if name == "earlyoom":
        argv = ["earlyoom", "-r", "3600", "--dryrun"]
        if NEAR_KIB:
            argv += ["-M", f"{NEAR_KIB[0]},{NEAR_KIB[0]}"]
            return argv, None, "earlyoom -r 3600 --dryrun -M L,L"
        return argv, None, " ".join(argv)
    if name == "nohang":
        argv = ["nohang", "--monitor", "--config", NOHANG_CONFIG]
        return argv, None, " ".join(argv)
    raise ValueError(name)


# --- reading a process ----------------------------------------------------------------------


@dataclass
class Look:
    """One look at a process (all its threads)."""

    at: float
    ticks: int            # utime + stime, whole process, clock ticks
    run_ns: int           # sum over threads of schedstat run time
    ctxsw: int            # sum over threads of voluntary + nonvoluntary switches
    threads: int
    vm_rss: int           # bytes
    vm_lck: int
    pss: int
    uss: int
    thread_ns: dict[str, int] = field(default_factory=dict)  # "main" / "thread <tid> <comm>"


def _status_kib(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def look(pid: int) -> Look:
    """Everything at once; raises OSError when the process is gone."""
    at = time.monotonic()
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    run_ns = ctxsw = threads = 0
    thread_ns: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            run_ns += ns
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            thread_ns["main" if int(tid) == pid else f"thread {tid} {comm}"] = ns
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                st = f.read()
            for key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                for line in st.splitlines():
                    if line.startswith(key + ":"):
                        ctxsw += int(line.split()[1])
            threads += 1
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    with open(f"/proc/{pid}/smaps_rollup") as f:
        rollup = f.read()
    uss = _status_kib(rollup, "Private_Clean") + _status_kib(rollup, "Private_Dirty")
    return Look(at, ticks, run_ns, ctxsw, threads, _status_kib(status, "VmRSS"),
                _status_kib(status, "VmLck"), _status_kib(rollup, "Pss"), uss, thread_ns)


@dataclass
class Usage:
    """What a process cost between two looks."""

    seconds: float
    cpu_ticks_s: float
    cpu_ticks_pct: float        # % of one CPU, from utime+stime
    cpu_sched_s: float
    cpu_sched_pct: float        # % of one CPU, from schedstat
    wakeups_per_s: float
    thread_pct: dict[str, float] = field(default_factory=dict)  # schedstat, per thread


def usage(a: Look, b: Look) -> Usage:
    wall = b.at - a.at
    ticks_s = (b.ticks - a.ticks) / CLK_TCK
    sched_s = (b.run_ns - a.run_ns) / 1e9
    threads = {k: 100 * (v - a.thread_ns.get(k, 0)) / 1e9 / wall
               for k, v in b.thread_ns.items()}
    return Usage(wall, ticks_s, 100 * ticks_s / wall, sched_s, 100 * sched_s / wall,
                 (b.ctxsw - a.ctxsw) / wall, threads)


# --- running the daemons ------------------------------------------------------------------


class Running:
    """A daemon started for the footprint, its output kept line by line."""

    def __init__(self, name: str) -> None:
        self.name = name
        argv, env, self.shown = idle_command(name)
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, close_fds=True, env=env)
        assert self.proc.stdout is not None
        self.out = LineReader(self.proc.stdout.fileno())
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pump(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.out.pump(time.monotonic())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pump()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Result:
    name: str
    command: str
    pid: int
    startup: Usage | None = None       # start -> end of warm-up
    idle: Usage | None = None          # the measured window
    end: Look | None = None
    max_vm_rss: int = 0
    series: list[dict[str, float]] = field(default_factory=list)  # per 10 s interval
    log_in_window: list[str] = field(default_factory=list)
    error: str = ""


def wait_pumping(daemons: Sequence[Running], seconds: float) -> None:
    """Sleep `seconds` while draining the daemons' pipes (a full pipe would block them)."""
    deadline = time.monotonic() + seconds
    fds = [d.out.fd for d in daemons if not d.out.eof]
    while (remaining := deadline - time.monotonic()) > 0:
        select.select(fds, [], [], remaining)
        for d in daemons:
            d.pump()
        fds = [d.out.fd for d in daemons if not d.out.eof]
        if not fds:
            time.sleep(max(deadline - time.monotonic(), 0))
            break


def measure_idle(names: Sequence[str], seconds: float, warmup: float = WARMUP_S,
                 every: float = SAMPLE_EVERY_S) -> list[Result]:
    """Start `names` together, warm up, measure for `seconds`; all stopped in finally."""
    daemons: list[Running] = []
    try:
        for name in names:
            daemons.append(Running(name))
        first = {d.name: look(d.pid) for d in daemons}
        wait_pumping(daemons, warmup)
        for d in daemons:
            if d.proc.poll() is not None:
                raise RuntimeError(f"{d.name} exited ({d.proc.returncode}) during the warm-up: "
                                   f"{d.out.text()[-2000:]}")
        results = {d.name: Result(d.name, d.shown, d.pid) for d in daemons}
        t0 = {}
        for d in daemons:
            t0[d.name] = look(d.pid)
            results[d.name].startup = usage(first[d.name], t0[d.name])
        mark = {d.name: len(d.out.lines) for d in daemons}
        prev = dict(t0)
        start = time.monotonic()
        while (left := start + seconds - time.monotonic()) > 0:
            wait_pumping(daemons, min(every, left))
            for d in daemons:
                r = results[d.name]
                try:
                    now = look(d.pid)
                except OSError as e:
                    r.error = f"gone during the window: {e}"
                    continue
                u = usage(prev[d.name], now)
                r.series.append({"t": now.at - start, "cpu_sched_pct": u.cpu_sched_pct,
                                 "cpu_ticks_pct": u.cpu_ticks_pct,
                                 "wakeups_per_s": u.wakeups_per_s, "vm_rss": now.vm_rss})
                r.max_vm_rss = max(r.max_vm_rss, now.vm_rss)
                prev[d.name] = now
        for d in daemons:
            r = results[d.name]
            if not r.error:
                r.idle = usage(t0[d.name], prev[d.name])
                r.end = prev[d.name]
            r.log_in_window = [line for _, line in d.out.lines[mark[d.name]:]][-50:]
        return [results[n] for n in names]
    finally:
        for d in daemons:
            d.stop()


def markdown(env: dict[str, Any], results: Sequence[Result], seconds: float) -> str:
    lines = [
        "# Idle footprint", "",
        f"{env['date']} on `{env['hostname']}`: Linux {env['kernel']}, {env['cpus']} CPUs "
        f"({env['cpu_model']}), MemTotal {env['mem_total_kib'] // 1024} MiB, swap "
        f"{env['swap_total_kib'] // 1024} MiB; mreaper {env['mreaper_under_test']}, "
        f"{env['earlyoom']}, {env['nohang']}. The three daemons ran at the same time, "
        f"idle, {seconds:.0f} s after a {WARMUP_S:.0f} s warm-up, on a machine shared with "
        f"other test runs (load average {env['loadavg_at_start']} at the start).", "",
        "| daemon | CPU, % of one core (schedstat) | CPU, % (utime+stime ticks) | "
        "wake-ups/s | VmRSS | PSS | USS | VmLck | threads | lines logged in the window |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 1 << 20
    for r in results:
        if r.idle is None or r.end is None:
            lines.append(f"| {r.name} | {r.error or 'no data'} |||||||||")
            continue
        u, e = r.idle, r.end
        lines.append(
            f"| {r.name} | {u.cpu_sched_pct:.4f} ({u.cpu_sched_s:.3f} s) | "
            f"{u.cpu_ticks_pct:.3f} ({u.cpu_ticks_s:.2f} s) | {u.wakeups_per_s:.1f} | "
            f"{e.vm_rss / mib:.1f} MiB | {e.pss / mib:.1f} MiB | {e.uss / mib:.1f} MiB | "
            f"{e.vm_lck / mib:.1f} MiB | {e.threads} | {len(r.log_in_window)} |")
    lines += ["", "Per thread (schedstat, % of one core): " + "; ".join(
        f"{r.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.idle.thread_pct.items())
        for r in results if r.idle)]
    lines += ["", "Start-up (start -> end of warm-up): " + "; ".join(
        f"{r.name} {r.startup.cpu_sched_s:.3f} s CPU" for r in results if r.startup), ""]
    by = {r.name: r for r in results}
    mr, er, nr = by.get("mreaper"), by.get("earlyoom"), by.get("nohang")
    lines.append("Targets:")
    lines.append("")
    if mr and er and mr.idle and er.idle:
        mi, ei = mr.idle, er.idle
        ok = mi.cpu_sched_pct <= ei.cpu_sched_pct
        lines.append(f"- mreaper idle CPU <= earlyoom's: {mi.cpu_sched_pct:.4f} % vs "
                     f"{ei.cpu_sched_pct:.4f} % -> {'met' if ok else 'NOT met'} "
                     f"({mi.cpu_sched_pct / max(ei.cpu_sched_pct, 1e-9):.1f}x)")
    if mr and nr and mr.end and nr.end:
        me, ne = mr.end, nr.end
        ok = me.vm_rss <= ne.vm_rss
        okp = me.pss <= ne.pss
        lines.append(f"- mreaper RSS <= nohang's: VmRSS {me.vm_rss / mib:.1f} vs "
                     f"{ne.vm_rss / mib:.1f} MiB -> {'met' if ok else 'NOT met'}; PSS "
                     f"{me.pss / mib:.1f} vs {ne.pss / mib:.1f} MiB -> "
                     f"{'met' if okp else 'NOT met'}")
    lines += ["", "Commands:", ""]
    for r in results:
        lines.append(f"- {r.name}: `{r.command}`")
    noisy = [r for r in results if r.log_in_window]
    if noisy:
        lines += ["", "Lines logged during the window (a daemon that saw pressure was not idle):",
                  ""]
        for r in noisy:
            for line in r.log_in_window[:10]:
                lines.append(f"- {r.name}: `{line.strip()}`")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120.0, help="measured window (default 120)")
    p.add_argument("--daemons", default=",".join(DAEMONS))
    p.add_argument("--quick", action="store_true", help="20 s window, output under results/tmp/")
    p.add_argument("--near", type=int, metavar="MIB",
                   help="levels MIB under MemAvailable (mreaper and earlyoom only)")
    p.add_argument("--out", help="output directory (default bench/results/<date>-<host>/)")
    add_mreaper_args(p)
    args = p.parse_args(argv)
    names = [n for n in args.daemons.split(",") if n]
    if any(n not in DAEMONS for n in names):
        p.error(f"daemons from {list(DAEMONS)}")
    seconds = 20.0 if args.quick else args.seconds
    problems = preflight(names)
    if "nohang" in names and not os.path.exists(NOHANG_CONFIG):
        problems.append(f"{NOHANG_CONFIG} missing: apt-get install nohang")
    if problems:
        for problem in problems:
            print(f"footprint: {problem}", file=sys.stderr)
        return 1
    if args.near is not None:
        if "nohang" in names:
            p.error("--near: mreaper and earlyoom only (nohang's levels live in its file)")
        with open("/proc/meminfo") as f:
            avail = next(int(x.split()[1]) for x in f if x.startswith("MemAvailable:"))
        NEAR_KIB.append(avail - args.near * 1024)
    end_cleanly_on_signals()
    choose_mreaper(args)
    env = environment()
    if NEAR_KIB:
        env["near_level_kib"] = NEAR_KIB[0]
    results = measure_idle(names, seconds)
    with open("/proc/loadavg") as f:
        env["loadavg_at_end"] = " ".join(f.read().split()[:3])
    data = {"benchmark": "footprint", "environment": env,
            "settings": {"seconds": seconds, "warmup_s": WARMUP_S, "concurrent": True,
                         "commands": {r.name: r.command for r in results}},
            "results": [asdict(r) for r in results]}
    md = markdown(env, results, seconds)
    outdir = results_dir(args.quick, args.out)
    write_outputs(outdir, "footprint", data, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
