"""Fault injection: the kernel, the machine or the configuration fails, and mreaper goes on.

Faults come in through the swappable syscall layer (test_invariants.GuardedSyscalls,
which also keeps every real signal to this run's own hogs), through the daemon's
mounts file and PSI path, and through a hook that hangs and an events file on a full
disk.  Each daemon runs in this process with the levels just under the MemAvailable of
now and every name but this run's hogs protected (see test_invariants).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_invariants import (
    PREFIX,
    DaemonRun,
    GuardedSyscalls,
    Leak,
    Scenario,
    daemon_config,
    own_pressure,
    owned_by_test,
    run_daemon,
)

from mreaper.hogs import GiB, Hog, MemoryCgroup, MiB
from mreaper.linux import procfs
from mreaper.reap import KillOptions, KillReport, Mrelease, Victim, kill_and_reap
from mreaper.sinks import build_sink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: memory cgroups, mounts")

# What each process_mrelease errno must become in the report (reap.Mrelease).
OUTCOME = {
    errno.EAGAIN: Mrelease.RETRIES_EXHAUSTED,  # every attempt: the retries run out
    errno.EINTR: Mrelease.RETRIES_EXHAUSTED,
    errno.EINVAL: Mrelease.SHARED_MM,
    errno.ESRCH: Mrelease.EXITED_FIRST,
    errno.ENOSYS: Mrelease.UNSUPPORTED,
    errno.EBADF: Mrelease.FAILED,
}
ERRNOS = [pytest.param(e, id=errno.errorcode[e]) for e in OUTCOME]
LEFT_OVER = 16 * MiB  # what a memory cgroup may still hold once its victim is dead


@pytest.fixture
def memcgs() -> Iterator[list[MemoryCgroup]]:
    made: list[MemoryCgroup] = []
    yield made
    for cg in reversed(made):
        cg.remove()


def wait_memory_back(cg: MemoryCgroup, timeout: float = 10.0) -> int:
    """Wait (bounded) until `cg` holds at most LEFT_OVER; its usage then."""
    deadline = time.monotonic() + timeout
    while (usage := cg.usage()) > LEFT_OVER:
        if time.monotonic() > deadline:
            raise AssertionError(f"{cg.path} still holds {usage // MiB} MiB")
        time.sleep(0.01)
    return usage


def assert_outcome(report: KillReport, err: int, retries: int = KillOptions().retries) -> None:
    name = errno.errorcode[err]
    assert (report.mrelease, report.mrelease_errno) == (OUTCOME[err], name), report
    expected_attempts = retries if err in (errno.EAGAIN, errno.EINTR) else 1
    assert report.mrelease_attempts == expected_attempts, report
    assert f"process_mrelease {OUTCOME[err].value} ({name})" in report.human()
    assert report.exited and [s.name for s in report.signals] == ["SIGKILL"], report


def run_two_leaks(memcgs: list[MemoryCgroup], extra: dict[str, Any] | None = None, *,
                  linger: float = 0.0, **daemon_kw: Any) -> DaemonRun:
    """An in-process daemon and two leaks, one after the other, each grown to 1.25 GiB
    in its own 2 GiB memory cgroup, far past the kill level: both must be killed, and
    their memory come back.  The daemon runs on at least `linger` seconds in all.

    The MemAvailable the daemon sees is the real one of now less what these leaks hold
    (test_invariants.own_pressure): on this shared machine another user's allocation
    or free of a GiB must neither make it act early nor hide a leak from it."""
    memcgs += [MemoryCgroup.create(limit=2 * GiB) for _ in range(2)]
    cgs = memcgs[-2:]
    base = procfs.read_meminfo().mem_available
    cfg = daemon_config(available=base, extra=extra)
    leaks: list[Leak] = []
    started = time.monotonic()

    def scenario(s: Scenario) -> None:
        for i, cg in enumerate(cgs):
            leak = Leak(cg, f"leak{i}")
            leaks.append(leak)
            leak.grow(1280 * MiB)
            assert s.killed(leak) == -signal.SIGKILL
            s.reported(i + 1)
        while time.monotonic() - started < linger:
            time.sleep(0.05)

    try:
        run = run_daemon(cfg, scenario, meminfo=own_pressure(cgs, base), **daemon_kw)
    finally:
        for leak in leaks:
            leak.kill()
    assert run.crash is None, run.crash_text() + "\n".join(run.log)
    assert [k.pid for k in run.daemon.kills] == [leak.pid for leak in leaks], run.log
    for cg in cgs:
        wait_memory_back(cg)
    return run


# --- process_mrelease fails ------------------------------------------------------------------


@pytest.mark.parametrize("err", ERRNOS)
def test_kill_and_reap_when_process_mrelease_fails(err: int, memcgs: list[MemoryCgroup]) -> None:
    """The victim still dies, its memory still comes back (by its own exit path), and the
    report names the outcome and the errno."""
    memcgs.append(MemoryCgroup.create(limit=256 * MiB))
    faulty = GuardedSyscalls(owned_by_test(os.getpid()), mrelease_errno=err)
    with Hog(64 * MiB, memcgs[0], name=f"{PREFIX}-victim") as hog:
        before = memcgs[0].usage()
        with Victim.open(hog.pid, syscalls=faulty) as victim:
            report = kill_and_reap(victim, KillOptions(exit_timeout=10), syscalls=faulty)
        assert hog.proc.wait(timeout=10) == -signal.SIGKILL
    assert_outcome(report, err)
    wait_memory_back(memcgs[0])
    assert report.freed_bytes is not None and report.freed_bytes >= (before - LEFT_OVER), report
    assert faulty.violations == []


@pytest.mark.parametrize("err", ERRNOS)
def test_daemon_when_process_mrelease_fails(err: int, memcgs: list[MemoryCgroup]) -> None:
    """The daemon kills, reports the outcome, and goes on to kill the next leak."""
    faulty = GuardedSyscalls(owned_by_test(os.getpid()), mrelease_errno=err)
    run = run_two_leaks(memcgs, syscalls=faulty)
    for report in run.daemon.kills:
        assert_outcome(report, err)
        assert report.freed_bytes is not None, report
        assert report.freed_bytes >= report.holdings.rss_anon * 9 // 10, report
    logged = [line for line in run.log if line.startswith("WARNING killed ")]
    assert len(logged) == 2
    assert all(f"process_mrelease {OUTCOME[err].value} ({errno.errorcode[err]})" in line
               for line in logged), logged
    assert faulty.violations == []


# --- pidfd_open fails --------------------------------------------------------------------------


def test_daemon_when_pidfd_open_fails_for_the_first_candidate(memcgs: list[MemoryCgroup]) -> None:
    """EMFILE (out of file descriptors) when pinning the first victim: the daemon logs
    it and picks again, at once or at its next look; it never crashes."""
    faulty = GuardedSyscalls(owned_by_test(os.getpid()), pidfd_open_errnos=[errno.EMFILE])
    run = run_two_leaks(memcgs, syscalls=faulty)
    opens = [c for c in faulty.calls if c.name == "pidfd_open"]
    assert opens[0].errno == errno.EMFILE and opens[1].errno is None
    assert any("EMFILE" in line or "Too many open files" in line for line in run.log), run.log
    assert faulty.violations == []


# --- no PSI, no cgroup2 ---------------------------------------------------------------------------


def mounts_without_cgroup2(tmp: Path) -> str:
    """This machine's mount table without its cgroup2 line."""
    path = tmp / "mounts"
    with open("/proc/self/mounts") as f:
        path.write_text("".join(line for line in f if line.split()[2:3] != ["cgroup2"]))
    return str(path)


def test_psi_absent_falls_back_says_so_once_and_kills_by_memavailable(
        memcgs: list[MemoryCgroup], tmp_path: Path) -> None:
    """PSI configured, but the pressure file is missing (and no cgroup2 root offers its
    memory.pressure instead): one line says so in 4 s and more, and MemAvailable still
    kills."""
    missing = tmp_path / "no-pressure" / "memory"
    run = run_two_leaks(memcgs, {"detect": {"when": "memory | psi"},
                                 "psi": {"warn": "some 300000 2000000",
                                         "kill": "full 800000 2000000"}},
                        linger=4.0, pressure_path=str(missing),
                        mounts_file=mounts_without_cgroup2(tmp_path))
    said = [line for line in run.log if str(missing) in line]
    assert len(said) == 1, run.log
    assert "PSI averages" in said[0] and "No such file or directory" in said[0], said
    assert all(k.reason.startswith("kill: MemAvailable") for k in run.daemon.kills), \
        [k.reason for k in run.daemon.kills]


def test_no_cgroup2_mount_with_a_scope_configured_runs_the_machine_scope_only(
        memcgs: list[MemoryCgroup], tmp_path: Path) -> None:
    run = run_two_leaks(memcgs, {"scope": [{"name": "web", "cgroup": "web.slice"}]},
                        linger=2.0, mounts_file=mounts_without_cgroup2(tmp_path))
    assert run.daemon.cfg.scopes == ()  # dropped, with the one line below
    said = [line for line in run.log if "cgroup2" in line]
    assert said == ["WARNING no cgroup2 mount: 1 configured scopes ignored, machine scope only"]
    assert list(run.daemon.scopes) == ["machine"]


# --- a hook that hangs, an events file on a full disk ------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 KiB tmpfs, for the caller to fill."""
    where = tmp_path / "tiny"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(where)],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> None:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as full:
            for _ in range(64):
                os.write(fd, b"x" * 1024)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_hanging_pre_kill_hook_and_full_events_disk_do_not_stop_the_kills(
        memcgs: list[MemoryCgroup], tmp_path: Path, full_disk: Path) -> None:
    hook = tmp_path / "hang.sh"
    hook.write_text("#!/bin/sh\nsleep 100\n")
    hook.chmod(0o755)
    events = full_disk / "events.jsonl"
    extra = {"hooks": {"pre_kill": [str(hook)], "pre_kill_timeout": 0.5},
             "events": {"path": str(events)}}
    sink, hooks = build_sink(daemon_config(extra=extra))  # opens the events file
    assert hooks is not None
    fill(full_disk)
    faulty = GuardedSyscalls(owned_by_test(os.getpid()))
    run = run_two_leaks(memcgs, extra, sink=sink, before_kill=hooks.before_kill,
                        syscalls=faulty)
    assert hooks.last_pre is not None and hooks.last_pre.timed_out, hooks.last_pre
    hung = [line for line in run.log if "pre_kill hook" in line and "still running" in line]
    assert len(hung) == 2, run.log
    failed = [line for line in run.log if "EventsSink sink" in line and "failed" in line]
    assert failed and all("No space left on device" in line for line in failed), run.log
    assert events.stat().st_size == 0 or events.read_bytes().endswith(b"\n")
    assert faulty.violations == []
