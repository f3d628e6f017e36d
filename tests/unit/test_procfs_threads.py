"""read_status / read_cmdline / mm_thread when the leader has exited before its threads.

Fixture trees, because this machine cannot hold still the moments they stand for: a
thread that is itself past exit_mm (no Vm lines) listed before the one that holds the
mm, and a thread that vanishes between the listing and the read.  The plain case (a
main thread that called pthread_exit) is tested for real in
tests/real/test_hostile_processes.py.
"""

from __future__ import annotations

from pathlib import Path

from mreaper.linux import procfs

LEADER = 500
# a leader that called pthread_exit: State Z, no Vm*/Rss* lines, Threads counts the living
LEADER_STATUS = (b"Name:\tmr-ghost\nUmask:\t0022\nState:\tZ (zombie)\nTgid:\t500\nPid:\t500\n"
                 b"PPid:\t1\nUid:\t1000\t1000\t1000\t1000\nThreads:\t3\n")


def _thread_status(tid: int, *, with_mm: bool, name: bytes = b"mr-ghost") -> bytes:
    data = (b"Name:\t" + name + b"\nState:\tS (sleeping)\nTgid:\t500\nPid:\t%d\n"
            b"Uid:\t1000\t1000\t1000\t1000\n" % tid)
    if with_mm:
        data += (b"VmRSS:\t  307200 kB\nRssAnon:\t  307000 kB\nRssFile:\t     200 kB\n"
                 b"RssShmem:\t       0 kB\nVmSwap:\t       0 kB\n")
    return data + b"Threads:\t3\n"


def _tree(tmp_path: Path, threads: dict[int, bytes | None]) -> str:
    """/proc/500 with the leader's files and task/<tid>/ for each thread (None: listed
    in task/ but its files gone, as a thread that exited after the listing)."""
    d = tmp_path / str(LEADER)
    (d / "task" / str(LEADER)).mkdir(parents=True)
    (d / "status").write_bytes(LEADER_STATUS)
    (d / "cmdline").write_bytes(b"")
    for tid, status in threads.items():
        t = d / "task" / str(tid)
        t.mkdir()
        if status is not None:
            (t / "status").write_bytes(status)
            (t / "cmdline").write_bytes(b"./mr-ghost\x00300\x00")
    return str(tmp_path)


def test_memory_comes_from_the_first_thread_that_still_holds_the_mm(tmp_path: Path) -> None:
    proc = _tree(tmp_path, {501: None,                                   # gone meanwhile
                            502: _thread_status(502, with_mm=False),     # past exit_mm
                            503: _thread_status(503, with_mm=True, name=b"worker")})
    s = procfs.read_status(LEADER, proc)
    assert s.has_mm and s.mm_tid == 503
    assert s.vm_rss == 307200 * 1024 and s.rss_anon == 307000 * 1024
    # who the process is stays the leader's: its name (not the thread's), tgid, uid
    assert (s.name, s.tgid, s.uid) == ("mr-ghost", LEADER, 1000)
    assert procfs.mm_thread(LEADER, proc) == 503
    assert procfs.read_cmdline(LEADER, proc) == ("./mr-ghost", "300")


def test_no_thread_with_the_mm_reads_as_no_memory(tmp_path: Path) -> None:
    proc = _tree(tmp_path, {502: _thread_status(502, with_mm=False)})
    s = procfs.read_status(LEADER, proc)
    assert not s.has_mm and s.mm_tid == 0 and s.vm_rss == 0
    assert procfs.mm_thread(LEADER, proc) is None
    assert procfs.read_cmdline(LEADER, proc) == ()
