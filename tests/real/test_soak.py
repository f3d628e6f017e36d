"""Soak: 1,000 kill-and-reap cycles in one run, and nothing of ours grows.

Each victim is a tiny C process in one bounded memory cgroup that holds 1 MiB of
private anonymous memory; victims are killed ten at a time through a two-worker
ReaperPool.  After a 20-cycle warm-up (the pool's threads, the first pidfds, lazy
imports) the test process must end the 1,000 cycles with the same open file
descriptors and threads, at most 1 MiB more resident memory, every victim dead by
SIGKILL with its memory back, and the memory cgroup back to where it started.
"""

from __future__ import annotations

import collections
import os
import select
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from helpers import compile_c
from mreaper.hogs import MemoryCgroup, MiB
from mreaper.reap import KillOptions, ReaperPool, Victim

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: memory cgroups")]

CYCLES = 1000
WARM_UP = 20
BATCH = 10
VICTIM_SIZE = 1 * MiB
RSS_SLACK = 1 * MiB

# Joins the memory cgroup (argv[1], its cgroup.procs), touches argv[2] bytes of private
# anonymous memory, writes one byte to stdout, waits.  Dies with its parent.
VICTIM_C = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3 || prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() == 1)
        return 1;
    FILE *f = fopen(argv[1], "w");
    if (!f || fprintf(f, "%d", (int)getpid()) < 0 || fclose(f) != 0)
        return 1;
    size_t size = strtoull(argv[2], NULL, 10);
    char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return 1;
    memset(mem, 1, size);
    if (write(1, "r", 1) != 1)
        return 1;
    for (;;)
        pause();
}
"""


@pytest.fixture(scope="module")
def victim_binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(compile_c(VICTIM_C, tmp_path_factory.mktemp("soak") / "victim"))


@pytest.fixture
def memcg() -> Iterator[MemoryCgroup]:
    cg = MemoryCgroup.create(limit=64 * MiB)
    try:
        yield cg
    finally:
        cg.remove()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def self_status(key: str) -> int:
    """A number from /proc/self/status (the first word of its value)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise KeyError(key)


def vm_rss() -> int:
    return self_status("VmRSS") * 1024  # kB


def os_threads() -> int:
    return self_status("Threads")


class Soak:
    """Spawns victims into `cg` and kills them through `pool`, keeping only counts (a
    list of reports would itself grow the resident memory being measured)."""

    def __init__(self, binary: str, cg: MemoryCgroup, pool: ReaperPool) -> None:
        self.binary, self.cg, self.pool = binary, cg, pool
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.cycles = self.exited = self.free_seen = self.sigkilled = 0
        self.slowest_free = 0.0

    def run(self, cycles: int) -> None:
        done = 0
        while done < cycles:
            n = min(BATCH, cycles - done)
            self._batch(n)
            done += n

    def _batch(self, n: int) -> None:
        r, w = os.pipe()
        pids = []
        try:
            for _ in range(n):
                pids.append(os.posix_spawn(
                    self.binary, [self.binary, self.cg.procs_file, str(VICTIM_SIZE)], {},
                    file_actions=[(os.POSIX_SPAWN_DUP2, w, 1)]))
            os.close(w)
            w = -1
            ready = b""
            deadline = time.monotonic() + 30
            while len(ready) < n:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"only {len(ready)} of {n} victims ready"
                if select.select([r], [], [], remaining)[0]:
                    chunk = os.read(r, n)
                    assert chunk, "a victim died before it was ready"
                    ready += chunk
            futures = [self.pool.submit(Victim.open(pid), KillOptions(exit_timeout=10))
                       for pid in pids]
            for future in futures:
                report = future.result(timeout=30)
                self.outcomes[report.mrelease.value] += 1
                self.exited += report.exited
                if report.kill_to_free_s is not None:
                    self.free_seen += 1
                    self.slowest_free = max(self.slowest_free, report.kill_to_free_s)
        finally:
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)
            for pid in pids:  # our own children: reap them (and a leftover, if any)
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    os.kill(pid, signal.SIGKILL)  # unreaped child: its PID is its own
                    _, status = os.waitpid(pid, 0)
                self.sigkilled += os.WIFSIGNALED(status) and \
                    os.WTERMSIG(status) == signal.SIGKILL
        self.cycles += n


def wait_usage(cg: MemoryCgroup, at_most: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (usage := cg.usage()) > at_most and time.monotonic() < deadline:
        time.sleep(0.01)
    return usage


def test_1000_kill_and_reap_cycles_leak_nothing(victim_binary: str, memcg: MemoryCgroup,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    baseline = memcg.usage()
    started = time.monotonic()
    with ReaperPool(2) as pool:
        soak = Soak(victim_binary, memcg, pool)
        soak.run(WARM_UP)
        before = (fd_count(), threading.active_count(), os_threads())
        rss_before = vm_rss()
        soak.run(CYCLES)
        after = (fd_count(), threading.active_count(), os_threads())
        rss_after = vm_rss()
    elapsed = time.monotonic() - started
    usage = wait_usage(memcg, baseline + MiB)
    with capsys.disabled():
        print(f"\n  soak: {soak.cycles} kill-and-reap cycles in {elapsed:.1f} s; "
              f"outcomes {dict(soak.outcomes)}; slowest kill-to-free "
              f"{soak.slowest_free * 1000:.1f} ms; VmRSS {rss_before // 1024} -> "
              f"{rss_after // 1024} KiB; fds/threads {before} -> {after}; memcg "
              f"{baseline // 1024} -> {usage // 1024} KiB")
    assert soak.cycles == WARM_UP + CYCLES
    assert after == before, "(fds, Python threads, OS threads) changed over the soak"
    assert rss_after - rss_before <= RSS_SLACK, (rss_before, rss_after)
    assert soak.sigkilled == soak.exited == soak.cycles, vars(soak)
    assert soak.free_seen == soak.cycles, vars(soak)  # each report saw its memory back
    assert set(soak.outcomes) <= {"reaped", "exited-first"}, soak.outcomes
    assert usage <= baseline + MiB, (baseline, usage)
