"""refusal(): the processes mreaper must never kill (pure, on Stat records)."""

from __future__ import annotations

import os
import threading

from mreaper.linux import procfs
from mreaper.reap import refusal


def stat(pid: int, ppid: int = 1000, flags: int = 0x400100, comm: str = "x") -> procfs.Stat:
    return procfs.Stat(pid=pid, comm=comm, state="S", ppid=ppid, flags=flags, starttime=42)


def free_pid() -> int:
    """A PID that is neither ours nor our parent's nor 1 or 2."""
    return next(p for p in range(4000, 5000) if p not in (os.getpid(), os.getppid()))


def test_pid_1() -> None:
    reason = refusal(stat(1, ppid=0))
    assert reason is not None and "PID 1" in reason


def test_kernel_threads() -> None:
    assert "kernel thread" in (refusal(stat(2, ppid=0, flags=procfs.PF_KTHREAD | 0x40)) or "")
    # a kworker: PF_KTHREAD and a child of kthreadd
    assert "kernel thread" in (refusal(stat(free_pid(), ppid=2, flags=0x04208060)) or "")
    # PF_KTHREAD alone is enough, whatever the parent
    assert "kernel thread" in (refusal(stat(free_pid(), ppid=0,
                                            flags=procfs.PF_KTHREAD)) or "")


def test_captured_kthreadd_is_refused() -> None:
    from pathlib import Path

    proc = str(Path(__file__).parent / "fixtures" / "proc")
    assert "kernel thread" in (refusal(procfs.read_stat(2, proc)) or "")


def test_self() -> None:
    reason = refusal(stat(os.getpid(), ppid=os.getppid()))
    assert reason is not None and "itself" in reason


def test_parent() -> None:
    reason = refusal(stat(os.getppid()))
    assert reason is not None and "parent" in reason


def test_a_thread_id() -> None:
    """A non-leader thread: its TID has a /proc entry, but Tgid names the process."""
    started, stop = threading.Event(), threading.Event()
    tids: list[int] = []

    def run() -> None:
        tids.append(threading.get_native_id())
        started.set()
        stop.wait(30)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert started.wait(30)
        tid = tids[0]
        st = procfs.read_stat(tid)
        assert st.pid == tid != os.getpid()
        tgid = procfs.read_status(tid).tgid
        assert tgid == os.getpid()
        reason = refusal(st, tgid)
        assert reason is not None and "thread" in reason and str(tgid) in reason
    finally:
        stop.set()
        t.join()


def test_synthetic_thread_id() -> None:
    pid = free_pid()
    reason = refusal(stat(pid + 1), tgid=pid)
    assert reason is not None and f"thread of process {pid}" in reason


def test_an_ordinary_process_is_not_refused() -> None:
    pid = free_pid()
    assert refusal(stat(pid)) is None
    assert refusal(stat(pid), tgid=pid) is None
    assert refusal(stat(pid, ppid=1)) is None  # a daemon reparented to init


def test_a_child_of_pid_2_without_pf_kthread_is_a_process() -> None:
    """Inside a PID namespace (a container), PID 2 is an ordinary process and its children
    are too: PF_KTHREAD, not the PID, says what a kernel thread is (the real kthreadd
    carries the flag, so checking it loses nothing)."""
    assert refusal(stat(2, ppid=1, flags=0x400100, comm="bash")) is None
    assert refusal(stat(free_pid(), ppid=2, flags=0x400100, comm="postgres")) is None
