"""Helpers shared by the real-process tests (imported as `helpers`; tests/ is on sys.path)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mreaper.linux import procfs
from mreaper.linux.syscalls import LinuxSyscalls


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)


def is_alive_unsignalled(pid: int) -> bool:
    """True if `pid` exists, is not a zombie and has no signal pending."""
    try:
        stat = procfs.read_stat(pid)
        status = status_fields(pid)
    except (procfs.ProcessGone, FileNotFoundError, ProcessLookupError):
        return False
    return (stat.state not in ("Z", "X")
            and int(status["SigPnd"], 16) == 0 and int(status["ShdPnd"], 16) == 0)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
               what: str = "condition") -> None:
    """Poll `predicate` until true; fail the test after `timeout` s (a bound, not a check)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def pidfd_readable(pidfd: int, timeout: float) -> bool:
    """Wait (bounded) for a pidfd to report the process exited."""
    r, _, _ = select.select([pidfd], [], [], timeout)
    return bool(r)


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def thread_count(pid: int | str = "self") -> int:
    return int(status_fields(pid)["Threads"])  # type: ignore[arg-type]


def kernel_threads(limit: int = 5) -> list[int]:
    """A few PIDs with PF_KTHREAD set (this host runs in the init PID namespace)."""
    found = []
    for pid in sorted(procfs.list_pids()):
        with contextlib.suppress(procfs.ProcessGone, procfs.ParseError):
            if procfs.read_stat(pid).is_kernel_thread:
                found.append(pid)
        if len(found) >= limit:
            break
    return found


# --- a Syscalls that records the order of the engine's calls ---------------------------


@dataclass
class Call:
    name: str
    args: tuple[int, ...]
    thread: int
    errno: int | None = None


@dataclass
class RecordingSyscalls:
    """LinuxSyscalls with a log of every call, in order, and optional hooks run before
    a call (hook(name, args)) -- the real kernel answers every call."""

    real: LinuxSyscalls = field(default_factory=LinuxSyscalls)
    calls: list[Call] = field(default_factory=list)
    before: Callable[[str, tuple[int, ...]], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _do(self, name: str, fn: Callable[..., object], *args: int) -> object:
        if self.before is not None:
            self.before(name, args)
        call = Call(name, args, threading.get_ident())
        with self.lock:
            self.calls.append(call)
        try:
            return fn(*args)
        except OSError as e:
            call.errno = e.errno
            raise

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        return self._do("pidfd_open", self.real.pidfd_open, pid, flags)  # type: ignore[return-value]

    def pidfd_send_signal(self, pidfd: int, sig: int, flags: int = 0) -> None:
        self._do("pidfd_send_signal", self.real.pidfd_send_signal, pidfd, sig, flags)

    def process_mrelease(self, pidfd: int, flags: int = 0) -> None:
        self._do("process_mrelease", self.real.process_mrelease, pidfd, flags)

    def signals(self) -> list[int]:
        return [c.args[1] for c in self.calls if c.name == "pidfd_send_signal"]

    def index(self, name: str, sig: int | None = None) -> int:
        """Index of the first call `name` (with signal `sig`), or -1."""
        for i, c in enumerate(self.calls):
            if c.name == name and (sig is None or c.args[1] == sig):
                return i
        return -1


# --- PID reuse ---------------------------------------------------------------------------

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"


def spawn_with_pid(pid: int, argv: list[str], attempts: int = 20) -> subprocess.Popen[bytes]:
    """Start `argv` with exactly PID `pid` (root: write pid-1 to ns_last_pid, then fork;
    another fork on the machine may take it first, so retry a few times)."""
    for _ in range(attempts):
        with open(NS_LAST_PID, "w") as f:
            f.write(str(pid - 1))
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    pytest.fail(f"could not get PID {pid} back in {attempts} attempts")


# --- a tiny C helper, compiled at test time -------------------------------------------------


def compile_c(source: str, out: Path) -> Path:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(out), str(src)], check=True,
                   capture_output=True, timeout=120)
    return out


# Allocates and touches N MiB of private anonymous memory (after joining the given
# cgroup.procs), clone(CLONE_VM|SIGCHLD)s a child that sleeps forever -- a separate
# process sharing the same mm -- prints the child's PID and sleeps too.
SHARED_MM_C = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int sleeper(void *arg) {
    (void)arg;
    for (;;)
        pause();
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CGROUP_PROCS|'' MIB\n", argv[0]);
        return 2;
    }
    if (argv[1][0]) {
        FILE *f = fopen(argv[1], "w");
        if (!f || fprintf(f, "%d", (int)getpid()) < 0 || fclose(f) != 0) {
            perror("joining the memory cgroup");
            return 1;
        }
    }
    size_t size = strtoull(argv[2], NULL, 10) << 20;
    char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    memset(mem, 1, size);
    size_t stack_size = 1 << 16;
    char *stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) {
        perror("mmap stack");
        return 1;
    }
    pid_t child = clone(sleeper, stack + stack_size, CLONE_VM | SIGCHLD, NULL);
    if (child < 0) {
        perror("clone");
        return 1;
    }
    printf("%d\n", (int)child);
    fflush(stdout);
    for (;;)
        pause();
}
"""
