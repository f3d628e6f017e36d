"""procfs readers on fixture trees: captured files (fixtures/proc: a sleep 15545, the
zombie 15553, kthreadd 2, meminfo) and crafted ones for what a healthy host rarely shows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mreaper.linux import procfs
from mreaper.linux.procfs import ParseError, ProcessGone

FIXTURES = Path(__file__).parent / "fixtures" / "proc"
PROC = str(FIXTURES)

SLEEP, ZOMBIE, KTHREADD = 15545, 15553, 2

# A /proc/<pid>/stat tail (fields 3..52) as the kernel writes it, state S, ppid 1,
# flags 0x400100, starttime 123456.
TAIL = (b"S 1 4242 4242 0 -1 4194560 76 0 0 0 0 0 0 0 20 0 1 0 123456 2990080 407 "
        b"18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n")


def stat_line(pid: int, comm: bytes, tail: bytes = TAIL) -> bytes:
    return str(pid).encode() + b" (" + comm + b") " + tail


def make_proc(tmp_path: Path, pid: int, **files: bytes) -> str:
    """A proc tree under tmp_path holding /<pid>/<name> for each files[name]."""
    d = tmp_path / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return str(tmp_path)


# --- captured files ---------------------------------------------------------------------


def test_stat_of_a_normal_process() -> None:
    st = procfs.read_stat(SLEEP, PROC)
    assert st == procfs.Stat(pid=SLEEP, comm="sleep", state="S", ppid=15504, flags=4194304,
                             starttime=87398, pgrp=15501, session=2481)
    assert not st.is_kernel_thread


def test_status_of_a_normal_process() -> None:
    s = procfs.read_status(SLEEP, PROC)
    assert s == procfs.Status(name="sleep", tgid=SLEEP, uid=0, vm_rss=1800 * 1024,
                              rss_anon=108 * 1024, rss_file=1692 * 1024, rss_shmem=0, vm_swap=0,
                              has_mm=True)


def test_cmdline_cgroup_and_oom_score_of_a_normal_process() -> None:
    assert procfs.read_cmdline(SLEEP, PROC) == ("sleep", "1000")
    cg = procfs.read_cgroup(SLEEP, PROC)
    assert cg.unified == "/"
    assert cg.memory_v1 == "/process_api/311a83f87d9a20c7d0cb8a3c6ae14f07"
    score, adj = procfs.read_oom_score(SLEEP, PROC)
    assert (score, adj) == (int((FIXTURES / str(SLEEP) / "oom_score").read_text()), 0)


def test_kernel_thread_flags_and_no_memory() -> None:
    st = procfs.read_stat(KTHREADD, PROC)
    assert st.comm == "kthreadd" and st.ppid == 0
    assert st.flags & procfs.PF_KTHREAD
    assert st.is_kernel_thread
    s = procfs.read_status(KTHREADD, PROC)
    assert (s.vm_rss, s.rss_anon, s.rss_file, s.rss_shmem, s.vm_swap) == (0, 0, 0, 0, 0)
    assert not s.has_mm
    assert procfs.read_cmdline(KTHREADD, PROC) == ()


def test_kernel_thread_detected_by_flags_alone() -> None:
    line = stat_line(77, b"kworker/0:1H-kblockd",
                     TAIL.replace(b" 4194560 ", b" %d " % (procfs.PF_KTHREAD | 0x40)))
    st = procfs.parse_stat(line)
    assert st.is_kernel_thread and st.comm == "kworker/0:1H-kblockd"


def test_zombie_has_state_z_and_no_vm_lines() -> None:
    st = procfs.read_stat(ZOMBIE, PROC)
    assert st.state == "Z" and st.comm == "python3"
    raw = (FIXTURES / str(ZOMBIE) / "status").read_bytes()
    assert b"VmRSS" not in raw  # the premise: a zombie has no Vm*/Rss* lines
    s = procfs.read_status(ZOMBIE, PROC)
    assert s.tgid == ZOMBIE and s.uid == 0 and s.name == "python3"
    assert (s.vm_rss, s.rss_anon, s.rss_file, s.rss_shmem, s.vm_swap) == (0, 0, 0, 0, 0)
    assert not s.has_mm
    assert procfs.read_cmdline(ZOMBIE, PROC) == ()


def test_meminfo_captured() -> None:
    mi = procfs.read_meminfo(PROC)
    assert mi.mem_total > 0
    assert 0 < mi.mem_available <= mi.mem_total
    assert 0 <= mi.mem_free <= mi.mem_total
    assert mi.swap_total == 0 and mi.swap_free == 0
    # sizes are converted from kB
    line = next(x for x in (FIXTURES / "meminfo").read_text().splitlines()
                if x.startswith("MemTotal:"))
    assert mi.mem_total == int(line.split()[1]) * 1024


def test_list_pids_only_numeric_entries(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    shutil.copytree(FIXTURES, root)
    (root / "self").mkdir()
    (root / "sys").mkdir()
    assert sorted(procfs.list_pids(str(root))) == [KTHREADD, SLEEP, ZOMBIE]


# --- what a healthy host rarely shows: crafted comm values ----------------------------------


@pytest.mark.parametrize("comm", [
    b"foo) Z (bar",
    b"a b  c",
    b")",
    b"(",
    b"((()))",
    b") 1 2 3 (",
    b"new\nline",
    b"\n) S 1 (\n",
    b"",
])
def test_stat_comm_with_spaces_parens_and_newlines(comm: bytes) -> None:
    st = procfs.parse_stat(stat_line(4242, comm))
    assert st.comm == comm.decode()
    assert (st.pid, st.state, st.ppid, st.flags, st.starttime) == (4242, "S", 1, 4194560, 123456)


def test_stat_comm_invalid_utf8_is_kept_escaped(tmp_path: Path) -> None:
    proc = make_proc(tmp_path, 4242, stat=stat_line(4242, b"\xff\xfe ok\x80"))
    st = procfs.read_stat(4242, proc)
    assert st.comm == "\\xff\\xfe ok\\x80"
    assert st.state == "S" and st.starttime == 123456


def test_status_name_escaped_by_the_kernel_and_invalid_utf8(tmp_path: Path) -> None:
    # /proc/<pid>/status escapes '\n' and '\\' in Name; other bytes come raw.
    status = (FIXTURES / str(SLEEP) / "status").read_bytes().replace(
        b"Name:\tsleep\n", b"Name:\tfoo\\n) Z (\xff bar\n")
    proc = make_proc(tmp_path, SLEEP, status=status)
    s = procfs.read_status(SLEEP, proc)
    assert s.name == "foo\\n) Z (\\xff bar"
    assert s.tgid == SLEEP and s.vm_rss == 1800 * 1024


def test_cmdline_invalid_utf8_and_empty_args(tmp_path: Path) -> None:
    proc = make_proc(tmp_path, 9, cmdline=b"prog\0\xff\xfe\0\0last\0")
    assert procfs.read_cmdline(9, proc) == ("prog", "\\xff\\xfe", "", "last")


def test_cmdline_without_trailing_nul(tmp_path: Path) -> None:
    # a process that rewrote its argv area (setproctitle) may leave no trailing NUL
    proc = make_proc(tmp_path, 9, cmdline=b"postgres: writer process")
    assert procfs.read_cmdline(9, proc) == ("postgres: writer process",)


# --- truncated and garbage files name the file ---------------------------------------------


@pytest.mark.parametrize("data", [
    b"",
    b"4242",
    b"4242 (sleep",
    b"4242 (sleep) S 1 2 3",                 # truncated before flags/starttime
    b"4242 (sleep) S 1 4242 4242 0 -1 4194560 76 0 0 0 0 0 0 0 20 0 1 0",  # before starttime
    b"abc (sleep) " + TAIL,                 # pid not a number
    b"4242 (sleep) S x " + TAIL[4:],        # ppid not a number
    b"\x00\xff garbage \xfe",
    b") 4242 (",
])
def test_garbage_stat_is_a_parse_error_naming_the_file(tmp_path: Path, data: bytes) -> None:
    proc = make_proc(tmp_path, 4242, stat=data)
    with pytest.raises(ParseError) as e:
        procfs.read_stat(4242, proc)
    path = f"{proc}/4242/stat"
    assert e.value.path == path
    assert path in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("data", [
    b"",                                    # truncated to nothing
    b"Name:\tsleep\n",                      # truncated before Tgid
    b"Name:\tsleep\nTgid:\tabc\nUid:\t0\t0\t0\t0\n",
    b"Name:\tsleep\nTgid:\t1\nUid:\n",
    b"Name:\tsleep\nTgid:\t1\nUid:\t0\nVmRSS:\t 12 MB\n",
    b"Name:\tsleep\nTgid:\t1\nUid:\t0\nVmRSS:\t kB\n",
    b"Name:\tsleep\nTgid:\t1\nUid:\t0\nRssAnon:\tlots kB\n",
    b"\xff\xfe\x00garbage",
])
def test_garbage_status_is_a_parse_error_naming_the_file(tmp_path: Path, data: bytes) -> None:
    proc = make_proc(tmp_path, 4242, status=data)
    with pytest.raises(ParseError) as e:
        procfs.read_status(4242, proc)
    assert e.value.path == f"{proc}/4242/status"
    assert f"{proc}/4242/status" in str(e.value)


def test_truncated_real_status_is_a_parse_error(tmp_path: Path) -> None:
    full = (FIXTURES / str(SLEEP) / "status").read_bytes()
    proc = make_proc(tmp_path, SLEEP, status=full[:full.index(b"Tgid")])
    with pytest.raises(ParseError, match="Tgid"):
        procfs.read_status(SLEEP, proc)


@pytest.mark.parametrize("data", [
    b"",
    b"MemTotal: 100 kB\n",                               # truncated
    b"MemTotal: 100 kB\nMemFree: 1 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\nAnonPages: 1 kB\n",
    b"MemTotal: lots kB\nMemFree: 1 kB\nMemAvailable: 1 kB\n",
    b"MemTotal:\n",
    b"\xff\xfe\x00",
])
def test_garbage_meminfo_is_a_parse_error_naming_the_file(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "meminfo").write_bytes(data)
    with pytest.raises(ParseError) as e:
        procfs.read_meminfo(str(tmp_path))
    assert e.value.path == f"{tmp_path}/meminfo"


def test_meminfo_without_memavailable_names_the_missing_key() -> None:
    data = (FIXTURES / "meminfo").read_bytes()
    lines = [x for x in data.split(b"\n") if not x.startswith(b"MemAvailable:")]
    with pytest.raises(ParseError, match="MemAvailable"):
        procfs.parse_meminfo(b"\n".join(lines))


def test_meminfo_without_shmem_reads_zero() -> None:
    data = (FIXTURES / "meminfo").read_bytes()
    lines = [x for x in data.split(b"\n") if not x.startswith(b"Shmem:")]
    assert procfs.parse_meminfo(b"\n".join(lines)).shmem == 0


def test_garbage_oom_score_is_a_parse_error_naming_the_file(tmp_path: Path) -> None:
    proc = make_proc(tmp_path, 4242, oom_score=b"lots\n", oom_score_adj=b"0\n")
    with pytest.raises(ParseError) as e:
        procfs.read_oom_score(4242, proc)
    assert e.value.path == f"{proc}/4242/oom_score"


def test_garbage_oom_score_adj_is_a_parse_error_naming_that_file(tmp_path: Path) -> None:
    proc = make_proc(tmp_path, 4242, oom_score=b"667\n", oom_score_adj=b"\n")
    with pytest.raises(ParseError) as e:
        procfs.read_oom_score(4242, proc)
    assert e.value.path == f"{proc}/4242/oom_score_adj"


# --- vanished processes ------------------------------------------------------------------


@pytest.mark.parametrize("reader", [procfs.read_stat, procfs.read_status, procfs.read_cmdline,
                                    procfs.read_cgroup, procfs.read_oom_score])
def test_vanished_pid_is_process_gone(tmp_path: Path, reader: object) -> None:
    with pytest.raises(ProcessGone) as e:
        reader(31337, str(tmp_path))  # type: ignore[operator]
    assert e.value.pid == 31337
    assert "31337" in str(e.value)


def test_pid_that_vanishes_between_two_reads(tmp_path: Path) -> None:
    proc = make_proc(tmp_path, 4242, stat=stat_line(4242, b"x"))
    assert procfs.read_stat(4242, proc).comm == "x"
    shutil.rmtree(os.path.join(proc, "4242"))
    with pytest.raises(ProcessGone):
        procfs.read_status(4242, proc)


def test_real_reaped_pid_is_process_gone() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    with pytest.raises(ProcessGone):
        procfs.read_stat(pid)


def test_other_os_errors_are_not_hidden(tmp_path: Path) -> None:
    proc = make_proc(tmp_path, 4242)
    os.mkdir(os.path.join(proc, "4242", "stat"))  # a directory: IsADirectoryError
    with pytest.raises(IsADirectoryError):
        procfs.read_stat(4242, proc)


# --- /proc/<pid>/cgroup ---------------------------------------------------------------------


def test_parse_cgroup_hybrid_pure_v2_and_none() -> None:
    hybrid = (b"9:name=systemd:/\n8:pids:/\n4:memory:/a/b c\n3:cpuset:/\n"
              b"1:cpu,cpuacct:/x\n0::/user.slice\n")
    assert procfs.parse_cgroup(hybrid) == procfs.CgroupMembership("/user.slice", "/a/b c")
    assert procfs.parse_cgroup(b"0::/system.slice/x.service\n") == procfs.CgroupMembership(
        "/system.slice/x.service", "")
    assert procfs.parse_cgroup(b"5:cpu,memory,blkio:/m\n") == procfs.CgroupMembership("", "/m")
    assert procfs.parse_cgroup(b"") == procfs.CgroupMembership("", "")
    assert procfs.parse_cgroup(b"garbage\n\xff:\n") == procfs.CgroupMembership("", "")
    # path containing ':' (allowed in cgroup names) stays whole
    assert procfs.parse_cgroup(b"0::/a:b\n").unified == "/a:b"


def test_private_memory_is_private_dirty_of_smaps_rollup() -> None:
    """A forked child's own pages only: what it shares copy-on-write is Shared_*.
    (Captured from a child of a 128 MiB parent that touched 16 MiB of its own.)"""
    rollup = (b"55d85ab8b000-7ffd83c73000 ---p 00000000 00:00 0   [rollup]\n"
              b"Rss:              152000 kB\nShared_Clean:       3000 kB\n"
              b"Shared_Dirty:     131072 kB\nPrivate_Clean:        500 kB\n"
              b"Private_Dirty:     16800 kB\nAnonymous:        148000 kB\n")
    assert procfs.parse_smaps_private(rollup) == 16800 * 1024
    with pytest.raises(procfs.ParseError, match="Private_Dirty"):
        procfs.parse_smaps_private(b"Rss: 1 kB\n")
    with pytest.raises(procfs.ParseError, match="Private_Dirty"):
        procfs.parse_smaps_private(b"Private_Dirty: many kB\n")
