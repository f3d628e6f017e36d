"""scan() against the real /proc: real processes, real kernel threads, and its cost."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mreaper import policy
from mreaper.linux import procfs

SLEEP = shutil.which("sleep")
pytestmark = pytest.mark.skipif(SLEEP is None, reason="no sleep binary")


def _wait_exec(procs: list[subprocess.Popen[bytes]], name: str, timeout: float = 10.0) -> None:
    """Wait until every child has finished exec'ing `name`.

    The comm alone is not enough: execve sets it in begin_new_exec(), before
    create_elf_tables() sets mm->arg_start, so for a moment the new program
    has its name but an empty /proc/<pid>/cmdline (CI saw exactly that).
    """
    deadline = time.monotonic() + timeout
    for p in procs:
        while procfs.read_stat(p.pid).comm != name or not procfs.read_cmdline(p.pid):
            assert time.monotonic() < deadline, f"{p.pid} did not exec {name}"
            time.sleep(0.001)


@contextmanager
def _spawn_sleeps(n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([str(SLEEP), "3600"], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_exec(procs, "sleep")
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    with _spawn_sleeps(1) as procs:
        yield procs[0]


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    with _spawn_sleeps(1000) as procs:
        yield procs


def test_scan_finds_a_sleep(sleeper: subprocess.Popen[bytes]) -> None:
    candidates, warnings = policy.scan()
    assert warnings == []
    found = {c.pid: c for c in candidates}
    c = found[sleeper.pid]
    assert c.name == "sleep"
    assert c.cmdline == (str(SLEEP), "3600")
    assert c.uid == os.getuid()
    assert c.rss > 0
    assert c.starttime == procfs.read_stat(sleeper.pid).starttime
    assert os.path.realpath(c.exe) == os.path.realpath(str(SLEEP))
    assert c.cgroup == procfs.read_cgroup(sleeper.pid).unified
    assert c.oom_score_adj == int(Path(f"/proc/{sleeper.pid}/oom_score_adj").read_text())
    chosen = policy.choose(policy.rank(candidates, []))
    assert chosen is not None


def test_scan_never_returns_init_self_parent_or_kthreads() -> None:
    kthreads = set()
    for pid in procfs.list_pids():
        try:
            stat = procfs.read_stat(pid)
        except procfs.ProcessGone:
            continue
        if stat.is_kernel_thread:
            kthreads.add(pid)
    assert kthreads, "expected kernel threads in /proc (kthreadd at least)"
    candidates, _ = policy.scan()
    pids = {c.pid for c in candidates}
    assert 1 not in pids
    assert os.getpid() not in pids
    assert os.getppid() not in pids
    assert not pids & kthreads
    assert all(c.rss + c.swap > 0 for c in candidates)


@pytest.mark.slow
def test_scan_finds_all_of_1000_sleeping_processes(
        sleepers: list[subprocess.Popen[bytes]]) -> None:
    """Correctness at scale; how long it takes is measured in bench/decision_scale.py,
    not asserted here (absolute times on a shared machine are noise)."""
    candidates, warnings = policy.scan()
    found = {c.pid for c in candidates}
    assert {p.pid for p in sleepers} <= found
    assert warnings == []
