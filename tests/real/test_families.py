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
    MemoryCgroup,
    Scenario,
    daemon_config,
    memcgs,  # noqa: F401  (fixture)
    mrelease_without_our_kill,
    run_guarded,
)

from mreaper.hogs import GiB, MiB
from mreaper.linux import procfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: memory cgroups")

# A pool: a parent that holds `shared` bytes and forks `n` children; each child names
# itself <prefix><i>, touches `private` bytes of its own and waits; on each byte read
# from stdin ("g") every child grows by `step` bytes every 20 ms, `steps` times.  With
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
                time.sleep(0.02)
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
                 steps: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", POOL, cg.procs_file, parent, prefix, str(shared),
             str(private), str(n), "1" if respawn else "0", str(step), str(steps)],
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
        super().__init__(may_signal)
        self.gate = gate
        self.reap_delay = reap_delay

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
