"""Locate cgroup hierarchies and read memory-cgroup charges (v2 memory.current, v1 usage).

Facts only.  On a hybrid host the v1 `memory` controller and the cgroup2 tree are
separate mounts; a process's memory charge lives in whichever carries the memory
controller.  The charge of the victim's own memory cgroup is the most direct
measure of what a kill gave back: unlike MemAvailable it drops at once, without
waiting for per-CPU free lists to drain (research/mrelease-facts.md).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from mreaper.linux.procfs import CgroupMembership


@dataclass(frozen=True, slots=True)
class Mounts:
    """Where the cgroup hierarchies are mounted ("" when absent)."""

    unified: str
    memory_v1: str


def parse_mounts(data: str) -> Mounts:
    unified = memory_v1 = ""
    for line in data.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        where, fstype, options = fields[1], fields[2], fields[3].split(",")
        # /proc/mounts escapes spaces as \040; cgroup mounts rarely have any.
        where = where.replace("\\040", " ")
        if fstype == "cgroup2" and not unified:
            unified = where
        elif fstype == "cgroup" and "memory" in options and not memory_v1:
            memory_v1 = where
    return Mounts(unified=unified, memory_v1=memory_v1)


def find_mounts(mounts_file: str = "/proc/self/mounts") -> Mounts:
    with open(mounts_file, encoding="utf-8", errors="replace") as f:
        return parse_mounts(f.read())


def memory_charge_file(member: CgroupMembership, mounts: Mounts) -> str | None:
    """The file holding the charge of the memory cgroup `member` belongs to, or None
    when it is the root (whose figure is the whole machine) or there is none."""
    if mounts.memory_v1 and member.memory_v1 not in ("", "/"):
        path = os.path.join(mounts.memory_v1, member.memory_v1.lstrip("/"), "memory.usage_in_bytes")
        if os.path.exists(path):
            return path
    if mounts.unified and member.unified not in ("", "/"):
        path = os.path.join(mounts.unified, member.unified.lstrip("/"), "memory.current")
        if os.path.exists(path):
            return path
    return None


def read_charge(path: str) -> int | None:
    """The charge in bytes, or None if the cgroup is gone."""
    try:
        with open(path, "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


# --- cgroup v2 memory facts -------------------------------------------------------------


class CgroupGone(Exception):
    """The cgroup was removed while we were reading it."""

    def __init__(self, path: str) -> None:
        super().__init__(f"cgroup {path} is gone")
        self.path = path


def parse_limit(data: bytes) -> int | None:
    """memory.max / memory.high: a byte count, or the literal "max" (no limit) -> None."""
    text = data.strip()
    if text == b"max":
        return None
    return int(text)


def parse_flat_keyed(data: bytes) -> dict[str, int]:
    """Flat keyed files (memory.events, memory.stat): "key value" per line."""
    out = {}
    for line in data.split(b"\n"):
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0].decode("ascii", "replace")] = int(parts[1])
            except ValueError:
                continue
    return out


@dataclass(frozen=True, slots=True)
class MemoryState:
    """One look at a v2 cgroup's memory: current charge, limits, reclaimable cache and
    the memory.events counters.  None where the file is absent (no memory controller
    in this hierarchy, as on a hybrid host's unified tree)."""

    current: int | None
    max: int | None         # None: no limit ("max") or no file
    high: int | None
    inactive_file: int      # cheaply reclaimable page cache, from memory.stat
    events: dict[str, int]  # memory.events: low, high, max, oom, oom_kill, ...

    @property
    def limit(self) -> int | None:
        """The tighter of memory.max and memory.high, if any."""
        limits = [x for x in (self.max, self.high) if x is not None]
        return min(limits) if limits else None

    @property
    def headroom(self) -> int | None:
        """How much more the cgroup can take before its limit, counting inactive page
        cache as available (reclaim drops it first, as MemAvailable counts it)."""
        if self.current is None or self.limit is None:
            return None
        return self.limit - self.current + self.inactive_file


def _read_optional(path: str) -> bytes | None:
    """The file's bytes, or None when it does not exist.  Other errors propagate: a
    read of a cgroup removed after the open fails with ENODEV (see `_gone`)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


# What cgroupfs answers for a cgroup that was removed under us: ENOENT when it is gone
# before the open, ENODEV when rmdir raced between the open and the read (kernfs
# deactivates the node of an open file).
_GONE_ERRNOS = (errno.ENOENT, errno.ENODEV)


def _gone(e: OSError) -> bool:
    return e.errno in _GONE_ERRNOS


def read_memory_state(cgroup_dir: str) -> MemoryState:
    """Read memory.current/max/high/stat/events of a v2 cgroup; CgroupGone if removed."""
    if not os.path.isdir(cgroup_dir):
        raise CgroupGone(cgroup_dir)
    try:
        current = _read_optional(os.path.join(cgroup_dir, "memory.current"))
        mx = _read_optional(os.path.join(cgroup_dir, "memory.max"))
        high = _read_optional(os.path.join(cgroup_dir, "memory.high"))
        stat = _read_optional(os.path.join(cgroup_dir, "memory.stat"))
        events = _read_optional(os.path.join(cgroup_dir, "memory.events"))
    except OSError as e:  # ENODEV/ENOENT when rmdir races with the read
        raise CgroupGone(cgroup_dir) from e
    if current is None and not os.path.isdir(cgroup_dir):
        raise CgroupGone(cgroup_dir)
    try:
        return MemoryState(
            current=int(current) if current is not None else None,
            max=parse_limit(mx) if mx is not None else None,
            high=parse_limit(high) if high is not None else None,
            inactive_file=parse_flat_keyed(stat).get("inactive_file", 0) if stat else 0,
            events=parse_flat_keyed(events) if events else {},
        )
    except ValueError as e:
        raise ValueError(f"{cgroup_dir}: unexpected memory file content: {e}") from None


def read_procs(cgroup_dir: str, recursive: bool = True) -> list[int]:
    """PIDs in the cgroup (and its descendants when recursive); [] if it vanished.  A
    descendant removed mid-walk (its cgroup.procs gone, or ENODEV on the read) is
    skipped and the rest returned."""
    pids: list[int] = []
    for root, dirs, _files in os.walk(cgroup_dir) if recursive else [(cgroup_dir, [], [])]:
        del dirs  # os.walk descends on its own (and skips directories it cannot list)
        try:
            data = _read_optional(os.path.join(root, "cgroup.procs"))
        except OSError as e:
            if not _gone(e):
                raise
            continue
        if data:
            pids.extend(int(x) for x in data.split())
    return pids


def children(cgroup_dir: str) -> list[str]:
    """Child cgroups (directories), sorted; [] if the cgroup vanished (ENOENT, or
    ENODEV when it is removed while being listed)."""
    try:
        with os.scandir(cgroup_dir) as it:
            return sorted(e.path for e in it if e.is_dir(follow_symlinks=False))
    except OSError as e:
        if _gone(e):
            return []
        raise


def can_kill(cgroup_dir: str) -> bool:
    """cgroup.kill exists (Linux >= 5.14) in this cgroup.  False for a cgroup that is
    gone: os.path.exists never raises."""
    return os.path.exists(os.path.join(cgroup_dir, "cgroup.kill"))


def kill(cgroup_dir: str) -> None:
    """SIGKILL every process in the cgroup and its descendants, atomically with respect
    to forks (cgroup.kill, Linux >= 5.14)."""
    with open(os.path.join(cgroup_dir, "cgroup.kill"), "w") as f:
        f.write("1")


def oom_group(cgroup_dir: str) -> bool:
    """memory.oom.group = 1: the workload wants to die as a whole.  False when the
    cgroup is gone (no file, or ENODEV when removed between the open and the read)."""
    try:
        data = _read_optional(os.path.join(cgroup_dir, "memory.oom.group"))
    except OSError as e:
        if _gone(e):
            return False
        raise
    return data is not None and data.strip() == b"1"


OOMD_XATTRS = ("user.oomd_omit", "user.oomd_avoid")


def oomd_preference(cgroup_dir: str) -> str | None:
    """systemd's ManagedOOMPreference= as set on the cgroup: "omit", "avoid" or None.
    systemd writes the xattr user.oomd_omit or user.oomd_avoid with value "1"."""
    for name in OOMD_XATTRS:
        try:
            if os.getxattr(cgroup_dir, name).strip() == b"1":
                return name.removeprefix("user.oomd_")
        except OSError:  # ENODATA, ENOTSUP, ENOENT: no preference
            continue
    return None


def resolve(unified: str, pattern: str) -> list[str]:
    """The cgroup directories a scope pattern names: an absolute path under the cgroup2
    mount, or a path relative to it; glob characters allowed.  Sorted, existing only.

    Never the root cgroup itself ("." or the mount path name it): the root is the
    machine scope, whose figures are the whole machine's.  Nor anything that is not
    below the mount once resolved."""
    import glob

    full = pattern if pattern.startswith(unified.rstrip("/") + "/") or pattern == unified \
        else os.path.join(unified, pattern.lstrip("/"))
    top = os.path.realpath(unified)
    below = top.rstrip("/") + "/"

    def strictly_below(p: str) -> bool:
        real = os.path.realpath(p)
        return real != top and real.startswith(below)

    return sorted(p for p in glob.glob(full) if os.path.isdir(p) and strictly_below(p))


def relative(unified: str, cgroup_dir: str) -> str:
    """The path /proc/<pid>/cgroup shows for a cgroup directory ("/a/b")."""
    rel = os.path.relpath(cgroup_dir, unified)
    return "/" if rel == "." else "/" + rel
