"""The daemon: wires detection, policy and the reaper pool into one event-driven loop.

For each scope (the machine, and each watched cgroup): pressure event -> verdict ->
victim (from a ranked list kept fresh in the background) -> one more look at the
pressure -> reaper pool -> kill report -> measured recovery -> act again only if
pressure persists.  The loop sleeps in poll() on every scope's PSI trigger fds and a
wake-up pipe (signals, finished kills), for an interval that shrinks as memory
approaches a level.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import gc
import logging
import os
import resource
import select
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mreaper import config as config_mod
from mreaper import families, pacing, policy, sdnotify
from mreaper import status as status_mod
from mreaper.config import Config
from mreaper.detect import PSI_RECHECK, Severity, Verdict
from mreaper.linux import cgroup, procfs
from mreaper.linux.syscalls import (
    LinuxSyscalls,
    Syscalls,
    lock_memory,
    one_malloc_arena,
    probe_support,
)
from mreaper.proctable import IncrementalRanking, ProcTable
from mreaper.reap import (
    STOP_EXIT_WAIT,
    Escalation,
    GroupKillReport,
    KillOptions,
    KillReport,
    Mrelease,
    ReaperPool,
    Sent,
    Victim,
    VictimError,
    VictimForbidden,
    VictimGone,
    fmt_bytes,
    pin_cgroup,
    send_sigkill,
)
from mreaper.report import Episode, Fanout, LogSink, Sink
from mreaper.scope import (
    MACHINE,
    CgroupScope,
    InFlight,
    MachineScope,
    Scope,
    child_cgroups,
    namespace_problem,
    pick_child,
    preferences,
    resolve_scopes,
)
from mreaper.sinks import observe_decision

log = logging.getLogger("mreaper")

EPISODE_CALM = 2.0  # seconds without any level held before an episode is over
KEEP_KILLS = 20     # kill reports kept for status
SAMPLE_EVERY = 1.0  # seconds between samples handed to the sinks (gauges)
OWN_HIGH_MARGIN = 16 << 20  # lift our own cgroup's memory.high when this close to it
MIN_GRACE = 1.0      # a SIGTERM grace shorter than this helps no victim: SIGKILL instead
PARK_FOR = 2.0       # seconds at most the background scan parks for a dying victim
SCAN_DUTY = 0.05     # at most this share of a CPU for the scan under pressure
STATUS_WAIT = 2.0    # seconds a status client waits for a ranking made for it
NEAR_ROOM = 128 << 20  # start keeping the ranking this close to a scope's first level
NEAR_SECONDS = 10.0    # ... or when the fall rate would reach it within this
OWN_CHECK_EVERY = 60.0  # seconds between reads of our own cgroup's memory.high while far
FRESH_MAX = 4096     # family members measured again on the kill path, at most
IDLE_FIRST = 0.05    # first wait before looking again for a victim when none may die
NEW_PIDS_MAX = 4096  # more new PIDs than this since the last look: just look again
NEW_PID_SETTLE = 0.1  # a new process is judged this long after it appeared: a fork of a
#                       shell (a protected name) is the leak only once it has exec'd


@dataclass
class _Idle:
    """A scope at a kill level where no process may be killed: the search for a victim
    is backed off (IDLE_FIRST, doubling up to scan_interval) until the level changes or
    a new process that could be a victim appears."""

    severity: Severity
    delay: float
    until: float
    last_pid: int  # the newest PID seen (/proc/loadavg)
    # PIDs handed out since the search, not looked at yet: (after, up to, first seen)
    pending: tuple[int, int, float] | None = None


def _last_pid() -> int:
    """The PID most recently handed out in our PID namespace: the last field of
    /proc/loadavg (the kernel's pid_ns->last_pid).  One small read, to learn whether a
    process may have started since, without listing /proc."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return -1


# --- logging ---------------------------------------------------------------------------


class _JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority (<3> error, <4> warning, <6> info,
    <7> debug), which journald reads from a service's stderr (sd-daemon(3))."""

    def format(self, record: logging.LogRecord) -> str:
        prio = 3 if record.levelno >= logging.ERROR else 4 if record.levelno >= logging.WARNING \
            else 6 if record.levelno >= logging.INFO else 7
        return f"<{prio}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd gave us ($JOURNAL_STREAM dev:ino)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def setup_logging(mode: str, verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    journal = mode == "journal" or (mode == "auto" and stderr_is_journal())
    handler.setFormatter(_JournalFormatter("%(message)s") if journal else
                         logging.Formatter("%(asctime)s mreaper: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("mreaper")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


# --- self-protection ----------------------------------------------------------------------


def protect_self(cfg: Config) -> list[str]:
    """mlockall, our own oom_score_adj, nice and optional realtime priority.  Returns
    what could not be done (the daemon still runs, and says so)."""
    problems = []
    if cfg.mlockall:
        one_malloc_arena()  # before any thread: no per-thread arena to lock
        try:
            log.info("memory locked (%s)", lock_memory())
        except OSError as e:
            problems.append(f"mlockall failed: {e.strerror}")
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(cfg.oom_score_adj))
    except OSError as e:
        problems.append(f"cannot set oom_score_adj {cfg.oom_score_adj}: {e.strerror}")
    if cfg.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, cfg.nice)
        except OSError as e:
            problems.append(f"cannot set nice {cfg.nice}: {e.strerror}")
    if cfg.realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError as e:
            problems.append(f"cannot set SCHED_FIFO: {e.strerror}")
    return problems


# --- privileges: what this daemon can and cannot do ----------------------------------------

# include/uapi/linux/capability.h
CAP_KILL, CAP_IPC_LOCK, CAP_SYS_PTRACE, CAP_SYS_NICE, CAP_SYS_RESOURCE = 5, 14, 19, 23, 24


def _cap_eff(status: str = "/proc/self/status") -> int:
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _has_cap(cap: int) -> bool:
    return bool(_cap_eff() >> cap & 1)


def privileges(cfg: Config, proc: str = procfs.PROC) -> tuple[list[str], list[str]]:
    """What this daemon may do as who it runs, for the start-up log: (facts, lacks).
    Each missing capability is named with what it costs here; process_mrelease and
    pidfd_open need none (a pidfd is all the reaping takes).  A daemon run by hand as
    a user used to learn this only at its first kill, from a debug line."""
    caps = _cap_eff()
    uid = os.geteuid()
    facts, lacks = [], []
    if caps >> CAP_KILL & 1:
        facts.append(f"uid {uid} with CAP_KILL: may signal any process the rules "
                     "allow")
    else:
        # kill(2)'s check (kill_ok_by_cred): our uid or euid must be the target's uid or
        # saved uid.  /proc/<pid> is owned by the target's euid: near enough to count.
        owners: Counter[int] = Counter()
        for pid in procfs.list_pids(proc):
            with contextlib.suppress(OSError):
                owners[os.stat(f"{proc}/{pid}").st_uid] += 1
        mine, total = owners[uid], sum(owners.values())
        others = ", ".join(f"uid {u}: {n}" for u, n in owners.most_common(4) if u != uid)
        lacks.append(f"CAP_KILL: may kill only processes of uid {uid} ({mine} of {total} now); "
                     f"cannot kill the other {total - mine} ({others or 'none'}): at a kill "
                     "level with only those to kill, nothing is killed; run as root")
    if not caps >> CAP_SYS_RESOURCE & 1:
        triggers = [t for t in (*cfg.psi.values(), *(t for sc in cfg.scopes
                                                     for t in sc.psi.values())) if t]
        odd = sorted({str(t) for t in triggers if t.window_us % 2_000_000})
        own = _own_oom_score_adj()
        costs = ([f"PSI triggers {', '.join(odd)}: the kernel refuses windows that are not "
                  "multiples of 2 s (EINVAL)"] if odd else []) + (
            [f"oom_score_adj {cfg.oom_score_adj}: below our {own}, refused (EACCES)"]
            if own is not None and cfg.oom_score_adj < own else [])
        if costs:
            lacks.append("CAP_SYS_RESOURCE: " + "; ".join(costs))
    if cfg.mlockall and not caps >> CAP_IPC_LOCK & 1:
        lacks.append(f"CAP_IPC_LOCK: mlockall within RLIMIT_MEMLOCK ({_memlock_limit()}) "
                     "only: the daemon may be paged out under the pressure it must act on")
    if not caps >> CAP_SYS_NICE & 1 and (cfg.realtime or cfg.demote or cfg.nice < 0):
        lacks.append("CAP_SYS_NICE: no daemon.realtime / negative nice for us, no kill.demote "
                     "of other users' victims")
    if not caps >> CAP_SYS_PTRACE & 1 and any(r.exe is not None for r in cfg.rules):
        lacks.append("CAP_SYS_PTRACE: /proc/<pid>/exe of other users' processes cannot be "
                     "read, so exe = rules do not match them")
    return facts, lacks


def _own_oom_score_adj() -> int | None:
    try:
        with open("/proc/self/oom_score_adj") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _memlock_limit() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return "unlimited" if soft == resource.RLIM_INFINITY else fmt_bytes(soft)


# --- the candidate list, kept fresh in the background ------------------------------------


class _ScanStopped(Exception):
    """The daemon stops: the background scan ends where it stands."""


@dataclasses.dataclass
class _Keeper:
    """A process table and the ranking kept over it: changed by one thread at a time."""

    table: ProcTable
    ranking: IncrementalRanking
    preferences_read: dict[str, str | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Published:
    """What the loop and the status server read: never changed once published."""

    at: float
    candidates: list[policy.Candidate]
    preferences: dict[str, str]
    ranked: list[policy.Ranked]
    pids: frozenset[int]   # every PID listed at that refresh: the rest is new
    last_pid: int | None   # the last PID allocated before that listing
    keeper: _Keeper


class CandidateCache:
    """The process table and its ranking, kept by a background thread ONLY while a
    scope nears a level (`set_urgent`): calm, the thread sleeps without a timeout and
    reads nothing.  The table is filled once at start-up (static facts: name, cmdline,
    exe, cgroup, uid, identity), so that when memory nears a level, bringing it up to
    date costs two small reads per process (statm, oom_score) instead of a full scan:
    a ranked list is ready by the time a level is crossed, and event-to-SIGKILL time
    does not grow with the number of processes.  Under pressure it refreshes every
    scan_interval / 10, but never more than SCAN_DUTY of a CPU."""

    def __init__(self, cfg: Config, unified: str, proc: str = procfs.PROC) -> None:
        self._cfg = cfg
        self.unified = unified
        self.proc = proc
        self._keeper = self._new_keeper()
        self._published: _Published | None = None
        self._urgent = False
        self._asked = False     # someone (status) wants a ranking now
        self._wake = threading.Event()
        self._published_event = threading.Event()
        self._stop = False
        self._lock = threading.Lock()       # the swap of what is published
        self._mutating = threading.Lock()   # the current keeper's table is being refreshed
        # (pid, starttime) -> RSS at the last refresh before the pressure episode (no
        # scope at warn yet: the one near a level is, or the start-up fill), or else at
        # the first refresh that saw the process: what growth in the episode is
        # measured from (families.py).  A process born big and idle since has not grown.
        self.calm: dict[tuple[int, int], int] = {}
        self._episode = False  # a scope is at warn or above: the calm sizes stay
        self._thread = threading.Thread(target=self._loop, name="mreaper-scan", daemon=True)
        self._warned: set[str] = set()
        self._clear = threading.Event()  # set: the scan may run; cleared: it parks
        self._clear.set()
        self._holding = False
        self._parked = False
        self.refreshes = 0  # how many refreshes ran (tests count them: none while calm)

    def _new_keeper(self) -> _Keeper:
        cfg = self._cfg
        return _Keeper(ProcTable(self.proc), IncrementalRanking(
            cfg.rules, sort_by=cfg.sort_by, min_rss=cfg.min_rss, pods=cfg.pods))

    @property
    def cfg(self) -> Config:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: Config) -> None:
        """A reload: rules may have changed, so every entry is judged again (the table,
        facts only, is kept)."""
        self._cfg = cfg
        keeper = self._keeper
        ranking = IncrementalRanking(cfg.rules, sort_by=cfg.sort_by, min_rss=cfg.min_rss,
                                     cgroup_preferences=keeper.ranking.preferences,
                                     pods=cfg.pods)
        self._keeper = _Keeper(keeper.table, ranking, keeper.preferences_read)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._clear.set()  # a scan parked for a dying victim must not hold the stop (5 s)
        self._thread.join(timeout=5)

    def set_episode(self, episode: bool) -> None:
        """A scope is at warn or above: growth is measured from the sizes of before."""
        self._episode = episode

    def set_urgent(self, urgent: bool) -> None:
        if urgent and not self._urgent:
            self._urgent = True
            self._wake.set()
        self._urgent = urgent

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Park the background scan, at its next process, while the loop decides.

        Both threads share the GIL.  Every /proc read on the kill path releases it, and
        getting it back meant waiting for the scan thread's next read or the 5 ms
        switch interval: in the emulated lab VM, where the scan runs nearly all the
        time at warn level, that turned a decision of a dozen reads into 35-55 ms."""
        self._holding = True
        self._clear.clear()
        try:
            yield
        finally:
            self._holding = False
            self._update()

    def park(self, parked: bool) -> None:
        """Park the scan while victims are dying: their exit frees the memory and needs
        a CPU; under pressure at warn level the scan would take one (in the lab VM it
        ran 80 ms in every 100, and the victims took twice as long to exit)."""
        self._parked = parked
        self._update()

    def _update(self) -> None:
        # The loop calls park() on every look: the Event's lock only on a change.
        if self._holding or self._parked:
            if self._clear.is_set():
                self._clear.clear()
        elif not self._clear.is_set():
            self._clear.set()

    def _wait_clear(self) -> None:
        self._clear.wait()
        if self._stop:
            raise _ScanStopped

    def suspect(self, pid: int) -> None:
        """The ranking named a process that is not there any more under that identity:
        read it again whole at the next refresh."""
        self._keeper.table.suspect(pid)

    def refresh(self, between: Callable[[], None] | None = None) -> None:
        """Bring the table and the ranking up to date now.  The loop and the scan thread
        may both ask, and the loop must never wait behind a parked scan: whoever finds
        the table busy builds a fresh one of its own (a full scan) and publishes that."""
        if self._mutating.acquire(blocking=False):
            try:
                self._refresh(self._keeper, between, fresh=False)
            finally:
                self._mutating.release()
        else:
            self._refresh(self._new_keeper(), None, fresh=True)

    def _refresh(self, keeper: _Keeper, between: Callable[[], None] | None, *,
                 fresh: bool) -> None:
        self.refreshes += 1
        done = keeper.table.refresh(between=between)
        for w in done.warnings:
            if w not in self._warned:
                self._warned.add(w)
                log.warning("scan: %s", w)
        touched = set(done.added) | set(done.changed)
        if touched and self.unified:
            # systemd's ManagedOOMPreference= xattrs: read once per cgroup path.
            cache = keeper.preferences_read

            def read(path: str) -> str | None:
                if path not in cache:
                    cache[path] = cgroup.oomd_preference(path)
                return cache[path]

            found = preferences([keeper.table.entries[p].candidate for p in touched
                                 if p in keeper.table.entries], self.unified, read=read)
            if found.items() - keeper.ranking.preferences.items():
                keeper.ranking.set_preferences({**keeper.ranking.preferences, **found})
        if self._cfg.pods and self.unified:
            # Usage over the pod container's memory request, where kubelet shows it
            # (podmem.py): read again each refresh, it moves without statm changing.
            keeper.table.read_requests(self.unified, between=between)
        if self._urgent:
            # What a kill frees, for forked children (policy._with_private's rule), only
            # near a level: smaps_rollup walks page tables, ~6 ms per GiB resident.
            keeper.table.read_private(between=between)
        ranked = keeper.ranking.update(keeper.table, between=between)
        if between is not None:
            between()  # and not in the middle of a decision for what follows either
        candidates = keeper.table.candidates()
        published = _Published(time.monotonic(), candidates, keeper.ranking.preferences,
                               ranked, keeper.table.listed, keeper.table.last_pid, keeper)
        sizes = {(c.pid, c.starttime): c.rss for c in candidates}
        with self._lock:
            if fresh:
                self._keeper = keeper
            elif self._keeper is not keeper:
                return  # a fresh table was published meanwhile: this one is orphaned
            self._published = published
            if self._episode:
                self.calm = {k: self.calm.get(k, rss) for k, rss in sizes.items()}
            else:
                self.calm = sizes
        self._published_event.set()

    def peek(self, build: bool = False) -> list[policy.Ranked]:
        """The machine-wide ranking as it is (no scan); with `build`, when there is
        none, or it is older than scan_interval while calm (not kept fresh), ask the
        scan thread for a refresh and wait for it a little: a status client asked, the
        only time a ranking is made for nobody's decision."""
        published = self._published
        stale = published is None or (not self._urgent and time.monotonic() - published.at
                                      > self.cfg.scan_interval)
        if build and stale and self._thread.is_alive():
            self._published_event.clear()
            self._asked = True
            self._wake.set()
            self._published_event.wait(STATUS_WAIT)
            published = self._published
        return published.ranked if published is not None else []

    @property
    def table(self) -> ProcTable | None:
        """The process table behind the published ranking (None before the first
        refresh), for readers that need more than the ranking (families, growth).  Only
        the scan thread changes it: read its entries, do not iterate them while a
        refresh may run (copy with list(table.entries.values()) first)."""
        published = self._published
        return published.keeper.table if published is not None else None

    def get(self) -> tuple[list[policy.Candidate], dict[str, str], list[policy.Ranked], float]:
        """Candidates, cgroup preferences and the machine-wide ranking, for a decision
        now; and the age of the refresh behind them.

        Never a full rescan on the kill path while a ranking exists (at 10,000
        processes that is over half a second): stale entries are harmless, since
        victims are pinned by pid and start time and ranked again alone before any
        signal.  But a process started since the refresh (very often the leak itself)
        must not be missed: the pids listed now that the table did not hold are read,
        judged alone and put in their place (policy.rank_key)."""
        published = self._published
        if published is None:
            self.refresh()
            published = self._published
            assert published is not None
            return (published.candidates, published.preferences, published.ranked,
                    time.monotonic() - published.at)
        keeper = published.keeper
        new = keeper.table.read_new(known=published.pids, since=published.last_pid)
        candidates, ranked = published.candidates, published.ranked
        if new:
            added = [e.candidate for e in new]
            candidates = candidates + added
            ranked = list(ranked)
            for r in keeper.ranking.judge(added):
                bisect.insort(ranked, r, key=policy.rank_key)
        return candidates, published.preferences, ranked, time.monotonic() - published.at

    def _loop(self) -> None:
        # Start-up: the static facts of every process, once, so that nearing a level
        # later costs a cheap refresh, not a full scan.  Then nothing until asked.
        first = True
        while not self._stop:
            if not (first or self._urgent or self._asked):
                self._wake.wait()  # calm: no timeout, no wake-up
                self._wake.clear()
                continue
            first = False
            self._asked = False
            started = time.thread_time()  # CPU time: a scan parked for a kill costs none
            try:
                self.refresh(between=self._wait_clear)
            except _ScanStopped:
                break
            except Exception:  # the scan must never kill the daemon
                log.exception("background scan failed")
            took = time.thread_time() - started
            if not self._urgent:
                continue
            # Under pressure ten times as often, but never more than SCAN_DUTY of a CPU:
            # the CPU is what the victims need to exit.
            self._wake.wait(max(self.cfg.scan_interval / 10, took / SCAN_DUTY))
            self._wake.clear()


# --- the loop -----------------------------------------------------------------------------


class Daemon:
    """The only object that knows every stage."""

    def __init__(self, cfg: Config, *, reload: Callable[[], Config] | None = None,
                 meminfo: Callable[[], procfs.MemInfo] | None = None,
                 sink: Sink | None = None,
                 before_kill: Callable[[Victim, str], None] | None = None,
                 syscalls: Syscalls | None = None,
                 mounts_file: str = "/proc/self/mounts",
                 pressure_path: str = "/proc/pressure/memory") -> None:
        """The keyword arguments after `sink` exist for fault injection: a Syscalls
        that fails on demand, a mounts file without cgroup2, a missing PSI file."""
        self.cfg = cfg
        self._reload = reload
        # Default: /proc/meminfo through a descriptor kept open (opened in run()).
        self.meminfo: Callable[[], procfs.MemInfo] | None = meminfo
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signals: list[int] = []
        self._poll_set: tuple[tuple[tuple[int, ...], ...], select.poll,
                              dict[int, Scope]] | None = None
        self._stop = False
        self._stop_reason = "mreaper stopping"
        self.kills: list[KillReport] = []
        self.scopes: dict[str, Scope] = {}
        self._cache: CandidateCache | None = None
        self._sampled_at = -SAMPLE_EVERY
        self._resolved_at = 0.0
        self._unified = ""
        self._previous_sizes: dict[str, dict[str, int]] = {}
        self._own_pressure: str | None = None
        self._own_dir: str | None = None
        self._own_next = 0.0                     # next read of our own cgroup's memory.high
        self._own_peak_limit = 0.0               # ... or as soon as our peak RSS passes this
        self.own_checks = 0                      # how many times it was read (tests)
        self.sink: Sink = sink if sink is not None else LogSink()
        # Gauges only for a sink that records them (metrics): LogSink, events and hooks
        # do nothing with a sample.
        self._wants_samples = wants_samples(self.sink)
        self._before_kill = before_kill
        # (pid, starttime) of processes we SIGKILLed that have not been seen to exit: a
        # victim stuck in D state keeps its place in /proc (and its oom_score) but must
        # never be chosen again.
        self._killed: set[tuple[int, int]] = set()
        self.syscalls = syscalls or LinuxSyscalls()
        self._mounts_file = mounts_file
        self._mounts: cgroup.Mounts | None = None
        self._pressure_path = pressure_path
        self.notify = sdnotify.Notifier()
        self._idle: dict[str, _Idle] = {}  # scopes where no process may be killed now
        self._passed_over: Counter[str] = Counter()  # why, at the last search
        self._forbidden: set[tuple[int, int]] = set()  # EPERM already logged for these
        self._notified = ""  # the last STATUS= sent

    # -- signals: recorded by the handler, handled in the loop
    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def request_stop(self) -> None:
        self._stop = True
        self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"k")

    def run(self) -> int:
        cfg = self.cfg
        support = probe_support()
        if not support.pidfd:
            log.error("cannot act safely: %s; refusing to start", support.detail)
            return 1
        log.info("kernel: %s", support.detail)
        if not support.mrelease and cfg.mrelease:
            log.warning("process_mrelease unavailable: kills will wait for the victim's own "
                        "exit path")
        facts, lacks = privileges(cfg)
        for fact in facts:
            log.info("privileges: %s", fact)
        for lack in lacks:
            log.warning("privileges: without %s", lack)
        for problem in protect_self(cfg):
            log.warning("self-protection: %s", problem)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            # Kept for pinning victims too: their charge file is found through it, and
            # reading the mount table again on the kill path costs time for nothing.
            self._mounts = cgroup.find_mounts(self._mounts_file)
            self._unified = self._mounts.unified
        except OSError:
            self._mounts = None
            self._unified = ""
        self._own_pressure = self._own_cgroup_check()
        if cfg.scopes:
            try:
                init_cgroup = procfs.read_cgroup(1).unified
            except (procfs.ProcessGone, procfs.ParseError, OSError):
                init_cgroup = ""
            in_own_namespace = namespace_problem(cfg, init_cgroup)
            if in_own_namespace is not None:
                log.warning("scopes: %s", in_own_namespace)
        if self.meminfo is None:
            self.meminfo = procfs.MemInfoReader()
        machine = MachineScope(cfg, self.meminfo, self._unified, self._pressure_path,
                               self._own_pressure)
        self.scopes[MACHINE] = machine
        log.info("scope machine: %s", machine.capabilities())
        self._resolve(time.monotonic())
        pool = ReaperPool(cfg.reapers, syscalls=self.syscalls, before_kill=self._before_kill)
        cache = CandidateCache(cfg, self._unified)
        self._cache = cache
        cache.start()
        log.info("running%s: %s", " (dry run)" if cfg.dry_run else "", describe(cfg))
        server = status_mod.serve(cfg.status_socket, self.status)
        self.notify.ready("running")
        # Start-up is over: what exists now lives as long as the daemon.  Out of the
        # collector's sight, it is never traversed again by a collection (and never
        # written to by one: its pages stay clean, shared with nothing, and cheap).
        gc.collect()
        gc.freeze()
        # A thread that wants the GIL waits up to this for the one holding it to let go
        # (default 5 ms).  Under pressure the loop must not wait that long behind the
        # scan thread at each of the dozen reads of a decision; calm, nothing contends.
        sys.setswitchinterval(0.0005)
        try:
            self._loop(pool, cache)
        finally:
            self.notify.stopping()
            self._end_graces()
            if server is not None:
                server.close()
            cache.stop()
            pool.shutdown(wait=True)
            for scope in self.scopes.values():
                # A kill under way when the stop came (its SIGKILL went out from this
                # loop) is reported all the same: no victim without its "killed" line.
                self._collect(scope)
                scope.close()
            self.sink.close()
            signal.set_wakeup_fd(-1)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
        log.info("stopped")
        return 0

    def _own_cgroup_check(self) -> str | None:
        """Our own cgroup v2: warn if it limits our memory (memory.high throttling stalls
        the daemon when it must act), and return its memory.pressure so our own stall
        is not taken for the machine's."""
        if not self._unified:
            return None
        try:
            own = procfs.read_cgroup(os.getpid()).unified
        except (procfs.ProcessGone, OSError):
            return None
        if own in ("", "/"):
            return None
        path = os.path.join(self._unified, own.lstrip("/"))
        try:
            state = cgroup.read_memory_state(path)
        except (cgroup.CgroupGone, ValueError):
            return None
        if state.limit is not None:
            log.warning("self-protection: mreaper's own cgroup %s limits it to %s "
                        "(memory.max/high): throttling would stall it just when it must act; "
                        "its own stall is not counted as pressure, but raise the limit",
                        own, fmt_bytes(state.limit))
        self._own_dir = path
        pressure = os.path.join(path, "memory.pressure")
        return pressure if os.path.exists(pressure) else None

    def _watch_own_high(self, now: float) -> None:
        """Read our own cgroup's memory.high and charge only when they may be near:
        every OWN_CHECK_EVERY seconds (an administrator may set a limit at any time),
        and as soon as our own peak RSS (getrusage: one system call, no file) has grown
        by half the room the last reading left.  Calm, the daemon's RSS does not move,
        so neither file is read on a look."""
        if self._own_dir is None:
            return
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if now < self._own_next and peak < self._own_peak_limit:
            return
        room = self._lift_own_high()
        self._own_next = now + OWN_CHECK_EVERY
        self._own_peak_limit = (peak + max(room - OWN_HIGH_MARGIN, 0) // 2
                                if room is not None else float("inf"))
        self.own_checks += 1

    def _lift_own_high(self) -> int | None:
        """A killer throttled by memory.high on its own cgroup cannot act: each page it
        charges over the limit puts it to sleep (up to 2 s), while the machine runs
        out (seen in the lab VM: the kernel OOM killer fired first).  When that cgroup
        holds nothing but mreaper and its charge nears memory.high, lift the limit and
        say so loudly.  A shared cgroup is left alone: its limit is not ours to lift.
        Returns the room left under memory.high (None: no limit, or no figure)."""
        if self._own_dir is None:
            return None
        try:
            state = cgroup.read_memory_state(self._own_dir)
            if state.high is None or state.current is None:
                return None
            if state.high - state.current > OWN_HIGH_MARGIN:
                return state.high - state.current
            if cgroup.read_procs(self._own_dir, recursive=True) != [os.getpid()]:
                return state.high - state.current
            with open(os.path.join(self._own_dir, "memory.high"), "w") as f:
                f.write("max")
        except (cgroup.CgroupGone, ValueError, OSError) as e:
            log.debug("own memory.high not lifted: %s", e)
            return None
        log.warning("self-protection: lifted memory.high %s of mreaper's own cgroup %s (charge "
                    "%s): a throttled low-memory killer cannot act in time",
                    fmt_bytes(state.high), self._own_dir, fmt_bytes(state.current))
        return None

    def _resolve(self, now: float) -> None:
        """Match the [[scope]] patterns against the cgroup tree: add new cgroups, drop
        removed ones (a kill in flight there finishes on its own)."""
        self._resolved_at = now
        if not self.cfg.scopes:
            return
        if not self._unified:
            log.warning("no cgroup2 mount: %d configured scopes ignored, machine scope only",
                        len(self.cfg.scopes))
            self.cfg = dataclasses.replace(self.cfg, scopes=())
            return
        wanted = resolve_scopes(self.cfg, self._unified)
        for name in [n for n in self.scopes if n != MACHINE and n not in wanted]:
            log.info("scope %s: cgroup gone, dropped", name)
            self.scopes.pop(name).close()
        for name, (sc, path) in wanted.items():
            if name not in self.scopes:
                scope = CgroupScope(sc, name, path, self._unified, poll_min=self.cfg.poll_min,
                                    poll_max=self.cfg.poll_max, own_pressure=self._own_pressure)
                self.scopes[name] = scope
                try:
                    log.info("scope %s: %s", name, scope.capabilities())
                except cgroup.CgroupGone:
                    self.scopes.pop(name).close()

    def _loop(self, pool: ReaperPool, cache: CandidateCache) -> None:
        while not self._stop:
            now = time.monotonic()
            if now - self._resolved_at >= self.cfg.scan_interval:
                self._resolve(now)
            urgent = False
            for scope in list(self.scopes.values()):
                urgent |= self._tend(scope, now, pool, cache)
            cache.set_episode(any(sc.last is not None and sc.last.verdict.severity >= Severity.WARN
                                  for sc in self.scopes.values()))
            cache.set_urgent(urgent)
            cache.park(any(self._dying(scope, now) for scope in self.scopes.values()))
            # Calm, a look is all there is: gauges only for a sink that records them,
            # a summary only for a notify socket, our own cgroup only when near its limit.
            if now - self._sampled_at >= SAMPLE_EVERY and (self._wants_samples
                                                           or self.notify.enabled):
                self._sampled_at = now
                if self._wants_samples:
                    for scope in self.scopes.values():
                        if scope.last is not None:
                            self.sink.sample(scope.sample())
                if self.notify.enabled:  # the summary costs a status() for nothing else
                    text = status_mod.summary(self.status(top=1, ranking=False))
                    if text != self._notified:  # STATUS= only when it reads differently
                        self._notified = text
                        self.notify.status(text)
            self._watch_own_high(now)
            self.notify.watchdog_due(now)
            self._wait(min(self._timeout(scope) for scope in self.scopes.values()))
            self._handle_signals(cache)

    def _tend(self, scope: Scope, now: float, pool: ReaperPool, cache: CandidateCache) -> bool:
        """One look at one scope and what follows from it.  True if it is under pressure."""
        try:
            look = scope.look(now)
        except cgroup.CgroupGone:
            log.info("scope %s: cgroup removed, dropped", scope.name)
            self.scopes.pop(scope.name).close()
            return False
        verdict = look.verdict
        self._track_episode(scope, verdict, now, look.available)
        self._collect(scope)
        if verdict.severity == Severity.KILL:
            for inflight in scope.inflight:
                if inflight.escalation:
                    inflight.escalation.set()  # cut a SIGTERM grace period short
        if verdict.severity < Severity.TERM and scope.name in self._idle:
            # Out of the kill levels: a return to one is a new level, searched at once
            # and, if still nothing may be killed, said again.
            del self._idle[scope.name]
            scope.warned_no_victim = False
        if (verdict.severity >= Severity.TERM and self._ready(scope, verdict, now, look.available)
                and self._worth_a_search(scope, verdict.severity, now)):
            with cache.hold():
                self._act(scope, verdict, now, pool, cache)
        # Near a level (or falling towards it fast), the ranking is kept fresh: it must
        # be ready when the level is crossed; farther, nothing is scanned.  Backed off
        # (nothing may be killed): the background scan need not hurry either.
        return ((verdict.severity >= Severity.WARN or scope.near(NEAR_ROOM, NEAR_SECONDS))
                and scope.name not in self._idle)

    def _worth_a_search(self, scope: Scope, severity: Severity, now: float) -> bool:
        """Search for a victim now?  Always, unless the last search found none at this
        same level: then only once the back-off has run out, or as soon as a process
        that could be a victim has started since (a leak is very often a new process),
        judged NEW_PID_SETTLE after it appeared.  Searching on every look (100 a second
        at poll_min) re-listed /proc each time: 63 % of a CPU with 5,000 processes, for
        the same answer.  A process that becomes a candidate later (renamed after start)
        waits for the back-off, at most scan_interval, as it waited for the scan."""
        idle = self._idle.get(scope.name)
        if idle is None:
            return True
        if severity != idle.severity:
            del self._idle[scope.name]
            return True
        if now >= idle.until:
            return True
        newest = _last_pid()
        if newest != idle.last_pid:
            since = idle.pending[0] if idle.pending else idle.last_pid
            first = idle.pending[2] if idle.pending else now
            idle.pending, idle.last_pid = (since, newest, first), newest
        if idle.pending is None or now - idle.pending[2] < NEW_PID_SETTLE:
            return False
        since, newest, _ = idle.pending
        idle.pending = None
        return self._new_candidate(scope, since, newest)

    def _new_candidate(self, scope: Scope, since: int, newest: int) -> bool:
        """Is one of the PIDs handed out after `since` up to `newest` a process that the
        rules let die?  PIDs grow until they wrap at pid_max: looked at one by one
        (threads and gone ones cost one failed read each); a wrap or a burst is just
        searched."""
        if since < 0 or not 0 < newest - since <= NEW_PIDS_MAX:
            return True
        for pid in range(since + 1, newest + 1):
            try:
                c = policy.snapshot(pid)
            except (procfs.ProcessGone, procfs.ParseError, OSError):
                continue
            if c is None:
                continue
            r = policy.rank([c], self.cfg.rules, sort_by=self.cfg.sort_by,
                            min_rss=self.cfg.min_rss, scope_cgroup=scope.cgroup_path,
                            pods=self.cfg.pods)[0]
            if r.excluded is None:
                return True
        return False

    def _back_off(self, scope: Scope, severity: Severity) -> None:
        idle = self._idle.get(scope.name)
        delay = IDLE_FIRST if idle is None else min(idle.delay * 2,
                                                    max(self.cfg.scan_interval, IDLE_FIRST))
        self._idle[scope.name] = _Idle(severity, delay, time.monotonic() + delay, _last_pid())

    @staticmethod
    def _dying(scope: Scope, now: float) -> bool:
        """A victim of this scope was killed less than PARK_FOR seconds ago and its
        memory is not known back yet."""
        return any(not f.released.is_set() and not f.future.done()
                   and now - f.detected_at < PARK_FOR for f in scope.inflight)

    def _timeout(self, scope: Scope) -> float:
        timeout = scope.interval()
        if scope.episode_since is not None:
            timeout = min(timeout, EPISODE_CALM)
        if scope.inflight or scope.settle or scope.releases:
            timeout = min(timeout, 0.05)
        if scope.psi.pending:  # a trigger event waits to be judged by the next totals
            timeout = min(timeout, PSI_RECHECK)
        return timeout

    def _wait(self, timeout: float) -> None:
        # The poll set changes only when scopes or their triggers do: built once for
        # each set, not on every look.
        key = tuple((id(scope), *scope.psi.fds) for scope in self.scopes.values())
        if self._poll_set is None or self._poll_set[0] != key:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            owners: dict[int, Scope] = {}
            for scope in self.scopes.values():
                for fd in scope.psi.fds:
                    poller.register(fd, select.POLLPRI)
                    owners[fd] = scope
            self._poll_set = (key, poller, owners)
        _, poller, owner = self._poll_set
        for fd, revents in poller.poll(timeout * 1000):
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
            elif fd in owner:
                # POLLERR: the cgroup was removed; the next look drops the scope.
                owner[fd].psi.on_event(fd, revents, time.monotonic())

    def _track_episode(self, scope: Scope, verdict: Verdict, now: float,
                       available: int | None) -> None:
        """Start, peak and end of a pressure episode.  An episode ends only after
        EPISODE_CALM seconds without any level held, so a reading that hovers at a
        level does not flood the log."""
        if verdict.severity >= Severity.WARN:
            if scope.episode_since is None:
                scope.episode_since, scope.episode_peak = now, verdict.severity

                self._emit_episode(scope, "start", verdict, now, available)
            elif verdict.severity > scope.episode_peak:
                scope.episode_peak = verdict.severity
                self._emit_episode(scope, "peak", verdict, now, available)
            scope.episode_last = now
        elif scope.episode_since is not None and now - scope.episode_last >= EPISODE_CALM:
            self._emit_episode(scope, "end", Verdict(scope.episode_peak, "pressure over"),
                               scope.episode_last, available)
            scope.episode_since = None

    def _emit_episode(self, scope: Scope, phase: str, verdict: Verdict, now: float,
                      available: int | None) -> None:
        assert scope.episode_since is not None
        self.sink.episode(Episode(
            scope=scope.name, phase=phase, severity=verdict.severity.name.lower(),
            reason=verdict.reason, wall_time=time.time(), duration_s=now - scope.episode_since,
            mem_available=available))

    def _ready(self, scope: Scope, verdict: Verdict, looked_at: float,
               available: int | None) -> bool:
        """May this scope kill again at this look?  Paced by what is known of its
        victims' releases (pacing.pace), not by a clock: a victim whose memory is known
        back no longer holds the next kill back, and one still dying holds it back only
        if its release covers the shortfall."""
        now = time.monotonic()
        if now < scope.quiet_until:
            return False
        if scope.settle is not None:
            if now < scope.settle:
                return False
            scope.settle = None
        scope.releases = [r for r in scope.releases if pacing.lingering(r, now)]
        releases = scope.releases + [i.release() for i in scope.inflight]  # kill order
        p = pacing.pace(scope.shortfall(verdict.severity), releases, now=now,
                        looked_at=looked_at, available=available)
        if not p.act:
            log.debug("%snot yet: %s", _prefix(scope), p.why)
        return p.act

    def _collect(self, scope: Scope) -> None:
        for inflight in [i for i in scope.inflight if i.future.done()]:
            scope.inflight.remove(inflight)
            self._report(scope, inflight)

    def _report(self, scope: Scope, inflight: InFlight) -> None:
        if inflight.escalation:
            inflight.escalation.close()
        try:
            result = inflight.future.result()
        except Exception:
            log.exception("[%s] kill failed", scope.name)
            # Not at once again: whatever failed (EPERM...) would fail the same way.
            scope.settle = time.monotonic() + min(1.0, self.cfg.recovery_timeout)
            return
        if result.spared:
            # Not a kill: no sink hears of it (no metric, no post-kill hook).  The loop
            # chooses again at its next look, with no settle time to wait out.
            log.warning("%s%s; choosing again", _prefix(scope), result.human())
            if isinstance(result, KillReport):
                self._killed.discard((result.pid, result.starttime))
            else:
                self._killed.difference_update(inflight.victims)
            return
        if isinstance(result, GroupKillReport):
            log.warning("%s%s", "" if scope.name == MACHINE else f"[{scope.name}] ",
                        result.human())
            reports = list(result.members)
            freed = result.freed_bytes
        else:
            reports = [result]
            freed = result.freed_bytes
        for report in reports:
            self.kills.append(report)
            self.sink.kill(report, scope.name)
            if report.exited:
                self._killed.discard((report.pid, report.starttime))
        del self.kills[:-KEEP_KILLS]
        release = _release_of(result, inflight, freed)
        if pacing.lingering(release, time.monotonic()):
            scope.releases.append(release)

    def _act(self, scope: Scope, verdict: Verdict, detected_at: float, pool: ReaperPool,
             cache: CandidateCache) -> None:
        candidates, prefs, machine_ranked, age = cache.get()
        t_ranked = time.monotonic()
        if isinstance(scope, CgroupScope):
            ranked = policy.rank(candidates, self.cfg.rules, sort_by=self.cfg.sort_by,
                                 min_rss=self.cfg.min_rss, scope_cgroup=scope.cgroup_path,
                                 cgroup_preferences=prefs, pods=self.cfg.pods)
        else:
            ranked = machine_ranked
        if isinstance(scope, CgroupScope) and scope.sc.unit == "cgroup":
            unit = self._pick_group(scope, candidates, ranked)
            if unit is not None:
                self._idle.pop(scope.name, None)
                self._kill_group(scope, unit[0], unit[1], verdict, detected_at=detected_at,
                                 pool=pool, age=age, prefs=prefs)
                return
        if self.cfg.families:
            family, fwhy = self._family(scope, ranked)
            if family is not None and self._kill_family(scope, family, fwhy, verdict,
                                                        detected_at=detected_at, pool=pool,
                                                        age=age, prefs=prefs,
                                                        t_ranked=t_ranked):
                return
        victim, chosen = self._pin_first(ranked, scope, prefs)
        if victim is None or chosen is None:
            self._back_off(scope, verdict.severity)
            if not scope.warned_no_victim:  # once, not on every search
                why = ", ".join(f"{n} {what}" for what, n in self._passed_over.most_common(6))
                log.error("%s%s, but no process may be killed: %s; searching again with a "
                          "back-off of up to %g s, or as soon as a process that may die "
                          "starts or the level changes", _prefix(scope), verdict.reason,
                          why or "no process at all", self.cfg.scan_interval)
                scope.warned_no_victim = True
            return
        scope.warned_no_victim = False
        self._idle.pop(scope.name, None)
        t_pinned = time.monotonic()
        # One more look: the scan may have taken long enough for pressure to clear.
        again = scope.look(t_pinned)
        if again.verdict.severity < Severity.TERM:
            log.info("%spressure cleared before the kill (now: %s; was: %s); %d %r spared",
                     _prefix(scope), again.verdict.reason, verdict.reason, victim.pid,
                     victim.name)
            victim.close()
            return
        why = _why(scope, again.verdict, chosen)
        group = self._oom_group_of(victim)
        if group is not None:
            victim.close()
            self._kill_group(scope, group, f"memory.oom.group=1 of {victim.pid} "
                                           f"{victim.name!r}", again.verdict,
                             detected_at=detected_at, pool=pool, age=age, prefs=prefs)
            return
        t_decided = time.monotonic()
        decided_ms = (t_decided - detected_at) * 1000
        # Where the time went: the ranking (new processes ranked in), pinning the victim
        # and checking it again, the last look.
        phases = (f"ranking {(t_ranked - detected_at) * 1000:.1f}, pin "
                  f"{(t_pinned - t_ranked) * 1000:.1f}, last look "
                  f"{(t_decided - t_pinned) * 1000:.1f}")
        if self.cfg.dry_run:
            log.warning("%sdry run: would kill %d %r (rss %s) [%s]; decided in %.1f ms",
                        _prefix(scope), victim.pid, victim.name,
                        fmt_bytes(victim.holdings.vm_rss), why, decided_ms)
            victim.close()
            scope.quiet_until = time.monotonic() + self.cfg.recovery_timeout
            return
        observe_decision(self.sink, decided_ms / 1000, scope.name)
        term = again.verdict.severity == Severity.TERM
        if term and self.cfg.term_timeout > 0:
            # A SIGTERM grace is granted only if memory would last a useful part of it:
            # at the rate it falls, the kill level may be a fraction of a second away (a
            # fast leak), too close for the loop to escalate in time, above all when the
            # daemon itself is slowed by the pressure.
            room, rate = scope.kill_room(), scope.fall.rate
            if room is not None and rate > 0 and room / rate < min(MIN_GRACE,
                                                                 self.cfg.term_timeout):
                term = False
                why += (f"; kill level {room / rate:.2f} s away at {fmt_bytes(int(rate))}/s: "
                        "no time for SIGTERM")
        options = KillOptions(term_timeout=self.cfg.term_timeout if term else 0.0,
                              exit_timeout=self.cfg.recovery_timeout,
                              mrelease=self.cfg.mrelease, demote=self.cfg.demote)
        escalation = Escalation()
        log.info("%skilling %d %r (rss %s, frees %s) [%s]; decided in %.1f ms from a %.0f ms "
                 "old ranking (%s)", _prefix(scope), victim.pid, victim.name,
                 fmt_bytes(victim.holdings.vm_rss), fmt_bytes(victim.holdings.expected), why,
                 decided_ms, age * 1000, phases)
        released = threading.Event()
        released_at: list[float] = []

        def on_released() -> None:  # in the reaper thread
            released_at.append(time.monotonic())
            released.set()
            self._poke()

        # Straight to SIGKILL (no grace, no pre-kill hook): sent from this thread, now.
        # The reaper thread reaps and waits; the hand-over to it is not on the clock.
        sent = (send_sigkill(victim, options, syscalls=self.syscalls)
                if options.term_timeout == 0 and self._before_kill is None else None)
        future = pool.submit(victim, options, reason=why, escalation=escalation,
                             on_released=on_released, sent=sent,
                             recheck=self._protected_by_rules(prefs))
        future.add_done_callback(lambda _f: self._poke())
        key = (victim.pid, victim.starttime)
        self._killed.add(key)
        scope.inflight.append(InFlight(future, escalation, detected_at, again.available,
                                       victim.holdings.expected, (key,), released, released_at))
        # PSI events from before the kill say nothing about after it: pressure must
        # fire again for a PSI-held level to act again.
        scope.psi.fired.clear()

    def _baseline(self, ranked: list[policy.Ranked]) -> dict[tuple[int, int], int]:
        """What growth in this episode is measured from, per process: its size at the
        last scan taken while calm (the episode's start, give or take a scan interval),
        or at the first scan that saw it, or else as this ranking has it."""
        calm = self._cache.calm if self._cache is not None else {}
        out = {}
        for r in ranked:
            key = (r.candidate.pid, r.candidate.starttime)
            out[key] = calm.get(key, r.candidate.rss)
        return out

    def _own(self) -> families.Own:
        """mreaper's own process group, session, cgroup and ancestors."""
        ancestors, pid = set(), os.getpid()
        while pid > 1 and pid not in ancestors:
            ancestors.add(pid)
            try:
                pid = procfs.read_stat(pid).ppid
            except (procfs.ProcessGone, procfs.ParseError, OSError):
                break
        try:
            own_cgroup = procfs.read_cgroup(os.getpid()).unified
        except (procfs.ProcessGone, OSError):
            own_cgroup = ""
        return families.Own(pgrp=os.getpgrp(), session=os.getsid(0), cgroup=own_cgroup,
                            ancestors=frozenset(ancestors))

    def _family(self, scope: Scope, ranked: list[policy.Ranked]
                ) -> tuple[families.Family | None, str]:
        """The family to kill whole, if one outranks every single process (families.py).

        The ranking may be a scan old (over a second at 10,000 processes), older than the
        growth that matters: the members of the families that may die are measured
        again now (statm, one small read each, at most FRESH_MAX of them)."""
        alive = [r for r in ranked if (r.candidate.pid, r.candidate.starttime) not in self._killed]
        own = self._own()
        weight = self.cfg.growth_weight
        base = self._baseline(alive)

        def growth_of(ranked: list[policy.Ranked]) -> dict[tuple[int, int], int]:
            return {(r.candidate.pid, r.candidate.starttime):
                    r.candidate.rss - base[(r.candidate.pid, r.candidate.starttime)]
                    for r in ranked}

        first = families.group(alive, growth_of(alive), weight=weight, own=own,
                               growing_only=True)
        wanted = {(r.candidate.pid, r.candidate.starttime) for f in first if f.eligible
                  for r in f.members}
        if len(wanted) <= FRESH_MAX:
            alive = [_refreshed(r) if (r.candidate.pid, r.candidate.starttime) in wanted else r
                     for r in alive]
        growth = growth_of(alive)
        found = families.group(alive, growth, weight=weight, own=own, growing_only=True)
        family, why = families.choose(found, alive, growth, weight=weight)
        if family is None:
            log.debug("%sno family: %s", _prefix(scope), why)
        return family, why

    def _kill_family(self, scope: Scope, family: families.Family, why: str, verdict: Verdict,
                     *, detected_at: float, pool: ReaperPool, age: float,
                     prefs: dict[str, str], t_ranked: float) -> bool:
        """Pin every member, judge each again alone, then SIGKILL them all through their
        pidfds (parents first: a pool cannot respawn what it lost) and hand them to the
        pool to reap, one report for all.  False: not killed whole (a member changed or
        cannot be pinned): the caller kills a single process instead."""
        t_chosen = time.monotonic()
        self._forget_gone()
        victims: list[Victim] = []
        skipped: list[str] = []

        def give_up(reason: str) -> bool:
            log.info("%snot killing %s whole: %s", _prefix(scope), family.label, reason)
            for v in victims:
                v.close()
            return False

        for r in family.members:
            c = r.candidate
            try:
                v = Victim.open(c.pid, starttime=c.starttime, syscalls=self.syscalls,
                                mounts=self._mounts)
            except VictimGone as e:
                skipped.append(str(e))
                continue
            except (VictimError, OSError) as e:
                return give_up(f"{c.pid} {c.name!r}: {e}")
            now = policy.candidate_of(v)
            if now is None:
                # Pinned, but its memory is gone already (it exited, a zombie its
                # parent has not reaped, or the kernel OOM killer took it): nothing of
                # it to judge or free.  Giving the family up for it left the rest to
                # die one per decision while the kernel killed (the lab storm test).
                v.close()
                skipped.append(f"{c.pid} {c.name!r}: exited (no memory left)")
                continue
            victims.append(v)
            again = policy.rank([now], self.cfg.rules, sort_by=self.cfg.sort_by,
                                scope_cgroup=scope.cgroup_path,
                                cgroup_preferences=prefs)
            if not again or again[0].must_live or (
                    again[0].excluded is not None and "outside scope" in again[0].excluded):
                return give_up(f"{c.pid} {c.name!r} changed since it was ranked "
                               f"({again[0].excluded if again else 'no longer a candidate'})")
            if c.private is not None:
                grown = max(v.holdings.vm_rss - c.rss, 0)
                v.holdings = dataclasses.replace(v.holdings, private=c.private + grown)
        if len(victims) < families.MIN_MEMBERS:
            return give_up(f"{len(victims)} members left")
        look = scope.look(time.monotonic())
        if look.verdict.severity < Severity.TERM:
            log.info("%spressure cleared before the kill (now: %s; was: %s); %s spared",
                     _prefix(scope), look.verdict.reason, verdict.reason, family.label)
            for v in victims:
                v.close()
            return True
        reason = f"{_prefix(scope)}{look.verdict.reason}; {why}"
        decided_ms = (time.monotonic() - detected_at) * 1000
        if self.cfg.dry_run:
            log.warning("%sdry run: would kill %s (%d processes) [%s]; decided in %.1f ms",
                        _prefix(scope), family.label, len(victims), reason, decided_ms)
            for v in victims:
                v.close()
            scope.quiet_until = time.monotonic() + self.cfg.recovery_timeout
            return True
        observe_decision(self.sink, decided_ms / 1000, scope.name)
        options = KillOptions(exit_timeout=self.cfg.recovery_timeout, mrelease=self.cfg.mrelease,
                              demote=self.cfg.demote)
        log.info("%skilling %s (%d processes) [%s]; decided in %.1f ms from a %.0f ms old "
                 "ranking (ranking %.1f, family %.1f, pin %.1f)", _prefix(scope), family.label,
                 len(victims), reason, decided_ms, age * 1000,
                 (t_ranked - detected_at) * 1000, (t_chosen - t_ranked) * 1000,
                 (time.monotonic() - t_chosen) * 1000)
        sents: list[Sent] = []
        signalled: list[Victim] = []
        for v in victims:
            try:
                sents.append(send_sigkill(v, options, syscalls=self.syscalls))
            except OSError as e:  # EPERM...: this member lives; the others still die
                log.error("%scannot SIGKILL %d %r of %s: %s", _prefix(scope), v.pid, v.name,
                          family.label, e)
                skipped.append(f"{v.pid} {v.name!r}: SIGKILL failed: {e}")
                v.close()
                continue
            signalled.append(v)
        victims = signalled
        if not victims:
            scope.settle = time.monotonic() + min(1.0, self.cfg.recovery_timeout)
            return True
        keys = tuple((v.pid, v.starttime) for v in victims)
        expected = sum(v.holdings.expected for v in victims)
        future = pool.submit_family(family.label, victims, sents, options, reason=reason,
                                    skipped=tuple(skipped))
        future.add_done_callback(lambda _f: self._poke())
        self._killed.update(keys)
        scope.inflight.append(InFlight(future, None, detected_at, look.available, expected,
                                       keys))
        scope.psi.fired.clear()
        return True

    def _pick_group(self, scope: CgroupScope, candidates: list[policy.Candidate],
                    ranked: list[policy.Ranked]) -> tuple[str, str] | None:
        assert scope.cgroup_dir is not None
        previous = self._previous_sizes.get(scope.name, {})
        children = child_cgroups(scope.cgroup_dir, self._unified, candidates, ranked,
                                 previous=previous, interval=self.cfg.scan_interval)
        self._previous_sizes[scope.name] = {c.path: c.size for c in children}
        child = pick_child(children, scope.sc.select)
        if child is None:
            log.info("[%s] no child cgroup may be killed: killing a process instead",
                     scope.name)
            return None
        figure = {"size": fmt_bytes(child.size), "growth": f"{fmt_bytes(int(child.growth))}/s",
                  "pressure": f"some avg10 {child.pressure:.1f}%"}[scope.sc.select]
        return child.path, f"largest {scope.sc.select} among {len(children)} children: {figure}"

    def _oom_group_of(self, victim: Victim) -> str | None:
        """memory.oom.group=1 on the victim's own cgroup: the group dies together."""
        if not self._unified or victim.cgroups.unified in ("", "/"):
            return None
        leaf = os.path.join(self._unified, victim.cgroups.unified.lstrip("/"))
        return leaf if cgroup.oom_group(leaf) else None

    def _kill_group(self, scope: Scope, path: str, chosen: str, verdict: Verdict, *,
                    detected_at: float, pool: ReaperPool, age: float,
                    prefs: dict[str, str]) -> None:
        try:
            victims, skipped = pin_cgroup(path, syscalls=self.syscalls)
        except VictimError as e:
            log.error("%snot killing cgroup %s: %s", _prefix(scope), path, e)
            return
        if not victims:
            log.info("%scgroup %s is empty", _prefix(scope), path)
            return
        why = f"{scope.name} {verdict.reason}; chose cgroup {path}: {chosen}"
        decided_ms = (time.monotonic() - detected_at) * 1000
        if self.cfg.dry_run:
            log.warning("%sdry run: would kill cgroup %s (%d processes) [%s]; decided in "
                        "%.1f ms", _prefix(scope), path, len(victims), why, decided_ms)
            for v in victims:
                v.close()
            scope.quiet_until = time.monotonic() + self.cfg.recovery_timeout
            return
        observe_decision(self.sink, decided_ms / 1000, scope.name)
        log.info("%skilling cgroup %s (%d processes) [%s]; decided in %.1f ms from a %.0f ms "
                 "old ranking", _prefix(scope), path, len(victims), why, decided_ms, age * 1000)
        options = KillOptions(exit_timeout=self.cfg.recovery_timeout, mrelease=self.cfg.mrelease)
        keys = tuple((v.pid, v.starttime) for v in victims)
        expected = sum(v.holdings.expected for v in victims)
        future = pool.submit_group(path, victims, options, reason=why, skipped=tuple(skipped),
                                   recheck=self._protected_by_rules(prefs))
        future.add_done_callback(lambda _f: self._poke())
        self._killed.update(keys)
        available = scope.last.available if scope.last else None
        scope.inflight.append(InFlight(future, None, detected_at, available, expected, keys))
        scope.psi.fired.clear()

    def _pin_first(self, ranked: list[policy.Ranked], scope: Scope, prefs: dict[str, str]
                   ) -> tuple[Victim | None, policy.Ranked | None]:
        """Pin the first eligible candidate that is still what the ranking says.  The
        ranking may be seconds old: once pinned, the process is looked at again and
        ranked alone with the rules, so one that has since become protected (exec'd
        into a protected name, oom_score_adj -1000) is never signalled."""
        self._forget_gone()
        passed = self._passed_over
        passed.clear()
        for r in ranked:
            if r.excluded is not None:
                passed[r.excluded.split("; ")[0]] += 1
                continue
            c = r.candidate
            if (c.pid, c.starttime) in self._killed:
                passed["killed already, not exited yet"] += 1
                continue  # killed already, not exited yet (stuck): killing it again frees nothing
            try:
                victim = Victim.open(c.pid, starttime=c.starttime, syscalls=self.syscalls,
                                     mounts=self._mounts)
            except VictimForbidden as e:
                # EPERM: the kill this daemon exists for cannot happen; say so loudly,
                # once per process (not at debug level, as if it were a race).
                passed["not ours to signal (EPERM)"] += 1
                if (c.pid, c.starttime) not in self._forbidden:
                    if len(self._forbidden) > 10_000:
                        self._forbidden.clear()
                    self._forbidden.add((c.pid, c.starttime))
                    log.error("cannot kill %d %r: %s%s", c.pid, c.name, e,
                              "" if _has_cap(CAP_KILL) else " (mreaper lacks CAP_KILL)")
                continue
            except VictimError as e:
                passed["gone or refused"] += 1
                log.debug("skipping %d: %s", c.pid, e)
                if self._cache is not None:
                    self._cache.suspect(c.pid)  # gone, or another process: read it again
                continue
            except OSError as e:  # EMFILE, ENOMEM...: this one cannot be pinned now
                passed["could not be pinned"] += 1
                log.warning("cannot pin %d %r: %s", c.pid, c.name, e)
                continue
            now = policy.candidate_of(victim)
            again = policy.rank([now], self.cfg.rules, sort_by=self.cfg.sort_by,
                                min_rss=self.cfg.min_rss, scope_cgroup=scope.cgroup_path,
                                cgroup_preferences=prefs,
                                pods=self.cfg.pods) if now is not None else []
            if not again or again[0].excluded is not None:
                why = again[0].excluded if again else "no longer a candidate"
                passed["changed since the ranking"] += 1
                log.info("%d %r changed since it was ranked (%s): not killed", c.pid, c.name,
                         why)
                victim.close()
                continue
            if c.private is not None:
                # Ranked on private memory read seconds ago: what it grew since is its own.
                grown = max(victim.holdings.vm_rss - c.rss, 0)
                victim.holdings = dataclasses.replace(victim.holdings, private=c.private + grown)
            return victim, r
        return None, None

    def _protected_by_rules(self, prefs: dict[str, str]) -> Callable[[Victim], str | None]:
        """What the reaper asks immediately before each signal (a SIGTERM grace or a
        pre-kill hook may have run since the victim was pinned): does a protect rule,
        user.oomd_omit or oom_score_adj -1000 cover the process now?  Victim.recheck
        has just refreshed what it is called and runs as."""
        def protected(victim: Victim) -> str | None:
            now = policy.candidate_of(victim)
            if now is None:
                return None  # exiting (zombie, no mm): a signal to it harms no one
            again = policy.rank([now], self.cfg.rules, sort_by=self.cfg.sort_by,
                                cgroup_preferences=prefs, pods=self.cfg.pods)[0]
            return again.excluded if again.must_live else None
        return protected

    def _forget_gone(self) -> None:
        """Drop killed processes that are gone (or whose PID now names another)."""
        for pid, starttime in list(self._killed):
            try:
                alive = procfs.read_stat(pid).starttime == starttime
            except (procfs.ProcessGone, procfs.ParseError):
                alive = False
            if not alive:
                self._killed.discard((pid, starttime))

    def status(self, top: int = 10, ranking: bool = True) -> dict[str, object]:
        """What the daemon decides from, for `mreaper status` (systemd-oomd's `oomctl
        dump` idea): per scope the figures, the levels and the distance to them, the
        top candidates, the last kills.  Safe to call from another thread.  Calm, there
        is no ranking: a status client's question makes one (`ranking`; the sd_notify
        summary needs none)."""
        scopes: list[dict[str, object]] = []
        for scope in list(self.scopes.values()):
            look = scope.last
            if look is None:
                continue
            scopes.append({"scope": scope.name, "severity": look.verdict.severity.name.lower(),
                           "reason": look.verdict.reason, **look.figures})
        candidates: list[dict[str, object]] = []
        if self._cache is not None:
            for r in (self._cache.peek(build=True) if ranking else [])[:top]:
                c = r.candidate
                candidates.append({"pid": c.pid, "name": c.name, "rss": c.rss,
                                   "oom_score": c.oom_score, "score": r.score,
                                   "excluded": r.excluded, "rules": list(r.touched_by)})
        return {"pid": os.getpid(), "dry_run": self.cfg.dry_run, "config": self.cfg.origin,
                "scopes": scopes, "candidates": candidates,
                "kills": [k.to_dict() for k in list(self.kills)[-top:]]}

    def _handle_signals(self, cache: CandidateCache) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGHUP:
                self.notify.reloading()
                self._do_reload(cache)
                self.notify.ready(status_mod.summary(self.status(top=1)))
            else:
                log.info("got %s, stopping", signal.Signals(sig).name)
                self._stop_reason = f"mreaper stopping ({signal.Signals(sig).name})"
                self._stop = True

    def _end_graces(self) -> None:
        """What a stop means for a victim in its SIGTERM grace (or waiting for a pre-kill
        hook): it was already judged to die, so it gets its SIGKILL now (after the same
        re-check as ever) and is reaped and reported before the daemon exits.  Waiting
        out the grace held a stop for up to term_timeout, past systemd's TimeoutStopSec,
        and leaving it SIGTERMed but alive kept the shortage it was chosen for."""
        waiting = [(scope, f) for scope in self.scopes.values() for f in scope.inflight
                   if f.escalation is not None and not f.future.done()]
        if not waiting:
            return
        log.warning("stopping: %d kill(s) under way (%s) end now: a victim in its SIGTERM "
                    "grace gets SIGKILL at once, and is reaped and reported; an exit is "
                    "awaited %g s at most", len(waiting),
                    ", ".join(f"{_prefix(scope)}{pid}" for scope, f in waiting
                              for pid, _ in f.victims), STOP_EXIT_WAIT)
        for _, f in waiting:
            assert f.escalation is not None
            f.escalation.stop(self._stop_reason)

    def _do_reload(self, cache: CandidateCache) -> None:
        if self._reload is None:
            log.warning("SIGHUP: no configuration file to reload")
            return
        try:
            new = self._reload()
        except config_mod.ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        if (new.psi != self.cfg.psi or new.reapers != self.cfg.reapers
                or new.scopes != self.cfg.scopes):
            log.warning("reload: psi, scopes and reapers changes take effect on restart")
            new = dataclasses.replace(new, psi=self.cfg.psi, reapers=self.cfg.reapers,
                                      scopes=self.cfg.scopes)
        self.cfg = new
        cache.cfg = new
        machine = self.scopes.get(MACHINE)
        if isinstance(machine, MachineScope):
            machine.cfg = new
        log.info("configuration reloaded from %s: %s", new.origin, describe(new))


def _release_of(result: KillReport | GroupKillReport, inflight: InFlight,
                freed: int | None) -> pacing.Release:
    """A finished kill as the pacing sees it: reaped by us, freed by its own exit (its
    pages may lag on per-CPU free lists), or stuck (not seen back)."""
    now = time.monotonic()
    if isinstance(result, GroupKillReport):
        back = result.kill_to_free_s is not None or all(
            m.kill_to_free_s is not None or (m.exited and m.mrelease is not Mrelease.SHARED_MM)
            for m in result.members)
        reaped = (result.kill_to_free_s is not None
                  and all(m.mrelease is Mrelease.REAPED for m in result.members))
        measured = result.freed_source.startswith("memcg")
    else:
        # An exit whose memory was not seen back at once still gives it back (a reader
        # of /proc/<pid>/smaps* holding its mm delays that a little): a lag, not stuck.
        # Stuck: no exit, or an mm shared with a live process.
        back = result.kill_to_free_s is not None or (
            result.exited and result.mrelease is not Mrelease.SHARED_MM)
        reaped = (result.kill_to_free_s is not None and result.mrelease is Mrelease.REAPED
                  and inflight.released.is_set())
        measured = result.freed_source.startswith("memcg")
    state = (pacing.State.REAPED if reaped else pacing.State.EXITED if back
             else pacing.State.STUCK)
    known_at = inflight.released_at[0] if reaped and inflight.released_at else now
    return pacing.Release(state, inflight.expected, freed=freed if measured else None,
                          known_at=known_at, available_at_kill=inflight.available_at_kill)


def _refreshed(r: policy.Ranked) -> policy.Ranked:
    """`r` with its size read again now; what it grew since is its own (anonymous)."""
    c = r.candidate
    try:
        rss = procfs.read_resident(c.pid)
    except (procfs.ProcessGone, procfs.ParseError, OSError):
        return r
    private = None if c.private is None else c.private + max(rss - c.rss, 0)
    return dataclasses.replace(r, candidate=dataclasses.replace(c, rss=rss, private=private))


def wants_samples(sink: Sink) -> bool:
    """Whether `sink` (or one behind a Fanout) does anything with a Sample: a sink says
    so with `wants_samples = False`; one that does not say is fed."""
    inner = sink.sinks if isinstance(sink, Fanout) else [sink]
    return any(getattr(s, "wants_samples", True) for s in inner)


def _prefix(scope: Scope) -> str:
    return "" if scope.name == MACHINE else f"[{scope.name}] "


def _why(scope: Scope, verdict: Verdict, chosen: policy.Ranked) -> str:
    """The reason a report carries: the scope, what held, and why this victim."""
    rules = f" ({', '.join(chosen.touched_by)})" if chosen.touched_by else ""
    where = "" if scope.name == MACHINE else f"{scope.name} "
    return f"{where}{verdict.reason}; top score {chosen.score}{rules}"


def describe(cfg: Config) -> str:
    """One line with what the daemon watches."""
    def levels(section: str) -> str:
        lv = getattr(cfg, section)
        return "/".join(lv[x].describe() for x in config_mod.LEVELS)

    psi = "/".join(str(cfg.psi[x]) if cfg.psi[x] else "off" for x in config_mod.LEVELS)
    if any(cfg.psi.values()):
        psi += f" (gate: MemAvailable <= {cfg.psi_gate.describe()})"
    return (f"when {config_mod.format_when(cfg.when)}; memory warn/term/kill {levels('memory')}; "
            f"swap {levels('swap')}; psi {psi}; {len(cfg.rules)} rules; "
            f"{cfg.reapers} reapers")
