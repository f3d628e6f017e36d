"""Invariants: what mreaper never does, each held against the real kernel.

1. It never signals PID 1, a kernel thread, itself, its parent, a process with
   oom_score_adj -1000 or one a protect rule matches: through Victim.open, through the
   daemon's policy path (a daemon running in a forked child, so that "itself" and "its
   parent" are processes this test can name mr-*), and through `mreaper kill`.
2. It never signals a recycled PID: 1,000 PIDs are taken back for new processes through
   ns_last_pid, and Victim.open with the old start time refuses every one of them.
3. It signals only through pidfds: an AST scan of the package, with an allowlist.
4. It never calls process_mrelease on a process it did not SIGKILL itself (or kill with
   cgroup.kill), checked call by call on a daemon run over a real leak.

Safety on a shared machine.  Every daemon here has the levels just under the
MemAvailable of now, and protect rules for every name but this run's own hogs
(`^(?!mr-)`, and `^(?!mr-<token>)` so that another session's mr-* hogs are safe too).
Where the order of the daemon's acts matters, the MemAvailable it sees is the real one
of the start less what this test's leaks hold (own_pressure): another user's GiB
allocated or freed meanwhile can then neither make it act early nor hide a leak.
Its syscall layer is a `GuardedSyscalls`: a real signal (not the 0 of a permission
check) reaches only a child of this test whose name carries the token and that the test
did not mark as one that must live; anything else is refused with EPERM and recorded as
a violation.  So even a broken mreaper kills nothing it should not, and the test says so.

This module also holds what test_faults.py shares: the guard, the configuration, the
in-process daemon runner.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helpers import NS_LAST_PID, is_alive_unsignalled, kernel_threads
from mreaper import config, policy
from mreaper.config import Config
from mreaper.daemon import Daemon
from mreaper.hogs import GiB, Hog, MemoryCgroup, MiB
from mreaper.linux import cgroup, procfs
from mreaper.linux.syscalls import LinuxSyscalls, syscall_error
from mreaper.reap import (
    KillOptions,
    Mrelease,
    Victim,
    VictimRecycled,
    VictimRefused,
    kill_group,
    pin_cgroup,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: memory cgroups, ns_last_pid, mounts")

TOKEN = uuid.uuid4().hex[:4]
PREFIX = f"mr-{TOKEN}"  # every hog of this run is named PREFIX-<what> (<= 15 bytes)
SRC = Path(__file__).resolve().parents[2] / "src" / "mreaper"
CLI = [sys.executable, "-m", "mreaper.cli"]
PR_SET_PDEATHSIG = 1
CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
_libc = ctypes.CDLL(None, use_errno=True)


# --- the guarded, recording, fault-injecting syscall layer ----------------------------------


@dataclass
class SysCall:
    name: str            # pidfd_open | pidfd_send_signal | process_mrelease | cgroup.kill
    pid: int | None      # the process the pidfd was opened for
    fd: int
    pin: int             # which pidfd_open the fd came from (fd numbers are reused)
    sig: int | None = None
    errno: int | None = None
    members: tuple[int, ...] = ()  # cgroup.kill: the cgroup's processes at the kill
    thread: str = field(default_factory=lambda: threading.current_thread().name)


class GuardedSyscalls:
    """LinuxSyscalls that records every call in order, refuses a real signal to any
    process `may_signal` does not allow (EPERM, recorded in `violations`), and injects
    faults: `mrelease_errno` on every process_mrelease, `pidfd_open_errnos` on the first
    pidfd_open calls (one errno per call)."""

    def __init__(self, may_signal: Callable[[int], bool], *, mrelease_errno: int | None = None,
                 pidfd_open_errnos: Iterable[int] = ()) -> None:
        self.real = LinuxSyscalls()
        self.may_signal = may_signal
        self.mrelease_errno = mrelease_errno
        self.open_faults = list(pidfd_open_errnos)
        self.calls: list[SysCall] = []
        self.violations: list[str] = []
        self._pins: dict[int, tuple[int, int]] = {}  # fd -> (pin, pid)
        self._lock = threading.Lock()

    def _record(self, call: SysCall) -> SysCall:
        with self._lock:
            self.calls.append(call)
        return call

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        with self._lock:
            fault = self.open_faults.pop(0) if self.open_faults else None
        if fault is not None:
            self._record(SysCall("pidfd_open", pid, -1, -1, errno=fault))
            raise syscall_error(fault, "pidfd_open", "injected by the test")
        fd = self.real.pidfd_open(pid, flags)
        with self._lock:
            pin = len(self.calls)
            self._pins[fd] = (pin, pid)
            self.calls.append(SysCall("pidfd_open", pid, fd, pin))
        return fd

    def pidfd_send_signal(self, pidfd: int, sig: int, flags: int = 0) -> None:
        pin, pid = self._pins.get(pidfd, (-1, -1))
        call = self._record(SysCall("pidfd_send_signal", pid, pidfd, pin, sig=int(sig)))
        if sig != 0 and not self.may_signal(pid):
            what = describe_pid(pid)
            with self._lock:
                self.violations.append(f"{signal.Signals(sig).name} to {what}")
            call.errno = errno.EPERM
            raise syscall_error(errno.EPERM, "pidfd_send_signal", "refused by the test's guard")
        try:
            self.real.pidfd_send_signal(pidfd, sig, flags)
        except OSError as e:
            call.errno = e.errno
            raise

    def process_mrelease(self, pidfd: int, flags: int = 0) -> None:
        pin, pid = self._pins.get(pidfd, (-1, -1))
        call = self._record(SysCall("process_mrelease", pid, pidfd, pin))
        if self.mrelease_errno is not None:
            call.errno = self.mrelease_errno
            raise syscall_error(self.mrelease_errno, "process_mrelease", "injected by the test")
        try:
            self.real.process_mrelease(pidfd, flags)
        except OSError as e:
            call.errno = e.errno
            raise

    def record_cgroup_kill(self, cgroup_dir: str) -> None:
        """Called (by a wrapper around cgroup.kill) just before a group kill."""
        try:
            members = tuple(cgroup.read_procs(cgroup_dir))
        except OSError:
            members = ()
        self._record(SysCall("cgroup.kill", None, -1, -1, members=members))

    def signalled(self) -> list[tuple[int, int]]:
        """(pid, signal) of every real signal asked for, refused ones included."""
        return [(c.pid or -1, c.sig or 0) for c in self.calls
                if c.name == "pidfd_send_signal" and c.sig]


def describe_pid(pid: int) -> str:
    try:
        st = procfs.read_stat(pid)
    except (procfs.ProcessGone, procfs.ParseError, OSError):
        return f"PID {pid} (gone)"
    return f"PID {pid} {st.comm!r} (parent {st.ppid})"


def owned_by_test(parent: int, deny: Collection[int] = ()) -> Callable[[int], bool]:
    """The guard's rule: a child of `parent` (still unreaped, so its PID is its own)
    named with this run's token, and not in `deny`."""
    def may_signal(pid: int) -> bool:
        if pid in deny:
            return False
        try:
            st = procfs.read_stat(pid)
        except (procfs.ProcessGone, procfs.ParseError, OSError):
            return False
        return st.ppid == parent and st.comm.startswith(PREFIX)
    return may_signal


def mrelease_without_our_kill(calls: list[SysCall]) -> list[str]:
    """Every process_mrelease whose pidfd did not get our SIGKILL before it (or whose
    process was not in a cgroup we had killed with cgroup.kill before it)."""
    killed: set[int] = set()
    pins: dict[int, int] = {}  # pin -> pid
    bad = []
    for i, c in enumerate(calls):
        if c.name == "pidfd_open" and c.errno is None and c.pid is not None:
            pins[c.pin] = c.pid
        elif (c.name == "pidfd_send_signal" and c.sig == signal.SIGKILL
              and c.errno in (None, errno.ESRCH)):
            killed.add(c.pin)
        elif c.name == "cgroup.kill":
            killed.update(pin for pin, pid in pins.items() if pid in c.members)
        elif c.name == "process_mrelease" and c.pin not in killed:
            sigs = [signal.Signals(x.sig).name if x.sig else "0" for x in calls[:i]
                    if x.name == "pidfd_send_signal" and x.pin == c.pin]
            bad.append(f"call {i}: process_mrelease on PID {c.pid} after only {sigs}")
    return bad


# --- configuration and the in-process daemon --------------------------------------------------


def size_text(n: int) -> str:
    return f"{n // MiB}M"


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def daemon_config(*, headroom: int = 350 * MiB, term: int | None = None,
                  rules: Iterable[dict[str, object]] = (), extra: dict[str, Any] | None = None,
                  available: int | None = None) -> Config:
    """Levels just under the MemAvailable of now: warn at -headroom/2, kill at -headroom
    (term at -term if given, else off); PSI and swap off; every name but this run's
    hogs protected.  No mlockall, nice or oom_score_adj: the daemon runs in the test."""
    avail = procfs.read_meminfo().mem_available if available is None else available
    data: dict[str, Any] = {
        "daemon": {"mlockall": False, "nice": 0, "oom_score_adj": 0, "recovery_timeout": 2.0},
        "detect": {"when": "memory", "scan_interval": 2.0},
        "memory": {"warn": size_text(avail - headroom // 2),
                   "term": "off" if term is None else size_text(avail - term),
                   "kill": size_text(avail - headroom)},
        "swap": {"warn": "off", "term": "off", "kill": "off"},
        "psi": {"warn": "off", "term": "off", "kill": "off"},
        "kill": {"term_timeout": 0},
        "status": {"socket": ""},
        "rule": [{"action": "protect", "name": "^(?!mr-)"},
                 {"action": "protect", "name": f"^(?!{PREFIX})"}, *rules],
    }
    return config.apply(Config(), merge(data, extra or {}), "test")


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


@contextlib.contextmanager
def mreaper_log(level: int = logging.INFO) -> Iterator[ListHandler]:
    """Collect what logger "mreaper" says, whatever handlers it already has."""
    logger = logging.getLogger("mreaper")
    handler = ListHandler()
    old = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


@dataclass
class Scenario:
    """What a scenario thread gets: the daemon, and bounded waits that give up at once
    when the daemon has stopped (or crashed)."""

    daemon: Daemon
    stopped: threading.Event = field(default_factory=threading.Event)

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.stopped.is_set():
                raise AssertionError(f"the daemon stopped while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.01)

    def killed(self, hog: Hog | Leak, timeout: float = 30.0) -> int:
        """Wait for `hog` to die; its exit status."""
        self.wait(lambda: hog.proc.poll() is not None, timeout, f"{hog.pid} to be killed")
        rc = hog.proc.returncode
        assert rc is not None
        return rc

    def reported(self, count: int, timeout: float = 30.0) -> None:
        """Wait until the daemon has collected `count` kill reports.  As long as
        killed(): a report follows the victim's exit, and on a loaded machine (CI
        beside other jobs) the exit itself took over 10 s once."""
        self.wait(lambda: len(self.daemon.kills) >= count, timeout, f"{count} kill reports")


@dataclass
class DaemonRun:
    daemon: Daemon
    rc: int | None
    crash: BaseException | None
    log: list[str]

    def crash_text(self) -> str:
        return "".join(traceback.format_exception(self.crash)) if self.crash else ""


def run_daemon(cfg: Config, scenario: Callable[[Scenario], None], *, timeout: float = 60.0,
               **daemon_kw: Any) -> DaemonRun:
    """Run Daemon(cfg) in this (main) thread while `scenario` runs in another; the
    daemon is stopped when the scenario ends or after `timeout` seconds.  The signal
    handlers run() installs are put back.  A scenario failure is raised here."""
    assert threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    failures: list[BaseException] = []
    with mreaper_log() as log:
        daemon = Daemon(cfg, **daemon_kw)
        ctx = Scenario(daemon)

        def drive() -> None:
            try:
                scenario(ctx)
            except BaseException as e:
                failures.append(e)
            finally:
                daemon.request_stop()

        thread = threading.Thread(target=drive, name="test-scenario", daemon=True)
        watchdog = threading.Timer(timeout, daemon.request_stop)
        watchdog.daemon = True
        rc: int | None = None
        crash: BaseException | None = None
        thread.start()
        watchdog.start()
        try:
            rc = daemon.run()
        except Exception as e:
            crash = e
        finally:
            ctx.stopped.set()
            watchdog.cancel()
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        thread.join(timeout=60)
    run = DaemonRun(daemon, rc, crash, log.lines)
    if failures and crash is None:
        raise AssertionError("scenario failed; daemon log:\n" + "\n".join(run.log)) \
            from failures[0]
    return run


@pytest.fixture
def memcgs() -> Iterator[list[MemoryCgroup]]:
    made: list[MemoryCgroup] = []
    yield made
    for cg in reversed(made):
        cg.remove()


# A leak that grows on demand: joins its memory cgroup, names itself, says "ready";
# each line on stdin is a size in bytes to grow to (`step` bytes every `interval` s),
# answered with the size reached.  Dies with the test (PR_SET_PDEATHSIG).
LEAK = r"""
import ctypes, os, signal, sys, time
ctypes.CDLL(None).prctl(1, signal.SIGKILL)
if os.getppid() == 1:
    sys.exit(1)
procs, name, step, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
with open(procs, "w") as f:
    f.write(str(os.getpid()))
with open("/proc/self/comm", "w") as f:
    f.write(name)
if sys.argv[5] == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
blocks = []
for line in sys.stdin:
    while len(blocks) * step < int(line):
        blocks.append(bytearray(b"\x01") * step)
        time.sleep(interval)
    print(len(blocks) * step, flush=True)
while True:
    signal.pause()
"""


class Leak:
    """A leak in memory cgroup `cg`, named PREFIX-<what>, that grows when told to."""

    def __init__(self, cg: MemoryCgroup, what: str, *, step: int = 32 * MiB,
                 interval: float = 0.02, ignore_sigterm: bool = False) -> None:
        self.cg = cg
        self.name = f"{PREFIX}-{what}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LEAK, cg.procs_file, self.name, str(step), str(interval),
             "1" if ignore_sigterm else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self._answer(30) != b"ready\n":
            self.kill()
            raise RuntimeError(f"leak {self.name} did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _answer(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if r else b""

    def grow(self, total: int) -> None:
        """Start growing to `total` bytes (bounded: well under the cgroup's limit)."""
        assert total <= GiB * 3 // 2
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"%d\n" % total)
        self.proc.stdin.flush()

    def grown(self, timeout: float = 30.0) -> int:
        """Wait for the size reached after grow()."""
        line = self._answer(timeout)
        assert line.strip().isdigit(), f"leak {self.name} did not grow: {line!r}"
        return int(line)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()  # our own child, not reaped yet
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def __enter__(self) -> Leak:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def run_guarded(cfg: Config, scenario: Callable[[Scenario], None], guard: GuardedSyscalls,
                meminfo: Callable[[], procfs.MemInfo], leaks: list[Leak]) -> DaemonRun:
    """run_daemon behind `guard`; the scenario's `leaks` are killed afterwards, whatever
    happened; the daemon must not have crashed nor tried to signal anything else."""
    try:
        run = run_daemon(cfg, scenario, syscalls=guard, meminfo=meminfo)
    finally:
        for leak in leaks:
            leak.kill()
    assert run.crash is None, run.crash_text()
    assert guard.violations == []
    return run


def own_pressure(cgs: Collection[MemoryCgroup], base: int) -> Callable[[], procfs.MemInfo]:
    """/proc/meminfo with MemAvailable as `base` less what `cgs` hold: the daemon then
    feels only this test's leaks, and another user's allocation cannot make it act
    early (for tests where the order of the daemon's acts matters)."""
    def meminfo() -> procfs.MemInfo:
        real = procfs.read_meminfo()
        return dataclasses.replace(real, mem_available=base - sum(cg.usage() for cg in cgs))
    return meminfo


# --- 1. never signals what it must not: Victim.open, policy.scan, `mreaper kill` ----------------


def test_victim_open_refuses_init_kthreads_itself_its_parent_and_signals_nothing() -> None:
    guard = GuardedSyscalls(lambda pid: False)
    targets = {1: "PID 1", os.getpid(): "itself", os.getppid(): "parent"}
    targets.update({k: "kernel thread" for k in kernel_threads(limit=5)})
    for pid, words in targets.items():
        with pytest.raises(VictimRefused, match=words):
            Victim.open(pid, syscalls=guard)
        with pytest.raises(VictimRefused, match=words):
            Victim.open(pid, starttime=procfs.read_stat(pid).starttime, syscalls=guard)
    assert guard.calls == []  # refused before any pidfd, let alone a signal
    # The daemon's candidates come from policy.scan: none of them is ever in it.
    candidates, _ = policy.scan()
    assert not {c.pid for c in candidates} & set(targets)


def fake_oom_score_adj(pid: int, value: int, tmp: Path) -> list[str]:
    """A shell prefix that runs the rest of the command in a private mount namespace
    where /proc/<pid>/oom_score_adj reads `value`.  Here root lacks CAP_SYS_RESOURCE and
    cannot set -1000 for real; nothing outside that namespace sees the change."""
    fake = tmp / f"oom_score_adj.{pid}"
    fake.write_text(f"{value}\n")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f"mount --bind {fake} /proc/{pid}/oom_score_adj && exec \"$@\"", "sh"]


def test_mreaper_kill_refuses_and_signals_nothing(memcgs: list[MemoryCgroup],
                                                  tmp_path: Path) -> None:
    def kill(*argv: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*(prefix or []), *CLI, "kill", *argv], capture_output=True,
                              text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)

    init_start = procfs.read_stat(1).starttime
    r = kill("1")
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert "PID 1" in r.stderr and procfs.read_stat(1).starttime == init_start
    kthread = kernel_threads(limit=2)[-1]
    r = kill(str(kthread))
    assert r.returncode == 2 and "kernel thread" in r.stderr, r.stderr
    # itself: exec keeps the shell's PID, so $$ is mreaper's own
    r = subprocess.run(["sh", "-c", f"exec {shlex.join(CLI)} kill $$"], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 2 and "itself" in r.stderr, (r.returncode, r.stderr)
    # its parent: the shell is alive after mreaper returns
    r = subprocess.run(["sh", "-c", f"{shlex.join(CLI)} kill $$; echo alive $?"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.stdout == "alive 2\n" and "parent" in r.stderr, (r.stdout, r.stderr)
    # oom_score_adj -1000: the kernel's own "never kill this"
    memcgs.append(MemoryCgroup.create(limit=64 * MiB))
    with Hog(8 * MiB, memcgs[-1], name=f"{PREFIX}-adj") as hog:
        r = kill(str(hog.pid), prefix=fake_oom_score_adj(hog.pid, -1000, tmp_path))
        assert hog.proc.poll() is None and is_alive_unsignalled(hog.pid), \
            f"mreaper kill killed a process with oom_score_adj -1000: {r.stdout}"
        assert r.returncode == 2 and "oom_score_adj" in r.stderr, r.stderr


# --- the daemon's policy path, with the daemon in a forked child ------------------------------
#
# pytest forks A (named PREFIX-par), A forks B (named PREFIX-self), B runs the daemon.
# So the daemon's own process and its parent carry names no protect rule matches, and a
# prefer rule puts them (and the -1000 and protected hogs) at the top of the ranking:
# only the invariant stands between them and the kill.  B runs in a private mount
# namespace, where /proc/<pid>/oom_score_adj of chosen hogs reads -1000.


@dataclass
class ForkedDaemon:
    a: int
    ready: int            # read end: B writes "ready <pid>" once its first scan is done
    result: Path
    log: Path

    reaped: bool = False

    def wait_ready(self, timeout: float = 30.0) -> int:
        r, _, _ = select.select([self.ready], [], [], timeout)
        line = os.read(self.ready, 200).decode() if r else ""
        if not line.startswith("ready "):
            self.abort()
            raise AssertionError(f"forked daemon not ready ({line!r}); log:\n{self.log_text()}")
        return int(line.split()[1])

    def abort(self) -> None:
        """SIGKILL A (our child, not reaped yet); B dies with it (PR_SET_PDEATHSIG)."""
        if not self.reaped:
            os.kill(self.a, signal.SIGKILL)
            os.waitpid(self.a, 0)
            self.reaped = True
            os.close(self.ready)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log)"

    def stop(self, b: int | None) -> dict[str, Any]:
        """SIGTERM to B through a pidfd (B is not our child), then wait for A."""
        if b is not None:
            with contextlib.suppress(ProcessLookupError):
                fd = os.pidfd_open(b)
                try:
                    signal.pidfd_send_signal(fd, signal.SIGTERM)
                finally:
                    os.close(fd)
        deadline = time.monotonic() + 30
        status = None
        while status is None:
            pid, st = os.waitpid(self.a, os.WNOHANG)
            if pid:
                status = st
            elif time.monotonic() > deadline:
                self.abort()
                raise AssertionError(f"forked daemon did not stop; log:\n{self.log_text()}")
            else:
                time.sleep(0.01)
        self.reaped = True
        os.close(self.ready)
        assert os.waitstatus_to_exitcode(status) == 0, \
            f"forked daemon exited with {status:#x}; log:\n{self.log_text()}"
        data: dict[str, Any] = json.loads(self.result.read_text())
        return data


def set_comm(name: str) -> None:
    with open("/proc/self/comm", "w") as f:
        f.write(name)


def fork_daemon(cfg: Config, tmp: Path, *, must_live: Collection[int], watch: Collection[int],
                fake_adj: Collection[int] = (), fake_adj_after_scan: Collection[int] = (),
                meminfo: Callable[[], procfs.MemInfo] = procfs.read_meminfo) -> ForkedDaemon:
    """Start the daemon in B (see above).  `watch`: PIDs that must be in its first
    ranking before it says ready; `fake_adj`: PIDs whose oom_score_adj reads -1000 from
    the start, `fake_adj_after_scan`: from just after that first ranking."""
    test_pid = os.getpid()
    r, w = os.pipe()
    result, log = tmp / "daemon-result.json", tmp / "daemon.log"
    fake = tmp / "oom_score_adj"
    fake.write_text("-1000\n")
    a = os.fork()
    if a != 0:
        os.close(w)
        return ForkedDaemon(a, r, result, log)
    code = 4
    try:  # A
        os.close(r)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        set_comm(f"{PREFIX}-par")
        b = os.fork()
        if b == 0:
            code = 3
            try:
                code = _run_b(cfg, w, test_pid, must_live=must_live, watch=watch, fake=fake,
                              fake_adj=fake_adj, fake_adj_after_scan=fake_adj_after_scan,
                              meminfo=meminfo, result=result, log=log)
            except BaseException:
                with open(log, "a") as f:
                    f.write(traceback.format_exc())
            finally:
                os._exit(code)
        os.close(w)
        _, status = os.waitpid(b, 0)
        code = os.waitstatus_to_exitcode(status) & 0xFF
    finally:
        os._exit(code)


def _bind(source: Path, target: str) -> None:
    if _libc.mount(str(source).encode(), target.encode(), None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), f"bind mount over {target}")


def _run_b(cfg: Config, w: int, test_pid: int, *, must_live: Collection[int],
           watch: Collection[int], fake: Path, fake_adj: Collection[int],
           fake_adj_after_scan: Collection[int], meminfo: Callable[[], procfs.MemInfo],
           result: Path, log: Path) -> int:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    set_comm(f"{PREFIX}-self")
    # Single-threaded still: a private mount namespace for the fake -1000 files.
    if _libc.unshare(CLONE_NEWNS) != 0 or _libc.mount(b"none", b"/", None,
                                                       MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "private mount namespace")
    for pid in fake_adj:
        _bind(fake, f"/proc/{pid}/oom_score_adj")
    logger = logging.getLogger("mreaper")
    logger.handlers[:] = [logging.FileHandler(log)]
    logger.handlers[0].setFormatter(logging.Formatter("%(relativeCreated)6.0f %(message)s"))
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    guard = GuardedSyscalls(owned_by_test(test_pid, {*must_live, os.getpid(), os.getppid()}))
    daemon = Daemon(cfg, syscalls=guard, meminfo=meminfo)

    def when_ranked() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            candidates = daemon.status(top=100_000)["candidates"]
            assert isinstance(candidates, list)
            if set(watch) <= {int(c["pid"]) for c in candidates}:
                for pid in fake_adj_after_scan:
                    _bind(fake, f"/proc/{pid}/oom_score_adj")
                os.write(w, f"ready {os.getpid()}\n".encode())
                return
            time.sleep(0.01)
        os.write(w, b"never ranked\n")
        daemon.request_stop()

    threading.Thread(target=when_ranked, daemon=True).start()
    rc = daemon.run()
    result.write_text(json.dumps({
        "rc": rc, "violations": guard.violations, "signalled": guard.signalled(),
        "kills": [[k.pid, k.name] for k in daemon.kills]}))
    return rc


# A small victim: joins its memory cgroup, names itself, holds a little memory, says
# "ready", then on "exec" on stdin execs /bin/sleep (same PID and start time, new name).
EXEC_VICTIM = r"""
import os, sys, ctypes, signal
ctypes.CDLL(None).prctl(1, signal.SIGKILL)
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
with open("/proc/self/comm", "w") as f:
    f.write(sys.argv[2])
block = bytearray(b"\x01") * (8 << 20)
print("ready", flush=True)
if sys.stdin.readline().strip() == "exec":
    os.execv("/bin/sleep", ["sleep", "1000"])
"""


def test_daemon_never_kills_itself_its_parent_a_minus_1000_or_a_protected_process(
        memcgs: list[MemoryCgroup], tmp_path: Path) -> None:
    memcgs.append(MemoryCgroup.create(limit=64 * MiB))
    memcgs.append(MemoryCgroup.create(limit=2 * GiB))
    adj = Hog(16 * MiB, memcgs[0], name=f"{PREFIX}-adj")
    prot = Hog(16 * MiB, memcgs[0], name=f"{PREFIX}-prot")
    try:
        base = procfs.read_meminfo().mem_available
        cfg = daemon_config(available=base, rules=[
            {"action": "protect", "name": f"^{PREFIX}-prot$"},
            {"action": "prefer", "name": f"^{PREFIX}-(self|par|adj|prot)$", "adjust": 100_000},
        ], extra={"kill": {"sort_by": "rss"}})
        forked = fork_daemon(cfg, tmp_path, must_live={adj.pid, prot.pid},
                             watch={adj.pid, prot.pid}, fake_adj={adj.pid},
                             meminfo=own_pressure(memcgs[1:], base))
        try:
            b = forked.wait_ready()
            with Leak(memcgs[1], "leak") as hog:
                hog.grow(1280 * MiB)
                try:
                    rc = hog.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    rc = None
            out = forked.stop(b)
        finally:
            forked.abort()
        refused = sorted(set(out["violations"]))
        assert refused == [], (f"the guard refused {len(out['violations'])} signals: {refused}; "
                               "log:\n" + "\n".join(forked.log_text().splitlines()[:12]))
        assert rc == -signal.SIGKILL, forked.log_text()
        assert out["kills"] == [[hog.pid, f"{PREFIX}-leak"]], forked.log_text()
        assert out["signalled"] == [[hog.pid, signal.SIGKILL]]
        assert is_alive_unsignalled(adj.pid) and is_alive_unsignalled(prot.pid)
    finally:
        adj.kill()
        prot.kill()


def test_daemon_rechecks_a_stale_ranking_before_it_signals(
        memcgs: list[MemoryCgroup], tmp_path: Path) -> None:
    """The ranking the daemon acts on can be up to scan_interval old.  Two processes
    were fair game when it was made: one has become oom_score_adj -1000 since, one has
    exec'd into a name a protect rule matches (same PID, same start time).  Pinning
    checks identity, but must also check again what makes a process untouchable.

    Pressure here comes from this test's leak only (MemAvailable as of the start minus
    the leak's charge), and warn is off: so nothing refreshes the ranking before the
    kill level is crossed, whatever else runs on the machine."""
    memcgs.append(MemoryCgroup.create(limit=128 * MiB))
    memcgs.append(MemoryCgroup.create(limit=1 * GiB))
    small, big = memcgs
    adj = Hog(16 * MiB, small, name=f"{PREFIX}-adj")
    exe = subprocess.Popen([sys.executable, "-c", EXEC_VICTIM, small.procs_file,
                            f"{PREFIX}-exec"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert exe.stdout is not None and exe.stdin is not None
        assert exe.stdout.readline() == b"ready\n"
        base = procfs.read_meminfo().mem_available
        cfg = daemon_config(available=base, headroom=300 * MiB, rules=[
            {"action": "prefer", "name": f"^{PREFIX}-(adj|exec)$", "adjust": 100_000},
        ], extra={"memory": {"warn": "off"}, "detect": {"scan_interval": 600.0},
                  "kill": {"sort_by": "rss"}})
        forked = fork_daemon(cfg, tmp_path, must_live={adj.pid, exe.pid},
                             watch={adj.pid, exe.pid}, fake_adj_after_scan={adj.pid},
                             meminfo=own_pressure([big], base))
        try:
            b = forked.wait_ready()
            exe.stdin.write(b"exec\n")
            exe.stdin.flush()
            deadline = time.monotonic() + 10
            while procfs.read_stat(exe.pid).comm != "sleep":
                assert time.monotonic() < deadline, "the victim did not exec"
                time.sleep(0.005)
            with Leak(big, "leak") as hog:
                hog.grow(600 * MiB)
                try:
                    rc = hog.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    rc = None
            out = forked.stop(b)
        finally:
            forked.abort()
        violations = sorted(set(out["violations"]))
        assert violations == [], (
            "the daemon signalled processes that became untouchable after its ranking "
            f"was made (the guard refused, {len(out['violations'])} attempts): {violations}; "
            "log:\n" + "\n".join(forked.log_text().splitlines()[:12]))
        assert rc == -signal.SIGKILL, forked.log_text()
        assert is_alive_unsignalled(adj.pid) and is_alive_unsignalled(exe.pid)
    finally:
        adj.kill()
        exe.kill()
        exe.wait()


# --- 2. never signals a recycled PID ------------------------------------------------------------

SLEEP = shutil.which("sleep") or "/bin/sleep"
REUSE_ATTEMPTS = 1000
BATCH = 100


def _spawn_sleep() -> int:
    return os.posix_spawn(SLEEP, ["sleep", "30"], {})


def _reap(pid: int) -> None:
    """SIGKILL and wait for a child of ours (unreaped, so the PID is still its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _ticks_now() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def test_never_signals_a_recycled_pid(capsys: pytest.CaptureFixture[str]) -> None:
    """A victim is chosen (PID and start time recorded), exits and is reaped, and a new
    process takes its PID (ns_last_pid, retried when another fork on the machine takes
    it first).  Victim.open with the old start time must refuse, signal nothing, and
    leave the new process alive and unsignalled."""
    guard = GuardedSyscalls(lambda pid: False)  # any real signal is a violation
    reuses = misses = 0
    for _ in range(REUSE_ATTEMPTS // BATCH):
        chosen = []
        for _ in range(BATCH):
            pid = _spawn_sleep()
            chosen.append((pid, procfs.read_stat(pid).starttime))
        for pid, _ in chosen:
            _reap(pid)
        # Start times are in clock ticks: the new processes start in a later tick.
        last = max(start for _, start in chosen)
        deadline = time.monotonic() + 5
        while _ticks_now() <= last + 1:
            assert time.monotonic() < deadline, "the clock did not tick"
            time.sleep(0.002)
        reused: list[int] = []
        try:
            for pid, old_start in chosen:
                new = None
                for _ in range(5):
                    with open(NS_LAST_PID, "w") as f:
                        f.write(str(pid - 1))
                    new = _spawn_sleep()
                    if new == pid:
                        break
                    _reap(new)  # another fork took the PID meanwhile: not a reuse
                    misses += 1
                    new = None
                if new is None:
                    continue
                reused.append(new)
                assert procfs.read_stat(new).starttime != old_start
                with pytest.raises(VictimRecycled, match=f"PID {pid} was reused"):
                    Victim.open(pid, starttime=old_start, syscalls=guard)
                assert is_alive_unsignalled(new)
            reuses += len(reused)
            assert all(is_alive_unsignalled(p) for p in reused)  # zero wrong kills
        finally:
            for p in reused:
                _reap(p)
    assert guard.calls == [] and guard.violations == []
    with capsys.disabled():
        print(f"\n  PID reuse: {reuses} true reuses of {REUSE_ATTEMPTS} attempts "
              f"({misses} misses retried), 0 signals")
    assert reuses >= REUSE_ATTEMPTS * 9 // 10, (reuses, misses)


# --- 3. signals only through pidfds -----------------------------------------------------------

# Calls that signal a process by PID (or open a pidfd behind the engine's back).
BY_PID = {("os", "kill"), ("os", "killpg"), ("signal", "pthread_kill"),
          ("signal", "pidfd_send_signal"), ("os", "pidfd_open"), ("os", "system")}
# Method calls that signal a subprocess.Popen by its PID.
POPEN_SIGNALS = {"terminate", "send_signal"}
KILL_COMMANDS = {"kill", "pkill", "killall", "skill"}

# (file, function, call) -> why it is acceptable.  Any other site fails the test, and
# so does an entry here that no longer matches anything.
ALLOWED = {
    # hooks.py: a hook that outlives its timeout has its own process group killed; the
    # group leader is our unreaped child, so its PID (= the group ID) cannot be reused.
    ("hooks.py", "run_hook", "os.killpg(proc.pid, signal.SIGKILL)"):
        "the hook's own process group",
    # hogs.py: test and demo tooling; Popen.kill signals our own child, which the
    # Popen has not reaped yet (it checks), so the PID is still that child's.
    ("hogs.py", "Hog.__init__", "self.proc.kill()"): "own child",
    ("hogs.py", "Hog.__init__", "self.kill()"): "Hog.kill: own child",
    # hogs.py: Hog.kill reaps its own unreaped child through a pidfd; only where
    # pidfd_open fails (old kernel) does it fall back to a plain SIGKILL by PID.
    ("hogs.py", "reap_child", "os.kill(pid, signal.SIGKILL)"): "own child, no pidfd",
    ("hogs.py", "Hog.__exit__", "self.kill()"): "Hog.kill: own child",
    ("hogs.py", "Thrasher.stop", "self.proc.kill()"): "own child",
    ("hogs.py", "CpuStarver.stop", "self.proc.kill()"): "own child",
    # hogs.py: MemoryCgroup.remove SIGKILLs what is left in a throw-away cgroup it made,
    # which only its hogs join; by PID, so test tooling only, never the engine.
    ("hogs.py", "MemoryCgroup.remove", "os.kill(pid, signal.SIGKILL)"): "test cgroup cleanup",
    # reap.py: the group kill (cgroup.kill); each member was pinned with a pidfd first.
    ("reap.py", "kill_group", "cgroup.kill(cgroup_dir)"): "group kill",
    # linux/cgroup.py: the write to cgroup.kill behind it.
    ("linux/cgroup.py", "kill", "open(os.path.join(cgroup_dir, 'cgroup.kill'), 'w')"):
        "group kill",
}


def signal_sites(source: str, filename: str) -> set[tuple[str, str, str]]:
    """Every place in `source` that could signal a process other than through the
    Syscalls layer's pidfds: (file, enclosing function, the call)."""
    tree = ast.parse(source, filename)
    sites: set[tuple[str, str, str]] = set()
    imported: set[str] = set()  # `from os import kill`
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "signal"):
            imported |= {a.asname or a.name for a in node.names
                         if (node.module, a.name) in BY_PID}

    class Visitor(ast.NodeVisitor):
        def __init__(self) -> None:
            self.stack: list[str] = []

        def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
            self.stack.append(node.name)
            self.generic_visit(node)
            self.stack.pop()

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            self._scoped(node)

        def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
            self._scoped(node)

        def visit_ClassDef(self, node: ast.ClassDef) -> None:
            self._scoped(node)

        def visit_Call(self, node: ast.Call) -> None:
            if _signals(node, imported):
                sites.add((filename, ".".join(self.stack) or "<module>", ast.unparse(node)))
            self.generic_visit(node)

    Visitor().visit(tree)
    return sites


def _signals(node: ast.Call, imported: set[str]) -> bool:
    f = node.func
    if isinstance(f, ast.Name):
        if f.id in imported:
            return True
        if f.id == "open" and any(isinstance(a, ast.Constant) and a.value == "cgroup.kill"
                                  for a in ast.walk(node)):
            return True  # a write to cgroup.kill
    if isinstance(f, ast.Attribute):
        if isinstance(f.value, ast.Name) and ((f.value.id, f.attr) in BY_PID
                                              or (f.value.id, f.attr) == ("cgroup", "kill")):
            return True
        if f.attr in POPEN_SIGNALS or (f.attr == "kill" and not node.args and not node.keywords):
            return True  # Popen.kill() / Hog.kill(), not Sink.kill(report, scope)
    for arg in node.args:  # a kill command run as a process: ["kill", "-9", pid]
        if isinstance(arg, ast.List | ast.Tuple) and arg.elts:
            first = arg.elts[0]
            if (isinstance(first, ast.Constant) and isinstance(first.value, str)
                    and os.path.basename(first.value) in KILL_COMMANDS):
                return True
    return False


def test_signals_only_through_pidfds() -> None:
    files = sorted([*SRC.glob("*.py"), *SRC.glob("linux/*.py")])
    assert len(files) > 10
    found: set[tuple[str, str, str]] = set()
    for path in files:
        found |= signal_sites(path.read_text(), str(path.relative_to(SRC)))
    unexpected = sorted(found - set(ALLOWED))
    stale = sorted(set(ALLOWED) - found)
    assert not unexpected, f"signals by PID, outside the pidfd path: {unexpected}"
    assert not stale, f"allowlist entries that match nothing any more: {stale}"


def test_the_scan_catches_every_form() -> None:
    """The scanner itself: each way of signalling by PID is found."""
    source = """
import os, signal, subprocess
from os import kill as k
def a(pid): os.kill(pid, 9)
def b(pid): os.killpg(pid, 9)
def c(t): signal.pthread_kill(t, 9)
def d(pid): k(pid, 9)
def e(p): p.terminate()
def f(p): p.send_signal(9)
def g(p): p.kill()
def h(pid): subprocess.run(["kill", "-9", str(pid)])
def i(pid): subprocess.run(["/bin/kill", str(pid)])
def j(pid): os.system(f"kill -9 {pid}")
def l(fd): signal.pidfd_send_signal(fd, 9)
def m(pid): os.pidfd_open(pid)
def fine(sink, report): sink.kill(report, "machine")
"""
    found = {fn for _, fn, _ in signal_sites(source, "x.py")}
    assert found == set("abcdefghijlm")


# --- 4. process_mrelease only after our own SIGKILL ---------------------------------------------


def test_daemon_calls_process_mrelease_only_after_its_own_sigkill(
        memcgs: list[MemoryCgroup]) -> None:
    """Two leaks, each stopped between the term and the kill level until the daemon's
    SIGTERM is seen.  The first ignores SIGTERM and then grows past the kill level: the
    daemon cuts the grace period short with SIGKILL, then calls process_mrelease.  The
    second dies of its SIGTERM: no SIGKILL, and so no process_mrelease.  Every call is
    recorded; pressure is these leaks' own (see own_pressure)."""
    memcgs += [MemoryCgroup.create(limit=2 * GiB) for _ in range(2)]
    guard = GuardedSyscalls(owned_by_test(os.getpid()))
    base = procfs.read_meminfo().mem_available
    cfg = daemon_config(available=base, headroom=500 * MiB, term=250 * MiB,
                        extra={"kill": {"term_timeout": 20.0}})
    leaks: list[Leak] = []

    def sigterm_seen(pid: int) -> Callable[[], bool]:
        return lambda: (pid, signal.SIGTERM) in guard.signalled()

    def scenario(s: Scenario) -> None:
        # Slow (80 MiB/s): the daemon grants a SIGTERM grace only when the kill level
        # is more than a second away at the rate memory falls.
        deaf = Leak(memcgs[0], "deaf", ignore_sigterm=True, step=4 * MiB, interval=0.05)
        leaks.append(deaf)
        deaf.grow(380 * MiB)
        s.wait(sigterm_seen(deaf.pid), 30, "SIGTERM to the first leak")
        deaf.grow(1280 * MiB)
        assert s.killed(deaf) == -signal.SIGKILL
        s.reported(1)
        term = Leak(memcgs[1], "term", step=4 * MiB, interval=0.05)
        leaks.append(term)
        term.grow(380 * MiB)
        assert s.killed(term) == -signal.SIGTERM
        s.reported(2)

    run = run_guarded(cfg, scenario, guard, own_pressure(memcgs, base), leaks)
    deaf_report, term_report = run.daemon.kills
    assert [s.name for s in deaf_report.signals] == ["SIGTERM", "SIGKILL"], deaf_report
    assert deaf_report.mrelease in (Mrelease.REAPED, Mrelease.EXITED_FIRST)
    assert [s.name for s in term_report.signals] == ["SIGTERM"], term_report
    assert term_report.mrelease is Mrelease.NOT_CALLED, term_report
    assert [c for c in guard.calls if c.name == "process_mrelease"], "no process_mrelease"
    assert mrelease_without_our_kill(guard.calls) == []


def straight_kill_setup(memcgs: list[MemoryCgroup]
                        ) -> tuple[Config, Callable[[], procfs.MemInfo]]:
    """A 2 GiB memcg for one leak, a kill level 300 MiB under MemAvailable with no
    SIGTERM stage, and the meminfo that feels only the test's own memcgs."""
    memcgs.append(MemoryCgroup.create(limit=2 * GiB))
    base = procfs.read_meminfo().mem_available
    return daemon_config(available=base, headroom=300 * MiB), own_pressure(memcgs, base)


def test_daemon_sends_sigkill_from_its_loop_and_reaps_in_a_reaper_thread(
        memcgs: list[MemoryCgroup]) -> None:
    """Straight to SIGKILL (no SIGTERM stage, no pre-kill hook): the signal goes out
    from the loop that decided, with no hand-over to a reaper thread on the clock; the
    reaper thread then calls process_mrelease, after that SIGKILL."""
    guard = GuardedSyscalls(owned_by_test(os.getpid()))
    cfg, meminfo = straight_kill_setup(memcgs)
    leaks: list[Leak] = []

    def scenario(s: Scenario) -> None:
        leak = Leak(memcgs[0], "straight")
        leaks.append(leak)
        leak.grow(600 * MiB)
        assert s.killed(leak) == -signal.SIGKILL
        s.reported(1)

    run = run_guarded(cfg, scenario, guard, meminfo, leaks)
    (report,) = run.daemon.kills
    assert [s.name for s in report.signals] == ["SIGKILL"], report
    kills = [c for c in guard.calls if c.name == "pidfd_send_signal" and c.sig]
    assert [(c.sig, c.thread) for c in kills] == [(signal.SIGKILL, "MainThread")], kills
    reaps = [c for c in guard.calls if c.name == "process_mrelease"]
    assert reaps and all(c.thread.startswith("mreaper-reaper") for c in reaps), reaps
    assert mrelease_without_our_kill(guard.calls) == []


class SlowReaper(GuardedSyscalls):
    """process_mrelease that first sleeps: the kill report comes late."""

    def process_mrelease(self, pidfd: int, flags: int = 0) -> None:
        time.sleep(0.5)
        super().process_mrelease(pidfd, flags)


def test_a_kill_under_way_when_the_daemon_stops_is_still_reported(
        memcgs: list[MemoryCgroup]) -> None:
    """The daemon is told to stop right after its SIGKILL, while the reaper thread is
    still at work: it waits for that kill and reports it before it exits."""
    guard = SlowReaper(owned_by_test(os.getpid()))
    cfg, meminfo = straight_kill_setup(memcgs)
    leaks: list[Leak] = []

    def scenario(s: Scenario) -> None:
        leak = Leak(memcgs[0], "late")
        leaks.append(leak)
        leak.grow(600 * MiB)
        s.wait(lambda: any(c.name == "pidfd_send_signal" and c.sig == signal.SIGKILL
                           for c in guard.calls), 30, "the SIGKILL")
        assert s.daemon.kills == []  # the reaper is still asleep: nothing reported yet

    run = run_guarded(cfg, scenario, guard, meminfo, leaks)
    (report,) = run.daemon.kills
    assert report.name == f"{PREFIX}-late"
    killed = [line for line in run.log if " killed " in line]
    assert len(killed) == 1 and run.log.index(killed[0]) < run.log.index("INFO stopped"), run.log


def test_group_kill_calls_process_mrelease_only_after_cgroup_kill(
        memcgs: list[MemoryCgroup], monkeypatch: pytest.MonkeyPatch) -> None:
    """A cgroup killed whole: cgroup.kill, then process_mrelease on each pinned member."""
    unified = cgroup.find_mounts().unified
    if not unified or not os.path.exists(os.path.join(unified, "cgroup.procs")):
        pytest.fail("no cgroup2 mount on this host")
    group = os.path.join(unified, f"{PREFIX}-group-{uuid.uuid4().hex[:6]}")
    os.mkdir(group)
    memcgs.append(MemoryCgroup.create(limit=256 * MiB))
    guard = GuardedSyscalls(owned_by_test(os.getpid()))
    real_kill = cgroup.kill

    def recorded_kill(cgroup_dir: str) -> None:
        guard.record_cgroup_kill(cgroup_dir)
        real_kill(cgroup_dir)

    monkeypatch.setattr(cgroup, "kill", recorded_kill)
    members = [Hog(32 * MiB, memcgs[0], name=f"{PREFIX}-g{i}", also_in=[group])
               for i in range(2)]
    try:
        victims, skipped = pin_cgroup(group, syscalls=guard)
        try:
            report = kill_group(group, victims, KillOptions(exit_timeout=10), syscalls=guard)
        finally:
            for v in victims:
                v.close()
        assert skipped == [] and len(report.members) == 2
        assert [h.proc.wait(timeout=10) for h in members] == [-signal.SIGKILL] * 2
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
    assert mrelease_without_our_kill(guard.calls) == []
    assert [c.name for c in guard.calls].count("cgroup.kill") == 1
    assert [c.name for c in guard.calls].count("process_mrelease") == 2
    assert guard.signalled() == []  # no SIGKILL of ours: cgroup.kill did it
