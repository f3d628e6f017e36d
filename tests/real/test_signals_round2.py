"""Signals, stops and privileges (issue 11, round 2), against the real kernel.

- A victim that becomes protected after it was chosen (renames itself into a protected
  name, writes oom_score_adj -1000) during its SIGTERM grace or while a pre-kill hook
  runs is spared: no SIGKILL, and the report says why.
- A stop (SIGTERM to the daemon, Ctrl-C to `mreaper kill`) during a victim's SIGTERM
  grace SIGKILLs and reaps it at once, says so, and ends within seconds, not the grace.

Every daemon runs in this process behind test_invariants' GuardedSyscalls, its levels
just under the MemAvailable of the start less what this test's victims hold, every name
but this run's own protected.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_invariants import (
    CLI,
    MS_BIND,
    PREFIX,
    SLEEP,
    GuardedSyscalls,
    Scenario,
    _libc,
    daemon_config,
    own_pressure,
    owned_by_test,
    run_daemon,
)

from daemon_harness import DaemonProcess
from helpers import is_alive_unsignalled
from mreaper import instance
from mreaper.hogs import Hog, MemoryCgroup, MiB
from mreaper.linux import cgroup, procfs
from mreaper.reap import KillOptions, Victim, kill_group, pin_cgroup

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: memory cgroups")

# A victim: joins its memory cgroup, names itself, holds `size` bytes, says "ready".  On
# SIGTERM it says "term" and lives on, after renaming itself (comm) to argv[5] if `mode`
# is "rename".  Dies with the test (PR_SET_PDEATHSIG).
VICTIM = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)
procs, name, size, mode, safe = sys.argv[1:6]
with open(procs, "w") as f:
    f.write(str(os.getpid()))
with open("/proc/self/comm", "w") as f:
    f.write(name)
block = bytearray(b"\x01") * int(size)

def on_term(signum, frame):
    if mode == "rename":
        with open("/proc/self/comm", "w") as f:
            f.write(safe)
    print("term", flush=True)

signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    signal.pause()
"""

SAFE = f"{PREFIX}-safe"
MNT_DETACH = 2


class VictimProc:
    def __init__(self, cg: MemoryCgroup, size: int, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", VICTIM, cg.procs_file, f"{PREFIX}-vic", str(size), mode,
             SAFE], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.line(30) == "ready", "the victim did not start"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().decode().strip() if r else ""

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()  # our own child, not reaped yet
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def minus_1000(pid: int, tmp: Path) -> Iterator[None]:
    """/proc/<pid>/oom_score_adj reads -1000 until the end of the block.  This host
    withholds CAP_SYS_RESOURCE even from root, so nobody can lower it there for real:
    a file bind-mounted over it (as test_invariants does; every reader of the victim's
    oom_score_adj sees it, another daemon on the machine included, which then spares
    this test's victim, nothing else)."""
    fake = tmp / f"oom_score_adj-{pid}"
    fake.write_text("-1000\n")
    target = f"/proc/{pid}/oom_score_adj"
    if _libc.mount(str(fake).encode(), target.encode(), None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), f"bind mount over {target}")
    try:
        yield
    finally:
        _libc.umount2(target.encode(), MNT_DETACH)


@pytest.fixture
def cg() -> Iterator[MemoryCgroup]:
    made = MemoryCgroup.create(limit=512 * MiB)
    yield made
    made.remove()


def sigs_to(guard: GuardedSyscalls, pid: int) -> list[str]:
    return [signal.Signals(s).name for p, s in guard.signalled() if p == pid]


def grace_config(base: int, *, term_timeout: float) -> Any:
    """Term level 100 MiB under `base`, kill level 600 MiB under it: a 200 MiB victim
    puts the daemon at the term level only (warn off)."""
    return daemon_config(available=base, headroom=600 * MiB, term=100 * MiB, rules=[
        {"action": "protect", "name": f"^{SAFE}$"},
        {"action": "prefer", "name": f"^{PREFIX}-vic$", "adjust": 100_000},
    ], extra={"memory": {"warn": "off"}, "kill": {"term_timeout": term_timeout,
                                                   "sort_by": "rss"}})


# --- protection re-checked before every signal -------------------------------------------


@pytest.mark.parametrize("mode", ["rename", "adj"])
def test_victim_protected_during_its_sigterm_grace_is_not_sigkilled(
        cg: MemoryCgroup, mode: str, tmp_path: Path) -> None:
    """The victim answers SIGTERM by making itself untouchable (a protected name, or
    oom_score_adj -1000) and stays: at the end of the grace the daemon must look again
    and spare it, not SIGKILL it, and say so."""
    base = procfs.read_meminfo().mem_available
    victim = VictimProc(cg, 200 * MiB, mode)
    guard = GuardedSyscalls(owned_by_test(os.getpid()))

    def scenario(s: Scenario) -> None:
        s.wait(lambda: "SIGTERM" in sigs_to(guard, victim.pid), 20, "the SIGTERM")
        assert victim.line(10) == "term"
        with minus_1000(victim.pid, tmp_path) if mode == "adj" else contextlib.nullcontext():
            # the grace (4 s) ends, the daemon looks again: spared, and it chooses again
            s.wait(lambda: any("spared" in line for line in run_log), 15, "the victim spared")

    run_log: list[str] = []
    try:
        with _log_into(run_log):
            run = run_daemon(grace_config(base, term_timeout=4.0), scenario, syscalls=guard,
                             meminfo=own_pressure([cg], base), timeout=60)
        alive = victim.proc.poll() is None
    finally:
        victim.kill()
    assert run.crash is None, run.crash_text()
    assert guard.violations == []
    text = "\n".join(run.log)
    assert sigs_to(guard, victim.pid) == ["SIGTERM"], text
    assert alive, text
    spared = [line for line in run.log if "spared" in line]
    assert spared and "became protected during the SIGTERM grace" in spared[0], text
    assert ("oom_score_adj is now -1000" if mode == "adj" else f"^{SAFE}$") in spared[0], text
    assert run.daemon.kills == [], "a spared victim is not a kill"


def test_victim_protected_while_the_pre_kill_hook_runs_is_not_signalled(
        cg: MemoryCgroup, tmp_path: Path) -> None:
    """At the kill level, with a pre-kill step: while it runs, the victim becomes
    oom_score_adj -1000.  The SIGKILL after the hook must see it."""
    base = procfs.read_meminfo().mem_available
    victim = VictimProc(cg, 200 * MiB, "ignore")
    guard = GuardedSyscalls(owned_by_test(os.getpid()))
    hooked: list[int] = []
    stack = contextlib.ExitStack()

    def before_kill(v: Victim, _reason: str) -> None:
        stack.enter_context(minus_1000(v.pid, tmp_path))
        hooked.append(v.pid)

    def scenario(s: Scenario) -> None:
        s.wait(lambda: any("spared" in line for line in run_log), 20, "the victim spared")

    cfg = daemon_config(available=base, headroom=100 * MiB, rules=[
        {"action": "prefer", "name": f"^{PREFIX}-vic$", "adjust": 100_000}],
        extra={"kill": {"sort_by": "rss"}})
    run_log: list[str] = []
    try:
        with _log_into(run_log):
            run = run_daemon(cfg, scenario, syscalls=guard, meminfo=own_pressure([cg], base),
                             before_kill=before_kill, timeout=60)
        alive = victim.proc.poll() is None
    finally:
        stack.close()
        victim.kill()
    assert run.crash is None, run.crash_text()
    text = "\n".join(run.log)
    assert hooked[:1] == [victim.pid], text
    assert sigs_to(guard, victim.pid) == [], text
    assert alive, text
    spared = [line for line in run.log if "spared" in line]
    assert "became protected after it was chosen, before any signal" in spared[0], text


@contextlib.contextmanager
def _log_into(lines: list[str]) -> Iterator[None]:
    """Mirror what logger "mreaper" says into `lines` while the daemon runs (run_daemon's
    own copy is handed over only at the end)."""
    import logging

    class Into(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname} {record.getMessage()}")

    logger = logging.getLogger("mreaper")
    handler = Into(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


# --- a stop during a SIGTERM grace -----------------------------------------------------------


def test_sigterm_to_the_daemon_during_a_grace_sigkills_reaps_and_reports_the_victim(
        cg: MemoryCgroup) -> None:
    """A 30 s grace, a victim that ignores SIGTERM, and SIGTERM to the daemon: the daemon
    SIGKILLs and reaps the victim at once, reports it, and is gone well before the grace
    would have ended (bound 10 s: not a timing figure, just "not the grace")."""
    base = procfs.read_meminfo().mem_available
    victim = VictimProc(cg, 200 * MiB, "ignore")
    guard = GuardedSyscalls(owned_by_test(os.getpid()))
    stopped_at: list[float] = []

    def scenario(s: Scenario) -> None:
        s.wait(lambda: "SIGTERM" in sigs_to(guard, victim.pid), 20, "the SIGTERM")
        assert victim.line(10) == "term"
        stopped_at.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
        s.stopped.wait(40)

    before = set(threading.enumerate())
    try:
        run = run_daemon(grace_config(base, term_timeout=30.0), scenario, syscalls=guard,
                         meminfo=own_pressure([cg], base), timeout=90)
        took = time.monotonic() - stopped_at[0]
        # Nothing of the daemon's left behind: its background scan, parked while the
        # victim died, used to stay parked and hold the stop for its 5 s join.
        left = sorted(t.name for t in set(threading.enumerate()) - before
                      if t.is_alive() and t.name.startswith("mreaper"))
        rc = victim.proc.wait(timeout=10)
    finally:
        victim.kill()
    assert run.crash is None, run.crash_text()
    assert guard.violations == []
    text = "\n".join(run.log)
    assert left == [], left
    assert took < 10, f"the daemon took {took:.1f} s to stop during a 30 s grace:\n{text}"
    assert rc == -signal.SIGKILL, text
    assert sigs_to(guard, victim.pid) == ["SIGTERM", "SIGKILL"], text
    assert [k.pid for k in run.daemon.kills] == [victim.pid], text
    report = run.daemon.kills[0]
    assert report.exited, text
    assert any("mreaper stopping (SIGTERM)" in n for n in report.notes), report.notes
    stopping = next(i for i, line in enumerate(run.log) if "got SIGTERM, stopping" in line)
    said = next(i for i, line in enumerate(run.log) if "grace gets SIGKILL at once" in line)
    killed = next(i for i, line in enumerate(run.log) if f"killed {victim.pid}" in line)
    assert stopping < said < killed, text
    assert run.log[-1].endswith("stopped"), text


def test_ctrl_c_on_mreaper_kill_during_the_grace_sigkills_and_says_so(cg: MemoryCgroup) -> None:
    """`mreaper kill --term-timeout 30` on a victim that ignores SIGTERM, then Ctrl-C
    (SIGINT): no traceback; the victim is SIGKILLed and reaped, and the output says so."""
    victim = VictimProc(cg, 64 * MiB, "ignore")
    try:
        kill = subprocess.Popen([*CLI, "kill", "--term-timeout", "30", str(victim.pid)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert victim.line(20) == "term", "no SIGTERM reached the victim"
        kill.send_signal(signal.SIGINT)
        try:
            out, err = kill.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            kill.kill()
            out, err = kill.communicate()
            raise AssertionError(f"mreaper kill still waits after Ctrl-C: {out}{err}") from None
        rc = victim.proc.wait(timeout=10)
    finally:
        victim.kill()
    assert "Traceback" not in err, err
    assert kill.returncode == 130, (kill.returncode, out, err)
    assert rc == -signal.SIGKILL
    assert f"killed {victim.pid}" in out and "SIGTERM+SIGKILL" in out, out
    assert "interrupted (SIGINT)" in out, out
    assert "interrupted by SIGINT: sent SIGTERM+SIGKILL, process_mrelease " in err, err
    assert err.rstrip().endswith("it exited"), err


# --- no spinning at a kill level where nothing may be killed ---------------------------------


def test_nothing_to_kill_backs_off_the_search_and_still_finds_a_new_process(
        cg: MemoryCgroup, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """At the kill level with every process protected, the daemon looks at memory as
    often as ever (poll_min) but must not list /proc on every look: counted in looks,
    not seconds, over 300 looks.  It says once why nothing may be killed.  And a
    killable process started meanwhile is still found well before the back-off
    (scan_interval 2 s, 200 looks at poll_min) would have come round."""
    base = procfs.read_meminfo().mem_available
    guarded = VictimProc(cg, 200 * MiB, "ignore")  # ours, but protected by a rule
    guard = GuardedSyscalls(owned_by_test(os.getpid()))
    listings: list[int] = []
    real_list_pids = procfs.list_pids

    def counting_list_pids(proc: str = procfs.PROC) -> list[int]:
        listings.append(1)
        return real_list_pids(proc)

    monkeypatch.setattr(procfs, "list_pids", counting_list_pids)
    pressure = own_pressure([cg], base)
    looks: list[int] = []

    def meminfo() -> procfs.MemInfo:
        looks.append(1)
        return pressure()

    sleep = tmp_path / f"{PREFIX}-new"  # comm is the file name: a killable name at exec
    sleep.write_bytes(Path(SLEEP).read_bytes())
    sleep.chmod(0o755)
    counted: dict[str, int] = {}
    newcomer: list[subprocess.Popen[bytes]] = []

    def scenario(s: Scenario) -> None:
        s.wait(lambda: any("no process may be killed" in line for line in run_log), 20,
               "the daemon to find nothing to kill")
        start_looks, start_listings = len(looks), len(listings)
        deadline = time.monotonic() + 60  # a slow machine: fewer looks, counted all the same
        while len(looks) - start_looks < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        counted["looks"] = len(looks) - start_looks
        counted["listings"] = len(listings) - start_listings
        # Before: one listing (or more) per look.  Backed off: a handful.
        assert counted["listings"] * 5 < counted["looks"], counted
        counted["said"] = sum("no process may be killed" in line for line in run_log)
        newcomer.append(subprocess.Popen([str(sleep), "1000"]))
        spawned = len(looks)
        s.wait(lambda: newcomer[0].poll() is not None, 20, "the new process to be killed")
        counted["looks_to_kill"] = len(looks) - spawned
        s.reported(1)

    run_log: list[str] = []
    cfg = daemon_config(available=base, headroom=100 * MiB, rules=[
        {"action": "protect", "name": f"^{PREFIX}-vic$"}])
    try:
        with _log_into(run_log):
            run = run_daemon(cfg, scenario, syscalls=guard, meminfo=meminfo, timeout=120)
    finally:
        guarded.kill()
        for p in newcomer:
            p.kill()
            p.wait()
    assert run.crash is None, run.crash_text()
    assert guard.violations == []
    text = "\n".join(run.log[:20])
    assert counted["looks"] >= 300 and counted["listings"] < 40, (counted, text)
    assert counted["looks_to_kill"] < 150, (counted, text)
    # said once over those 300 looks (and again only after the kill, when the search
    # that follows it finds nothing once more)
    assert counted["said"] == 1, counted
    said = [line for line in run.log if "no process may be killed" in line]
    assert said[0].startswith("ERROR") and "protected by rule" in said[0], said
    assert sigs_to(guard, guarded.pid) == []
    assert [k.pid for k in run.daemon.kills] == [newcomer[0].pid]


# --- not root ---------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_unprivileged_daemon_says_what_it_cannot_kill_and_logs_eperm_as_error(
        cg: MemoryCgroup, tmp_path: Path) -> None:
    """`mreaper run` as nobody, at a kill level whose only candidate is root's: the
    start-up says which capabilities it lacks and what it may kill, and the refused
    kill is an error line (journal priority <3>), not a debug one.  Nothing is signalled:
    nobody may not (the kernel's check), and every other name is protected."""
    victim = VictimProc(cg, 64 * MiB, "ignore")
    mem = procfs.read_meminfo()
    # 99 % of MemTotal: always above MemAvailable on a running machine (the kernel's own
    # memory, page tables, the processes), whatever another user frees meanwhile.
    assert mem.mem_available < mem.mem_total * 0.98, mem
    log_path = tmp_path / "daemon.log"
    lock_dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-lock-"))  # tmp_path is root's 0700
    os.chown(lock_dir, 65534, 65534)  # nobody's own lock directory
    with open(log_path, "w") as log:
        st = os.fstat(log.fileno())
        # stderr is "the journal stream": lines carry their syslog priority (<3> error).
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        daemon = subprocess.Popen(
            ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
             *CLI, "run", "--memory-warn", "off", "--memory-term", "off",
             "--memory-kill", "99%", "--psi-warn", "off", "--psi-term", "off",
             "--psi-kill", "off", "--protect", f"^(?!{PREFIX}-vic$)",
             "--lock-file", str(lock_dir / "mreaper.lock")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while f"cannot kill {victim.pid}" not in log_path.read_text():
            assert daemon.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        time.sleep(0.5)  # a look or two more: the refusal must be said once only
        alive = is_alive_unsignalled(victim.pid)
    finally:
        daemon.terminate()  # our own child
        daemon.wait(timeout=15)
        victim.kill()
        shutil.rmtree(lock_dir, ignore_errors=True)
    lines = log_path.read_text().splitlines()
    text = "\n".join(lines)
    assert alive, text
    privileges = [line for line in lines if "privileges:" in line]
    lacking = next(line for line in privileges if "without CAP_KILL" in line)
    assert lacking.startswith("<4>") and "may kill only processes of uid 65534" in lacking, text
    assert any("without CAP_SYS_RESOURCE: oom_score_adj -1000: below our 0" in line
               for line in privileges), text
    assert any("without CAP_IPC_LOCK" in line for line in privileges), text
    refused = [line for line in lines if f"cannot kill {victim.pid}" in line]
    assert len(refused) == 1 and refused[0].startswith("<3>"), text
    assert "permission denied" in refused[0] and "lacks CAP_KILL" in refused[0], text
    nothing = [line for line in lines if "no process may be killed" in line]
    assert len(nothing) == 1 and "1 not ours to signal (EPERM)" in nothing[0], text


# --- one killer per machine -------------------------------------------------------------------


def _run_briefly(*args: str, timeout: float = 20.0) -> tuple[int | None, str]:
    """`mreaper run ARGS`: its exit code and stderr if it exits within `timeout`, else
    (None, stderr so far) after stopping it (it started: a second killer)."""
    proc = subprocess.Popen([*CLI, "run", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.terminate()  # our own child
        _, err = proc.communicate()
        return None, err


def test_a_second_mreaper_run_is_refused_with_the_pid_of_the_first(tmp_path: Path) -> None:
    """While one `mreaper run` holds the lock, a second refuses to start and names the
    first's PID; --allow-second-instance runs it anyway, saying so.  A lock left by a
    killed daemon is no obstacle; a lock file another user made, a symlink, or a
    directory others may write are refused, each by name."""
    cfg = tmp_path / "mreaper.toml"
    cfg.write_text('[status]\nsocket = ""\n[daemon]\nmlockall = false\n')
    lock = tmp_path / "run" / "mreaper.lock"
    lock.parent.mkdir(mode=0o700)
    common = ("--config", str(cfg), "--dry-run", "--lock-file", str(lock))
    first = DaemonProcess(*common)
    try:
        rc, err = _run_briefly(*common)
        assert rc == 1, f"a second mreaper ran beside the first (rc {rc}): {err}"
        assert f"another mreaper runs (PID {first.proc.pid}, lock {lock})" in err, err
        assert "--allow-second-instance" in err, err
        second = DaemonProcess(*common, "--allow-second-instance")
        second.wait_for(rf"another mreaper runs \(PID {first.proc.pid}.*starting beside it")
        assert second.stop() == 0, "\n".join(second.lines)
    finally:
        first.proc.kill()  # our own child: dies holding the lock, as in a crash
        first.proc.wait()
    assert lock.read_text().strip() == str(first.proc.pid)  # stale, and harmless:
    third = DaemonProcess(*common)
    assert third.stop() == 0, "\n".join(third.lines)

    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    (planted / "mreaper.lock").write_text("1\n")
    os.chown(planted / "mreaper.lock", 65534, 65534)
    (planted / "link.lock").symlink_to(planted / "target")
    (planted / "target").write_text("")
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    for path, says in ((planted / "mreaper.lock", "is owned by uid 65534, not by us"),
                       (planted / "link.lock", "is a symlink: refused"),
                       (loose / "mreaper.lock", "is writable by others (mode 0777)")):
        rc, err = _run_briefly("--config", str(cfg), "--dry-run", "--lock-file", str(path))
        assert rc == 1 and f"{path.parent}" in err and says in err, (path, rc, err)
    assert (planted / "target").read_text() == "", "followed the symlink"


def test_group_kill_spares_the_group_when_a_member_became_protected(
        cg: MemoryCgroup, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """cgroup.kill spares no one: a member that became oom_score_adj -1000 after the
    group was pinned keeps the whole group alive (and cgroup.kill is never written)."""
    unified = cgroup.find_mounts().unified
    if not unified or not os.path.exists(os.path.join(unified, "cgroup.procs")):
        pytest.fail("no cgroup2 mount on this host")
    group = os.path.join(unified, f"{PREFIX}-group-{uuid.uuid4().hex[:6]}")
    os.mkdir(group)
    writes: list[str] = []
    real_kill = cgroup.kill
    monkeypatch.setattr(cgroup, "kill", lambda d: (writes.append(d), real_kill(d)))
    guard = GuardedSyscalls(owned_by_test(os.getpid()))
    members = [Hog(16 * MiB, cg, name=f"{PREFIX}-g{i}", also_in=[group]) for i in range(2)]
    try:
        victims, _ = pin_cgroup(group, syscalls=guard)
        try:
            with minus_1000(members[1].pid, tmp_path):
                report = kill_group(group, victims, KillOptions(exit_timeout=10),
                                    syscalls=guard)
        finally:
            for v in victims:
                v.close()
        alive = [is_alive_unsignalled(h.pid) for h in members]
    finally:
        for h in members:
            h.kill()
        with contextlib.suppress(OSError):
            real_kill(group)
        deadline = time.monotonic() + 10
        while os.path.exists(group):
            try:
                os.rmdir(group)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
    assert writes == [], "cgroup.kill written for a group holding a protected process"
    assert alive == [True, True]
    assert report.members == () and f"member {members[1].pid}" in report.spared, report
    assert "oom_score_adj is now -1000" in report.spared


def test_nothing_to_kill_is_said_again_when_the_kill_level_returns() -> None:
    """The back-off and the one line belong to one stay at the kill level: leaving it and
    coming back is a new level, searched at once and said again (counted in looks)."""
    base = procfs.read_meminfo().mem_available
    below = [True]  # MemAvailable 200 MiB under the kill level (100 MiB under base) or not
    looks: list[int] = []

    def meminfo() -> procfs.MemInfo:
        looks.append(1)
        real = procfs.read_meminfo()
        return dataclasses.replace(real, mem_available=base - (300 * MiB if below[0] else 0))

    def said() -> int:
        return sum("no process may be killed" in line for line in run_log)

    counted: dict[str, int] = {}

    def scenario(s: Scenario) -> None:
        s.wait(lambda: said() == 1, 20, "the daemon to find nothing to kill")
        below[0] = False
        start = len(looks)
        s.wait(lambda: len(looks) - start >= 20, 20, "20 looks out of the kill level")
        below[0] = True
        back = len(looks)
        s.wait(lambda: said() == 2, 20, "nothing to kill, said again")
        counted["looks_to_say_again"] = len(looks) - back

    run_log: list[str] = []
    guard = GuardedSyscalls(owned_by_test(os.getpid()))
    with _log_into(run_log):
        run = run_daemon(daemon_config(available=base, headroom=200 * MiB,
                                       extra={"memory": {"warn": "off"},
                                              "detect": {"scan_interval": 60.0}}),
                         scenario, syscalls=guard, meminfo=meminfo, timeout=90)
    assert run.crash is None, run.crash_text()
    assert guard.signalled() == []
    # at once, not after the back-off (up to scan_interval, 60 s, thousands of looks)
    assert counted["looks_to_say_again"] < 50, counted


def test_the_default_lock_directory_found_loose_is_made_0700(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Kubernetes emptyDir at /run/mreaper is 0777: the daemon's own default directory
    is tightened to 0700 (and said), not refused (the daemon would not start in its pod)
    nor left loose.  Another directory given by path is refused instead (above)."""
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)
    monkeypatch.setattr(instance, "DEFAULT", str(run / "mreaper.lock"))
    lock = instance.acquire(str(run / "mreaper.lock"))
    try:
        assert stat.S_IMODE(run.stat().st_mode) == 0o700
        assert lock.notes == [f"{run} was writable by others (mode 0777): made 0700"]
        assert (run / "mreaper.lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.close()
