"""`mreaper demo`: plain SIGKILL against kill-and-reap, side by side, on a starved hog.

The point of process_mrelease(2), shown safely on the user's own machine in a few
seconds.  A bounded hog (private anonymous memory, 256 MiB by default) is pinned to
a CPU that a busy loop takes away from it (SCHED_FIFO when root; otherwise the hog
is made SCHED_IDLE under a normal busy loop), then killed:

1. with a plain SIGKILL: the hog's memory comes back only when the hog itself gets
   enough CPU to run its exit path, which a starved hog does not;
2. through the engine (`kill_and_reap`): SIGKILL, then process_mrelease from our
   own CPU, which frees the address space at once.

Each round has its own hog, and, when memory cgroups are writable (root), its own
memory cgroup (limit: size + 64 MiB), whose charge a small thread watches so that
the time the memory came back is measured independently of the engine's report.
Both kill reports are printed, then one comparison line.

Safety: the size is bounded (16..8192 MiB) and refused unless MemAvailable is at
least four times the size; one hog exists at a time; the CPU starver ends itself
after a bounded lifetime; and every hog, starver and cgroup is removed on the way
out, whether the demo ends normally, on an exception, on Ctrl-C or on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

from mreaper.hogs import CgroupUnavailable, CpuStarver, GiB, Hog, MemoryCgroup, MiB
from mreaper.linux import Support, probe_support, procfs
from mreaper.reap import KillOptions, KillReport, Victim, VictimError, kill_and_reap

MIN_SIZE_MIB = 16
MAX_SIZE_MIB = 8192
HEADROOM = 4                    # MemAvailable must be at least this many times the size
MEMCG_SLACK = 64 * MiB          # memory cgroup limit: the hog's size plus this
CGROUP_PREFIX = "mreaper-demo"  # so that a leftover would say where it came from

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2

_POLL_S = 0.0005   # the charge watcher's poll interval
_SETTLE_S = 1.0    # after the exit, how long the watcher may still take to see the drop
_DEFERRED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


class _InterruptedError(Exception):
    """SIGTERM or SIGHUP arrived: unwind (and clean up) like on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- refusal -----------------------------------------------------------------------


def size_refusal(size_mib: int, mem_available: int | None) -> str | None:
    """Why a demo of `size_mib` MiB must not run here, or None.  Pure."""
    if not MIN_SIZE_MIB <= size_mib <= MAX_SIZE_MIB:
        return (f"--size {size_mib} MiB is outside the allowed {MIN_SIZE_MIB}..{MAX_SIZE_MIB} "
                "MiB")
    if mem_available is None:
        return "cannot read MemAvailable from /proc/meminfo to check there is room for the hog"
    needed = HEADROOM * size_mib * MiB
    if mem_available < needed:
        return (f"--size {size_mib} MiB needs MemAvailable of at least {HEADROOM} x "
                f"{size_mib} = {HEADROOM * size_mib} MiB, and MemAvailable is "
                f"{mem_available // MiB} MiB: choose a smaller --size")
    return None


# --- the set-up shared by both rounds ----------------------------------------------


@dataclass
class _Setup:
    size: int                 # bytes
    cpu: int | None           # the CPU taken from the hog, None: the hog is not starved
    starver_kind: str         # what takes the CPU from the hog ("" when nothing does)
    lifetime: float           # the starver's bounded lifetime, seconds
    memcg: bool               # each hog gets its own memory cgroup
    notes: list[str] = field(default_factory=list)


@dataclass
class Round:
    """One kill of one hog, with what was measured around the engine's report."""

    label: str
    report: KillReport
    hog_pid: int
    starver_pid: int | None
    memcg_path: str | None
    memcg_free_s: float | None   # SIGKILL -> the cgroup charge fell by `watched`
    lower_bound: bool            # memory not back before the starver's lifetime ended
    watched: int = 0             # bytes the charge had to fall by (watched_drop)

    def free_s(self, by_memcg: bool) -> float | None:
        return self.memcg_free_s if by_memcg else self.report.kill_to_free_s

    def to_dict(self) -> dict[str, object]:
        return {"hog_pid": self.hog_pid, "starver_pid": self.starver_pid,
                "memcg": self.memcg_path,
                "memcg_kill_to_free_ms": _ms(self.memcg_free_s),
                "report_kill_to_free_ms": _ms(self.report.kill_to_free_s),
                "memcg_watched_drop": self.watched if self.memcg_path else None,
                "starver_ended_first": self.lower_bound}


def watched_drop(size: int) -> int:
    """How far the hog's cgroup charge must fall for its memory to count as back: the
    hog's size less 1/32 (at least 1 MiB), since the kernel charges and uncharges in
    per-CPU batches and the fall can come out a few dozen KiB short of the size."""
    return size - max(size // 32, MiB)


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 1)


def _memcg_available() -> str | None:
    """None if this process can create (and remove) a memory cgroup, else why not."""
    with _deferred_signals():
        try:
            cg = MemoryCgroup.create(prefix=CGROUP_PREFIX)
        except (CgroupUnavailable, OSError) as e:
            return str(e)
        cg.remove()
    return None


def _plan(size: int, support: Support) -> _Setup:
    lifetime = 4.0 + 2.0 * size / GiB
    why_not = _memcg_available()
    setup = _Setup(size=size, cpu=None, starver_kind="", lifetime=lifetime, memcg=why_not is None)
    if why_not is not None:
        who = "not root" if os.geteuid() != 0 else "no memory cgroup"
        setup.notes.append(f"{who} ({why_not}): the hogs run without a memory cgroup, so the "
                           "times are the engine's reports only")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        setup.notes.append("only one CPU is usable: starving it would starve mreaper too, so "
                           "the hog is not starved and the two kills will look alike")
    else:
        setup.cpu = cpus[-1]
        setup.starver_kind = ("SCHED_FIFO busy loop" if os.geteuid() == 0
                              else "busy loop (the hog made SCHED_IDLE: SCHED_FIFO needs root)")
    if not support.mrelease:
        setup.notes.append(f"process_mrelease is not available here ({support.detail}): the "
                           "demo cannot show the difference; running the plain SIGKILL only")
    return setup


# --- signals -------------------------------------------------------------------------


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while a child is started and registered for cleanup,
    so an interruption never falls between the two; the children inherit the mask,
    so a Ctrl-C at the terminal reaches only us and we SIGKILL them ourselves."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _raise_interrupted(signum: int, _frame: types.FrameType | None) -> None:
    raise _InterruptedError(signum)


@contextlib.contextmanager
def _terminations_unwind() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception for the duration (main thread only)."""
    if not _main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _off_cpu(cpu: int | None) -> Iterator[None]:
    """Keep this thread (the reaper) and the threads it starts off the starved CPU."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, before - {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --- the charge watcher ----------------------------------------------------------------


class _ChargeWatch:
    """A thread polling a memory cgroup's charge; notes when it fell to `target`."""

    def __init__(self, memcg: MemoryCgroup, target: int) -> None:
        self._memcg = memcg
        self.target = target
        self.fell_at: float | None = None  # time.monotonic()
        self.fell = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mreaper-demo-watch",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)  # they belong to the main thread
        while not self._stop.is_set():
            try:
                usage = self._memcg.usage()
            except (OSError, ValueError):
                return
            if usage <= self.target:
                self.fell_at = time.monotonic()
                self.fell.set()
                return
            self._stop.wait(_POLL_S)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)


# --- one round -----------------------------------------------------------------------------


def _run_round(label: str, options: KillOptions, setup: _Setup) -> Round:
    size = setup.size
    # The stack unwinds in reverse: watcher, pidfd, starver, hog, cgroup.
    with contextlib.ExitStack() as stack:
        memcg: MemoryCgroup | None = None
        if setup.memcg:
            with _deferred_signals():
                memcg = stack.enter_context(MemoryCgroup.create(prefix=CGROUP_PREFIX))
            memcg.set_limit(size + MEMCG_SLACK)
        with _deferred_signals():
            hog = stack.enter_context(Hog(size, memcg))
        starver: CpuStarver | None = None
        starver_end: float | None = None
        if setup.cpu is not None:
            started = time.monotonic()
            with _deferred_signals():
                starver = stack.enter_context(CpuStarver(setup.cpu, lifetime=setup.lifetime))
            starver_end = started + setup.lifetime  # it ends itself no sooner than this
            starver.starve(hog.pid)
        victim = stack.enter_context(Victim.open(hog.pid))
        watch: _ChargeWatch | None = None
        if memcg is not None:
            watch = _ChargeWatch(memcg, memcg.usage() - watched_drop(size))
            stack.callback(watch.stop)
            watch.start()
        mono, wall = time.monotonic(), time.time()
        report = kill_and_reap(victim, options, reason=f"mreaper demo: {label}")
        # The report's times are relative to its own start, `wall_time`: place its
        # SIGKILL on our monotonic clock.
        kill = next((s for s in report.signals if s.name == "SIGKILL"), None)
        kill_at = mono + (report.wall_time - wall) + (kill.at_s if kill else 0.0)
        memcg_free_s: float | None = None
        if watch is not None:
            watch.fell.wait(_SETTLE_S if report.exited else 0.0)
            if watch.fell_at is not None and kill is not None:
                memcg_free_s = max(watch.fell_at - kill_at, 0.0)
        free_s = memcg_free_s if memcg_free_s is not None else report.kill_to_free_s
        lower_bound = starver_end is not None and (
            free_s is None or kill_at + free_s >= starver_end - 0.05)
        return Round(label=label, report=report, hog_pid=hog.pid,
                     starver_pid=starver.proc.pid if starver else None,
                     memcg_path=memcg.path if memcg else None, memcg_free_s=memcg_free_s,
                     lower_bound=lower_bound, watched=watched_drop(size))
    raise AssertionError("unreachable")  # pragma: no cover - for mypy: ExitStack may swallow


# --- output ----------------------------------------------------------------------------


def _header(setup: _Setup, support: Support, size_mib: int) -> list[str]:
    release = os.uname().release
    lines = [f"mreaper demo: Linux {release}, {os.cpu_count()} CPUs; {support.detail}"]
    where = (f"pinned to CPU {setup.cpu}, which a {setup.starver_kind} takes from it for at "
             f"most {setup.lifetime:.1f} s" if setup.cpu is not None else "not starved")
    how = ("once with a plain SIGKILL, once by the engine (SIGKILL + process_mrelease)"
           if support.mrelease else "with a plain SIGKILL")
    lines.append(f"A {size_mib} MiB hog, {where}, is killed {how}.")
    if setup.memcg:
        lines.append(f"Each hog has its own memory cgroup (limit {size_mib + MEMCG_SLACK // MiB}"
                     f" MiB); memory back = its charge fell by {watched_drop(setup.size) // MiB}"
                     f" MiB, watched every {_POLL_S * 1000:g} ms.")
    lines.extend(f"note: {n}" for n in setup.notes)
    return lines


def _round_lines(r: Round) -> list[str]:
    lines = [f"  {r.report.human()}"]
    if r.memcg_path is not None:
        if r.memcg_free_s is not None:
            lines.append(f"  memory cgroup: charge down by {r.watched // MiB} MiB "
                         f"{r.memcg_free_s * 1000:.1f} ms after SIGKILL")
        else:
            lines.append(f"  memory cgroup: charge not seen to fall by {r.watched // MiB} MiB")
    if r.lower_bound:
        lines.append("  (the CPU starver's lifetime ended before the memory was back: this "
                     "time is a lower bound)")
    return lines


def _speedup(plain: Round, mreaper: Round | None) -> tuple[float | None, float | None,
                                                             float | None, str]:
    """(plain ms, mreaper ms, speedup, how measured)."""
    by_memcg = (plain.memcg_free_s is not None
                and (mreaper is None or mreaper.memcg_free_s is not None))
    source = "memory cgroup charge" if by_memcg else "kill reports"
    p = plain.free_s(by_memcg)
    m = mreaper.free_s(by_memcg) if mreaper else None
    if p is None or m is None or m <= 0:
        return _ms(p), _ms(m), None, source
    return _ms(p), _ms(m), round(p / m, 1), source


def _comparison(plain: Round, mreaper: Round | None) -> str:
    p_ms, m_ms, x, source = _speedup(plain, mreaper)
    more = "> " if plain.lower_bound else ""
    p_text = "not seen" if p_ms is None else f"{more}{p_ms:.0f} ms"
    line = f"plain SIGKILL: memory back after {p_text}"
    if mreaper is None:
        return line + " (process_mrelease unavailable: nothing to compare with)"
    m_text = "not seen" if m_ms is None else f"{m_ms:.0f} ms"
    line += f"; mreaper (process_mrelease): {m_text}"
    if x is None:
        return line + f" (by the {source})"
    if x >= 1.5:
        factor = f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"
        return line + f" \N{EM DASH} {more}{factor} faster (by the {source})"
    return line + (f" \N{EM DASH} {x:.1f}x: no clear difference this time (by the {source}; "
                   "the hog got CPU to free its own memory)")


def _result(setup: _Setup, support: Support, size_mib: int, plain: Round,
            mreaper: Round | None) -> dict[str, object]:
    p_ms, m_ms, x, source = _speedup(plain, mreaper)
    return {
        "plain": plain.report.to_dict(),
        "mreaper": mreaper.report.to_dict() if mreaper else None,
        "speedup": x,
        "speedup_is_lower_bound": plain.lower_bound,
        "plain_ms": p_ms,
        "mreaper_ms": m_ms,
        "measured_by": source,
        "size_mib": size_mib,
        "kernel": os.uname().release,
        "mrelease_supported": support.mrelease,
        "support": support.detail,
        "memcg": setup.memcg,
        "starved_cpu": setup.cpu,
        "starver": setup.starver_kind or None,
        "rounds": {"plain": plain.to_dict(),
                   "mreaper": mreaper.to_dict() if mreaper else None},
        "notes": list(setup.notes),
        "comparison": _comparison(plain, mreaper),
    }


# --- entry point -------------------------------------------------------------------------


def run_demo(size_mib: int = 256, as_json: bool = False) -> int:
    """Run the demo; returns the exit status (0, 1 failure, 2 refused, 128+n signal)."""
    try:
        available: int | None = procfs.read_meminfo().mem_available
    except (OSError, procfs.ParseError):
        available = None
    refused = size_refusal(size_mib, available)
    if refused:
        print(f"mreaper demo: refusing: {refused}", file=sys.stderr)
        return EXIT_REFUSED
    support = probe_support()
    if not support.pidfd:
        print(f"mreaper demo: cannot run: {support.detail}", file=sys.stderr)
        return EXIT_FAILED

    def say(line: str) -> None:
        if not as_json:
            print(line, flush=True)

    try:
        with _terminations_unwind():
            setup = _plan(size_mib * MiB, support)
            for line in _header(setup, support, size_mib):
                say(line)
            with _off_cpu(setup.cpu):
                say("[1/2] plain SIGKILL" if support.mrelease else "[1/1] plain SIGKILL")
                plain = _run_round("plain SIGKILL", _options(setup, mrelease=False), setup)
                for line in _round_lines(plain):
                    say(line)
                mreaper: Round | None = None
                if support.mrelease:
                    say("[2/2] mreaper: SIGKILL + process_mrelease")
                    mreaper = _run_round("mreaper", _options(setup, mrelease=True), setup)
                    for line in _round_lines(mreaper):
                        say(line)
    except KeyboardInterrupt:
        print("\nmreaper demo: interrupted; its hogs, CPU starvers and memory cgroups are gone",
              file=sys.stderr)
        return 128 + signal.SIGINT
    except _InterruptedError as e:
        print(f"mreaper demo: {e} received; its hogs, CPU starvers and memory cgroups are gone",
              file=sys.stderr)
        return 128 + e.signum
    except (VictimError, CgroupUnavailable, RuntimeError, OSError) as e:
        print(f"mreaper demo: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    if as_json:
        print(json.dumps(_result(setup, support, size_mib, plain, mreaper), sort_keys=True))
    else:
        print(_comparison(plain, mreaper))
    return EXIT_OK


def _options(setup: _Setup, *, mrelease: bool) -> KillOptions:
    # Long enough for a starved hog's exit once its starver has ended, and bounded.
    return KillOptions(mrelease=mrelease, exit_timeout=setup.lifetime + 5.0)
