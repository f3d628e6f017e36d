"""Detection: from memory facts and PSI events to a pressure verdict (none, warn, term, kill).

The assessment and the polling interval are pure functions of snapshots; the only I/O
here is `PsiMonitor`, which owns the kernel PSI trigger file descriptors (or, where
the kernel refuses triggers, reads the averages instead and says so once).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import math
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mreaper.config import LEVELS, Config, Level, PsiTrigger, ScopeConfig, When
from mreaper.linux import trust
from mreaper.linux.cgroup import MemoryState
from mreaper.linux.procfs import MemInfo


class Severity(enum.IntEnum):
    NONE = 0
    WARN = 1
    TERM = 2
    KILL = 3


SEVERITY_OF = {"warn": Severity.WARN, "term": Severity.TERM, "kill": Severity.KILL}


@dataclass(frozen=True, slots=True)
class Verdict:
    severity: Severity
    reason: str  # which sources held, with their figures, e.g. "MemAvailable 1.1 GiB <= 1.2 GiB"


Held = tuple[bool | None, str]  # holds (None: neutral), and why in words


def source_states(cfg: Config, mem: MemInfo, psi_active: Mapping[str, bool],
                  level: str) -> dict[str, Held]:
    """For one level: whether each source holds, and why, in words.

    A level that is off never holds; PSI does not hold while MemAvailable is above
    psi.gate.  With no swap configured (SwapTotal 0) the swap source is neutral: there
    is nothing to fall back on, so it must not veto a kill ("memory & swap"), and it
    must not make one on its own ("swap", "any") either."""
    out: dict[str, Held] = {}
    out["memory"] = _level_state("MemAvailable", mem.mem_available, mem.mem_total,
                                 cfg.memory[level])
    if mem.swap_total == 0:
        out["swap"] = (None, "no swap")
    else:
        out["swap"] = _level_state("SwapFree", mem.swap_free, mem.swap_total, cfg.swap[level])
    trig = cfg.psi[level]
    gate = cfg.psi_gate.bytes_of(mem.mem_total)
    if trig is None:
        out["psi"] = (False, "psi off")
    elif gate is not None and mem.mem_available > gate and psi_active.get(level, False):
        # A stall while the machine has plenty is some cgroup's at its own limit.
        out["psi"] = (False, f"PSI {trig} ignored: MemAvailable {_mib(mem.mem_available)} "
                             f"> gate {_mib(gate)}")
    else:
        out["psi"] = (psi_active.get(level, False), f"PSI {trig}")
    return out


def _level_state(label: str, value: int, total: int, level: Level) -> tuple[bool, str]:
    limit = level.bytes_of(total)
    if limit is None:
        return False, f"{label} level off"
    return value <= limit, f"{label} {_mib(value)} {'<=' if value <= limit else '>'} {_mib(limit)}"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def highest_level(when: When, states: Callable[[str], Mapping[str, Held]]) -> Verdict:
    """The highest level at which some AND-term of `when` holds (pure): each of its
    sources holds or is neutral, and at least one truly holds.  `states(level)` says
    for each source whether it holds at that level, and why."""
    for level in reversed(LEVELS):
        held = states(level)
        for term in when:
            values = [held[s][0] for s in term]
            if all(v is not False for v in values) and any(v is True for v in values):
                reason = ", ".join(held[s][1] for s in term)
                return Verdict(SEVERITY_OF[level], f"{level}: {reason}")
    return Verdict(Severity.NONE, "")


def assess(cfg: Config, mem: MemInfo, psi_active: Mapping[str, bool]) -> Verdict:
    """The machine scope's verdict (pure)."""
    return highest_level(cfg.when, lambda level: source_states(cfg, mem, psi_active, level))


def scope_states(sc: ScopeConfig, state: MemoryState, psi_active: Mapping[str, bool],
                 events_delta: Mapping[str, int], level: str) -> dict[str, Held]:
    """For one level of a cgroup scope: headroom, psi and events, each held or not."""
    out: dict[str, Held] = {}
    headroom, limit = state.headroom, state.limit
    bound = sc.headroom[level].bytes_of(limit) if limit is not None else None
    if headroom is None or limit is None:
        out["headroom"] = (False, "no memory.current/limit")
    elif bound is None:
        out["headroom"] = (False, "headroom level off")
    else:
        out["headroom"] = (headroom <= bound, f"headroom {_mib(headroom)} "
                                              f"{'<=' if headroom <= bound else '>'} "
                                              f"{_mib(bound)} of limit {_mib(limit)}")
    trig = sc.psi[level]
    out["psi"] = (psi_active.get(level, False), f"PSI {trig}") if trig else (False, "psi off")
    rose = [f"{c} +{events_delta[c]}" for c in sc.events[level] if events_delta.get(c, 0) > 0]
    out["events"] = (bool(rose), "memory.events " + ", ".join(rose) if rose else "no events")
    return out


def assess_scope(sc: ScopeConfig, state: MemoryState, psi_active: Mapping[str, bool],
                 events_delta: Mapping[str, int]) -> Verdict:
    """A cgroup scope's verdict (pure)."""
    return highest_level(sc.when, lambda level: scope_states(sc, state, psi_active,
                                                             events_delta, level))


def next_interval(cfg: Config, mem: MemInfo, fall_rate: float) -> float:
    """Seconds until the next look at /proc/meminfo: the time memory would take to fall
    to the nearest action level, halved, at the faster of the observed fall rate and
    an assumed burst rate, clamped to [poll_min, poll_max] (pure)."""
    limits = [lvl.bytes_of(mem.mem_total) for lvl in (cfg.memory["term"], cfg.memory["kill"])]
    return interval_towards(mem.mem_available, limits, fall_rate, cfg.poll_min, cfg.poll_max)


def interval_towards(available: int, limits: Sequence[int | None], fall_rate: float,
                     poll_min: float, poll_max: float) -> float:
    """next_interval from the action levels in bytes (the daemon keeps them so): towards
    the highest of `limits` that is on; poll_max when none is (pure)."""
    target = max((x for x in limits if x is not None), default=None)
    if target is None:
        return poll_max
    return interval_for(available - target, fall_rate, poll_min, poll_max)


def interval_for(room: int, fall_rate: float, poll_min: float, poll_max: float) -> float:
    """Half the time `room` bytes last at the faster of the observed fall rate and an
    assumed burst rate, clamped to [poll_min, poll_max] (pure)."""
    if room <= 0:
        return poll_min
    # A process can fault in anonymous memory at several GiB/s; earlyoom assumes 6 GB/s.
    rate = max(fall_rate, ASSUMED_FILL_RATE)
    return min(max(room / rate / 2, poll_min), poll_max)


ASSUMED_FILL_RATE = 4.0 * (1 << 30)  # bytes/s


MIN_DT = 1e-6  # seconds: looks closer than this are one look (and no division by ~0)


class FallRate:
    """Rate at which MemAvailable (or a cgroup's headroom) falls, in bytes/s, >= 0.

    An exponential average with a time constant, not a per-sample weight: the daemon
    looks every 10 ms when close to a level, and a per-sample average made one 4 MiB
    allocation seen 4.5 ms after the previous look into "888 MiB/s", enough to deny
    a SIGTERM grace to a leak growing at 80 MiB/s.  Weighting each sample by
    1 - exp(-dt/tau) makes a fall of X bytes add about X/tau to the rate however the
    looks are spaced, and a steady fall converge to its true rate within a few tau.
    """

    def __init__(self, tau: float = 0.25) -> None:
        if not tau > 0:
            raise ValueError(f"FallRate: tau must be > 0 seconds, got {tau!r}")
        self.tau = tau
        self.rate = 0.0
        self._last: tuple[float, int] | None = None

    def update(self, now: float, available: int) -> float:
        if self._last is not None:
            t, a = self._last
            dt = now - t
            if dt < MIN_DT:
                return self.rate  # no time to speak of: keep the earlier look as the base
            sample = max((a - available) / dt, 0.0)
            weight = -math.expm1(-dt / self.tau)  # 1 - exp(-dt/tau), exact for small dt
            self.rate += weight * (sample - self.rate)
        self._last = (now, available)
        return self.rate


# --- PSI ------------------------------------------------------------------------------


class PsiMonitor:
    """Kernel PSI triggers on a pressure file, one per configured level.

    Writing "some|full <stall_us> <window_us>" to /proc/pressure/memory (or a cgroup's
    memory.pressure) arms a trigger; poll() then reports POLLPRI when the stall in a
    window exceeds the threshold, and nothing while the machine is calm
    (Documentation/accounting/psi.rst).  A level is active for one window after its
    trigger fired.  Where triggers are refused (no PSI, old kernel, permissions), the
    monitor falls back to comparing the avg10 figure on each look.
    """

    def __init__(self, triggers: Mapping[str, PsiTrigger | None],
                 path: str = "/proc/pressure/memory", alternates: Sequence[str] = (),
                 own: str | None = None) -> None:
        """Arm each trigger on `path`, or on the first of `alternates` that accepts all
        of them.  For the machine the alternate is the cgroup2 root's memory.pressure:
        the kernel backs it with the same system-wide PSI group, and it stays reachable
        where /proc/pressure is masked (some container runtimes)."""
        self.triggers = {lvl: t for lvl, t in triggers.items() if t is not None}
        self._readers: dict[str, int] = {}  # path -> descriptor kept open for reading
        self.fds: dict[int, str] = {}
        self.fired: dict[str, float] = {}
        self.fallback: str | None = None  # why triggers are not used, if they are not
        self._averages: dict[str, float] = {}
        self._totals: collections.deque[tuple[float, dict[str, int]]] = collections.deque()
        self.rejected = 0  # trigger events the totals did not bear out
        # level -> when its event came, for events the totals could not judge yet
        self.pending: dict[str, float] = {}
        # The daemon's own cgroup's memory.pressure, when it lies inside what this
        # monitor watches: a daemon throttled by its own memory.high stalls, and that
        # stall must not count as pressure to kill for.
        self.own = own
        self._own_totals: collections.deque[tuple[float, dict[str, int]]] = collections.deque()
        self.path = path
        # The first candidate found to be a kernel pressure file: averages are read
        # from it, also when it refuses triggers; None when none is (then no figures).
        self._readable: str | None = None
        refusals = []
        for candidate in (path, *alternates):
            why = self._arm(candidate)
            if why is None:
                self.path = candidate
                self.refresh(time.monotonic())  # the baseline events are checked against
                return
            refusals.append(why)
        if self.triggers:
            self.fallback = "; ".join(refusals)

    def _arm(self, path: str) -> str | None:
        """Arm every trigger on `path`; on any refusal close them all and say why.

        Only the kernel's own pressure file is used: a FIFO in its place would hang
        every later read (our own O_RDWR trigger fd is a writer that never closes), and
        /dev/null or a regular file would take the trigger and never fire.  Every open
        is O_NONBLOCK, so even a FIFO is refused at once."""
        why = _not_pressure_file(path)
        if why is not None:
            return why
        if self._readable is None:
            self._readable = path
        for level, trig in self.triggers.items():
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                self.close()
                return f"cannot open {path}: {e.strerror}"
            why = _not_pressure_file(path, fd)  # the very file we write the trigger to
            if why is not None:
                os.close(fd)
                self.close()
                return why
            try:
                # The trailing NUL matters: psi_write() for /proc/pressure/* overwrites the
                # last byte written with NUL, which would eat the window's last digit.
                os.write(fd, str(trig).encode() + b"\0")
            except OSError as e:
                os.close(fd)
                self.close()
                return f"{path} refused {level} trigger \"{trig}\": {_refusal(e, trig)}"
            self.fds[fd] = level
        return None

    def on_event(self, fd: int, revents: int, now: float) -> None:
        """A trigger woke us.  The event counts only if the stall the pressure file's
        `total=` figure shows over the trigger's window reaches the threshold: kernels
        that run unprivileged triggers on the averaging worker can fire one right after
        arming, measured from a stale baseline, whatever the threshold (seen on Linux
        6.18 without CAP_SYS_RESOURCE: a 95 % trigger fired at under 5 % stall)."""
        level = self.fds.get(fd)
        if level is None or not revents & _POLLPRI:
            return
        self.refresh(now)
        verdict = self._confirmed(self.triggers[level], now)
        if verdict is None:
            # Too few looks at the totals to judge the window: measure from here on
            # and judge at a look PSI_RECHECK seconds later (refresh() does).
            self.pending.setdefault(level, now)
        elif verdict:
            self.fired[level] = now
        else:
            self.rejected += 1

    def _confirmed(self, trig: PsiTrigger, now: float) -> bool | None:
        return confirm_stall(trig, self._stall_samples(trig.kind), now)

    def _stall_samples(self, kind: str, since: float | None = None) -> list[tuple[float, int]]:
        """(time, cumulative stall in us) of `kind` at each look, less the daemon's own
        stall up to then: differences between them are the stall that is not ours."""
        return [(t, tot[kind] - self._own_at(kind, t)) for t, tot in self._totals
                if kind in tot and (since is None or t >= since)]

    def _own_at(self, kind: str, at: float) -> int:
        """The daemon's own cumulative stall (us) at the newest look no later than `at`
        (the oldest we have if none; 0 when we do not watch our own cgroup)."""
        own = [(t, tot[kind]) for t, tot in self._own_totals if kind in tot]
        if not own:
            return 0
        before = [v for t, v in own if t <= at]
        return before[-1] if before else own[0][1]

    def refresh(self, now: float) -> None:
        """Read the pressure file once: its averages (for gauges and the fallback) and
        its totals (to confirm trigger events).  Called on every look."""
        try:
            data = self._read(self._readable or self.path)
        except OSError:
            self._averages = {}
            return
        try:
            self._averages = parse_pressure(data)
        except ValueError:  # garbage: no figures rather than no daemon
            self._averages = {}
        horizon = now - 2 * max((t.window_us / 1e6 for t in self.triggers.values()), default=0)
        horizon = min(horizon, min(self.pending.values(), default=horizon))
        _keep(self._totals, now, parse_totals(data), horizon)
        if self.own is not None:
            try:
                _keep(self._own_totals, now, parse_totals(self._read(self.own)), horizon)
            except OSError:
                self.own = None  # our cgroup changed or has no PSI: nothing to discount
        for level, since in list(self.pending.items()):
            if now - since >= PSI_RECHECK - MIN_DT:
                del self.pending[level]
                trig = self.triggers[level]
                if confirm_rate(trig, self._stall_samples(trig.kind, since)):
                    self.fired[level] = now
                else:
                    self.rejected += 1

    def _read(self, path: str) -> bytes:
        """A pressure file through a descriptor kept open (pread at 0 regenerates it):
        read on every look, it costs no open/close.  An error closes it (a removed
        cgroup: the next read opens it again, or fails for good)."""
        fd = self._readers.get(path)
        if fd is None:
            fd = open_pressure_file(path)  # checked once: a kernel PSI file, not a FIFO
            self._readers[path] = fd
        try:
            data = os.pread(fd, PRESSURE_FILE_LIMIT + 1, 0)
            if len(data) > PRESSURE_FILE_LIMIT:
                raise trust.TooLarge(errno.EFBIG, f"larger than {PRESSURE_FILE_LIMIT} bytes",
                                     path)
            return data
        except OSError:
            del self._readers[path]
            with contextlib.suppress(OSError):
                os.close(fd)
            raise

    def averages(self) -> dict[str, float]:
        """avg10 of some/full as of the last refresh."""
        return dict(self._averages)

    def active(self, now: float) -> dict[str, bool]:
        out = {}
        for level, trig in self.triggers.items():
            if self.fallback is None:
                at = self.fired.get(level)
                out[level] = at is not None and now - at <= trig.window_us / 1e6
            else:
                avg = self._averages.get(trig.kind)
                out[level] = avg is not None and avg >= 100.0 * trig.stall_us / trig.window_us
        return out

    def close(self) -> None:
        for fd in [*self.fds, *self._readers.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self._readers.clear()


_POLLPRI = 0x002
PRESSURE_FILE_LIMIT = 1 << 16  # a PSI file is two lines (about 110 bytes)
# Where the kernel's pressure files live (statfs f_type): /proc/pressure/* on procfs,
# memory.pressure on cgroup2.  None takes a regular file on any filesystem: only for
# unit tests, whose made-up pressure files stand in for what they cannot write.
PRESSURE_FILESYSTEMS: tuple[int, ...] | None = (trust.PROC_SUPER_MAGIC,
                                                trust.CGROUP2_SUPER_MAGIC)


def _not_pressure_file(path: str, fd: int | None = None) -> str | None:
    """None if `path` (or `fd`, open on it) is a kernel PSI file, else why not."""
    own = fd is None
    if fd is None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            return f"cannot open {path}: {e.strerror}"
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # as opening it for the trigger says
            return f"cannot open {path}: {os.strerror(errno.EISDIR)}"
        why = trust.kernel_pressure_file(fd, PRESSURE_FILESYSTEMS)
    except OSError as e:
        why = f"cannot check it: {e.strerror}"
    finally:
        if own:
            os.close(fd)
    return None if why is None else f"{path}: {why}"


def open_pressure_file(path: str) -> int:
    """A descriptor on the kernel PSI file `path`; OSError if it is not one (a FIFO is
    refused at once, never read: O_NONBLOCK)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    why = trust.kernel_pressure_file(fd, PRESSURE_FILESYSTEMS)
    if why is not None:
        os.close(fd)
        raise OSError(errno.EINVAL, why, path)
    return fd


def read_pressure_file(path: str) -> bytes:
    """The content of a kernel PSI file; OSError if `path` is not one (a FIFO is
    refused at once, never read: O_NONBLOCK) or holds more than PRESSURE_FILE_LIMIT."""
    fd = open_pressure_file(path)
    try:
        return trust.read_fd(fd, PRESSURE_FILE_LIMIT, path)
    finally:
        os.close(fd)

# How far the look before a trigger's window may lie from the window's start for the
# stall between them to judge the window (a fraction of the window).
WINDOW_SLACK = 0.25
# A span of totals shorter than this fraction of the window is too short to judge by.
MIN_SPAN = 0.25
# An event the totals could not judge is judged on the stall rate over this many
# seconds after it.  Short, because the level waits for it; long enough that the
# totals (microseconds) measure a rate: 40 % stall shows as 40 ms.
PSI_RECHECK = 0.1


def confirm_stall(trig: PsiTrigger, samples: Sequence[tuple[float, int]],
                  now: float) -> bool | None:
    """Does the stall of `trig.kind` in the window ending at `now` reach the trigger?

    `samples` are (time, cumulative stall in us), oldest first, the last one taken at
    `now`.  True or False when they can tell; None when they cannot: the kernel's event
    is checked, not believed (some kernels fire unprivileged triggers spuriously).

    Looks rarely fall on the window's start.  Stall time grows at most as fast as the
    clock, so from a look t0 before the window, the stall X since t0 bounds the
    window's own: between X - (now - t0 - window) and X.  From a look inside the
    window, between X and X + (window - (now - t0)).  Where the bounds decide, they
    decide; where they do not, the stall rate over the span judges, but only a span
    close to the window (at most WINDOW_SLACK longer, at least MIN_SPAN of it): five
    seconds of totals hold two and a half windows of stall, and an upper bound on
    the window's stall is no confirmation.  Sparser looks leave the event to be
    judged afresh (confirm_rate over the next PSI_RECHECK seconds)."""
    window = trig.window_us / 1e6
    if len(samples) < 2 or samples[-1][0] < now - MIN_DT:
        return None
    current = samples[-1][1]
    older = [x for x in samples if x[0] <= now - window]
    t0, total0 = older[-1] if older else samples[0]
    span = now - t0
    stall = current - total0
    if span < MIN_DT:
        return None
    unseen_us = abs(span - window) * 1e6  # the time the span has too much or too little
    low, high = (stall - unseen_us, stall) if older else (stall, stall + unseen_us)
    if low >= trig.stall_us:
        return True
    if high < trig.stall_us:
        return False
    if (older and span > window * (1 + WINDOW_SLACK)) or \
            (not older and span < window * MIN_SPAN):
        return None
    return stall >= trig.stall_us * span / window


def confirm_rate(trig: PsiTrigger, samples: Sequence[tuple[float, int]]) -> bool:
    """Is the stall rate from the first to the last sample at least the trigger's
    (threshold per window)?  False with fewer than two samples or no time between."""
    if len(samples) < 2:
        return False
    (t0, total0), (t1, total1) = samples[0], samples[-1]
    if t1 - t0 < MIN_DT:
        return False
    return (total1 - total0) / (t1 - t0) >= trig.stall_us / (trig.window_us / 1e6)


def _keep(samples: collections.deque[tuple[float, dict[str, int]]], now: float,
          totals: dict[str, int], horizon: float) -> None:
    if totals:
        samples.append((now, totals))
        while len(samples) > 2 and samples[1][0] < horizon:
            samples.popleft()


def has_cap_sys_resource(status_path: str = "/proc/self/status") -> bool:
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE = 24
    except (OSError, ValueError, IndexError):
        pass
    return False


def _refusal(e: OSError, trig: PsiTrigger) -> str:
    """Why the kernel refused a trigger, in words (kernel/sched/psi.c psi_trigger_create)."""
    if e.errno == errno.EINVAL and trig.window_us % 2_000_000 and not has_cap_sys_resource():
        return (f"EINVAL: without CAP_SYS_RESOURCE the window ({trig.window_us} us) must be a "
                "multiple of 2 s (2000000 us)")
    names = {errno.EINVAL: "EINVAL", errno.EPERM: "EPERM: not permitted",
             errno.EOPNOTSUPP: "EOPNOTSUPP: PSI disabled (boot with psi=1)",
             errno.EBUSY: "EBUSY"}
    return names.get(e.errno or 0, e.strerror or str(e))


def parse_totals(data: bytes) -> dict[str, int]:
    """{'some': total_us, 'full': total_us} from a PSI file: cumulative stall time."""
    out = {}
    for line in data.decode("ascii", "replace").splitlines():
        parts = line.split()
        if parts and parts[0] in ("some", "full"):
            for p in parts[1:]:
                if p.startswith("total="):
                    with contextlib.suppress(ValueError):
                        out[parts[0]] = int(p[6:])
    return out


def parse_pressure(data: bytes) -> dict[str, float]:
    """{'some': avg10, 'full': avg10} from a PSI file ('full' may be absent)."""
    out = {}
    for line in data.decode("ascii", "replace").splitlines():
        parts = line.split()
        if parts and parts[0] in ("some", "full"):
            for p in parts[1:]:
                if p.startswith("avg10="):
                    out[parts[0]] = float(p[6:])
    return out
