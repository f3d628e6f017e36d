"""Parse /proc: per-process stat, status, cmdline, cgroup; and /proc/meminfo.

Facts only, no policy.  Every reader takes the proc root as an argument so tests
can point it at a fixture tree.  A process can vanish between any two reads: the
readers raise `ProcessGone` for that (ENOENT/ESRCH), never a half-filled record.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, replace

PROC = "/proc"

# include/linux/sched.h: set in task->flags for kernel threads.
PF_KTHREAD = 0x00200000


class ProcessGone(Exception):
    """The process exited (or its /proc entry vanished) while we were reading it."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"process {pid} is gone")
        self.pid = pid


class ParseError(ValueError):
    """A /proc file had content we cannot interpret; names the file and the content."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path


def _read_bytes(path: str, pid: int, limit: int | None = None) -> bytes:
    """The file's content, or its first `limit` bytes."""
    # os.open/os.read: no buffered file object per read; /proc files of one process
    # are small, and a scan reads several per process.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            left = limit
            while left is None or left > 0:
                chunk = os.read(fd, 65536 if left is None else min(65536, left))
                if not chunk:
                    break
                chunks.append(chunk)
                if left is not None:
                    left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e
    except OSError as e:
        # Reading /proc/<pid>/* of an exiting task can give ESRCH as a plain OSError.
        if e.errno in (errno.ESRCH, errno.ENOENT):
            raise ProcessGone(pid) from e
        if e.filename is None:  # os.read errors (EISDIR, EIO) carry no file name
            e.filename = path
        raise


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/<pid>/stat that identify and classify a process."""

    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    starttime: int  # clock ticks since boot: with pid, the process's identity
    # Live threads of the thread group.  A leader in state Z with more than one is not
    # a zombie process: its main thread called pthread_exit while the others run on
    # (the kernel keeps the leader as a zombie until the whole group has exited).
    num_threads: int = 1
    pgrp: int = 0     # process group: a shell job, a `make` and its compilers
    session: int = 0  # session: a login, a terminal, a service's process tree

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def parse_stat(data: bytes, path: str = "stat") -> Stat:
    """Parse /proc/<pid>/stat.  comm may contain spaces, parentheses and newlines
    ("foo) Z (bar"), so it is everything between the first '(' and the last ')'."""
    try:
        open_paren = data.index(b"(")
        close_paren = data.rindex(b")")
    except ValueError:
        raise ParseError(path, f"no '(comm)' field in {data[:80]!r}") from None
    try:
        pid = int(data[:open_paren])
        rest = data[close_paren + 2:].split()
        # rest[0] is field 3 (state); field N is rest[N - 3].
        return Stat(
            pid=pid,
            comm=data[open_paren + 1:close_paren].decode("utf-8", "backslashreplace"),
            state=rest[0].decode("ascii", "replace"),
            ppid=int(rest[1]),
            pgrp=int(rest[2]),
            session=int(rest[3]),
            flags=int(rest[6]),
            num_threads=int(rest[17]),
            starttime=int(rest[19]),
        )
    except (ValueError, IndexError):
        raise ParseError(path, f"unexpected layout: {data[:200]!r}") from None


def read_stat(pid: int, proc: str = PROC) -> Stat:
    path = f"{proc}/{pid}/stat"
    return parse_stat(_read_bytes(path, pid), path)


@dataclass(frozen=True, slots=True)
class Status:
    """What /proc/<pid>/status says a process holds.  Sizes in bytes; a kernel thread
    or a process past exit_mm has no Vm* lines, which reads as 0."""

    name: str
    tgid: int
    uid: int  # real uid
    vm_rss: int
    rss_anon: int
    rss_file: int
    rss_shmem: int
    vm_swap: int
    has_mm: bool = True  # False: no Vm*/Rss* lines (kernel thread, zombie, past exit_mm)
    threads: int = 1     # the Threads: line (live threads of the thread group)
    # 0: the Vm*/Rss* figures are the leader's own.  Else the id of the live thread
    # whose status gave them, the leader having exited first (see read_status).
    mm_tid: int = 0


_STATUS_SIZES = {"VmRSS": "vm_rss", "RssAnon": "rss_anon", "RssFile": "rss_file",
                 "RssShmem": "rss_shmem", "VmSwap": "vm_swap"}
_STATUS_WANTED = frozenset({b"Name", b"Tgid", b"Uid", b"Threads"}
                           | {k.encode() for k in _STATUS_SIZES})


def parse_status(data: bytes, path: str = "status") -> Status:
    fields: dict[str, int] = dict.fromkeys(_STATUS_SIZES.values(), 0)
    name = ""
    tgid = uid = -1
    threads = 1
    has_mm = False
    for raw in data.split(b"\n"):
        key, sep, value = raw.partition(b":")
        # Compare bytes before decoding anything: a scan parses this file for every
        # process, and most of its ~55 lines are of no interest.
        if not sep or key not in _STATUS_WANTED:
            continue
        try:
            if key == b"Name":
                # The kernel escapes '\n' and '\\' in Name, so one line is the whole name.
                name = value.strip(b"\t ").decode("utf-8", "backslashreplace")
            elif key == b"Tgid":
                tgid = int(value)
            elif key == b"Uid":
                uid = int(value.split()[0])
            elif key == b"Threads":
                threads = int(value)
            else:
                number, _, unit = value.strip().partition(b" ")
                if unit.strip() not in (b"kB", b""):
                    raise ParseError(path, f"{key.decode()}: unit {unit!r}, expected kB")
                fields[_STATUS_SIZES[key.decode()]] = int(number) * 1024
                has_mm = True
        except (ValueError, IndexError):
            raise ParseError(path, f"{key.decode()}: cannot parse "
                                   f"{value.strip()[:60]!r}") from None
    if tgid < 0 or uid < 0:
        raise ParseError(path, "missing Tgid or Uid line")
    return Status(name=name, tgid=tgid, uid=uid, has_mm=has_mm, threads=threads, **fields)


def read_status(pid: int, proc: str = PROC) -> Status:
    """/proc/<pid>/status, with the memory of the whole thread group.

    When the leader has exited (pthread_exit) while other threads run on, its own
    status has no Vm*/Rss* lines although the group's mm is alive and full: the
    figures then come from a live thread's status (`mm_tid` says which).  Name, Tgid
    and Uid stay the leader's, as ps and the kernel's oom_score show them."""
    path = f"{proc}/{pid}/status"
    leader = parse_status(_read_bytes(path, pid), path)
    if leader.has_mm or leader.threads <= 1:
        return leader  # a live leader, a kernel thread, or a real zombie (no thread left)
    found = _mm_thread_status(pid, proc)
    if found is None:
        return leader
    tid, thread = found
    return replace(thread, name=leader.name, tgid=leader.tgid, uid=leader.uid, mm_tid=tid)


def mm_thread(pid: int, proc: str = PROC) -> int | None:
    """A live thread of `pid` that holds the thread group's mm when the leader no longer
    does (it called pthread_exit: the kernel keeps it as a zombie, without mm, until
    the last thread exits), or None.  The leader's own cmdline and exe then read empty
    and ENOENT, a live thread's give the process's."""
    found = _mm_thread_status(pid, proc)
    return None if found is None else found[0]


def _mm_thread_status(pid: int, proc: str) -> tuple[int, Status] | None:
    """The first thread other than the leader whose status has Vm* lines, and it."""
    for tid in _other_threads(pid, proc):
        path = f"{proc}/{pid}/task/{tid}/status"
        try:
            status = parse_status(_read_bytes(path, pid), path)
        except ProcessGone:
            continue  # that thread exited meanwhile: try the next
        if status.has_mm:
            return tid, status
    return None


def _other_threads(pid: int, proc: str) -> list[int]:
    """The thread ids of `pid`'s group other than the leader, lowest first."""
    try:
        names = os.listdir(f"{proc}/{pid}/task")
    except OSError:
        # Gone (ENOENT, ESRCH): the next read of its files says so; here it simply
        # has no thread left to read from.
        return []
    return sorted(int(n) for n in names if n.isdigit() and int(n) != pid)


# How much of a cmdline is read: argv can reach several MiB (ARG_MAX follows the
# stack rlimit), and a user with a thousand such processes would make every scan
# hold GiBs.  Past this, the last argument read is cut short.
CMDLINE_MAX = 65536


def read_cmdline(pid: int, proc: str = PROC) -> tuple[str, ...]:
    """argv as the process left it (NUL-separated), its first CMDLINE_MAX bytes; empty
    for kernel threads and zombies.

    A leader that has exited (pthread_exit) reads empty, as the kernel finds argv
    through the task's mm: then a live thread's cmdline, the same argv, is read."""
    data = _read_bytes(f"{proc}/{pid}/cmdline", pid, CMDLINE_MAX)
    if not data:
        tid = mm_thread(pid, proc)
        if tid is None:
            return ()
        data = _read_bytes(f"{proc}/{pid}/task/{tid}/cmdline", pid, CMDLINE_MAX)
        if not data:
            return ()
    return tuple(a.decode("utf-8", "backslashreplace") for a in data.rstrip(b"\0").split(b"\0"))


@dataclass(frozen=True, slots=True)
class CgroupMembership:
    """Where a process sits: the cgroup v2 path ("" if none) and v1 memory path ("" if none)."""

    unified: str
    memory_v1: str


def parse_cgroup(data: bytes) -> CgroupMembership:
    unified = memory_v1 = ""
    for raw in data.split(b"\n"):
        parts = raw.split(b":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        p = path.decode("utf-8", "backslashreplace")
        if hid == b"0" and controllers == b"":
            unified = p
        elif b"memory" in controllers.split(b","):
            memory_v1 = p
    return CgroupMembership(unified=unified, memory_v1=memory_v1)


def read_cgroup(pid: int, proc: str = PROC) -> CgroupMembership:
    return parse_cgroup(_read_bytes(f"{proc}/{pid}/cgroup", pid))


def read_oom_score(pid: int, proc: str = PROC) -> tuple[int, int]:
    """(oom_score, oom_score_adj) as the kernel computes them now."""
    values = []
    for name in ("oom_score", "oom_score_adj"):
        path = f"{proc}/{pid}/{name}"
        data = _read_bytes(path, pid)
        try:
            values.append(int(data))
        except ValueError:
            raise ParseError(path, f"not an integer: {data[:40]!r}") from None
    return values[0], values[1]


def read_statm(pid: int, proc: str = PROC) -> bytes:
    """/proc/<pid>/statm as the kernel wrote it (sizes in pages: total, resident,
    shared, text, 0, data, 0).  Raw: the process table compares it whole to see whether
    anything changed, without parsing it."""
    return _read_bytes(f"{proc}/{pid}/statm", pid)


def read_int(path: str, pid: int) -> int:
    """A /proc/<pid>/ file holding one integer (oom_score, oom_score_adj)."""
    data = _read_bytes(path, pid)
    try:
        return int(data)
    except ValueError:
        raise ParseError(path, f"not an integer: {data[:40]!r}") from None


def read_last_pid(proc: str = PROC) -> int:
    """The PID the kernel allocated last in our PID namespace: the last field of
    /proc/loadavg (fs/proc/loadavg.c: idr_get_cursor - 1).  PIDs are handed out in
    increasing order, wrapping at pid_max, so every process created since this was
    read has a PID after it: new processes can be found without listing /proc."""
    path = f"{proc}/loadavg"
    with open(path, "rb") as f:
        data = f.read()
    try:
        return int(data.split()[4])
    except (ValueError, IndexError):
        raise ParseError(path, f"no last PID in {data[:80]!r}") from None


def read_pid_max(proc: str = PROC) -> int:
    path = f"{proc}/sys/kernel/pid_max"
    with open(path, "rb") as f:
        data = f.read()
    try:
        return int(data)
    except ValueError:
        raise ParseError(path, f"not an integer: {data[:40]!r}") from None


def list_pids(proc: str = PROC) -> list[int]:
    """Numeric entries of /proc: every thread-group leader visible to us."""
    return [int(d) for d in os.listdir(proc) if d.isdigit()]


# --- /proc/meminfo -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemInfo:
    """The /proc/meminfo figures the killer decides from, in bytes."""

    mem_total: int
    mem_free: int
    mem_available: int
    swap_total: int
    swap_free: int
    anon_pages: int
    shmem: int


_MEMINFO_KEYS = {"MemTotal": "mem_total", "MemFree": "mem_free", "MemAvailable": "mem_available",
                 "SwapTotal": "swap_total", "SwapFree": "swap_free", "AnonPages": "anon_pages",
                 "Shmem": "shmem"}


_MEMINFO_BYTES = {k.encode(): f for k, f in _MEMINFO_KEYS.items()}


def parse_meminfo(data: bytes, path: str = "/proc/meminfo") -> MemInfo:
    found: dict[str, int] = {}
    for raw in data.split(b"\n"):
        key, sep, value = raw.partition(b":")
        # Bytes compared before anything is decoded: the daemon parses this file on
        # every look, and most of its ~55 lines are of no interest.
        field = _MEMINFO_BYTES.get(key)
        if not sep or field is None:
            continue
        parts = value.split()
        try:
            number = int(parts[0])
        except (ValueError, IndexError):
            raise ParseError(path, f"{key.decode('ascii', 'replace')}: cannot parse "
                                   f"{value.strip()[:60]!r}") from None
        found[field] = number * 1024 if parts[1:] == [b"kB"] else number
        if len(found) == len(_MEMINFO_BYTES):
            break  # all there (Shmem comes about line 20): the rest is not read
    missing = [k for k, f in _MEMINFO_KEYS.items() if f not in found and k != "Shmem"]
    if missing:
        # MemAvailable exists since Linux 3.14; without it we cannot judge headroom.
        raise ParseError(path, f"missing {', '.join(missing)}")
    found.setdefault("shmem", 0)
    return MemInfo(**found)


def read_meminfo(proc: str = PROC) -> MemInfo:
    path = f"{proc}/meminfo"
    with open(path, "rb") as f:
        return parse_meminfo(f.read(), path)


def parse_smaps_private(data: bytes, path: str = "smaps_rollup") -> int:
    """Bytes a kill of the process would free of its own: Private_Dirty from
    /proc/<pid>/smaps_rollup.  Pages a forked child still shares copy-on-write with
    its parent are counted in its RSS and RssAnon but are Shared_* here (mapcount > 1):
    killing the child frees none of them.  Private_Clean is left out: clean private
    pages are file pages (the page cache keeps them after the kill)."""
    for raw in data.split(b"\n"):
        if raw.startswith(b"Private_Dirty:"):
            try:
                return int(raw.split()[1]) * 1024
            except (ValueError, IndexError):
                raise ParseError(path, f"Private_Dirty: cannot parse {raw[:60]!r}") from None
    raise ParseError(path, "no Private_Dirty line")


def read_private(pid: int, proc: str = PROC) -> int:
    """parse_smaps_private of /proc/<pid>/smaps_rollup.  It walks the page tables under
    the mmap lock: ~6 ms per GiB resident here, so it is read under pressure only."""
    path = f"{proc}/{pid}/smaps_rollup"
    data = _read_bytes(path, pid)
    if not data:  # no mm (a process past exit_mm): nothing private left
        return 0
    return parse_smaps_private(data, path)


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def read_resident(pid: int, proc: str = PROC) -> int:
    """Resident bytes from /proc/<pid>/statm (its second field, in pages): the
    cheapest fresh size of a process, one small read."""
    path = f"{proc}/{pid}/statm"
    data = _read_bytes(path, pid)
    try:
        return int(data.split()[1]) * PAGE_SIZE
    except (ValueError, IndexError):
        raise ParseError(path, f"unexpected layout: {data[:80]!r}") from None


def pread_all(fd: int, size: int = 16384) -> bytes:
    """The whole of a small kernel-generated file through a descriptor kept open: one
    pread(2) at offset 0 regenerates it (seq_file restarts at a rewound position), so
    a file read on every look costs no open/close and no path walk."""
    data = os.pread(fd, size, 0)
    while len(data) == size:  # grew past the buffer: read it whole, once
        size *= 4
        data = os.pread(fd, size, 0)
    return data


class MemInfoReader:
    """/proc/meminfo read through one descriptor kept open (pread on every call): the
    daemon's calm loop reads it every second, and that read is all it does."""

    def __init__(self, proc: str = PROC) -> None:
        self.path = f"{proc}/meminfo"
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def __call__(self) -> MemInfo:
        return parse_meminfo(pread_all(self._fd), self.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
