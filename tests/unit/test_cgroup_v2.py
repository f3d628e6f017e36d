"""Unit tests of the cgroup v2 half of mreaper.linux.cgroup on fixture trees.

The fixture trees are built in tmp_path and stand for what this host cannot produce:
its cgroup2 tree (/sys/fs/cgroup/unified) carries no controllers, so memory.current,
memory.max, memory.high, memory.stat, memory.events and memory.oom.group do not exist
there, nor the literal "max" in a limit.  The fixtures also stand for hostile content
(garbage in a kernel file) and for cgroups removed while they are being read or
walked.  The user.oomd_* xattrs are real: set with os.setxattr on the fixture
directories (user xattrs work on ext4 and tmpfs).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mreaper.linux import cgroup
from mreaper.linux.cgroup import CgroupGone, MemoryState

MiB = 1 << 20
GiB = 1 << 30

EVENTS = b"low 0\nhigh 12\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n"
STAT = (b"anon 209715200\nfile 157286400\nkernel 4194304\nshmem 0\n"
        b"active_anon 200000000\ninactive_anon 9715200\nactive_file 52428800\n"
        b"inactive_file 104857600\nunevictable 0\npgfault 123456\n")


def make_cgroup(path: Path, **files: str | bytes) -> Path:
    """A fixture cgroup directory: memory_current="..." writes memory.current, etc."""
    path.mkdir(parents=True, exist_ok=True)
    for key, content in files.items():
        name = key.replace("_", ".", 1) if key.startswith(("memory_", "cgroup_")) else key
        if key == "memory_oom_group":
            name = "memory.oom.group"
        data = content.encode() if isinstance(content, str) else content
        (path / name).write_bytes(data)
    return path


# --- parse_limit / parse_flat_keyed ---------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [
    (b"max\n", None),
    (b"max", None),
    (b"  max \n", None),
    (b"123\n", 123),
    (b"0\n", 0),
    (b"1073741824\n", GiB),
])
def test_parse_limit(data: bytes, expected: int | None) -> None:
    assert cgroup.parse_limit(data) == expected


@pytest.mark.parametrize("data", [b"garbage\n", b"", b"\n", b"MAX\n", b"12 34\n", b"max max\n",
                                  b"1.5G\n"])
def test_parse_limit_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        cgroup.parse_limit(data)


def test_parse_flat_keyed_memory_events() -> None:
    assert cgroup.parse_flat_keyed(EVENTS) == {
        "low": 0, "high": 12, "max": 3, "oom": 2, "oom_kill": 1, "oom_group_kill": 0}


def test_parse_flat_keyed_memory_stat_subset() -> None:
    stat = cgroup.parse_flat_keyed(STAT)
    assert stat["inactive_file"] == 100 * MiB
    assert stat["anon"] == 200 * MiB
    assert stat["pgfault"] == 123456
    assert len(stat) == 10


def test_parse_flat_keyed_skips_garbage_lines() -> None:
    data = (b"garbage\n"            # one field
            b"oom notanumber\n"     # value not an integer
            b"three fields here\n"  # three fields
            b"\n   \n"              # blank
            b"high 7\n"
            b"max 1.5\n"            # not an integer
            b"oom_kill 4\r\n"       # CRLF: split() eats the \r
            b"\x00\x01")            # binary junk
    assert cgroup.parse_flat_keyed(data) == {"high": 7, "oom_kill": 4}


def test_parse_flat_keyed_empty() -> None:
    assert cgroup.parse_flat_keyed(b"") == {}


# --- MemoryState ------------------------------------------------------------------------


def state(current: int | None = 512 * MiB, mx: int | None = None, high: int | None = None,
          inactive_file: int = 0) -> MemoryState:
    return MemoryState(current=current, max=mx, high=high, inactive_file=inactive_file,
                       events={})


@pytest.mark.parametrize(("mx", "high", "limit"), [
    (2 * GiB, GiB, GiB),
    (GiB, 2 * GiB, GiB),
    (GiB, GiB, GiB),
    (GiB, None, GiB),
    (None, GiB, GiB),
    (None, None, None),
    (0, GiB, 0),
])
def test_limit_is_the_tighter_of_max_and_high(mx: int | None, high: int | None,
                                              limit: int | None) -> None:
    assert state(mx=mx, high=high).limit == limit


def test_headroom_is_limit_minus_current_plus_inactive_file() -> None:
    assert state(current=512 * MiB, mx=GiB, inactive_file=100 * MiB).headroom == 612 * MiB
    assert state(current=512 * MiB, mx=2 * GiB, high=GiB).headroom == 512 * MiB
    # Over the limit (memory.high is a throttle, not a wall): negative headroom.
    assert state(current=GiB + MiB, high=GiB).headroom == -MiB
    assert state(current=GiB + MiB, high=GiB, inactive_file=3 * MiB).headroom == 2 * MiB


def test_no_headroom_without_current_or_limit() -> None:
    assert state(current=None, mx=GiB).headroom is None
    assert state(current=512 * MiB).headroom is None
    assert state(current=None).headroom is None


# --- read_memory_state ---------------------------------------------------------------------


def test_read_memory_state_with_all_files(tmp_path: Path) -> None:
    d = make_cgroup(tmp_path / "work", memory_current="536870912\n",
                    memory_max="1073741824\n", memory_high="max\n", memory_stat=STAT,
                    memory_events=EVENTS)
    st = cgroup.read_memory_state(str(d))
    assert st == MemoryState(current=512 * MiB, max=GiB, high=None, inactive_file=100 * MiB,
                             events={"low": 0, "high": 12, "max": 3, "oom": 2, "oom_kill": 1,
                                     "oom_group_kill": 0})
    assert st.limit == GiB
    assert st.headroom == GiB - 512 * MiB + 100 * MiB


def test_read_memory_state_with_only_some_files(tmp_path: Path) -> None:
    d = make_cgroup(tmp_path / "work", memory_current="536870912\n",
                    memory_max="1073741824\n")
    st = cgroup.read_memory_state(str(d))
    assert st == MemoryState(current=512 * MiB, max=GiB, high=None, inactive_file=0,
                             events={})
    assert st.limit == GiB
    assert st.headroom == 512 * MiB


def test_read_memory_state_high_tighter_than_max(tmp_path: Path) -> None:
    d = make_cgroup(tmp_path / "work", memory_current="104857600\n",
                    memory_max="1073741824\n", memory_high="268435456\n",
                    memory_stat="inactive_file 1048576\n")
    st = cgroup.read_memory_state(str(d))
    assert (st.max, st.high, st.limit) == (GiB, 256 * MiB, 256 * MiB)
    assert st.headroom == 256 * MiB - 100 * MiB + MiB


def test_read_memory_state_max_literals_mean_no_limit(tmp_path: Path) -> None:
    d = make_cgroup(tmp_path / "work", memory_current="536870912\n", memory_max="max\n",
                    memory_high="max\n", memory_stat=STAT, memory_events=EVENTS)
    st = cgroup.read_memory_state(str(d))
    assert (st.current, st.max, st.high) == (512 * MiB, None, None)
    assert st.limit is None
    assert st.headroom is None
    assert st.events["high"] == 12


def test_read_memory_state_without_memory_controller(tmp_path: Path) -> None:
    """What this host's unified tree gives: a directory with no memory.* files."""
    d = make_cgroup(tmp_path / "plain", cgroup_procs="1\n")
    assert cgroup.read_memory_state(str(d)) == MemoryState(
        current=None, max=None, high=None, inactive_file=0, events={})


def test_read_memory_state_of_a_vanished_cgroup(tmp_path: Path) -> None:
    d = make_cgroup(tmp_path / "gone", memory_current="1\n")
    shutil.rmtree(d)
    with pytest.raises(CgroupGone) as info:
        cgroup.read_memory_state(str(d))
    assert info.value.path == str(d)
    assert str(info.value) == f"cgroup {d} is gone"


def test_read_memory_state_when_rmdir_races_with_a_read(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a file of a cgroup removed after its open gives ENODEV on cgroupfs."""
    d = make_cgroup(tmp_path / "racy", memory_current="1\n", memory_max="2\n")

    def enodev(path: str) -> bytes | None:
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV), path)

    monkeypatch.setattr(cgroup, "_read_optional", enodev)
    with pytest.raises(CgroupGone) as info:
        cgroup.read_memory_state(str(d))
    assert info.value.path == str(d)


def test_read_memory_state_when_the_cgroup_goes_between_check_and_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removed after the isdir check, before memory.current is read: every file is then
    missing, which must be told apart from a cgroup without the memory controller."""
    d = make_cgroup(tmp_path / "racy", memory_current="1\n")
    real = cgroup._read_optional

    def remove_first(path: str) -> bytes | None:
        if os.path.isdir(d):
            shutil.rmtree(d)
        return real(path)

    monkeypatch.setattr(cgroup, "_read_optional", remove_first)
    with pytest.raises(CgroupGone):
        cgroup.read_memory_state(str(d))


@pytest.mark.parametrize(("name", "content"), [
    ("memory.current", b"garbage\n"),
    ("memory.current", b""),
    ("memory.max", b"lots\n"),
    ("memory.high", b"-\n"),
])
def test_read_memory_state_garbage_names_the_cgroup(tmp_path: Path, name: str,
                                                    content: bytes) -> None:
    d = make_cgroup(tmp_path / "hostile", memory_current="1\n")
    (d / name).write_bytes(content)
    with pytest.raises(ValueError, match="unexpected memory file content") as info:
        cgroup.read_memory_state(str(d))
    assert not isinstance(info.value, CgroupGone)
    assert str(info.value).startswith(f"{d}: unexpected memory file content: ")


def test_read_memory_state_garbage_in_stat_and_events_is_skipped(tmp_path: Path) -> None:
    d = make_cgroup(tmp_path / "hostile", memory_current="10\n", memory_max="100\n",
                    memory_stat=b"inactive_file lots\n\xff\xfe\n",
                    memory_events=b"oom\noom_kill 2\nhigh x\n")
    st = cgroup.read_memory_state(str(d))
    assert st.inactive_file == 0
    assert st.events == {"oom_kill": 2}
    assert st.headroom == 90


# --- read_procs ---------------------------------------------------------------------------


def procs_tree(root: Path) -> Path:
    """root (1 2) / a (3) / a/x (4 5); b empty; c without cgroup.procs; a file beside."""
    make_cgroup(root, cgroup_procs="1\n2\n")
    make_cgroup(root / "a", cgroup_procs="3\n")
    make_cgroup(root / "a" / "x", cgroup_procs="4\n5\n")
    make_cgroup(root / "b", cgroup_procs="")
    make_cgroup(root / "c")
    (root / "memory.current").write_text("1\n")
    return root


def test_read_procs_recursive(tmp_path: Path) -> None:
    root = procs_tree(tmp_path / "s")
    assert sorted(cgroup.read_procs(str(root))) == [1, 2, 3, 4, 5]
    assert sorted(cgroup.read_procs(str(root / "a"))) == [3, 4, 5]
    assert cgroup.read_procs(str(root / "b")) == []
    assert cgroup.read_procs(str(root / "c")) == []


def test_read_procs_not_recursive(tmp_path: Path) -> None:
    root = procs_tree(tmp_path / "s")
    assert cgroup.read_procs(str(root), recursive=False) == [1, 2]
    assert cgroup.read_procs(str(root / "a"), recursive=False) == [3]


def test_read_procs_of_a_vanished_cgroup(tmp_path: Path) -> None:
    assert cgroup.read_procs(str(tmp_path / "absent")) == []
    assert cgroup.read_procs(str(tmp_path / "absent"), recursive=False) == []


def test_read_procs_child_removed_mid_walk(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk has listed a/ when a/ and a/x/ are removed: what remains is returned."""
    root = procs_tree(tmp_path / "s")
    real = cgroup._read_optional

    def remove_a_after_root(path: str) -> bytes | None:
        data = real(path)
        if path == os.path.join(str(root), "cgroup.procs"):
            shutil.rmtree(root / "a")
        return data

    monkeypatch.setattr(cgroup, "_read_optional", remove_a_after_root)
    assert sorted(cgroup.read_procs(str(root))) == [1, 2]


def test_read_procs_procs_file_removed_mid_walk(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """a/x/ is walked into, but its cgroup.procs is gone by the time it is read."""
    root = procs_tree(tmp_path / "s")
    real = cgroup._read_optional
    target = os.path.join(str(root / "a" / "x"), "cgroup.procs")

    def vanish(path: str) -> bytes | None:
        if path == target:
            os.unlink(target)
        return real(path)

    monkeypatch.setattr(cgroup, "_read_optional", vanish)
    assert sorted(cgroup.read_procs(str(root))) == [1, 2, 3]


def test_read_procs_child_removed_between_open_and_read(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """On cgroupfs a cgroup removed after its cgroup.procs was opened reads as ENODEV
    (read_memory_state says so and turns it into CgroupGone).  In a walk that is one
    vanished child: the rest is still returned."""
    root = procs_tree(tmp_path / "s")
    real = cgroup._read_optional
    target = os.path.join(str(root / "a" / "x"), "cgroup.procs")

    def enodev(path: str) -> bytes | None:
        if path == target:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV), path)
        return real(path)

    monkeypatch.setattr(cgroup, "_read_optional", enodev)
    assert sorted(cgroup.read_procs(str(root))) == [1, 2, 3]


# --- children, can_kill, kill, oom_group ------------------------------------------------------


def test_children_sorted_directories_only(tmp_path: Path) -> None:
    root = make_cgroup(tmp_path / "s", cgroup_procs="", memory_current="1\n")
    for name in ("zeta", "alpha", "mid.scope", "Beta"):
        (root / name).mkdir()
    (root / "link").symlink_to(root / "alpha")
    assert cgroup.children(str(root)) == [str(root / n)
                                          for n in ("Beta", "alpha", "mid.scope", "zeta")]
    assert cgroup.children(str(root / "alpha")) == []


def test_children_of_a_missing_cgroup(tmp_path: Path) -> None:
    assert cgroup.children(str(tmp_path / "absent")) == []


def test_can_kill_and_kill(tmp_path: Path) -> None:
    d = make_cgroup(tmp_path / "s")
    assert not cgroup.can_kill(str(d))
    (d / "cgroup.kill").write_text("")
    assert cgroup.can_kill(str(d))
    cgroup.kill(str(d))
    assert (d / "cgroup.kill").read_text() == "1"


@pytest.mark.parametrize(("content", "expected"), [
    ("1\n", True),
    ("1", True),
    ("0\n", False),
    ("", False),
    ("2\n", False),
    ("yes\n", False),
])
def test_oom_group(tmp_path: Path, content: str, expected: bool) -> None:
    d = make_cgroup(tmp_path / "s", memory_oom_group=content)
    assert (d / "memory.oom.group").exists()
    assert cgroup.oom_group(str(d)) is expected


def test_oom_group_missing_file_or_cgroup(tmp_path: Path) -> None:
    d = make_cgroup(tmp_path / "s")
    assert cgroup.oom_group(str(d)) is False
    assert cgroup.oom_group(str(tmp_path / "absent")) is False


# --- oomd_preference (real user xattrs) ---------------------------------------------------------


def _supports_user_xattrs(base: str) -> str | None:
    """None when `base` takes a user xattr, else why not."""
    probe = os.path.join(base, ".xattr-probe")
    os.mkdir(probe)
    try:
        os.setxattr(probe, "user.mreaper_probe", b"1")
        return None
    except OSError as e:
        return f"{base}: {e.strerror}"
    finally:
        os.rmdir(probe)


@pytest.fixture
def xattr_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose filesystem takes user xattrs: tmp_path, else one in /dev/shm.
    Neither: the test fails (the xattr code path must be exercised for real)."""
    why = _supports_user_xattrs(str(tmp_path))
    if why is None:
        yield tmp_path
        return
    shm = tempfile.mkdtemp(prefix="mreaper-xattr-", dir="/dev/shm")
    try:
        why_shm = _supports_user_xattrs(shm)
        if why_shm is not None:
            pytest.fail(f"no filesystem here takes user xattrs: {why}; {why_shm}")
        yield Path(shm)
    finally:
        shutil.rmtree(shm)


def with_xattrs(d: Path, **values: bytes) -> str:
    d.mkdir()
    for key, value in values.items():
        os.setxattr(d, f"user.oomd_{key}", value)
    return str(d)


def test_oomd_preference_none(xattr_dir: Path) -> None:
    assert cgroup.oomd_preference(with_xattrs(xattr_dir / "plain")) is None
    os.setxattr(xattr_dir / "plain", "user.other", b"1")
    assert cgroup.oomd_preference(str(xattr_dir / "plain")) is None


def test_oomd_preference_omit(xattr_dir: Path) -> None:
    assert cgroup.oomd_preference(with_xattrs(xattr_dir / "o", omit=b"1")) == "omit"


def test_oomd_preference_avoid(xattr_dir: Path) -> None:
    assert cgroup.oomd_preference(with_xattrs(xattr_dir / "a", avoid=b"1")) == "avoid"


def test_oomd_preference_omit_wins_over_avoid(xattr_dir: Path) -> None:
    d = with_xattrs(xattr_dir / "both", avoid=b"1", omit=b"1")
    assert cgroup.oomd_preference(d) == "omit"


def test_oomd_preference_value_zero_is_no_preference(xattr_dir: Path) -> None:
    assert cgroup.oomd_preference(with_xattrs(xattr_dir / "z", omit=b"0")) is None
    assert cgroup.oomd_preference(with_xattrs(xattr_dir / "z2", avoid=b"0")) is None
    # omit "0" does not hide an avoid "1"
    assert cgroup.oomd_preference(with_xattrs(xattr_dir / "z3", omit=b"0",
                                              avoid=b"1")) == "avoid"


def test_oomd_preference_value_with_whitespace_and_junk(xattr_dir: Path) -> None:
    assert cgroup.oomd_preference(with_xattrs(xattr_dir / "n", omit=b"1\n")) == "omit"
    assert cgroup.oomd_preference(with_xattrs(xattr_dir / "j", omit=b"yes")) is None
    assert cgroup.oomd_preference(with_xattrs(xattr_dir / "e", avoid=b"")) is None


def test_oomd_preference_of_a_missing_cgroup(xattr_dir: Path) -> None:
    assert cgroup.oomd_preference(str(xattr_dir / "absent")) is None


# --- resolve / relative --------------------------------------------------------------------------


@pytest.fixture
def unified(tmp_path: Path) -> Path:
    """u/{a/{b,c,b2/deep},d.slice/{x.service,y.service},e} with files beside the dirs."""
    u = make_cgroup(tmp_path / "u", cgroup_procs="", memory_pressure="")
    for rel in ("a/b", "a/c", "a/b2/deep", "d.slice/x.service", "d.slice/y.service", "e"):
        make_cgroup(u / rel, cgroup_procs="", memory_current="1\n")
    make_cgroup(u / "a", memory_current="1\n")
    return u


def test_resolve_glob(unified: Path) -> None:
    u = str(unified)
    assert cgroup.resolve(u, "a/*") == [f"{u}/a/b", f"{u}/a/b2", f"{u}/a/c"]
    assert cgroup.resolve(u, "/a/*") == [f"{u}/a/b", f"{u}/a/b2", f"{u}/a/c"]
    assert cgroup.resolve(u, "d.slice/*.service") == [f"{u}/d.slice/x.service",
                                                      f"{u}/d.slice/y.service"]
    assert cgroup.resolve(u, "a/[bc]") == [f"{u}/a/b", f"{u}/a/c"]
    assert cgroup.resolve(u, "a/b?") == [f"{u}/a/b2"]
    assert cgroup.resolve(u, "*/b2/*") == [f"{u}/a/b2/deep"]


def test_resolve_plain_relative_and_rooted(unified: Path) -> None:
    u = str(unified)
    assert cgroup.resolve(u, "a/b") == [f"{u}/a/b"]
    assert cgroup.resolve(u, "/a/b") == [f"{u}/a/b"]
    assert cgroup.resolve(u, "e") == [f"{u}/e"]


def test_resolve_absolute_path_under_the_mount(unified: Path) -> None:
    u = str(unified)
    assert cgroup.resolve(u, f"{u}/a/b") == [f"{u}/a/b"]
    assert cgroup.resolve(u, f"{u}/d.slice/*") == [f"{u}/d.slice/x.service",
                                                   f"{u}/d.slice/y.service"]
    assert cgroup.resolve(u + "/", f"{u}/a/c") == [f"{u}/a/c"]


def test_resolve_no_match(unified: Path) -> None:
    u = str(unified)
    assert cgroup.resolve(u, "nothing") == []
    assert cgroup.resolve(u, "nothing/*") == []
    assert cgroup.resolve(u, "a/b/*") == []          # b has files only
    assert cgroup.resolve(u, "a/memory.current") == []  # a file, not a cgroup
    # An absolute path outside the mount is taken as relative to it.
    assert cgroup.resolve(u, "/elsewhere/a/b") == []


@pytest.mark.parametrize(("path", "expected"), [
    ("", "/"),
    ("/a", "/a"),
    ("/a/b", "/a/b"),
    ("/d.slice/x.service", "/d.slice/x.service"),
    ("/a/b/", "/a/b"),
])
def test_relative(tmp_path: Path, path: str, expected: str) -> None:
    u = str(tmp_path / "u")
    assert cgroup.relative(u, u + path) == expected
    assert cgroup.relative(u + "/", u + path) == expected
