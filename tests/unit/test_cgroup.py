"""Locating cgroup hierarchies and a process's memory-charge file, on fixture trees."""

from __future__ import annotations

from pathlib import Path

from mreaper.linux import cgroup
from mreaper.linux.procfs import CgroupMembership

HYBRID = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,nosuid,nodev,noexec,relatime,freezer 0 0
"""

PURE_V2 = """\
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,memory_recursiveprot 0 0
"""


def test_parse_mounts_hybrid() -> None:
    assert cgroup.parse_mounts(HYBRID) == cgroup.Mounts(unified="/sys/fs/cgroup/unified",
                                                        memory_v1="/sys/fs/cgroup/memory")


def test_parse_mounts_pure_v2_and_nothing() -> None:
    assert cgroup.parse_mounts(PURE_V2) == cgroup.Mounts("/sys/fs/cgroup", "")
    assert cgroup.parse_mounts("") == cgroup.Mounts("", "")
    assert cgroup.parse_mounts("short line\n\n") == cgroup.Mounts("", "")


def test_parse_mounts_memory_among_other_controllers_and_escaped_spaces() -> None:
    text = r"cgroup /mnt/my\040cg cgroup rw,cpu,memory,blkio 0 0" + "\n"
    assert cgroup.parse_mounts(text).memory_v1 == "/mnt/my cg"
    # "memory" as a substring of another option is not the memory controller
    assert cgroup.parse_mounts("cgroup /x cgroup rw,memory_recursiveprot 0 0\n").memory_v1 == ""


def test_parse_mounts_first_mount_wins() -> None:
    text = HYBRID + "cgroup /elsewhere cgroup rw,memory 0 0\ncgroup2 /u2 cgroup2 rw 0 0\n"
    assert cgroup.parse_mounts(text) == cgroup.Mounts("/sys/fs/cgroup/unified",
                                                      "/sys/fs/cgroup/memory")


def test_find_mounts_reads_a_file(tmp_path: Path) -> None:
    f = tmp_path / "mounts"
    f.write_text(HYBRID)
    assert cgroup.find_mounts(str(f)).memory_v1 == "/sys/fs/cgroup/memory"


def _tree(tmp_path: Path) -> cgroup.Mounts:
    (tmp_path / "mem" / "a" / "b").mkdir(parents=True)
    (tmp_path / "mem" / "a" / "b" / "memory.usage_in_bytes").write_text("4096\n")
    (tmp_path / "uni" / "svc").mkdir(parents=True)
    (tmp_path / "uni" / "svc" / "memory.current").write_text("8192\n")
    (tmp_path / "uni" / "nomem").mkdir(parents=True)
    return cgroup.Mounts(unified=str(tmp_path / "uni"), memory_v1=str(tmp_path / "mem"))


def test_memory_charge_file_prefers_v1_memory(tmp_path: Path) -> None:
    mounts = _tree(tmp_path)
    f = cgroup.memory_charge_file(CgroupMembership(unified="/svc", memory_v1="/a/b"), mounts)
    assert f == str(tmp_path / "mem" / "a" / "b" / "memory.usage_in_bytes")
    assert f is not None and cgroup.read_charge(f) == 4096


def test_memory_charge_file_falls_back_to_v2(tmp_path: Path) -> None:
    mounts = _tree(tmp_path)
    for member in (CgroupMembership("/svc", ""), CgroupMembership("/svc", "/"),
                   CgroupMembership("/svc", "/gone")):
        f = cgroup.memory_charge_file(member, mounts)
        assert f == str(tmp_path / "uni" / "svc" / "memory.current"), member
        assert cgroup.read_charge(f) == 8192


def test_memory_charge_file_none_for_root_or_without_memory(tmp_path: Path) -> None:
    mounts = _tree(tmp_path)
    assert cgroup.memory_charge_file(CgroupMembership("/", "/"), mounts) is None
    assert cgroup.memory_charge_file(CgroupMembership("", ""), mounts) is None
    assert cgroup.memory_charge_file(CgroupMembership("/nomem", ""), mounts) is None
    assert cgroup.memory_charge_file(CgroupMembership("/svc", "/a/b"),
                                     cgroup.Mounts("", "")) is None


def test_read_charge_of_a_removed_or_garbage_cgroup_is_none(tmp_path: Path) -> None:
    assert cgroup.read_charge(str(tmp_path / "gone" / "memory.current")) is None
    (tmp_path / "g").write_text("max\n")
    assert cgroup.read_charge(str(tmp_path / "g")) is None
