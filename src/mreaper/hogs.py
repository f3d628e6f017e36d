"""Bounded memory hogs for the demo, the tests and the benchmarks.

A hog is a child process that fills private anonymous memory (a bytearray: not
`mmap.mmap(-1, n)`, which is shared memory that process_mrelease cannot free) and
waits.  Each hog can be put in its own memory cgroup so that (a) its charge is
measured exactly and (b) a runaway is stopped by the cgroup limit, never by a
system-wide OOM.  Works on the hybrid layout (v1 `memory` controller) and on pure
cgroup v2 (memory controller enabled in the parent's subtree_control).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from mreaper.linux import cgroup

MiB = 1 << 20
GiB = 1 << 30


class CgroupUnavailable(RuntimeError):
    """No writable memory cgroup here (not root, or no memory controller)."""


@dataclass
class MemoryCgroup:
    """A throw-away memory cgroup: v1 (`memory.usage_in_bytes`) or v2 (`memory.current`)."""

    path: str
    version: int

    @classmethod
    def create(cls, limit: int | None = None, prefix: str = "mreaper-test") -> MemoryCgroup:
        mounts = cgroup.find_mounts()
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        if mounts.memory_v1:
            path, version = os.path.join(mounts.memory_v1, name), 1
        elif mounts.unified and _v2_has_memory(mounts.unified):
            path, version = os.path.join(mounts.unified, name), 2
        else:
            raise CgroupUnavailable("no memory cgroup controller is mounted")
        try:
            os.mkdir(path)
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {path}: {e.strerror}") from e
        cg = cls(path, version)
        if limit is not None:
            try:
                cg.set_limit(limit)
            except BaseException:
                cg.remove()
                raise
        return cg

    def _file(self, v1: str, v2: str) -> str:
        return os.path.join(self.path, v1 if self.version == 1 else v2)

    def set_limit(self, limit: int) -> None:
        with open(self._file("memory.limit_in_bytes", "memory.max"), "w") as f:
            f.write(str(limit))
        if self.version == 2:  # no swap escape for a bounded hog
            with contextlib.suppress(OSError), open(os.path.join(self.path, "memory.swap.max"),
                                                    "w") as f:
                f.write("0")

    def usage(self) -> int:
        with open(self._file("memory.usage_in_bytes", "memory.current")) as f:
            return int(f.read())

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def pids(self) -> list[int]:
        with open(self.procs_file) as f:
            return [int(x) for x in f.read().split()]

    def remove(self, timeout: float = 5.0) -> None:
        """SIGKILL whatever is left inside, then remove the cgroup."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pids = self.pids()
            except FileNotFoundError:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if _try_rmdir(self.path, deadline):
                return

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _try_rmdir(path: str, deadline: float) -> bool:
    """Remove a cgroup directory: True when it is gone; False (after a short pause) while
    the kernel still counts exiting tasks in it; the error once `deadline` passed."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.01)
        return False
    return True


def _v2_has_memory(unified: str) -> bool:
    try:
        with open(os.path.join(unified, "cgroup.subtree_control")) as f:
            return "memory" in f.read().split()
    except OSError:
        return False


# The hog joins its cgroup itself (before allocating, so all of it is charged there),
# fills `size` bytes of private memory, optionally starts threads that share it,
# says "ready" and waits for a signal.  SIGTERM is ignored when asked, for the
# "victim ignores SIGTERM" cases.
_HOG = r"""
import ctypes, os, signal, sys, threading, time
# Die with the parent (PR_SET_PDEATHSIG = 1): a test or demo killed outright must not
# leave a hog paused for ever in a cgroup.
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
if os.getppid() == 1:
    sys.exit(1)
procs, size, threads, ignore_term = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
name, step, interval = sys.argv[5], int(sys.argv[6]), float(sys.argv[7])
for procs_file in filter(None, procs.split(",")):
    with open(procs_file, "w") as f:
        f.write(str(os.getpid()))
if name:
    with open("/proc/self/comm", "w") as f:
        f.write(name)
if ignore_term == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
for _ in range(threads):
    threading.Thread(target=threading.Event().wait, daemon=True).start()
if step:
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    blocks = []
    while len(blocks) * step < size:
        blocks.append(bytearray(b"\x01") * step)
        time.sleep(interval)
else:
    block = bytearray(b"\x01") * size
    sys.stdout.write("ready\n")
    sys.stdout.flush()
while True:
    signal.pause()
"""


class Hog:
    """A running hog process (a Popen with its cgroup).

    `name` sets its comm (what rules match on); with `step`, it says "ready" at once
    and then grows by `step` bytes every `interval` seconds up to `size` (a leak)."""

    def __init__(self, size: int, memcg: MemoryCgroup | None = None, *, threads: int = 0,
                 ignore_sigterm: bool = False, name: str = "", step: int = 0,
                 interval: float = 0.05, also_in: Sequence[str] = (),
                 ready_timeout: float = 60.0) -> None:
        """`also_in`: more cgroup directories to join (e.g. a cgroup2 scope on a hybrid
        host, where the memory cgroup is in the v1 hierarchy)."""
        self.size = size
        self.memcg = memcg
        procs = [memcg.procs_file] if memcg else []
        procs += [os.path.join(d, "cgroup.procs") for d in also_in]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOG, ",".join(procs), str(size),
             str(threads), "1" if ignore_sigterm else "0", name, str(step), str(interval)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, close_fds=True)
        assert self.proc.stdout is not None
        try:
            line = _readline_with_timeout(self.proc, ready_timeout)
        except BaseException:
            self.kill()
            raise
        if line != b"ready\n":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"hog of {size} bytes did not start (got {line!r}, "
                               f"exit {self.proc.returncode})")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL and reap with process_mrelease: after a plain SIGKILL the freed pages
        trickle back into MemAvailable through per-CPU free lists for up to a minute,
        which would move the levels of whatever test runs next."""
        if self.proc.poll() is None:
            reap_child(self.proc.pid)
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> Hog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def reap_child(pid: int) -> None:
    """SIGKILL a child of ours through a pidfd and free its memory at once.  Falls back
    to a plain SIGKILL where pidfds or process_mrelease are missing."""
    from mreaper.linux import syscalls

    try:
        fd = syscalls.pidfd_open(pid)
    except OSError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return
    try:
        syscalls.pidfd_send_signal(fd, signal.SIGKILL)
        with contextlib.suppress(OSError):  # ESRCH: it exited first; ENOSYS: old kernel
            syscalls.process_mrelease(fd)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def _readline_with_timeout(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    import select

    assert proc.stdout is not None
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if r else b""


# A thrasher: holds `anon` bytes and reads a file larger than what is left under its
# memory cgroup's limit, again and again.  Its page cache is charged to its own memcg
# (the file's cache is dropped first, else the pages stay charged to whoever wrote
# them), so each read reclaims within the cgroup: memory stall that PSI reports.
_THRASH = r"""
import os, sys
procs, path, anon = sys.argv[1], sys.argv[2], int(sys.argv[3])
for procs_file in filter(None, procs.split(",")):
    with open(procs_file, "w") as f:
        f.write(str(os.getpid()))
with open("/proc/self/comm", "w") as f:
    f.write(sys.argv[4])
block = bytearray(b"\x01") * anon
sys.stdout.write("ready\n"); sys.stdout.flush()
while True:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
"""


class Thrasher:
    """A process that makes memory pressure (PSI) inside its cgroups without growing."""

    def __init__(self, memcg: MemoryCgroup, workdir: str, *, anon: int, file_size: int,
                 also_in: Sequence[str] = (), name: str = "mr-thrash") -> None:
        self.path = os.path.join(workdir, f"mreaper-thrash-{uuid.uuid4().hex[:8]}")
        with open(self.path, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(file_size >> 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        procs = [memcg.procs_file] + [os.path.join(d, "cgroup.procs") for d in also_in]
        self.proc = subprocess.Popen([sys.executable, "-c", _THRASH, ",".join(procs), self.path,
                                      str(anon), name], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE)
        if _readline_with_timeout(self.proc, 30.0) != b"ready\n":
            self.stop()
            raise RuntimeError("thrasher did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> Thrasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# A CPU starver: a busy loop pinned to one CPU at SCHED_FIFO (root) so that a victim
# pinned to the same CPU gets only the RT throttling leftovers (5 % by default) to
# run its own exit path.  It ends itself after `lifetime` seconds, whatever happens.
_SPIN = r"""
import os, signal, sys
cpu, lifetime, fifo = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
os.sched_setaffinity(0, {cpu})
signal.setitimer(signal.ITIMER_REAL, lifetime)
if fifo:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
sys.stdout.write("spinning\n"); sys.stdout.flush()
while True:
    pass
"""


class CpuStarver:
    """Take one CPU away from a victim: SCHED_FIFO busy loop when root, else the
    victim is made SCHED_IDLE and the loop runs at normal priority."""

    def __init__(self, cpu: int, lifetime: float = 30.0) -> None:
        self.cpu = cpu
        self.fifo = os.geteuid() == 0
        self.proc = subprocess.Popen([sys.executable, "-c", _SPIN, str(cpu), str(lifetime),
                                      "1" if self.fifo else "0"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        if _readline_with_timeout(self.proc, 10.0) != b"spinning\n":
            self.stop()
            raise RuntimeError("CPU starver did not start")

    def starve(self, pid: int) -> None:
        """Pin `pid` (all its threads) to the starved CPU."""
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {self.cpu})
            if not self.fifo:
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> CpuStarver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Freezer:
    """A v1 freezer cgroup: its tasks sleep uninterruptibly (D state) while frozen, even
    after SIGKILL, which is the case where only process_mrelease frees their memory."""

    ROOT = "/sys/fs/cgroup/freezer"

    def __init__(self) -> None:
        if not os.path.isdir(self.ROOT):
            raise CgroupUnavailable("no v1 freezer hierarchy at /sys/fs/cgroup/freezer")
        self.path = os.path.join(self.ROOT, f"mreaper-test-{uuid.uuid4().hex[:10]}")
        os.mkdir(self.path)

    def add(self, pid: int) -> None:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(os.path.join(self.path, "tasks"), "w") as f:
                f.write(tid)

    def _state(self, state: str) -> None:
        with open(os.path.join(self.path, "freezer.state"), "w") as f:
            f.write(state)

    def freeze(self, timeout: float = 10.0) -> None:
        self._state("FROZEN")
        deadline = time.monotonic() + timeout
        while self.state() != "FROZEN":
            if time.monotonic() > deadline:
                raise RuntimeError("freezer did not reach FROZEN")
            time.sleep(0.005)

    def state(self) -> str:
        with open(os.path.join(self.path, "freezer.state")) as f:
            return f.read().strip()

    def thaw(self) -> None:
        self._state("THAWED")

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.thaw()
        deadline = time.monotonic() + 10
        while not _try_rmdir(self.path, deadline):
            pass

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
