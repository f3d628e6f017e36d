"""Kill-to-free benchmark: plain SIGKILL vs mreaper's engine vs a bare ctypes process_mrelease.

What it is for: measure, in one run so that drift hits every contender alike, how long a
victim's memory takes to come back after SIGKILL

* with plain SIGKILL (the engine with KillOptions(mrelease=False)),
* with mreaper's engine (SIGKILL + process_mrelease, KillOptions()),
* with the engine demoting the victim first (KillOptions(demote=True)),
* with a bare ctypes pidfd_open + pidfd_send_signal + process_mrelease and nothing else,

for idle, CPU-starved (SCHED_FIFO hog on the victim's CPU) and D-state (v1 freezer)
victims of 0.5-4 GiB.  Ground truth is independent of the engine's report: the victim's
own v1 memory cgroup signals, through a memcg eventfd threshold (cgroup.event_control on
memory.usage_in_bytes), the moment its charge falls below 5 % of the victim size.

Needs root, the v1 memory controller (and the v1 freezer for the D state), 2+ CPUs.
Usage and how to read the output: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime as dt
import errno
import json
import math
import os
import platform
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mreaper.hogs import CpuStarver, Freezer, GiB, MemoryCgroup, MiB
from mreaper.linux.procfs import read_meminfo
from mreaper.linux.syscalls import LinuxSyscalls
from mreaper.reap import KillOptions, Victim, VictimGone, kill_and_reap

CONTENDERS = ("plain", "engine", "engine+demote", "bare")
STATES = ("idle", "starved", "stuck")
DEFAULT_SIZES = (0.5, 1.0, 2.0, 4.0)
THRESHOLD_FRACTION = 0.05        # "memory back": victim memcg charge below 5 % of its size
HANG_S = 2.0                     # D state: thaw this long after SIGKILL if memory is not back
MAX_WAIT_S = 30.0                # give up on a trial (recorded as "not back") after this
EXIT_TIMEOUT_S = MAX_WAIT_S + HANG_S + 10.0
LIMIT_SLACK = 256 * MiB          # memcg limit = victim size + this
AVAIL_MARGIN = 2 * GiB           # MemAvailable must exceed limit + this before each victim
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

# --- the victim process -------------------------------------------------------------

# Pins itself to its CPU, joins its memory cgroup, then maps `size` bytes of *private*
# anonymous memory populated up front (MAP_POPULATE on a writable private mapping
# write-faults real 4 KiB pages: THP is madvise-only here and not requested).  Same
# memory as hogs.Hog's bytearray, filled ~8x faster on this host (1.1 s vs 8.9 s for
# 4 GiB), which is what keeps the full run under 15 minutes.
_VICTIM = r"""
import mmap, os, signal, sys
procs, size, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.sched_setaffinity(0, {cpu})
with open(procs, "w") as f:
    f.write(str(os.getpid()))
block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
sys.stdout.write("ready\n")
sys.stdout.flush()
while True:
    signal.pause()
"""


class VictimLost(Exception):
    """The victim died before our SIGKILL (killed by someone else): the trial is redone."""


class VictimProcess:
    """A forked victim holding `size` bytes in `memcg`, pinned to `cpu`."""

    def __init__(self, size: int, memcg: MemoryCgroup, cpu: int) -> None:
        self._pidfd: int | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _VICTIM, memcg.procs_file, str(size), str(cpu)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, close_fds=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 120.0)
        line = self.proc.stdout.readline() if ready else b""
        if line != b"ready\n":
            self.reap()
            raise VictimLost(f"victim of {size} bytes did not start: {line!r}, "
                             f"exit {self.proc.returncode}")
        self._pidfd = os.pidfd_open(self.proc.pid)

    def alive(self) -> bool:
        """Not exited yet (the pidfd is not readable); does not reap."""
        assert self._pidfd is not None
        exited, _, _ = select.select([self._pidfd], [], [], 0)
        return not exited

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reap(self) -> None:
        """SIGKILL (if still alive) and wait: the PID is released only here.  Idempotent."""
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            os.close(fd)


# --- ground truth: the memcg eventfd threshold ---------------------------------------


@dataclass
class Hooks:
    """What the watch does for the victim's state: thaw after the hang, end the state."""

    on_hang: Callable[[], None] | None = None
    on_done: Callable[[], None] | None = None


class ChargeWatch:
    """Time the moment the memcg charge falls below `threshold`.

    A v1 memcg threshold event (cgroup.event_control) signals an eventfd when the charge
    crosses it; a thread sleeps on the eventfd (nothing polls the charge) at SCHED_FIFO so
    that it takes its timestamp at once even while the reaping thread holds our CPU.  It
    is asleep *before* SIGKILL and nothing wakes it before the event: a wake-up inside the
    timed window would make it fight the contender for the GIL and the CPU (seen: 2 ms
    stalls when it was woken at SIGKILL).  The D-state hang is a second thread that first
    wakes HANG_S after it starts, i.e. after the kill, never inside a fast kill's window.
    """

    def __init__(self, memcg: MemoryCgroup, threshold: int, hooks: Hooks) -> None:
        self.memcg, self.threshold, self.hooks = memcg, threshold, hooks
        self.kill_at: float | None = None
        self.mrelease_at: float | None = None
        self.freed_at: float | None = None
        self.usage_at_event: int | None = None
        self.hang_thawed = False
        self.realtime = False
        self._stop = threading.Event()
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ufd = os.open(os.path.join(memcg.path, "memory.usage_in_bytes"),
                            os.O_RDONLY | os.O_CLOEXEC)
        with open(os.path.join(memcg.path, "cgroup.event_control"), "w") as f:
            f.write(f"{self._efd} {self._ufd} {threshold}")
        self._threads = [threading.Thread(target=self._watch, name="charge-watch", daemon=True)]
        if hooks.on_hang:
            self._threads.append(threading.Thread(target=self._hang, name="hang", daemon=True))
        for t in self._threads:
            t.start()

    def mark_kill(self) -> None:
        """Called right before the SIGKILL syscall: the start of the measurement."""
        self.kill_at = time.monotonic()

    def mark_mrelease(self) -> None:
        """Called right before the first process_mrelease: the contender's own overhead."""
        if self.mrelease_at is None:
            self.mrelease_at = time.monotonic()

    def kill_to_mrelease(self) -> float | None:
        if self.mrelease_at is None or self.kill_at is None:
            return None
        return self.mrelease_at - self.kill_at

    def kill_to_free(self) -> float | None:
        if self.freed_at is None or self.kill_at is None:
            return None
        return self.freed_at - self.kill_at

    def finish(self) -> None:
        """Wait for the measurement to end (bounded), then stop the threads, close fds."""
        if self.kill_at is not None:  # else the contender failed before SIGKILL
            self._threads[0].join(MAX_WAIT_S + HANG_S + 5.0)
        self._stop.set()
        os.eventfd_write(self._wake, 1)
        for t in self._threads:
            t.join()
        for fd in (self._efd, self._wake, self._ufd):
            os.close(fd)

    def _watch(self) -> None:
        self.realtime = _make_realtime()
        poller = select.poll()
        poller.register(self._efd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        events = poller.poll(int((MAX_WAIT_S + HANG_S) * 1000))
        if any(fd == self._efd for fd, _ in events) and self.kill_at is not None:
            self.freed_at = time.monotonic()
            self.usage_at_event = self.memcg.usage()
        if self.hooks.on_done:
            self.hooks.on_done()

    def _hang(self) -> None:
        """Thaw HANG_S after SIGKILL unless the memory is back by then."""
        self._stop.wait(HANG_S)
        while not self._stop.is_set() and self.freed_at is None:
            due = (self.kill_at or time.monotonic()) + HANG_S - time.monotonic()
            if due <= 0:
                assert self.hooks.on_hang is not None
                self.hooks.on_hang()
                self.hang_thawed = True
                return
            self._stop.wait(due)


def _make_realtime() -> bool:
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))  # this thread only
        return True
    return False


# --- the contenders -----------------------------------------------------------------


@dataclass
class Outcome:
    """What a contender saw; ground truth is taken separately by the ChargeWatch."""

    mrelease: str                     # Mrelease value: reaped, exited-first, not-called...
    mrelease_errno: str = ""
    engine_free_s: float | None = None  # the engine's own kill_to_free_s, for comparison
    exit_s: float | None = None


class KillClock:
    """The engine's real syscalls, handing the instant of SIGKILL to the watch."""

    def __init__(self, watch: ChargeWatch) -> None:
        self._sc, self._watch = LinuxSyscalls(), watch

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        return self._sc.pidfd_open(pid, flags)

    def pidfd_send_signal(self, pidfd: int, sig: int, flags: int = 0) -> None:
        if sig == signal.SIGKILL:
            self._watch.mark_kill()
        self._sc.pidfd_send_signal(pidfd, sig, flags)

    def process_mrelease(self, pidfd: int, flags: int = 0) -> None:
        self._watch.mark_mrelease()
        self._sc.process_mrelease(pidfd, flags)


def run_engine(pid: int, watch: ChargeWatch, options: KillOptions) -> Outcome:
    try:
        victim = Victim.open(pid)
    except VictimGone as e:
        raise VictimLost(str(e)) from e
    with victim:
        report = kill_and_reap(victim, options, reason="bench", syscalls=KillClock(watch))
    if not report.signals:  # "SIGKILL: already exited": someone else killed it
        raise VictimLost(f"victim {pid} exited before our SIGKILL")
    return Outcome(report.mrelease.value, report.mrelease_errno, report.kill_to_free_s,
                   report.kill_to_exit_s)


class BareMrelease:
    """pidfd_open + pidfd_send_signal(SIGKILL) + process_mrelease through ctypes, no more.

    Syscall numbers are the generic ones (all architectures since 5.1 except alpha,
    mips and x32, which this refuses)."""

    NR_PIDFD_SEND_SIGNAL, NR_PIDFD_OPEN, NR_PROCESS_MRELEASE = 424, 434, 448

    def __init__(self) -> None:
        machine = platform.machine().lower()
        if machine.startswith(("alpha", "mips")) or ctypes.sizeof(ctypes.c_void_p) != 8:
            raise SystemExit(f"bare contender: syscall numbers not known for {machine}")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long

    def _call(self, *args: int) -> int:
        return int(self._syscall(*(ctypes.c_long(a) for a in args)))

    def open(self, pid: int) -> int:
        fd = self._call(self.NR_PIDFD_OPEN, pid, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise (VictimLost if err == errno.ESRCH else OSError)(err, "pidfd_open")
        return fd

    def kill_and_release(self, pidfd: int, watch: ChargeWatch) -> str:
        """The timed part: mark, SIGKILL, process_mrelease.  Returns the errno name."""
        watch.mark_kill()
        sent = self._call(self.NR_PIDFD_SEND_SIGNAL, pidfd, signal.SIGKILL, 0, 0)
        watch.mark_mrelease()
        released = self._call(self.NR_PROCESS_MRELEASE, pidfd, 0) if sent == 0 else -1
        err = ctypes.get_errno()
        if sent != 0:
            raise (VictimLost if err == errno.ESRCH else OSError)(err, "pidfd_send_signal")
        return "0" if released == 0 else errno.errorcode.get(err, str(err))


_BARE_OUTCOME = {"0": "reaped", "ESRCH": "exited-first"}


def run_bare(pid: int, watch: ChargeWatch, bare: BareMrelease) -> Outcome:
    pidfd = bare.open(pid)
    try:
        err = bare.kill_and_release(pidfd, watch)
        exited, _, _ = select.select([pidfd], [], [], EXIT_TIMEOUT_S)
        exit_s = time.monotonic() - (watch.kill_at or 0.0) if exited else None
    finally:
        os.close(pidfd)
    return Outcome(_BARE_OUTCOME.get(err, f"failed-{err}"), err, None, exit_s)


def run_contender(name: str, pid: int, watch: ChargeWatch, bare: BareMrelease) -> Outcome:
    if name == "bare":
        return run_bare(pid, watch, bare)
    options = {"plain": KillOptions(mrelease=False, exit_timeout=EXIT_TIMEOUT_S),
               "engine": KillOptions(exit_timeout=EXIT_TIMEOUT_S),
               "engine+demote": KillOptions(demote=True, exit_timeout=EXIT_TIMEOUT_S)}[name]
    return run_engine(pid, watch, options)


# --- victim states ------------------------------------------------------------------


@contextlib.contextmanager
def victim_state(state: str, victim: VictimProcess, cpu: int) -> Iterator[Hooks]:
    """Put the victim in `state`.  On the way out (last in, first out): release the
    victim from its state, reap it, then remove the starver or freezer."""
    with contextlib.ExitStack() as stack:
        stack.callback(victim.reap)  # covers a failure while setting the state up
        hooks = Hooks()
        if state == "starved":
            starver = stack.enter_context(CpuStarver(cpu, lifetime=EXIT_TIMEOUT_S + 60.0))
            stack.callback(victim.reap)
            stack.callback(starver.proc.kill)
            starver.starve(victim.pid)
            hooks = Hooks(on_done=starver.proc.kill)
        elif state == "stuck":
            freezer = stack.enter_context(Freezer())
            stack.callback(victim.reap)
            stack.callback(freezer.thaw)
            freezer.add(victim.pid)
            freezer.freeze()
            hooks = Hooks(on_hang=freezer.thaw, on_done=freezer.thaw)
        yield hooks


# --- one trial ----------------------------------------------------------------------


@dataclass
class Trial:
    size_gib: float
    state: str
    rep: int
    slot: int                       # position of the contender in this repetition
    contender: str
    kill_to_free_s: float | None    # ground truth; None: not back within MAX_WAIT_S
    charge_before: int
    usage_at_event: int | None
    hang_thawed: bool               # D state: thawed by the 2 s hang, not after measurement
    watcher_realtime: bool
    mrelease: str
    mrelease_errno: str
    engine_free_s: float | None
    exit_s: float | None
    kill_to_mrelease_s: float | None  # SIGKILL -> process_mrelease entry: pure overhead
    reaper_wait_s: float              # reaper thread's run-queue wait during the contender
    attempt: int                    # > 1: earlier attempts lost the victim before SIGKILL


@dataclass(frozen=True)
class Slot:
    size_gib: float
    state: str
    rep: int
    slot: int
    contender: str


def run_trial(slot: Slot, cpu: int, bare: BareMrelease, attempts: int = 3) -> Trial:
    """Measure one slot; redo it (bounded) when the victim is lost before our SIGKILL."""
    for attempt in range(1, attempts + 1):
        try:
            return measure(slot, cpu, bare, attempt)
        except VictimLost as e:
            print(f"  victim lost ({e}); attempt {attempt} of {attempts}", file=sys.stderr)
    raise SystemExit(f"giving up on {slot}: victim lost {attempts} times")


def measure(slot: Slot, cpu: int, bare: BareMrelease, attempt: int) -> Trial:
    size = int(slot.size_gib * GiB)
    ensure_memory(size)
    with MemoryCgroup.create(limit=size + LIMIT_SLACK, prefix="mreaper-bench") as memcg:
        victim = VictimProcess(size, memcg, cpu)
        with victim_state(slot.state, victim, cpu) as hooks:
            charge = memcg.usage()
            if charge < 0.95 * size or not victim.alive():
                raise VictimLost(f"victim charged {charge} of {size} bytes before the kill")
            watch = ChargeWatch(memcg, int(size * THRESHOLD_FRACTION), hooks)
            try:
                waited = runqueue_wait_s()
                out = run_contender(slot.contender, victim.pid, watch, bare)
                waited = runqueue_wait_s() - waited
            finally:
                watch.finish()
    return Trial(slot.size_gib, slot.state, slot.rep, slot.slot, slot.contender,
                 watch.kill_to_free(), charge, watch.usage_at_event, watch.hang_thawed,
                 watch.realtime, out.mrelease, out.mrelease_errno, out.engine_free_s,
                 out.exit_s, watch.kill_to_mrelease(), waited, attempt)


def runqueue_wait_s() -> float:
    """Time this thread has spent runnable but waiting for its CPU (schedstat field 2):
    how much other tenants of the reaper's CPU got in the way."""
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def ensure_memory(size: int, wait_s: float = 30.0) -> None:
    """Refuse to start a victim unless MemAvailable covers it with a margin."""
    need = size + LIMIT_SLACK + AVAIL_MARGIN
    deadline = time.monotonic() + wait_s
    while (avail := read_meminfo().mem_available) < need:
        if time.monotonic() > deadline:
            raise SystemExit(f"refusing: MemAvailable {avail / GiB:.1f} GiB < "
                             f"{need / GiB:.1f} GiB needed for a {size / GiB:g} GiB victim")
        time.sleep(0.5)


def schedule(sizes: Sequence[float], states: Sequence[str], runs: int,
             contenders: Sequence[str]) -> list[Slot]:
    """Every cell, repetition by repetition, contenders interleaved in alternating order
    (forward on even repetitions, reversed on odd ones) so drift hits all alike."""
    slots = []
    for size in sizes:
        for state in states:
            for rep in range(runs):
                order = contenders if rep % 2 == 0 else contenders[::-1]
                slots += [Slot(size, state, rep, i, c) for i, c in enumerate(order)]
    return slots


# --- statistics ---------------------------------------------------------------------


def values(trials: Sequence[Trial], size: float, state: str, contender: str) -> list[float]:
    """Kill-to-free times of a cell; a trial not back in time counts as +inf."""
    return [math.inf if t.kill_to_free_s is None else t.kill_to_free_s for t in trials
            if t.size_gib == size and t.state == state and t.contender == contender]


def p90(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return xs[0]
    if math.inf in xs:
        ordered = sorted(xs)
        return ordered[min(len(xs) - 1, math.ceil(0.9 * len(xs)) - 1)]
    return statistics.quantiles(xs, n=10, method="inclusive")[-1]


def ratio(num: Sequence[float], den: Sequence[float]) -> float:
    a, b = statistics.median(num), statistics.median(den)
    return math.nan if b == 0 or math.isinf(b) else a / b


def ratio_ci(num: Sequence[float], den: Sequence[float], rng: random.Random,
             rounds: int = 2000) -> tuple[float, float]:
    """90 % bootstrap interval of the ratio of medians (each side resampled alone)."""
    rs = sorted(ratio(rng.choices(num, k=len(num)), rng.choices(den, k=len(den)))
                for _ in range(rounds))
    rs = [r for r in rs if not math.isnan(r)] or [math.nan]
    return rs[int(0.05 * (len(rs) - 1))], rs[int(0.95 * (len(rs) - 1))]


def fisher_two_sided(a: int, b: int, c: int, d: int) -> float:
    """Fisher's exact test on the 2x2 table [[a, b], [c, d]]: two-sided p-value."""
    row1, col1, n = a + b, a + c, a + b + c + d

    def prob(x: int) -> float:
        return math.comb(col1, x) * math.comb(n - col1, row1 - x) / math.comb(n, row1)

    observed = prob(a)
    lo, hi = max(0, row1 + col1 - n), min(row1, col1)
    return min(1.0, sum(p for x in range(lo, hi + 1) if (p := prob(x)) <= observed * 1.0000001))


# --- summary ------------------------------------------------------------------------


@dataclass
class Cell:
    size_gib: float
    state: str
    contender: str
    n: int
    median_s: float
    p90_s: float
    not_back: int                   # trials whose memory was not back within MAX_WAIT_S
    outcomes: dict[str, int]        # Mrelease outcome -> count


@dataclass
class Ratio:
    size_gib: float
    state: str
    name: str                       # "plain/engine": median of plain / median of engine
    value: float
    ci90: tuple[float, float]


@dataclass
class Verdict:
    target: str
    ratio: Ratio
    bound: float
    at_least: bool
    met: bool
    ci_spans_bound: bool


@dataclass
class Demotion:
    idle_reaped_engine: tuple[int, int]     # (REAPED, trials), idle, all sizes
    idle_reaped_demote: tuple[int, int]
    fisher_p: float
    engine_over_demote: dict[str, float]    # "idle 4 GiB" -> median ratio (> 1: demote faster)
    median_gain: float
    recommendation: str
    rule: str = ("turn on only if demote raises the idle REAPED fraction (Fisher p < 0.05) "
                 "AND makes kill-to-free >= 5 % faster at the median over idle and starved "
                 "cells")


def summarize_cells(trials: Sequence[Trial], sizes: Sequence[float], states: Sequence[str],
                    contenders: Sequence[str]) -> list[Cell]:
    cells = []
    for size in sizes:
        for state in states:
            for c in contenders:
                xs = values(trials, size, state, c)
                outs = Counter(t.mrelease for t in trials
                               if t.size_gib == size and t.state == state and t.contender == c)
                cells.append(Cell(size, state, c, len(xs), statistics.median(xs), p90(xs),
                                  sum(math.isinf(x) for x in xs), dict(outs)))
    return cells


RATIOS = (("plain/engine", "plain", "engine"), ("engine/bare", "engine", "bare"),
          ("engine/engine+demote", "engine", "engine+demote"),
          ("plain/engine+demote", "plain", "engine+demote"))


def summarize_ratios(trials: Sequence[Trial], sizes: Sequence[float], states: Sequence[str],
                     contenders: Sequence[str], seed: int) -> list[Ratio]:
    rng = random.Random(seed)
    rows = []
    for size in sizes:
        for state in states:
            for name, num, den in RATIOS:
                if num in contenders and den in contenders:
                    a, b = values(trials, size, state, num), values(trials, size, state, den)
                    rows.append(Ratio(size, state, name, ratio(a, b), ratio_ci(a, b, rng)))
    return rows


def find_ratio(ratios: Sequence[Ratio], size: float, state: str, name: str) -> Ratio | None:
    return next((r for r in ratios
                 if r.size_gib == size and r.state == state and r.name == name), None)


# --- targets and the demotion verdict -------------------------------------------------

TARGETS = (  # (what, state or None for all, sizes or None for all, ratio, bound, at_least)
    ("starved >= 9x faster than plain", "starved", (1.0, 4.0), "plain/engine", 9.0, True),
    ("stuck >= 9x faster than plain", "stuck", (1.0, 4.0), "plain/engine", 9.0, True),
    ("idle never slower than plain", "idle", None, "plain/engine", 1.0, True),
    ("idle: aim 1.3x at 4 GiB", "idle", (4.0,), "plain/engine", 1.3, True),
    ("engine within 10 % of bare ctypes", None, None, "engine/bare", 1.10, False),
)


def judge_targets(ratios: Sequence[Ratio], sizes: Sequence[float],
                  states: Sequence[str]) -> list[Verdict]:
    """Verdict on the point estimate (ratio of medians); the CI is shown next to it."""
    out = []
    for what, state, tsizes, name, bound, at_least in TARGETS:
        for st in [state] if state else states:
            for size in tsizes or sizes:
                r = find_ratio(ratios, size, st, name)
                if r is None:
                    continue
                met = r.value >= bound if at_least else r.value <= bound
                spans = r.ci90[0] < bound < r.ci90[1]
                out.append(Verdict(what, r, bound, at_least, met, spans))
    return out


def demotion(trials: Sequence[Trial], ratios: Sequence[Ratio]) -> Demotion | None:
    """REAPED fractions (idle, pooled over sizes) and time ratios engine vs engine+demote."""
    def reaped(contender: str) -> tuple[int, int]:
        ts = [t for t in trials if t.state == "idle" and t.contender == contender]
        return sum(t.mrelease == "reaped" for t in ts), len(ts)

    (ra, na), (rd, nd) = reaped("engine"), reaped("engine+demote")
    if not na or not nd:
        return None
    times = {f"{r.state} {r.size_gib:g} GiB": r.value for r in ratios
             if r.name == "engine/engine+demote" and r.state in ("idle", "starved")}
    finite = [v for v in times.values() if math.isfinite(v)]
    gain = statistics.median(finite) if finite else math.nan
    p = fisher_two_sided(ra, na - ra, rd, nd - rd)
    turn_on = rd / nd > ra / na and p < 0.05 and gain >= 1.05
    return Demotion((ra, na), (rd, nd), p, times, gain,
                    "turn demote on by default" if turn_on else "keep demote off")


# --- output -------------------------------------------------------------------------


def fmt_ms(s: float) -> str:
    if math.isinf(s):
        return f"> {MAX_WAIT_S:g} s"
    return f"{s * 1000:.0f}" if s >= 0.1 else f"{s * 1000:.1f}"


def fmt_x(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.2f}x"


def md_times(cells: Sequence[Cell], ratios: Sequence[Ratio], sizes: Sequence[float],
             states: Sequence[str], contenders: Sequence[str]) -> str:
    by = {(c.size_gib, c.state, c.contender): c for c in cells}
    reaped_of = [c for c in ("engine", "engine+demote", "bare") if c in contenders]
    head = ["state", "size", *contenders, "plain/engine", "engine/bare",
            *[f"{c} REAPED" for c in reaped_of]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for state in states:
        for size in sizes:
            row = [state, f"{size:g} GiB"]
            row += [f"{fmt_ms(by[size, state, c].median_s)} [{fmt_ms(by[size, state, c].p90_s)}]"
                    for c in contenders]
            for name in ("plain/engine", "engine/bare"):
                r = find_ratio(ratios, size, state, name)
                row.append(fmt_x(r.value) if r else "-")
            row += [f"{by[size, state, c].outcomes.get('reaped', 0)}/{by[size, state, c].n}"
                    for c in reaped_of]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def md_targets(verdicts: Sequence[Verdict]) -> str:
    lines = ["| target | cell | ratio (90 % CI) | verdict |", "|---|---|---|---|"]
    for v in verdicts:
        r = v.ratio
        verdict = "met" if v.met else "**NOT met**"
        if v.ci_spans_bound:
            verdict += " (CI spans the bound)"
        lines.append(f"| {v.target} | {r.state} {r.size_gib:g} GiB | {r.name} = "
                     f"{fmt_x(r.value)} ({fmt_x(r.ci90[0])}-{fmt_x(r.ci90[1])}) | {verdict} |")
    return "\n".join(lines)


def md_demotion(d: Demotion | None) -> str:
    if d is None:
        return "engine and engine+demote were not both measured on idle victims in this run."
    (ra, na), (rd, nd) = d.idle_reaped_engine, d.idle_reaped_demote
    times = ", ".join(f"{k} {fmt_x(v)}" for k, v in d.engine_over_demote.items())
    return "\n".join([
        f"- idle victims, process_mrelease REAPED (won the race): engine {ra}/{na} "
        f"({100 * ra / na:.0f} %), engine+demote {rd}/{nd} ({100 * rd / nd:.0f} %); "
        f"Fisher exact p = {d.fisher_p:.3f}",
        f"- engine / engine+demote median kill-to-free (> 1: demote faster): {times}; "
        f"median {fmt_x(d.median_gain)}",
        f"- rule: {d.rule}",
        f"- **{d.recommendation}**"])


def md_engine_report(trials: Sequence[Trial]) -> str:
    """The engine's own kill_to_free_s against the memcg ground truth, per outcome."""
    lines = ["| state | contender | outcome | n | engine says (median) | memcg says (median) |",
             "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str, str], list[Trial]] = {}
    for t in trials:
        if t.contender != "bare":
            groups.setdefault((t.state, t.contender, t.mrelease), []).append(t)
    for (state, c, o), ts in sorted(groups.items()):
        said = [t.engine_free_s for t in ts if t.engine_free_s is not None]
        truth = [t.kill_to_free_s for t in ts if t.kill_to_free_s is not None]
        lines.append(f"| {state} | {c} | {o} | {len(ts)} | "
                     f"{fmt_ms(statistics.median(said)) if said else '?'} | "
                     f"{fmt_ms(statistics.median(truth)) if truth else '?'} |")
    return "\n".join(lines)


def md_overhead(trials: Sequence[Trial]) -> str:
    """What each contender spends between the two syscalls, all trials pooled."""
    lines = ["| contender | n | median | p90 |", "|---|---|---|---|"]
    for c in ("engine", "engine+demote", "bare"):
        gaps = [t.kill_to_mrelease_s for t in trials
                if t.contender == c and t.kill_to_mrelease_s is not None]
        if gaps:
            lines.append(f"| {c} | {len(gaps)} | {statistics.median(gaps) * 1e6:.1f} µs | "
                         f"{p90(gaps) * 1e6:.1f} µs |")
    return "\n".join(lines)


def md_wait(trials: Sequence[Trial], args: argparse.Namespace) -> str:
    shown = [c for c in args.contenders if c != "plain"]
    lines = ["| state | size | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(shown)]
    for state in args.states:
        for size in args.sizes:
            row = [state, f"{size:g} GiB"]
            for c in shown:
                ws = [t.reaper_wait_s for t in trials
                      if t.state == state and t.size_gib == size and t.contender == c]
                row.append(f"{statistics.median(ws) * 1000:.1f} [{max(ws) * 1000:.1f}]")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


@dataclass
class Summary:
    cells: list[Cell]
    ratios: list[Ratio]
    targets: list[Verdict]
    demotion: Demotion | None


def markdown(meta: dict[str, object], s: Summary, trials: Sequence[Trial],
             args: argparse.Namespace) -> str:
    times = md_times(s.cells, s.ratios, args.sizes, args.states, args.contenders)
    return f"""# Kill-to-free: plain SIGKILL vs mreaper engine vs bare ctypes process_mrelease

{meta['date']} on `{meta['hostname']}`: Linux {meta['kernel']}, {meta['cpus']} CPUs, \
{meta['mem_total_gib']} GiB RAM; {args.runs} runs per cell; load average \
{meta['loadavg_start']} at start, {meta['loadavg_end']} at end; run took \
{meta['duration_s']:.0f} s. Reaper on CPU {meta['bench_cpu']}, victim on CPU \
{meta['victim_cpu']}.

Kill-to-free = from the SIGKILL syscall until the victim's v1 memcg charge falls below \
{THRESHOLD_FRACTION:.0%} of the victim size (memcg eventfd threshold). Milliseconds, \
median [p90]. plain = the engine with `KillOptions(mrelease=False)`. D state (stuck): \
thawed when memory is back, or {HANG_S:g} s after SIGKILL if it is not (plain always \
waits for the hang). Ratios are of medians. REAPED = process_mrelease returned 0 (it won \
the race against the victim's exit path); otherwise it returned ESRCH (exited-first).

## Kill-to-free times

{times}

## Targets

{md_targets(s.targets)}

## Demotion (`KillOptions(demote=True)`)

{md_demotion(s.demotion)}

## Overhead: SIGKILL to process_mrelease entry

{md_overhead(trials)}

## Reaper CPU contention: run-queue wait of the reaper thread during the trial

Time the killing thread spent runnable but waiting for CPU {meta['bench_cpu']} (schedstat), \
ms, median [max]. Non-zero means other tenants of the host took the reaper's CPU. In the \
starved state, the FIFO starver holds the other CPU, so every other runnable task on the \
host lands on the reaper's CPU.

{md_wait(trials, args)}

## The engine's own kill_to_free_s vs the memcg ground truth

{md_engine_report(trials)}
"""


def plot(cells: Sequence[Cell], states: Sequence[str], contenders: Sequence[str],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, len(states), figsize=(5 * len(states), 4.2), squeeze=False)
    for ax, state in zip(axes[0], states, strict=True):
        for i, c in enumerate(contenders):
            pts = [x for x in cells if x.state == state and x.contender == c
                   and math.isfinite(x.p90_s)]
            xs = [p.size_gib * 2 ** (0.06 * (i - 1.5)) for p in pts]
            med = [p.median_s * 1000 for p in pts]
            up = [(p.p90_s - p.median_s) * 1000 for p in pts]
            ax.errorbar(xs, med, yerr=[[0.0] * len(pts), up], marker="o", capsize=3, label=c)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = sorted({x.size_gib for x in cells})
        ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(f"{state} victim")
        ax.set_xlabel("victim size (GiB)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("kill-to-free, ms (median, bar to p90)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def jsonable(x: object) -> object:
    """inf/nan -> None, recursively, so the JSON is strict."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    return x


# --- host checks and metadata -------------------------------------------------------


def check_host(states: Sequence[str]) -> tuple[int, int]:
    """Refuse early with a clear message; return (bench CPU, victim CPU)."""
    if os.geteuid() != 0:
        raise SystemExit("needs root (memory cgroups, SCHED_FIFO starver, freezer)")
    probe = MemoryCgroup.create(prefix="mreaper-bench-probe")
    probe.remove()
    if probe.version != 1:
        raise SystemExit("needs the v1 memory controller (memcg eventfd thresholds)")
    if "stuck" in states and not os.path.isdir(Freezer.ROOT):
        raise SystemExit(f"state 'stuck' needs the v1 freezer at {Freezer.ROOT}")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs 2 CPUs: one for the victim, one for the reaper")
    return cpus[0], cpus[-1]


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def _git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                       check=False)
    return r.stdout.strip()


def metadata(args: argparse.Namespace, cpus: tuple[int, int]) -> dict[str, object]:
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(), "kernel": platform.release(),
        "cpus": os.cpu_count(), "mem_total_gib": round(read_meminfo().mem_total / GiB, 1),
        "python": platform.python_version(), "runs": args.runs, "sizes_gib": args.sizes,
        "states": args.states, "contenders": args.contenders, "bench_cpu": cpus[0],
        "victim_cpu": cpus[1], "threshold_fraction": THRESHOLD_FRACTION, "hang_s": HANG_S,
        "max_wait_s": MAX_WAIT_S, "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "loadavg_start": _read("/proc/loadavg").split(" ")[0],
        "mreaper_commit": _git("rev-parse", "--short", "HEAD"),
        "engine_files_modified": _git("status", "--porcelain", "src/mreaper/reap.py",
                                      "src/mreaper/hogs.py", "src/mreaper/linux"),
        "ground_truth": "v1 memcg eventfd threshold (cgroup.event_control + "
                        "memory.usage_in_bytes), waited on by a SCHED_FIFO thread",
        "plain_baseline": "mreaper engine, KillOptions(mrelease=False)",
        "victim": "python child, private anonymous mmap with MAP_POPULATE, 4 KiB pages",
    }


# --- the run ------------------------------------------------------------------------


def run_all(slots: Sequence[Slot], cpu: int) -> list[Trial]:
    bare = BareMrelease()
    trials = []
    start = time.monotonic()
    for i, slot in enumerate(slots, 1):
        t = run_trial(slot, cpu, bare)
        trials.append(t)
        took = fmt_ms(math.inf if t.kill_to_free_s is None else t.kill_to_free_s)
        print(f"[{i:4}/{len(slots)} {time.monotonic() - start:6.0f} s] {slot.size_gib:g} GiB "
              f"{slot.state:7} rep {slot.rep:2} {slot.contender:13} {took:>9} ms  "
              f"{t.mrelease}", file=sys.stderr, flush=True)
    return trials


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, help="repetitions per cell (default 10; --quick: 3)")
    p.add_argument("--sizes", type=lambda s: [float(x) for x in s.split(",")],
                   help="victim sizes in GiB (default 0.5,1,2,4; --quick: 0.5)")
    p.add_argument("--states", type=lambda s: s.split(","), default=list(STATES),
                   help="idle,starved,stuck (default all)")
    p.add_argument("--contenders", type=lambda s: s.split(","), default=list(CONTENDERS),
                   help="plain,engine,engine+demote,bare (default all)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 0.5 GiB, 3 runs, output under bench/results/tmp/ "
                   "(git-ignored)")
    p.add_argument("--out", type=Path, help="output directory "
                   "(default bench/results/<YYYY-MM-DD>-<hostname>/)")
    p.add_argument("--seed", type=int, default=1, help="bootstrap seed")
    args = p.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 10)
    args.sizes = args.sizes or ([0.5] if args.quick else list(DEFAULT_SIZES))
    bad = [x for x in args.states if x not in STATES] + [
        x for x in args.contenders if x not in CONTENDERS]
    if bad or args.runs < 1 or any(not 0 < s <= 16 for s in args.sizes):
        p.error(f"bad --states/--contenders/--runs/--sizes: {bad or 'out of range'}")
    return args


def output_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    name = f"{dt.date.today().isoformat()}-{socket.gethostname()}"
    return BENCH_DIR / "results" / ("tmp" if args.quick else "") / name


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = check_host(args.states)
    os.sched_setaffinity(0, {cpus[0]})  # the reaper (and the watch thread) on its own CPU
    meta = metadata(args, cpus)
    slots = schedule(args.sizes, args.states, args.runs, args.contenders)
    began = time.monotonic()
    trials = run_all(slots, cpus[1])
    meta["duration_s"] = time.monotonic() - began
    meta["loadavg_end"] = _read("/proc/loadavg").split(" ")[0]
    summary = summarize(trials, args)
    out = output_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "summary": asdict(summary), "trials": [asdict(t) for t in trials]}
    (out / "kill_to_free.json").write_text(json.dumps(jsonable(doc), indent=1) + "\n")
    (out / "kill_to_free.md").write_text(markdown(meta, summary, trials, args))
    plot(summary.cells, args.states, args.contenders, out / "kill_to_free.png")
    print(f"wrote {out}/kill_to_free.{{json,md,png}}", file=sys.stderr)
    print((out / "kill_to_free.md").read_text())
    return 0


def summarize(trials: Sequence[Trial], args: argparse.Namespace) -> Summary:
    cells = summarize_cells(trials, args.sizes, args.states, args.contenders)
    ratios = summarize_ratios(trials, args.sizes, args.states, args.contenders, args.seed)
    return Summary(cells, ratios, judge_targets(ratios, args.sizes, args.states),
                   demotion(trials, ratios))


if __name__ == "__main__":
    sys.exit(main())
