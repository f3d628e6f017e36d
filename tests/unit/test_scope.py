"""Unit tests of cgroup scopes: the verdict (detect.assess_scope / scope_states), the
CgroupScope run-time object, scope naming and resolution, systemd's ManagedOOMPreference
xattrs in the ranking, and the choice of a child cgroup to kill whole.

The cgroup trees are fixtures built in tmp_path.  They stand for what this host cannot
produce: its cgroup2 tree has no controllers, so memory.current, memory.max,
memory.high, memory.events, memory.stat and a cgroup's own memory.pressure figures (and
the literal "max" in a limit) exist only in fixtures here; so do hostile file contents
and cgroups removed in the middle of a scan.  A fixture memory.pressure is never present
when a CgroupScope is built: a regular file would take PSI trigger writes like any file
(open O_RDWR and write succeed), so the monitor is made to fall back by the file being
absent, and the pressure figures are written afterwards for the fallback to read.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest

from mreaper import policy
from mreaper.config import SCOPE_SOURCES as SOURCES
from mreaper.config import Config, Level, ScopeConfig, Threshold, parse_when
from mreaper.detect import ASSUMED_FILL_RATE, Severity, Verdict, assess_scope, scope_states
from mreaper.linux import cgroup
from mreaper.linux.cgroup import CgroupGone, MemoryState
from mreaper.policy import Action, Candidate, Rule
from mreaper.scope import (
    CgroupScope,
    ChildCgroup,
    child_cgroups,
    pick_child,
    preferences,
    resolve_scopes,
    scope_name,
)

MiB = 1 << 20
GiB = 1 << 30
LIMIT = 1000 * MiB          # warn bound (10%) 100 MiB, kill bound (3%) 30 MiB exactly
WARN_BOUND = 100 * MiB
KILL_BOUND = 30 * MiB

SC = ScopeConfig(name="work", cgroup="work")


def with_room(headroom: int, *, limit: int = LIMIT,
              events: Mapping[str, int] | None = None) -> MemoryState:
    return MemoryState(current=limit - headroom, max=limit, high=None, inactive_file=0,
                       events=dict(events or {}))


def when(text: str) -> tuple[tuple[str, ...], ...]:
    return parse_when(text, "test", "when", SOURCES)


# --- scope_states / assess_scope ---------------------------------------------------------


def test_defaults_hold_nothing_with_plenty_of_room() -> None:
    assert assess_scope(SC, with_room(500 * MiB), {}, {}) == Verdict(Severity.NONE, "")


def test_headroom_at_the_warn_bound_holds() -> None:
    assert assess_scope(SC, with_room(WARN_BOUND), {}, {}) == Verdict(
        Severity.WARN, "warn: headroom 100 MiB <= 100 MiB of limit 1000 MiB")
    assert scope_states(SC, with_room(WARN_BOUND), {}, {}, "warn")["headroom"] == (
        True, "headroom 100 MiB <= 100 MiB of limit 1000 MiB")


def test_headroom_one_byte_above_the_warn_bound_does_not_hold() -> None:
    assert assess_scope(SC, with_room(WARN_BOUND + 1), {}, {}).severity is Severity.NONE
    assert scope_states(SC, with_room(WARN_BOUND + 1), {}, {}, "warn")["headroom"] == (
        False, "headroom 100 MiB > 100 MiB of limit 1000 MiB")


def test_headroom_at_and_above_the_kill_bound() -> None:
    assert assess_scope(SC, with_room(KILL_BOUND), {}, {}) == Verdict(
        Severity.KILL, "kill: headroom 30 MiB <= 30 MiB of limit 1000 MiB")
    assert assess_scope(SC, with_room(KILL_BOUND + 1), {}, {}).severity is Severity.WARN
    assert assess_scope(SC, with_room(-5 * MiB), {}, {}).severity is Severity.KILL


def test_headroom_counts_inactive_file_and_the_tighter_limit() -> None:
    st = MemoryState(current=LIMIT - 20 * MiB, max=2 * LIMIT, high=LIMIT,
                     inactive_file=90 * MiB, events={})
    assert st.headroom == 110 * MiB
    assert assess_scope(SC, st, {}, {}).severity is Severity.NONE
    st = dataclasses.replace(st, inactive_file=80 * MiB)
    assert assess_scope(SC, st, {}, {}).severity is Severity.WARN


def test_headroom_level_off() -> None:
    assert scope_states(SC, with_room(0), {}, {}, "term")["headroom"] == (
        False, "headroom level off")
    sc = dataclasses.replace(SC, headroom={"warn": Level(), "term": Level(), "kill": Level()})
    assert assess_scope(sc, with_room(0), {}, {}) == Verdict(Severity.NONE, "")


def test_headroom_level_as_a_size() -> None:
    sc = dataclasses.replace(SC, headroom={"warn": Level((Threshold(size=200 * MiB),)),
                                           "term": Level(), "kill": Level()})
    assert assess_scope(sc, with_room(200 * MiB), {}, {}) == Verdict(
        Severity.WARN, "warn: headroom 200 MiB <= 200 MiB of limit 1000 MiB")


@pytest.mark.parametrize("st", [
    MemoryState(current=None, max=LIMIT, high=None, inactive_file=0, events={}),
    MemoryState(current=LIMIT, max=None, high=None, inactive_file=0, events={}),
    MemoryState(current=None, max=None, high=None, inactive_file=0, events={}),
])
def test_no_limit_or_no_current(st: MemoryState) -> None:
    for level in ("warn", "term", "kill"):
        assert scope_states(SC, st, {}, {}, level)["headroom"] == (
            False, "no memory.current/limit")
    assert assess_scope(SC, st, {}, {}) == Verdict(Severity.NONE, "")


def test_psi_active() -> None:
    room = with_room(500 * MiB)
    assert assess_scope(SC, room, {"warn": True}, {}) == Verdict(
        Severity.WARN, "warn: PSI some 300000 2000000")
    assert assess_scope(SC, room, {"warn": True, "kill": True}, {}) == Verdict(
        Severity.KILL, "kill: PSI full 600000 2000000")
    assert scope_states(SC, room, {"kill": False}, {}, "kill")["psi"] == (
        False, "PSI full 600000 2000000")
    # term has no trigger: active or not, it is off
    assert scope_states(SC, room, {"term": True}, {}, "term")["psi"] == (False, "psi off")


def test_events_rose_at_warn_and_kill() -> None:
    room = with_room(500 * MiB)
    assert assess_scope(SC, room, {}, {"high": 3, "oom": 0}) == Verdict(
        Severity.WARN, "warn: memory.events high +3")
    assert assess_scope(SC, room, {}, {"high": 3, "oom": 1}) == Verdict(
        Severity.KILL, "kill: memory.events oom +1")
    # counters not configured at any level, or not risen, hold nothing
    assert assess_scope(SC, room, {}, {"max": 9, "low": 4, "high": 0}).severity is Severity.NONE
    assert scope_states(SC, room, {}, {"high": 0}, "warn")["events"] == (False, "no events")
    # a counter that went backwards (cgroup recreated) is not a rise
    assert scope_states(SC, room, {}, {"oom": -2}, "kill")["events"] == (False, "no events")


def test_events_several_counters_listed() -> None:
    sc = dataclasses.replace(SC, events={"warn": ("high", "max"), "term": (),
                                         "kill": ("oom", "oom_kill")})
    assert assess_scope(sc, with_room(500 * MiB), {}, {"oom": 1, "oom_kill": 2}) == Verdict(
        Severity.KILL, "kill: memory.events oom +1, oom_kill +2")
    assert scope_states(sc, with_room(500 * MiB), {}, {"max": 1}, "term")["events"] == (
        False, "no events")


def test_when_and_needs_every_source() -> None:
    sc = dataclasses.replace(SC, when=when("headroom & psi"))
    at_kill = with_room(KILL_BOUND)
    assert assess_scope(sc, at_kill, {}, {}) == Verdict(Severity.NONE, "")
    assert assess_scope(sc, at_kill, {"warn": True}, {}) == Verdict(
        Severity.WARN, "warn: headroom 30 MiB <= 100 MiB of limit 1000 MiB, "
                       "PSI some 300000 2000000")
    assert assess_scope(sc, at_kill, {"warn": True, "kill": True}, {}).severity is Severity.KILL


def test_when_or_of_ands() -> None:
    sc = dataclasses.replace(SC, when=when("headroom & psi | events"))
    room = with_room(500 * MiB)
    assert assess_scope(sc, room, {"kill": True}, {}).severity is Severity.NONE
    assert assess_scope(sc, room, {"kill": True}, {"oom": 1}) == Verdict(
        Severity.KILL, "kill: memory.events oom +1")
    assert assess_scope(sc, with_room(KILL_BOUND), {"kill": True}, {"oom": 1}) == Verdict(
        Severity.KILL, "kill: headroom 30 MiB <= 30 MiB of limit 1000 MiB, "
                       "PSI full 600000 2000000")


def test_when_headroom_only_ignores_psi_and_events() -> None:
    sc = dataclasses.replace(SC, when=when("headroom"))
    assert assess_scope(sc, with_room(500 * MiB), {"warn": True, "kill": True},
                        {"high": 1, "oom": 1}).severity is Severity.NONE


def test_highest_level_wins_across_sources() -> None:
    # headroom at warn, events at kill: kill
    assert assess_scope(SC, with_room(WARN_BOUND), {}, {"oom": 1}) == Verdict(
        Severity.KILL, "kill: memory.events oom +1")


# --- CgroupScope on a fixture cgroup ----------------------------------------------------------


def write_memory(d: Path, *, current: int | None, mx: int | str | None = None,
                 high: int | str | None = None, inactive_file: int = 0,
                 events: Mapping[str, int] | None = None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, value in (("memory.current", current), ("memory.max", mx),
                        ("memory.high", high)):
        if value is None:
            (d / name).unlink(missing_ok=True)
        else:
            (d / name).write_text(f"{value}\n")
    (d / "memory.stat").write_text(f"anon 1\nfile 2\ninactive_file {inactive_file}\n")
    if events is None:
        (d / "memory.events").unlink(missing_ok=True)
    else:
        (d / "memory.events").write_text("".join(f"{k} {v}\n" for k, v in events.items()))
    (d / "cgroup.procs").touch()


EVENTS0 = {"low": 0, "high": 12, "max": 3, "oom": 3, "oom_kill": 1, "oom_group_kill": 0}


def pressure_text(some: float, full: float) -> str:
    return (f"some avg10={some:.2f} avg60=0.00 avg300=0.00 total=100\n"
            f"full avg10={full:.2f} avg60=0.00 avg300=0.00 total=50\n")


@pytest.fixture
def work(tmp_path: Path) -> tuple[Path, Path]:
    """(unified, cgroup dir): 1000 MiB limit, 500 MiB charged, memory.events, no
    memory.pressure (so PSI falls back)."""
    u = tmp_path / "u"
    d = u / "work"
    write_memory(d, current=500 * MiB, mx=LIMIT, high="max", events=EVENTS0)
    return u, d


def make_scope(u: Path, d: Path, sc: ScopeConfig = SC, *, poll_min: float = 0.01,
               poll_max: float = 1.0) -> CgroupScope:
    return CgroupScope(sc, sc.name, str(d), str(u), poll_min=poll_min, poll_max=poll_max)


def test_cgroup_scope_paths_and_capabilities(work: tuple[Path, Path]) -> None:
    u, d = work
    s = make_scope(u, d)
    assert (s.name, s.cgroup_dir, s.cgroup_path) == ("work", str(d), "/work")
    assert s.psi.fds == {}
    assert s.psi.fallback == f"cannot open {d}/memory.pressure: No such file or directory"
    assert s.capabilities() == (
        f"cgroup {d}; headroom: yes (limit 1000 MiB); psi: averages (cannot open "
        f"{d}/memory.pressure: No such file or directory); events: yes; cgroup.kill: no; "
        "unit: process")
    s.close()


def test_cgroup_scope_capabilities_variants(work: tuple[Path, Path]) -> None:
    u, d = work
    (d / "cgroup.kill").touch()
    sc = dataclasses.replace(SC, unit="cgroup", select="growth",
                             psi={"warn": None, "term": None, "kill": None})
    s = make_scope(u, d, sc)
    assert s.capabilities() == (f"cgroup {d}; headroom: yes (limit 1000 MiB); psi: off; "
                                "events: yes; cgroup.kill: yes; unit: cgroup by growth")
    write_memory(d, current=500 * MiB, mx="max", high="max", events=None)
    s2 = make_scope(u, d, sc)
    assert s2.capabilities() == (f"cgroup {d}; headroom: no (memory.max and memory.high are "
                                 "'max'); psi: off; events: no (no memory.events); "
                                 "cgroup.kill: yes; unit: cgroup by growth")
    write_memory(d, current=None, events=None)
    s3 = make_scope(u, d, sc)
    assert s3.capabilities() == (f"cgroup {d}; headroom: no (no memory.current: the memory "
                                 "controller is not enabled for this cgroup); psi: off; "
                                 "events: no (no memory.events); cgroup.kill: yes; "
                                 "unit: cgroup by growth")


def test_cgroup_scope_look(work: tuple[Path, Path]) -> None:
    u, d = work
    s = make_scope(u, d)
    look = s.look(1000.0)
    assert look.verdict == Verdict(Severity.NONE, "")
    assert look.available == 500 * MiB
    assert look.figures == {
        "cgroup": str(d), "current": 500 * MiB, "limit": LIMIT, "headroom": 500 * MiB,
        "events": EVENTS0, "levels": {"warn": WARN_BOUND, "term": None, "kill": KILL_BOUND}}
    assert s.last is look


def test_cgroup_scope_look_at_the_headroom_bounds(work: tuple[Path, Path]) -> None:
    u, d = work
    s = make_scope(u, d)
    write_memory(d, current=LIMIT - WARN_BOUND, mx=LIMIT, events=EVENTS0)
    assert s.look(1.0).verdict == Verdict(
        Severity.WARN, "warn: headroom 100 MiB <= 100 MiB of limit 1000 MiB")
    write_memory(d, current=LIMIT - KILL_BOUND - 1, mx=LIMIT, events=EVENTS0)
    assert s.look(2.0).verdict.severity is Severity.WARN
    write_memory(d, current=LIMIT - 20 * MiB, mx=2 * LIMIT, high=LIMIT, inactive_file=10 * MiB,
                 events=EVENTS0)
    assert s.look(3.0).verdict == Verdict(
        Severity.KILL, "kill: headroom 30 MiB <= 30 MiB of limit 1000 MiB")


def test_cgroup_scope_events_delta_between_looks(work: tuple[Path, Path]) -> None:
    u, d = work
    s = make_scope(u, d)
    # First look: the counters are already high, but there is nothing to compare with.
    assert s.look(1.0).verdict == Verdict(Severity.NONE, "")
    write_memory(d, current=500 * MiB, mx=LIMIT, events={**EVENTS0, "high": 15})
    assert s.look(2.0).verdict == Verdict(Severity.WARN, "warn: memory.events high +3")
    write_memory(d, current=500 * MiB, mx=LIMIT, events={**EVENTS0, "high": 16, "oom": 4})
    assert s.look(3.0).verdict == Verdict(Severity.KILL, "kill: memory.events oom +1")
    # Unchanged since the previous look: no delta, no verdict.
    assert s.look(4.0).verdict == Verdict(Severity.NONE, "")
    assert s.look(4.0).figures["events"] == {**EVENTS0, "high": 16, "oom": 4}


def test_cgroup_scope_psi_fallback_reads_averages(work: tuple[Path, Path]) -> None:
    u, d = work
    s = make_scope(u, d)
    assert s.look(1.0).verdict.severity is Severity.NONE
    (d / "memory.pressure").write_text(pressure_text(some=15.0, full=29.99))
    assert s.look(2.0).verdict == Verdict(Severity.WARN, "warn: PSI some 300000 2000000")
    (d / "memory.pressure").write_text(pressure_text(some=40.0, full=30.0))
    assert s.look(3.0).verdict == Verdict(Severity.KILL, "kill: PSI full 600000 2000000")
    (d / "memory.pressure").write_text(pressure_text(some=14.99, full=0.0))
    assert s.look(4.0).verdict.severity is Severity.NONE
    sample = s.sample()
    assert (sample.psi_some_avg10, sample.psi_full_avg10) == (14.99, 0.0)


def test_cgroup_scope_sample(work: tuple[Path, Path]) -> None:
    u, d = work
    s = make_scope(u, d)
    before = s.sample()
    assert before.mem_available is None
    assert before.distance == {"warn": None, "term": None, "kill": None}
    s.look(1.0)
    sample = s.sample()
    assert sample.scope == "work"
    assert sample.mem_available == 500 * MiB
    assert sample.swap_free is None
    assert sample.distance == {"warn": 500 * MiB - WARN_BOUND, "term": None,
                               "kill": 500 * MiB - KILL_BOUND}
    assert (sample.psi_some_avg10, sample.psi_full_avg10) == (None, None)


def expected_interval(headroom: int, bound: int = KILL_BOUND, rate: float = ASSUMED_FILL_RATE,
                      poll_min: float = 0.01, poll_max: float = 1.0) -> float:
    return min(max((headroom - bound) / rate / 2, poll_min), poll_max)


def test_cgroup_scope_interval_shrinks_towards_the_kill_bound(work: tuple[Path, Path]) -> None:
    u, d = work
    s = make_scope(u, d, poll_min=0.001, poll_max=1.0)
    assert s.interval() == 1.0  # no look yet
    got = []
    # Looks 1000 s apart: the observed fall rate stays far below the assumed burst rate.
    for i, room in enumerate((900 * MiB, 600 * MiB, 300 * MiB, 100 * MiB, 40 * MiB)):
        write_memory(d, current=LIMIT - room, mx=LIMIT, events=EVENTS0)
        s.look(1000.0 * i)
        got.append(s.interval())
        assert got[-1] == pytest.approx(expected_interval(room, poll_min=0.001))
    assert got == sorted(got, reverse=True)
    assert len(set(got)) == len(got)
    write_memory(d, current=LIMIT - KILL_BOUND, mx=LIMIT, events=EVENTS0)
    s.look(9000.0)
    assert s.interval() == 0.001
    write_memory(d, current=LIMIT + MiB, mx=LIMIT, events=EVENTS0)
    s.look(10000.0)
    assert s.interval() == 0.001


def test_cgroup_scope_interval_uses_term_when_it_is_higher(work: tuple[Path, Path]) -> None:
    u, d = work
    sc = dataclasses.replace(SC, headroom={"warn": Level((Threshold(percent=10.0),)),
                                           "term": Level((Threshold(percent=5.0),)),
                                           "kill": Level((Threshold(percent=3.0),))})
    s = make_scope(u, d, sc, poll_min=0.001)
    write_memory(d, current=LIMIT - 300 * MiB, mx=LIMIT, events=EVENTS0)
    s.look(0.0)
    assert s.interval() == pytest.approx(expected_interval(300 * MiB, bound=50 * MiB,
                                                           poll_min=0.001))


def test_cgroup_scope_interval_clamped_to_poll_max_with_plenty_of_room(
        tmp_path: Path) -> None:
    u = tmp_path / "u"
    d = u / "big"
    write_memory(d, current=10 * GiB, mx=100 * GiB, events=EVENTS0)
    s = make_scope(u, d)
    s.look(0.0)
    assert s.interval() == 1.0


def test_cgroup_scope_interval_faster_when_headroom_falls_fast(work: tuple[Path, Path]) -> None:
    u, d = work
    slow, fast = make_scope(u, d, poll_min=0.0001), make_scope(u, d, poll_min=0.0001)
    # A short time constant: with the default (0.25 s) no fall within a 1000 MiB limit
    # can raise the averaged rate above the 4 GiB/s assumed burst rate.
    fast.fall.tau = 0.005
    write_memory(d, current=LIMIT - 900 * MiB, mx=LIMIT, events=EVENTS0)
    slow.look(0.0)
    fast.look(0.0)
    write_memory(d, current=LIMIT - 500 * MiB, mx=LIMIT, events=EVENTS0)
    slow.look(1000.0)  # 400 MiB in 1000 s
    fast.look(0.01)    # 400 MiB in 10 ms: 39 GiB/s, above the assumed burst rate
    assert fast.fall.rate > ASSUMED_FILL_RATE
    assert slow.interval() == pytest.approx(expected_interval(500 * MiB, poll_min=0.0001))
    assert fast.interval() == pytest.approx(
        expected_interval(500 * MiB, rate=fast.fall.rate, poll_min=0.0001))
    assert fast.interval() < slow.interval()


@pytest.mark.parametrize(("current", "mx", "high"), [
    (500 * MiB, "max", "max"),
    (None, None, None),
    (500 * MiB, None, None),
])
def test_cgroup_scope_interval_without_headroom_is_poll_max(
        tmp_path: Path, current: int | None, mx: str | None, high: str | None) -> None:
    u = tmp_path / "u"
    d = u / "w"
    write_memory(d, current=current, mx=mx, high=high, events=EVENTS0)
    s = make_scope(u, d, poll_max=7.5)
    assert s.look(0.0).available is None
    assert s.interval() == 7.5


def test_cgroup_scope_interval_with_headroom_levels_off(work: tuple[Path, Path]) -> None:
    u, d = work
    sc = dataclasses.replace(SC, headroom={"warn": Level((Threshold(percent=10.0),)),
                                           "term": Level(), "kill": Level()})
    s = make_scope(u, d, sc, poll_max=3.0)
    s.look(0.0)
    assert s.interval() == 3.0


def test_cgroup_scope_look_after_removal(work: tuple[Path, Path]) -> None:
    u, d = work
    s = make_scope(u, d)
    s.look(0.0)
    shutil.rmtree(d)
    with pytest.raises(CgroupGone) as info:
        s.look(1.0)
    assert info.value.path == str(d)


# --- scope_name / resolve_scopes ----------------------------------------------------------


def test_scope_name_plain_and_glob() -> None:
    assert scope_name(ScopeConfig(name="db", cgroup="system.slice/db.service"),
                      "/system.slice/db.service") == "db"
    for pattern in ("system.slice/*.service", "a/b?", "a/[xy]"):
        assert scope_name(ScopeConfig(name="g", cgroup=pattern), "/a/x") == "g@/a/x"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    u = tmp_path / "u"
    for rel in ("system.slice/a.service", "system.slice/b.service", "system.slice/c.socket",
                "user.slice/user-1000.slice/session-1.scope"):
        (u / rel).mkdir(parents=True)
        (u / rel / "cgroup.procs").touch()
    (u / "system.slice" / "memory.current").write_text("1\n")
    return u


def test_resolve_scopes_two_scopes(tree: Path) -> None:
    u = str(tree)
    svc = ScopeConfig(name="svc", cgroup="system.slice/*.service")
    user = ScopeConfig(name="user", cgroup="/user.slice/user-1000.slice")
    cfg = Config(scopes=(svc, user))
    assert resolve_scopes(cfg, u) == {
        "svc@/system.slice/a.service": (svc, f"{u}/system.slice/a.service"),
        "svc@/system.slice/b.service": (svc, f"{u}/system.slice/b.service"),
        "user": (user, f"{u}/user.slice/user-1000.slice"),
    }


def test_resolve_scopes_absolute_no_match_and_appearing(tree: Path) -> None:
    u = str(tree)
    absolute = ScopeConfig(name="abs", cgroup=f"{u}/system.slice")
    nothing = ScopeConfig(name="none", cgroup="machine.slice/*")
    every = ScopeConfig(name="all", cgroup="system.slice/*")
    cfg = Config(scopes=(absolute, nothing, every))
    assert resolve_scopes(cfg, u) == {
        "abs": (absolute, f"{u}/system.slice"),
        "all@/system.slice/a.service": (every, f"{u}/system.slice/a.service"),
        "all@/system.slice/b.service": (every, f"{u}/system.slice/b.service"),
        "all@/system.slice/c.socket": (every, f"{u}/system.slice/c.socket"),
    }
    (tree / "machine.slice" / "vm1").mkdir(parents=True)
    shutil.rmtree(tree / "system.slice" / "a.service")
    names = set(resolve_scopes(cfg, u))
    assert "none@/machine.slice/vm1" in names
    assert "all@/system.slice/a.service" not in names
    assert resolve_scopes(Config(), u) == {}


def test_resolve_scopes_never_yields_the_root_cgroup(tree: Path) -> None:
    """The root cgroup is the machine scope ([[scope]] refuses "/" for that reason), yet
    cgroup.resolve maps "." and the cgroup2 mount path itself onto the mount: a cgroup
    scope on the whole machine, with headroom and events of the root."""
    u = str(tree)
    cfg = Config(scopes=(ScopeConfig(name="dot", cgroup="."),
                         ScopeConfig(name="mount", cgroup=u)))
    assert resolve_scopes(cfg, u) == {}


# --- preferences / rank with cgroup_preferences --------------------------------------------


def cand(pid: int, cgroup: str, *, name: str = "proc", rss: int = 100 * MiB,
         oom_score: int = 500, oom_score_adj: int = 0) -> Candidate:
    return Candidate(pid=pid, starttime=1000, name=name, cmdline=(name,),
                     exe=f"/usr/bin/{name}", uid=1000, cgroup=cgroup, rss=rss, swap=0,
                     oom_score=oom_score, oom_score_adj=oom_score_adj)


def test_preferences_one_read_per_distinct_cgroup_with_ancestors() -> None:
    calls: list[str] = []
    answers = {"/u/a/b": "omit", "/u/x": "avoid"}

    def read(path: str) -> str | None:
        calls.append(path)
        return answers.get(path)

    candidates = [cand(1, "/a/b/c"), cand(2, "/a/b/c"), cand(3, "/a/b/d"), cand(4, "/a"),
                  cand(5, "/x"), cand(6, ""), cand(7, "/"), cand(8, "/a/b")]
    assert preferences(candidates, "/u", read) == {"/a/b": "omit", "/x": "avoid"}
    assert sorted(calls) == sorted(["/u/a/b/c", "/u/a/b", "/u/a", "/u/a/b/d", "/u/x"])
    assert len(calls) == len(set(calls))


def test_preferences_without_unified_reads_nothing() -> None:
    def read(path: str) -> str | None:
        raise AssertionError(f"read {path}")

    assert preferences([cand(1, "/a")], "", read) == {}
    assert preferences([], "/u", read) == {}


def test_rank_omit_excludes_the_subtree() -> None:
    cands = [cand(1, "/a"), cand(2, "/a/b/c", oom_score=900), cand(3, "/ab"), cand(4, "/z")]
    ranked = policy.rank(cands, [], cgroup_preferences={"/a": "omit"})
    by = {r.candidate.pid: r for r in ranked}
    assert by[1].excluded == "user.oomd_omit on /a"
    assert by[2].excluded == "user.oomd_omit on /a"
    assert by[3].excluded is None       # /ab is not below /a
    assert by[4].excluded is None
    assert by[2].touched_by == ()
    assert [r.candidate.pid for r in ranked] == [3, 4, 2, 1]
    assert policy.choose(ranked) is by[3]


def test_rank_avoid_subtracts_and_is_listed() -> None:
    cands = [cand(1, "/x/y", oom_score=700), cand(2, "/z", oom_score=500)]
    ranked = policy.rank(cands, [], cgroup_preferences={"/x": "avoid"})
    by = {r.candidate.pid: r for r in ranked}
    assert by[1].score == 400
    assert by[1].touched_by == ("user.oomd_avoid on /x: -300",)
    assert by[1].excluded is None
    assert by[2].score == 500
    assert [r.candidate.pid for r in ranked] == [2, 1]


def test_rank_avoid_adds_to_rules() -> None:
    rule = Rule(action=Action.PREFER, name=re.compile("^hog$"))
    ranked = policy.rank([cand(1, "/x", name="hog", oom_score=100)], [rule],
                         cgroup_preferences={"/x": "avoid"})
    assert ranked[0].score == 100
    assert ranked[0].touched_by == ("rule 1 (prefer name=^hog$): +300",
                                    "user.oomd_avoid on /x: -300")


def test_rank_deepest_preference_wins() -> None:
    cands = [cand(1, "/a/b/c"), cand(2, "/a/z"), cand(3, "/a/b")]
    ranked = policy.rank(cands, [], cgroup_preferences={"/a": "omit", "/a/b": "avoid"})
    by = {r.candidate.pid: r for r in ranked}
    assert by[1].excluded is None
    assert by[1].touched_by == ("user.oomd_avoid on /a/b: -300",)
    assert by[3].touched_by == ("user.oomd_avoid on /a/b: -300",)
    assert by[2].excluded == "user.oomd_omit on /a"

    ranked = policy.rank(cands, [], cgroup_preferences={"/a": "avoid", "/a/b": "omit"})
    by = {r.candidate.pid: r for r in ranked}
    assert by[1].excluded == "user.oomd_omit on /a/b"
    assert by[1].touched_by == ()
    assert by[2].touched_by == ("user.oomd_avoid on /a: -300",)
    assert by[2].score == 200


def test_rank_omit_combines_with_other_reasons_and_scope() -> None:
    cands = [cand(1, "/s/a", oom_score_adj=-1000), cand(2, "/s/b")]
    ranked = policy.rank(cands, [], scope_cgroup="/s",
                         cgroup_preferences={"/s/a": "omit", "/s": "avoid"})
    by = {r.candidate.pid: r for r in ranked}
    assert by[1].excluded == "user.oomd_omit on /s/a; oom_score_adj -1000"
    assert by[2].excluded is None
    assert by[2].score == 200


# --- child_cgroups / pick_child --------------------------------------------------------------


@pytest.fixture
def scoped(tmp_path: Path) -> tuple[Path, Path]:
    """(unified, scope dir): children c1 (300 MiB), c2 (500 MiB, with c2/leaf),
    c3 (100 MiB, some avg10 50), empty (0)."""
    u = tmp_path / "u"
    s = u / "s"
    for rel, current in (("c1", 300 * MiB), ("c2", 500 * MiB), ("c2/leaf", 400 * MiB),
                         ("c3", 100 * MiB), ("empty", 0)):
        write_memory(s / rel, current=current, mx="max", events=EVENTS0)
    (s / "c3" / "memory.pressure").write_text(pressure_text(some=50.0, full=10.0))
    (s / "memory.current").write_text(f"{900 * MiB}\n")
    return u, s


def scoped_candidates() -> list[Candidate]:
    return [cand(1, "/s/c1", rss=280 * MiB), cand(2, "/s/c2/leaf", rss=400 * MiB),
            cand(3, "/s/c2", name="helper", rss=50 * MiB), cand(4, "/s/c3", rss=90 * MiB),
            cand(5, "/other", name="outsider", rss=10 * MiB)]


def children_of(u: Path, s: Path, candidates: list[Candidate], *,
                rules: tuple[Rule, ...] = (), min_rss: int = 0,
                prefs: Mapping[str, str] | None = None,
                previous: Mapping[str, int] | None = None,
                interval: float = 5.0) -> list[ChildCgroup]:
    ranked = policy.rank(candidates, rules, min_rss=min_rss, scope_cgroup="/s",
                         cgroup_preferences=prefs)
    return child_cgroups(str(s), str(u), candidates, ranked, previous=previous or {},
                         interval=interval)


def test_child_cgroups_sizes_growth_pressure(scoped: tuple[Path, Path]) -> None:
    u, s = scoped
    got = children_of(u, s, scoped_candidates(),
                      previous={str(s / "c1"): 200 * MiB, str(s / "c2"): 600 * MiB},
                      interval=5.0)
    assert got == [
        ChildCgroup(str(s / "c1"), 300 * MiB, 20 * MiB, 0.0, None),
        ChildCgroup(str(s / "c2"), 500 * MiB, -20 * MiB, 0.0, None),
        ChildCgroup(str(s / "c3"), 100 * MiB, 0.0, 50.0, None),
        ChildCgroup(str(s / "empty"), 0, 0.0, 0.0, "no processes"),
    ]


def test_child_cgroups_without_memory_controller_sum_rss(scoped: tuple[Path, Path]) -> None:
    u, s = scoped
    for rel in ("c1", "c2", "c3", "empty"):
        (s / rel / "memory.current").unlink()
    got = children_of(u, s, scoped_candidates(), previous={str(s / "c2"): 350 * MiB},
                      interval=2.0)
    assert [(c.path, c.size, c.growth) for c in got] == [
        (str(s / "c1"), 280 * MiB, 0.0),
        (str(s / "c2"), 450 * MiB, 50 * MiB),  # leaf 400 + helper 50, grown 100 in 2 s
        (str(s / "c3"), 90 * MiB, 0.0),
        (str(s / "empty"), 0, 0.0),
    ]


def test_child_cgroups_growth_needs_a_positive_interval(scoped: tuple[Path, Path]) -> None:
    u, s = scoped
    got = children_of(u, s, scoped_candidates(), previous={str(s / "c1"): 0}, interval=0.0)
    assert got[0].growth == 0.0


def test_child_cgroups_protected_process_excludes_its_child(scoped: tuple[Path, Path]) -> None:
    u, s = scoped
    rules = (Rule(action=Action.PROTECT, name=re.compile("^helper$")),)
    got = {c.path: c.excluded for c in children_of(u, s, scoped_candidates(), rules=rules)}
    assert got == {
        str(s / "c1"): None,
        str(s / "c2"): "holds 3 'helper': protected by rule 1 (protect name=^helper$)",
        str(s / "c3"): None,
        str(s / "empty"): "no processes",
    }


def test_child_cgroups_oom_score_adj_and_omit_exclude(scoped: tuple[Path, Path]) -> None:
    u, s = scoped
    candidates = scoped_candidates()
    candidates[3] = cand(4, "/s/c3", name="guard", rss=90 * MiB, oom_score_adj=-1000)
    got = {c.path: c.excluded for c in children_of(u, s, candidates,
                                                   prefs={"/s/c2/leaf": "omit"})}
    assert got == {
        str(s / "c1"): None,
        str(s / "c2"): "holds 2 'proc': user.oomd_omit on /s/c2/leaf",
        str(s / "c3"): "holds 4 'guard': oom_score_adj -1000",
        str(s / "empty"): "no processes",
    }


def test_child_cgroups_ignore_processes_outside_the_scope(scoped: tuple[Path, Path]) -> None:
    """The outsider is excluded ("outside scope") from the ranking; that must not mark
    any child, and a protected process outside the scope marks none either."""
    u, s = scoped
    rules = (Rule(action=Action.PROTECT, name=re.compile("^outsider$")),)
    got = children_of(u, s, scoped_candidates(), rules=rules)
    assert [c.excluded for c in got] == [None, None, None, "no processes"]


def test_child_cgroups_small_process_below_min_rss_does_not_exclude_its_child(
        scoped: tuple[Path, Path]) -> None:
    """min_rss only keeps small processes from being chosen one by one; it does not
    mean they must not die (the docstring: protect rule, oom_score_adj -1000,
    user.oomd_omit).  The daemon ranks with cfg.min_rss before choosing a child."""
    u, s = scoped
    ranked_excluded = policy.rank(scoped_candidates(), [], min_rss=64 * MiB, scope_cgroup="/s")
    helper = next(r for r in ranked_excluded if r.candidate.pid == 3)
    assert helper.excluded == "rss 50.0 MiB below min_rss 64.0 MiB"
    got = {c.path: c.excluded for c in children_of(u, s, scoped_candidates(), min_rss=64 * MiB)}
    assert got[str(s / "c2")] is None
    assert pick_child(children_of(u, s, scoped_candidates(), min_rss=64 * MiB),
                      "size") == ChildCgroup(str(s / "c2"), 500 * MiB, 0.0, 0.0, None)


def test_child_cgroups_child_removed_mid_scan(scoped: tuple[Path, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    u, s = scoped
    real = cgroup.children

    def listed_then_removed(d: str) -> list[str]:
        out = real(d)
        shutil.rmtree(s / "c2")
        return out

    monkeypatch.setattr(cgroup, "children", listed_then_removed)
    got = children_of(u, s, scoped_candidates())
    assert [c.path for c in got] == [str(s / "c1"), str(s / "c3"), str(s / "empty")]


def test_child_cgroups_of_a_removed_scope(scoped: tuple[Path, Path]) -> None:
    u, s = scoped
    shutil.rmtree(s)
    assert children_of(u, s, scoped_candidates()) == []


def test_child_cgroups_hostile_pressure_reads_as_zero(scoped: tuple[Path, Path]) -> None:
    u, s = scoped
    (s / "c1" / "memory.pressure").write_bytes(b"some avg10=lots avg60=0\n")
    (s / "c2" / "memory.pressure").mkdir()
    (s / "c3" / "memory.pressure").write_bytes(b"\xff\xfe\x00garbage\n")
    got = children_of(u, s, scoped_candidates())
    assert [c.pressure for c in got] == [0.0, 0.0, 0.0, 0.0]


def child(name: str, size: int, growth: float, pressure: float,
          excluded: str | None = None) -> ChildCgroup:
    return ChildCgroup(f"/u/s/{name}", size, growth, pressure, excluded)


def test_pick_child_by_size_growth_pressure() -> None:
    a = child("a", 300, 10.0, 1.0)
    b = child("b", 200, 50.0, 0.0)
    c = child("c", 100, 5.0, 80.0)
    x = child("x", 900, 900.0, 99.0, "holds 1 'sshd': protected by rule 1")
    e = child("e", 0, 0.0, 0.0, "no processes")
    kids = [a, b, c, x, e]
    assert pick_child(kids, "size") is a
    assert pick_child(kids, "growth") is b
    assert pick_child(kids, "pressure") is c


def test_pick_child_ties_go_to_the_larger() -> None:
    small = child("small", 100, 10.0, 5.0)
    big = child("big", 400, 10.0, 5.0)
    assert pick_child([small, big], "growth") is big
    assert pick_child([big, small], "pressure") is big


def test_pick_child_none_when_nothing_eligible() -> None:
    assert pick_child([], "size") is None
    assert pick_child([child("x", 900, 1.0, 1.0, "no processes"),
                       child("y", 10, 1.0, 1.0, "holds 2 'x': oom_score_adj -1000")],
                      "growth") is None


def test_pick_child_on_the_fixture(scoped: tuple[Path, Path]) -> None:
    u, s = scoped
    got = children_of(u, s, scoped_candidates(), previous={str(s / "c3"): 0}, interval=1.0)
    picked = {sel: pick_child(got, sel) for sel in ("size", "growth", "pressure")}
    assert {k: v.path if v else None for k, v in picked.items()} == {
        "size": str(s / "c2"), "growth": str(s / "c3"), "pressure": str(s / "c3")}
