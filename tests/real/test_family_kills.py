"""Many small allocators: kills paced by the victims' releases, ranked by what a kill frees.

Every process here is a forked child of a pool parent in a bounded memory cgroup: it
shares the parent's pages copy-on-write (counted in its RSS, freed by no kill of it) and
holds some of its own.  The daemon runs in this process behind the guarded syscall layer
of test_invariants (a real signal reaches only this run's own processes), with a
MemAvailable that feels only this test's memory cgroups (own_pressure), gated so that
pressure starts only when the pool is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
from test_invariants import (
    PREFIX,
    GuardedSyscalls,
    Leak,
    Scenario,
    daemon_config,
    memcgs,  # noqa: F401  (fixture)
    mrelease_without_our_kill,
    run_guarded,
)

from mreaper.config import Config
from mreaper.hogs import GiB, MemoryCgroup, MiB
from mreaper.linux import procfs
from mreaper.reap import Mrelease

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: memory cgroups")

# A pool: a parent that holds `shared` bytes and forks `n` children; each child names
# itself <prefix><i>, touches `private` bytes of its own and waits; on each byte read
# from stdin ("g") every child grows by `step` bytes every `pace` s, `steps` times.  With
# respawn=1 the parent forks a new child for each one that dies.  Prints "ready <pids>"
# and "respawned <pid>".  Everything dies with the test (PR_SET_PDEATHSIG).
POOL = r"""
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None)
libc.prctl(1, signal.SIGKILL)
if os.getppid() == 1:
    sys.exit(1)
procs, name, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
shared, private, n, respawn, step, steps = (int(x) for x in sys.argv[4:10])
pace = float(sys.argv[10])
with open(procs, "w") as f:
    f.write(str(os.getpid()))
with open("/proc/self/comm", "w") as f:
    f.write(name)
held = bytearray(b"\x01") * shared
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()

def kid(i):
    pid = os.fork()
    if pid:
        return pid
    try:
        libc.prctl(1, signal.SIGKILL)
        with open("/proc/self/comm", "w") as f:
            f.write(f"{prefix}{i}")
        own = [bytearray(b"\x02") * private]
        os.write(ready_w, b"r")
        while os.read(go_r, 1):
            for _ in range(steps):
                own.append(bytearray(b"\x03") * step)
                time.sleep(pace)
    finally:
        os._exit(0)

kids = {kid(i): i for i in range(n)}
for _ in range(n):
    os.read(ready_r, 1)
print("ready " + " ".join(map(str, kids)), flush=True)

def on_input():
    while True:
        b = os.read(0, 1)
        if not b:
            return
        os.write(go_w, b"g" * len(kids))

import threading
import time
threading.Thread(target=on_input, daemon=True).start()
while True:
    pid, _ = os.wait()
    i = kids.pop(pid, None)
    if respawn and i is not None:
        new = kid(i)
        kids[new] = i
        os.read(ready_r, 1)
        print(f"respawned {new}", flush=True)
"""


class Pool:
    """A pool parent and its forked children, in memory cgroup `cg`."""

    def __init__(self, cg: MemoryCgroup, parent: str, prefix: str, *, shared: int,
                 private: int, n: int, respawn: bool = False, step: int = 0,
                 steps: int = 0, pace: float = 0.02) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", POOL, cg.procs_file, parent, prefix, str(shared),
             str(private), str(n), "1" if respawn else "0", str(step), str(steps), str(pace)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.line(60)
        if not line.startswith("ready "):
            self.kill()
            raise RuntimeError(f"pool {parent} did not start: {line!r}")
        self.kids = [int(x) for x in line.split()[1:]]
        self.respawned: list[int] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().decode().strip() if r else ""

    def grow(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"g")
        self.proc.stdin.flush()

    def alive(self) -> list[int]:
        out = []
        for pid in self.kids:
            try:
                st = procfs.read_stat(pid)
            except (procfs.ProcessGone, procfs.ParseError):
                continue
            if st.ppid == self.pid and st.state not in ("Z", "X"):
                out.append(pid)
        return out

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()  # our own child; its children die with it (PDEATHSIG)
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def ours(test_pid: int, parents: Callable[[], set[int]],
         deny: Callable[[], set[int]] = set) -> Callable[[int], bool]:
    """The guard's rule: this run's token in the name, a child of this test or of one of
    its pool parents, not denied."""
    def may_signal(pid: int) -> bool:
        if pid in deny():
            return False
        try:
            st = procfs.read_stat(pid)
        except (procfs.ProcessGone, procfs.ParseError, OSError):
            return False
        return st.comm.startswith(PREFIX) and (st.ppid == test_pid or st.ppid in parents())
    return may_signal


class Gate:
    """MemAvailable as `base` until opened, then `base` less what `cgs` hold; every read
    (one per look of the machine scope) is counted, in order with the kills."""

    def __init__(self, cgs: list[MemoryCgroup], base: int) -> None:
        self.cgs, self.base = cgs, base
        self.open = threading.Event()
        self.lock = threading.Lock()
        self.timeline: list[tuple[str, int]] = []  # ("look", 0) | ("kill", pid)

    def __call__(self) -> procfs.MemInfo:
        real = procfs.read_meminfo()
        held = sum(cg.usage() for cg in self.cgs) if self.open.is_set() else 0
        with self.lock:
            self.timeline.append(("look", 0))
        return dataclasses.replace(real, mem_available=self.base - held)

    def mark(self, what: str, pid: int) -> None:
        with self.lock:
            self.timeline.append((what, pid))


class TimedGuard(GuardedSyscalls):
    """The guard, also putting each SIGKILL on the gate's timeline; process_mrelease
    first sleeps `reap_delay` seconds (a victim whose release is slow to come)."""

    def __init__(self, may_signal: Callable[[int], bool], gate: Gate,
                 reap_delay: float = 0.0) -> None:
        super().__init__(self.allowed)
        self.rule = may_signal
        self.ours_when_pinned: set[int] = set()
        self.gate = gate
        self.reap_delay = reap_delay

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        # A family dies parents first: by the time a worker's SIGKILL goes out, its
        # parent is dead and it was reparented.  It was ours when it was pinned.
        if self.rule(pid):
            self.ours_when_pinned.add(pid)
        return super().pidfd_open(pid, flags)

    def allowed(self, pid: int) -> bool:
        return pid in self.ours_when_pinned or self.rule(pid)

    def process_mrelease(self, pidfd: int, flags: int = 0) -> None:
        if self.reap_delay:
            time.sleep(self.reap_delay)
        super().process_mrelease(pidfd, flags)

    def pidfd_send_signal(self, pidfd: int, sig: int, flags: int = 0) -> None:
        super().pidfd_send_signal(pidfd, sig, flags)
        if sig == signal.SIGKILL:
            self.gate.mark("kill", self._pins.get(pidfd, (-1, -1))[1])


def private_of(pids: list[int]) -> list[int]:
    return [procfs.read_private(p) for p in pids]


def looks_between_kills(timeline: list[tuple[str, int]]) -> list[int]:
    """For each kill after the first, the looks since the kill before it."""
    out: list[int] = []
    looks = None
    for what, _ in timeline:
        if what == "kill":
            if looks is not None:
                out.append(looks)
            looks = 0
        elif looks is not None:
            looks += 1
    return out


@pytest.mark.parametrize("reap_delay", [0.0, 0.5], ids=["released-at-once", "slow-release"])
def test_kills_follow_the_releases_not_a_clock(memcgs: list[MemoryCgroup],  # noqa: F811
                                               reap_delay: float) -> None:
    """Forked children each holding 128 MiB shared with their parent and ~16 MiB of
    their own; pressure 2.5 children's worth under the kill level.  Each kill frees only
    the child's own pages (its RSS says ~9 times more).  The daemon kills exactly the
    three needed, each at the look after the one before, counted in looks: when a
    victim's memory is back and the level still holds, the next look acts (no settle
    time); when its release is slow (process_mrelease held back 0.5 s) and cannot cover
    the shortfall anyway, the next is killed without waiting for it (several in
    flight).  And no fourth kill for the same shortfall."""
    memcgs.append(MemoryCgroup.create(limit=1 * GiB))
    base = procfs.read_meminfo().mem_available
    gate = Gate(memcgs, base)
    pools: list[Pool] = []
    guard = TimedGuard(ours(os.getpid(), lambda: {p.pid for p in pools}), gate, reap_delay)
    pool = Pool(memcgs[0], "keeper", f"{PREFIX}-k", shared=128 * MiB, private=16 * MiB, n=8)
    pools.append(pool)
    own = private_of(pool.kids)
    assert all(8 * MiB < p < 40 * MiB for p in own), own  # the shared pages are not theirs
    usage = memcgs[0].usage()
    shortfall = sum(own) // len(own) * 5 // 2
    cfg = daemon_config(available=base, headroom=usage - shortfall,
                        extra={"kill": {"sort_by": "private"}})

    def scenario(s: Scenario) -> None:
        # Warn first, so the ranking reads private memory; then the kill level.
        gate.base = base + shortfall + (usage - shortfall) // 4
        gate.open.set()
        s.wait(lambda: s.daemon._cache is not None and any(
            r.candidate.private is not None for r in s.daemon._cache.peek()), 30,
            "a ranking with private memory")
        gate.base = base
        s.reported(3, timeout=30)
        s.wait(lambda: not any(sc.inflight for sc in s.daemon.scopes.values()), 10,
               "the kills to finish")
        # A few more looks with the pressure gone: nothing more dies.
        n = len(gate.timeline)
        s.wait(lambda: len(gate.timeline) > n + 20, 30, "more looks")

    run = run_guarded(cfg, scenario, guard, gate, [])
    try:
        killed = [r.pid for r in run.daemon.kills]
        assert len(killed) == 3, run.log
        assert sorted(set(pool.kids) - set(pool.alive())) == sorted(killed), run.log
        gaps = looks_between_kills(gate.timeline)
        # The look that acts and the daemon's one more look before its signal.
        assert gaps and all(g <= 3 for g in gaps), f"{gaps}\n" + "\n".join(run.log)
        for r in run.daemon.kills:
            assert r.holdings.private is not None and r.holdings.private < r.holdings.rss_anon
            assert r.kill_to_free_s is not None, r.human()  # the memory was seen back
            assert "not seen back" not in r.human()
        assert mrelease_without_our_kill(guard.calls) == []
    finally:
        pool.kill()


# --- families ----------------------------------------------------------------------------------


@dataclasses.dataclass
class FamilySetup:
    pool: Pool
    idle: Leak | None
    gate: Gate
    guard: TimedGuard
    cfg: Config

    def start(self, s: Scenario) -> None:
        """Pressure is felt once the ranking knows every worker; then the workers grow.
        Their growth counts from the start of the episode (the warn level)."""
        pool = self.pool
        s.wait(lambda: s.daemon._cache is not None and set(pool.kids) <= {
            r.candidate.pid for r in s.daemon._cache.peek()}, 30, "a ranking with the pool")
        self.gate.open.set()
        if self.idle is not None:  # the bystander alone holds the warn level
            s.wait(lambda: s.daemon.scopes["machine"].episode_since is not None, 30, "warn")
        pool.grow()


def family_setup(cgs: list[MemoryCgroup], *, respawn: bool = False, bystander: int = 0,
                 rules: tuple[dict[str, object], ...] = ()) -> FamilySetup:
    """A pool of 30 forked workers (2 MiB each of their own, 8 MiB more each when told
    to grow) and an idle bystander holding `bystander` bytes, each in its own memcg."""
    cgs += [MemoryCgroup.create(limit=1 * GiB), MemoryCgroup.create(limit=1 * GiB)]
    base = procfs.read_meminfo().mem_available
    gate = Gate(cgs, base)
    pools: list[Pool] = []
    guard = TimedGuard(ours(os.getpid(), lambda: {p.pid for p in pools}), gate)
    idle = None
    if bystander:
        idle = Leak(cgs[1], "idle", step=16 * MiB, interval=0.0)
        idle.grow(bystander)
        idle.grown()
    pool = Pool(cgs[0], f"{PREFIX}-pool", f"{PREFIX}-w", shared=4 * MiB, private=2 * MiB,
                n=30, respawn=respawn, step=1 * MiB, steps=8, pace=0.1)
    pools.append(pool)
    usage = sum(cg.usage() for cg in cgs)
    # The kill level: 160 of the workers' 240 MiB of growth away.
    cfg = daemon_config(available=base, headroom=usage + 160 * MiB, rules=rules)
    return FamilySetup(pool, idle, gate, guard, cfg)


def test_a_growing_family_outranks_a_bigger_idle_process_and_dies_whole(
        memcgs: list[MemoryCgroup]) -> None:  # noqa: F811
    """30 workers of one parent, growing 8 MiB each; beside them an idle process of 250
    MiB, the biggest single process by far, and bigger than what the family holds when
    the kill level is crossed (earlyoom, nohang and mreaper before families killed it
    first).  The family outranks it by what it holds and how it grows: the parent and
    every worker die together, each reaped, and the bystander lives."""
    f = family_setup(memcgs, bystander=250 * MiB)
    pool, idle, guard = f.pool, f.idle, f.guard
    assert idle is not None
    try:
        def scenario(s: Scenario) -> None:
            f.start(s)
            s.wait(lambda: pool.proc.poll() is not None, 60, "the pool to die")
            s.wait(lambda: not any(sc.inflight for sc in s.daemon.scopes.values()), 30,
                   "the family's report")

        run = run_guarded(f.cfg, scenario, guard, f.gate, [])
        assert idle.proc.poll() is None, "\n".join(run.log)  # the bystander lives
        assert pool.proc.returncode == -signal.SIGKILL
        assert pool.alive() == []
        killed = [line for line in run.log if "killed family tree of" in line]
        assert len(killed) == 1, "\n".join(run.log)
        assert f"({len(pool.kids) + 1} processes" in killed[0]
        signalled = {pid for pid, sig in guard.signalled() if sig == signal.SIGKILL}
        assert signalled == {pool.pid, *pool.kids}, "\n".join(run.log)
        # Every member reaped by process_mrelease after its own SIGKILL (or gone first),
        # all in the one report.
        outcomes = re.findall(r"(\d+) '[^']*' (\S+?)[,)]", killed[0])
        assert {int(pid) for pid, _ in outcomes} == signalled
        assert {o for _, o in outcomes} <= {Mrelease.REAPED.value, Mrelease.EXITED_FIRST.value}
        assert mrelease_without_our_kill(guard.calls) == []
        # Parents first: the pool's SIGKILL went out before any worker's.
        kills = [c.pid for c in guard.calls if c.name == "pidfd_send_signal" and c.sig]
        assert kills[0] == pool.pid, kills
    finally:
        pool.kill()
        idle.kill()


def test_a_family_with_one_protected_member_is_not_killed_whole(
        memcgs: list[MemoryCgroup]) -> None:  # noqa: F811
    """The same growing family, one worker protected by a rule: the family is never
    killed whole (single processes are, the protected worker is not)."""
    keep = f"^{PREFIX}-w7$"
    f = family_setup(memcgs, bystander=250 * MiB, rules=({"action": "protect", "name": keep},))
    pool, idle, guard = f.pool, f.idle, f.guard
    assert idle is not None
    protected = pool.kids[7]
    guard.rule = ours(os.getpid(), lambda: {pool.pid}, lambda: {protected})
    try:
        def scenario(s: Scenario) -> None:
            f.start(s)
            s.reported(1, timeout=60)

        run = run_guarded(f.cfg, scenario, guard, f.gate, [])
        assert not any("killing tree" in line or "killed family" in line for line in run.log), \
            "\n".join(run.log)
        assert protected in pool.alive()
        assert all(r.pid != protected for r in run.daemon.kills)
    finally:
        pool.kill()
        idle.kill()


def test_a_respawning_pool_is_killed_at_its_parent(memcgs: list[MemoryCgroup]) -> None:  # noqa: F811
    """A pool that forks a new worker for each one that dies, its workers growing: killing
    workers one by one never ends; the daemon kills the pool at its parent, with all its
    workers, once, and nothing respawns."""
    f = family_setup(memcgs, respawn=True)
    pool, guard = f.pool, f.guard
    try:
        def scenario(s: Scenario) -> None:
            f.start(s)
            s.wait(lambda: pool.proc.poll() is not None, 60, "the pool to die")
            s.wait(lambda: not any(sc.inflight for sc in s.daemon.scopes.values()), 30,
                   "the family's report")

        run = run_guarded(f.cfg, scenario, guard, f.gate, [])
        assert pool.proc.returncode == -signal.SIGKILL, "\n".join(run.log)
        killed = [line for line in run.log if "killed family tree of" in line]
        assert len(killed) == 1, "\n".join(run.log)
        kills = [c.pid for c in guard.calls if c.name == "pidfd_send_signal" and c.sig]
        assert kills[0] == pool.pid, kills  # at its parent, first
        assert pool.alive() == [] and memcgs[0].usage() < 64 * MiB
    finally:
        pool.kill()


def test_explain_shows_the_family_its_size_its_growth_and_why(
        memcgs: list[MemoryCgroup]) -> None:  # noqa: F811
    """`mreaper explain --growth S` looks twice, S seconds apart, and shows the families as
    the daemon ranks them: the pool's tree with its members, what it holds, how much it
    grew, and whether it may be killed whole."""
    memcgs.append(MemoryCgroup.create(limit=1 * GiB))
    pool = Pool(memcgs[0], f"{PREFIX}-pool", f"{PREFIX}-w", shared=4 * MiB, private=2 * MiB,
                n=12, step=1 * MiB, steps=60, pace=0.1)
    try:
        pool.grow()  # 1 MiB every 0.1 s each, for 6 s
        r = subprocess.run([sys.executable, "-m", "mreaper.cli", "explain", "--all",
                            "--growth", "2", "--protect", f"^{PREFIX}-w3$"],
                           capture_output=True, text=True, timeout=120, check=False,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        line = next((x for x in r.stdout.splitlines()
                     if x.startswith(f"tree of {pool.pid} '{PREFIX}-pool': 13 processes")), None)
        assert line is not None, r.stdout
        grown = re.search(r"grown ([\d.]+) MiB", line)
        assert grown and float(grown.group(1)) > 12, line  # 12 workers growing ~10 MiB/s
        # The protected worker keeps the tree from being killed whole, and explain says so.
        assert f"holds {pool.kids[3]} '{PREFIX}-w3', which must live" in line, line
    finally:
        pool.kill()


class ExitsWhenPinned(TimedGuard):
    """The guard, and one worker that loses its memory just as the daemon pins it: its
    parent is stopped (so it stays a zombie, unreaped) and the worker SIGKILLed by the
    test, then the pin goes through to the zombie."""

    def __init__(self, guard: TimedGuard, pool: Pool, worker: int) -> None:
        super().__init__(guard.rule, guard.gate)
        self.pool, self.worker, self.done = pool, worker, False

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        if pid == self.worker and not self.done:
            self.done = True
            os.kill(self.pool.pid, signal.SIGSTOP)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while procfs.read_stat(pid).state != "Z" and time.monotonic() < deadline:
                time.sleep(0.005)
        return super().pidfd_open(pid, flags)


def test_a_member_that_exits_as_it_is_pinned_does_not_save_the_family(
        memcgs: list[MemoryCgroup]) -> None:  # noqa: F811
    """One worker is gone (a zombie, no memory) by the time the daemon pins it for the
    family kill: the rest of the family still dies whole, in one kill, and the zombie is
    not signalled.  Before, the daemon gave the family up ("changed since it was ranked
    (no longer a candidate)") and killed one worker per decision, while in the lab VM
    the kernel OOM killer took the others."""
    f = family_setup(memcgs, bystander=250 * MiB)
    pool, idle = f.pool, f.idle
    assert idle is not None
    gone = pool.kids[5]
    guard = ExitsWhenPinned(f.guard, pool, gone)
    try:
        def scenario(s: Scenario) -> None:
            f.start(s)
            s.wait(lambda: pool.proc.poll() is not None, 60, "the pool to die")
            s.wait(lambda: not any(sc.inflight for sc in s.daemon.scopes.values()), 30,
                   "the family's report")

        run = run_guarded(f.cfg, scenario, guard, f.gate, [])
        assert guard.done, "the family kill never pinned the worker"
        assert idle.proc.poll() is None, "\n".join(run.log)
        killed = [line for line in run.log if "killed family tree of" in line]
        assert len(killed) == 1, "\n".join(run.log)
        assert f"({len(pool.kids)} processes" in killed[0], killed[0]
        signalled = {pid for pid, sig in guard.signalled() if sig == signal.SIGKILL}
        assert signalled == {pool.pid, *pool.kids} - {gone}, "\n".join(run.log)
        assert pool.alive() == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pool.pid, signal.SIGCONT)
        pool.kill()
        idle.kill()
