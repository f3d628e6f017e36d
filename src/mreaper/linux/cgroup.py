"""Locate cgroup hierarchies and read memory-cgroup charges (v2 memory.current, v1 usage).

Facts only.  On a hybrid host the v1 `memory` controller and the cgroup2 tree are
separate mounts; a process's memory charge lives in whichever carries the memory
controller.  The charge of the victim's own memory cgroup is the most direct
measure of what a kill gave back: unlike MemAvailable it drops at once, without
waiting for per-CPU free lists to drain (research/mrelease-facts.md).
"""

from __future__ import annotations

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
