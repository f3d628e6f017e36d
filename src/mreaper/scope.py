"""Scopes at run time: the machine and each watched cgroup, each with its own look at
pressure, its PSI triggers, its pressure episode and at most one kill in flight.

A scope turns facts into a `Look` (verdict plus figures); the daemon decides what to
do with it.  Cgroup scopes come from `[[scope]]` patterns, resolved against the
cgroup2 mount now and again, so cgroups that appear are picked up and those removed
are dropped.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from mreaper import config as config_mod
from mreaper import pacing, policy
from mreaper.config import Config, ScopeConfig
from mreaper.detect import (
    FallRate,
    PsiMonitor,
    Severity,
    Verdict,
    assess,
    assess_scope,
    interval_for,
    interval_towards,
    parse_pressure,
)
from mreaper.linux import cgroup, procfs
from mreaper.reap import Escalation, GroupKillReport, KillReport
from mreaper.report import Sample

MACHINE = "machine"


@dataclass(frozen=True, slots=True)
class Look:
    verdict: Verdict
    available: int | None   # what recovery is judged on: MemAvailable, or cgroup headroom
    figures: dict[str, object]


@dataclass
class InFlight:
    """A kill handed to the reaper pool.  `released` is set (from the reaper thread)
    when its memory is known to be back, which can be long before the victim exits
    (a victim stuck in D state): from then on the scope may act again."""

    future: Future[KillReport] | Future[GroupKillReport]
    escalation: Escalation | None
    detected_at: float
    available_at_kill: int | None
    expected: int                     # bytes the kill should give back (private memory)
    victims: tuple[tuple[int, int], ...]  # (pid, starttime) of each process killed
    released: threading.Event = field(default_factory=threading.Event)
    released_at: list[float] = field(default_factory=list)  # monotonic, set with `released`

    def release(self) -> pacing.Release:
        """This kill as the pacing sees it while it is in flight."""
        if self.released.is_set() and self.released_at:
            return pacing.Release(pacing.State.REAPED, self.expected,
                                  known_at=self.released_at[0],
                                  available_at_kill=self.available_at_kill)
        return pacing.Release(pacing.State.PENDING, self.expected,
                              available_at_kill=self.available_at_kill)


@dataclass
class Scope:
    """What every scope keeps between looks."""

    name: str
    psi: PsiMonitor
    cgroup_dir: str | None = None     # None: the machine
    cgroup_path: str | None = None    # as /proc/<pid>/cgroup shows it ("/a/b")
    inflight: list[InFlight] = field(default_factory=list)
    settle: float | None = None       # a kill failed: no other before this (monotonic)
    releases: list[pacing.Release] = field(default_factory=list)  # finished, still lagging
    quiet_until: float = 0.0          # dry run: no repeat before this
    warned_no_victim: bool = False
    episode_since: float | None = None
    episode_last: float = 0.0
    episode_peak: Severity = Severity.NONE
    last: Look | None = None
    fall: FallRate = field(default_factory=FallRate)

    def look(self, now: float) -> Look:
        raise NotImplementedError

    def interval(self) -> float:
        raise NotImplementedError

    def sample(self) -> Sample:
        raise NotImplementedError

    def capabilities(self) -> str:
        raise NotImplementedError

    def kill_room(self) -> int | None:
        """Bytes left above the kill level at the last look (None: no such figure)."""
        raise NotImplementedError

    def shortfall(self, severity: Severity) -> int | None:
        """Bytes under the byte level of `severity` ("term", "kill") at the last look;
        None when that figure does not hold it (a level held by PSI or swap alone)."""
        raise NotImplementedError

    def near(self, room: int, seconds: float) -> bool:
        """At the last look, within `room` bytes of the first level it would reach, or
        falling fast enough to reach it within `seconds`.  False without a figure (PSI
        alone: the trigger's verdict says when)."""
        return False

    def close(self) -> None:
        self.psi.close()


class MachineScope(Scope):
    """The whole machine: MemAvailable, SwapFree and /proc/pressure/memory."""

    def __init__(self, cfg: Config, meminfo: Callable[[], procfs.MemInfo],
                 unified: str = "", pressure_path: str = "/proc/pressure/memory",
                 own_pressure: str | None = None) -> None:
        alternates = [os.path.join(unified, "memory.pressure")] if unified else []
        super().__init__(name=MACHINE, psi=PsiMonitor(cfg.psi, pressure_path,
                                                      alternates=alternates, own=own_pressure))
        self.cfg = cfg
        self.meminfo = meminfo
        self._mem: procfs.MemInfo | None = None
        self._bounds: tuple[Config, int, int, dict[str, int | None],
                            dict[str, int | None]] | None = None

    def levels(self, mem: procfs.MemInfo) -> tuple[dict[str, int | None],
                                                     dict[str, int | None]]:
        """The memory and swap levels in bytes, computed once per configuration and
        totals (they change on a reload or a memory hotplug, not between looks)."""
        b = self._bounds
        if b is None or b[0] is not self.cfg or b[1] != mem.mem_total or b[2] != mem.swap_total:
            b = (self.cfg, mem.mem_total, mem.swap_total,
                 {lvl: self.cfg.memory[lvl].bytes_of(mem.mem_total) for lvl in config_mod.LEVELS},
                 {lvl: self.cfg.swap[lvl].bytes_of(mem.swap_total) for lvl in config_mod.LEVELS})
            self._bounds = b
        return b[3], b[4]

    def look(self, now: float) -> Look:
        mem = self.meminfo()
        self._mem = mem
        self.fall.update(now, mem.mem_available)
        self.psi.refresh(now)
        active = self.psi.active(now)
        levels, swap_levels = self.levels(mem)
        if _above(mem.mem_available, levels) and (mem.swap_total == 0 or _above(
                mem.swap_free, swap_levels)) and not any(active.values()):
            # No source holds at any level, so no term of `when` can (highest_level): the
            # calm look's verdict, without the words for each source and level.
            verdict = CALM
        else:
            verdict = assess(self.cfg, mem, active)
        figures: dict[str, object] = {
            "mem_total": mem.mem_total, "mem_available": mem.mem_available,
            "swap_total": mem.swap_total, "swap_free": mem.swap_free,
            "levels": levels, "swap_levels": swap_levels,
        }
        self.last = Look(verdict, mem.mem_available, figures)
        return self.last

    def interval(self) -> float:
        """next_interval, from the levels kept in bytes."""
        mem = self._mem
        if mem is None:
            return self.cfg.poll_min
        levels, _ = self.levels(mem)
        return interval_towards(mem.mem_available, (levels["term"], levels["kill"]),
                                self.fall.rate, self.cfg.poll_min, self.cfg.poll_max)

    def near(self, room: int, seconds: float) -> bool:
        mem = self._mem
        if mem is None:
            return False
        levels, _ = self.levels(mem)
        return _near(mem.mem_available, list(levels.values()), self.fall.rate, room, seconds)

    def kill_room(self) -> int | None:
        mem = self._mem
        bound = self.cfg.memory["kill"].bytes_of(mem.mem_total) if mem else None
        return None if mem is None or bound is None else mem.mem_available - bound

    def shortfall(self, severity: Severity) -> int | None:
        mem = self._mem
        level = (self.cfg.memory[severity.name.lower()].bytes_of(mem.mem_total)
                 if mem is not None and severity.name.lower() in config_mod.LEVELS else None)
        if mem is None or level is None or mem.mem_available > level:
            return None
        return level - mem.mem_available

    def sample(self) -> Sample:
        mem = self._mem
        assert mem is not None
        distance: dict[str, int | None] = {}
        for level in config_mod.LEVELS:
            limit = self.cfg.memory[level].bytes_of(mem.mem_total)
            distance[level] = None if limit is None else mem.mem_available - limit
        avgs = self.psi.averages()
        return Sample(scope=self.name, mem_available=mem.mem_available,
                      swap_free=mem.swap_free if mem.swap_total else None,
                      psi_some_avg10=avgs.get("some"), psi_full_avg10=avgs.get("full"),
                      distance=distance)

    def capabilities(self) -> str:
        psi = (f"PSI averages ({self.psi.fallback})" if self.psi.fallback
               else f"PSI triggers on {self.psi.path} ({len(self.psi.fds)})" if self.psi.fds
               else "PSI off")
        return f"MemAvailable, SwapFree, {psi}"


class CgroupScope(Scope):
    """One cgroup v2 subtree: headroom against memory.max/high, its memory.pressure
    triggers, and memory.events counters."""

    def __init__(self, sc: ScopeConfig, name: str, cgroup_dir: str, unified: str, *,
                 poll_min: float, poll_max: float, own_pressure: str | None = None) -> None:
        path = cgroup.relative(unified, cgroup_dir)
        own = own_pressure if own_pressure and policy.in_scope(
            cgroup.relative(unified, os.path.dirname(own_pressure)), path) else None
        super().__init__(name=name, psi=PsiMonitor(sc.psi, os.path.join(cgroup_dir,
                                                                         "memory.pressure"),
                                                   own=own),
                         cgroup_dir=cgroup_dir, cgroup_path=path)
        self.sc = sc
        self.poll_min, self.poll_max = poll_min, poll_max
        self._events: dict[str, int] | None = None
        self._state: cgroup.MemoryState | None = None

    def look(self, now: float) -> Look:
        assert self.cgroup_dir is not None
        state = cgroup.read_memory_state(self.cgroup_dir)  # CgroupGone: the daemon drops us
        delta = {k: v - self._events.get(k, 0) for k, v in state.events.items()} \
            if self._events is not None else {}
        self._events = state.events
        self._state = state
        if state.headroom is not None:
            self.fall.update(now, state.headroom)
        self.psi.refresh(now)
        verdict = assess_scope(self.sc, state, self.psi.active(now), delta)
        limit = state.limit
        figures: dict[str, object] = {
            "cgroup": self.cgroup_dir, "current": state.current, "limit": limit,
            "headroom": state.headroom, "events": state.events,
            "levels": {lvl: (self.sc.headroom[lvl].bytes_of(limit) if limit is not None
                             else None) for lvl in config_mod.LEVELS},
        }
        self.last = Look(verdict, state.headroom, figures)
        return self.last

    def interval(self) -> float:
        """Like the machine's: the nearer the headroom to an action level and the faster
        it shrinks, the sooner the next look.  Without headroom figures, PSI triggers
        and events are what we have: look every poll_max."""
        state = self._state
        if state is None or state.headroom is None or state.limit is None:
            return self.poll_max
        bounds = [self.sc.headroom[lvl].bytes_of(state.limit) for lvl in ("term", "kill")]
        target = max((b for b in bounds if b is not None), default=None)
        if target is None:
            return self.poll_max
        return interval_for(state.headroom - target, self.fall.rate, self.poll_min,
                            self.poll_max)

    def near(self, room: int, seconds: float) -> bool:
        state = self._state
        if state is None or state.headroom is None or state.limit is None:
            return False
        limit = state.limit
        bounds = [self.sc.headroom[lvl].bytes_of(limit) for lvl in config_mod.LEVELS]
        return _near(state.headroom, bounds, self.fall.rate, room, seconds)

    def kill_room(self) -> int | None:
        state = self._state
        if state is None or state.headroom is None or state.limit is None:
            return None
        bound = self.sc.headroom["kill"].bytes_of(state.limit)
        return None if bound is None else state.headroom - bound

    def shortfall(self, severity: Severity) -> int | None:
        state = self._state
        if (state is None or state.headroom is None or state.limit is None
                or severity.name.lower() not in config_mod.LEVELS):
            return None
        level = self.sc.headroom[severity.name.lower()].bytes_of(state.limit)
        if level is None or state.headroom > level:
            return None
        return level - state.headroom

    def sample(self) -> Sample:
        state = self._state
        distance: dict[str, int | None] = {}
        for level in config_mod.LEVELS:
            bound = (self.sc.headroom[level].bytes_of(state.limit)
                     if state is not None and state.limit is not None else None)
            distance[level] = (None if bound is None or state is None or state.headroom is None
                               else state.headroom - bound)
        avgs = self.psi.averages()
        return Sample(scope=self.name, mem_available=state.headroom if state else None,
                      swap_free=None, psi_some_avg10=avgs.get("some"),
                      psi_full_avg10=avgs.get("full"), distance=distance)

    def capabilities(self) -> str:
        """What this scope can see, for the log line when it is picked up.  Before the
        first look there is no state yet, so it reads memory state itself: that raises
        cgroup.CgroupGone when the cgroup was removed since it was resolved (the
        daemon catches it and drops the scope) and ValueError on a memory file it
        cannot parse, as look() does."""
        assert self.cgroup_dir is not None
        state = self._state or cgroup.read_memory_state(self.cgroup_dir)
        parts = [f"cgroup {self.cgroup_dir}"]
        if state.current is None:
            parts.append("headroom: no (no memory.current: the memory controller is not "
                         "enabled for this cgroup)")
        elif state.limit is None:
            parts.append("headroom: no (memory.max and memory.high are 'max')")
        else:
            parts.append(f"headroom: yes (limit {state.limit >> 20} MiB)")
        parts.append(f"psi: averages ({self.psi.fallback})" if self.psi.fallback
                     else f"psi: {len(self.psi.fds)} triggers" if self.psi.fds else "psi: off")
        parts.append("events: yes" if state.events else "events: no (no memory.events)")
        parts.append(f"cgroup.kill: {'yes' if cgroup.can_kill(self.cgroup_dir) else 'no'}")
        parts.append(f"unit: {self.sc.unit}" + (f" by {self.sc.select}"
                                                 if self.sc.unit == "cgroup" else ""))
        return "; ".join(parts)


CALM = Verdict(Severity.NONE, "")


def _above(figure: int, levels: Mapping[str, int | None]) -> bool:
    """`figure` above every level that is on (pure)."""
    return all(b is None or figure > b for b in levels.values())


def _near(figure: int, bounds: Sequence[int | None], rate: float, room: int,
          seconds: float) -> bool:
    """`figure` (MemAvailable, headroom) within `room` of the highest of `bounds` (the
    first level it would reach), or that close at `rate` bytes/s in `seconds` (pure)."""
    first = max((b for b in bounds if b is not None), default=None)
    if first is None:
        return False
    left = figure - first
    return left <= room or left <= rate * seconds


def scope_name(sc: ScopeConfig, cgroup_path: str) -> str:
    """A glob pattern names one scope per matching cgroup: "<name>@<path>"."""
    return f"{sc.name}@{cgroup_path}" if any(ch in sc.cgroup for ch in "*?[") else sc.name


def resolve_scopes(cfg: Config, unified: str) -> dict[str, tuple[ScopeConfig, str]]:
    """Scope name -> (its config, its cgroup directory), for every pattern now.  Never
    the root cgroup (cgroup.resolve drops it): the root is the machine scope."""
    out: dict[str, tuple[ScopeConfig, str]] = {}
    for sc in cfg.scopes:
        for d in cgroup.resolve(unified, sc.cgroup):
            out[scope_name(sc, cgroup.relative(unified, d))] = (sc, d)
    return out


def namespace_problem(cfg: Config, init_cgroup: str) -> str | None:
    """Why no process can ever be found inside cfg's [[scope]]s, or None.

    `init_cgroup`: PID 1's cgroup v2 path as /proc/1/cgroup shows it to us.  In a cgroup
    namespace of our own (containerd and CRI-O give one to a container on cgroup v2;
    Kubernetes has no pod field to ask for the host's), the kernel writes every path
    relative to our namespace's root (cgroup_path_ns()), and with the host's PID
    namespace (hostPID) the host's init then shows ".." steps.  A scope's cgroup still
    resolves (the host's /sys/fs/cgroup bind-mounted keeps its own root), but which
    processes are in it is decided by comparing those paths with the scope's
    (policy.in_scope), and none ever matches: at its kill level the scope finds no
    victim (docs/kubernetes.md)."""
    if not cfg.scopes or not init_cgroup.startswith("/.."):
        return None
    names = ", ".join(sc.name for sc in cfg.scopes)
    return (f"[[scope]] {names}: mreaper runs in a cgroup namespace of its own (/proc/1/cgroup "
            f"shows {printable_path(init_cgroup)}), where processes' cgroup paths are relative "
            "to it: no process is ever found inside a scope, so a scope at its kill level "
            "kills nothing (the machine scope still does); run mreaper in the host's cgroup "
            "namespace or drop the scopes (docs/kubernetes.md)")


def printable_path(path: str, limit: int = 200) -> str:
    """A cgroup path for a log line: escaped and bounded."""
    text = policy.printable(path)
    return text if len(text) <= limit else text[:limit] + "..."


# --- choosing within a scope ------------------------------------------------------------


def preferences(candidates: Sequence[policy.Candidate], unified: str,
                read: Callable[[str], str | None] = cgroup.oomd_preference) -> dict[str, str]:
    """systemd's ManagedOOMPreference= xattrs for the cgroups the candidates live in and
    their ancestors: cgroup path -> "omit" | "avoid".  One read per distinct cgroup."""
    if not unified:
        return {}
    seen: dict[str, str | None] = {}
    for c in candidates:
        path = c.cgroup
        while path and path not in seen:
            seen[path] = read(os.path.join(unified, path.lstrip("/"))) if path != "/" else None
            path = "" if path == "/" else (path.rsplit("/", 1)[0] or "/")
    return {p: v for p, v in seen.items() if v is not None}


@dataclass(frozen=True, slots=True)
class ChildCgroup:
    """A child cgroup as a unit to kill, with the figure it was chosen by."""

    path: str
    size: int
    growth: float
    pressure: float
    excluded: str | None


def child_cgroups(scope_dir: str, unified: str, candidates: Sequence[policy.Candidate],
                  ranked: Sequence[policy.Ranked], *, previous: Mapping[str, int],
                  interval: float) -> list[ChildCgroup]:
    """The scope's child cgroups with their size (memory.current, or the RSS of their
    processes where there is no memory controller), growth since the previous look
    (bytes/s) and pressure (memory.pressure some avg10).  A child holding a process
    that must not die (protect rule, oom_score_adj -1000, user.oomd_omit) is excluded:
    killing the cgroup would kill it too.  A process merely passed over as a single
    victim (rss below min_rss, outside the scope) does not exclude its child: only
    `Ranked.must_live` does."""
    excluded_by_path: dict[str, str] = {}
    for r in ranked:
        if r.must_live:
            excluded_by_path.setdefault(r.candidate.cgroup, f"{r.candidate.pid} "
                                                          f"{r.candidate.name!r}: {r.excluded}")
    out = []
    for d in cgroup.children(scope_dir):
        rel = cgroup.relative(unified, d)
        inside = [c for c in candidates if policy.in_scope(c.cgroup, rel)]
        try:
            state = cgroup.read_memory_state(d)
        except cgroup.CgroupGone:
            continue
        size = state.current if state.current is not None else sum(c.rss for c in inside)
        growth = (size - previous[d]) / interval if d in previous and interval > 0 else 0.0
        pressure = 0.0
        with contextlib.suppress(OSError, ValueError), \
                open(os.path.join(d, "memory.pressure"), "rb") as f:
            pressure = parse_pressure(f.read()).get("some", 0.0)
        why = next((v for k, v in excluded_by_path.items() if policy.in_scope(k, rel)), None)
        if why is None and not inside:
            why = "no processes"
        out.append(ChildCgroup(d, size, growth, pressure, why and f"holds {why}"
                               if why != "no processes" else why))
    return out


def pick_child(children: Sequence[ChildCgroup], select: str) -> ChildCgroup | None:
    """The eligible child with the largest size, growth or pressure (pure)."""
    key: Callable[[ChildCgroup], float] = {
        "size": lambda c: float(c.size), "growth": lambda c: c.growth,
        "pressure": lambda c: c.pressure}[select]
    eligible = [c for c in children if c.excluded is None]
    return max(eligible, key=lambda c: (key(c), c.size), default=None)
