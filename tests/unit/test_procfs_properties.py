"""Property tests: parse_stat round-trips any comm; the parsers fail only with ParseError."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mreaper.linux import cgroup, procfs
from mreaper.linux.procfs import ParseError

STATES = "RSDZTtXxKWPI"
u64 = st.integers(min_value=0, max_value=2**64 - 1)


def kernel_stat_line(f: dict[str, Any]) -> bytes:
    """/proc/<pid>/stat as fs/proc/array.c writes it: 52 fields, comm raw between parens."""
    fields = [f["state"], f["ppid"], 1, 1, 0, -1, f["flags"]] + [0] * 12 + [f["starttime"]]
    fields += [0] * 30
    assert len(fields) == 50  # fields 3..52
    return (b"%d (" % f["pid"]) + f["comm"] + b") " + " ".join(map(str, fields)).encode() + b"\n"


stat_fields = st.fixed_dictionaries({
    "pid": st.integers(min_value=1, max_value=2**22),
    "comm": st.binary(max_size=64),
    "state": st.sampled_from(STATES),
    "ppid": st.integers(min_value=0, max_value=2**22),
    "flags": st.integers(min_value=0, max_value=2**32 - 1),
    "starttime": u64,
})


@given(stat_fields)
@example({"pid": 1, "comm": b"foo) Z (bar", "state": "S", "ppid": 0, "flags": 0, "starttime": 0})
@example({"pid": 7, "comm": b") 9 (", "state": "D", "ppid": 2, "flags": procfs.PF_KTHREAD,
          "starttime": 1})
@example({"pid": 7, "comm": b"\n\n) R 1 (\n", "state": "Z", "ppid": 2, "flags": 0,
          "starttime": 2**64 - 1})
def test_parse_stat_round_trips_any_comm(f: dict[str, Any]) -> None:
    parsed = procfs.parse_stat(kernel_stat_line(f))
    assert (parsed.pid, parsed.state, parsed.ppid, parsed.flags, parsed.starttime) == (
        f["pid"], f["state"], f["ppid"], f["flags"], f["starttime"])
    assert parsed.comm == f["comm"].decode("utf-8", "backslashreplace")
    assert parsed.is_kernel_thread == bool(f["flags"] & procfs.PF_KTHREAD)


@given(st.binary(max_size=400))
def test_parse_stat_garbage_raises_only_parse_error(data: bytes) -> None:
    try:
        procfs.parse_stat(data, "/proc/9/stat")
    except ParseError as e:
        assert e.path == "/proc/9/stat"


MEMINFO_KEYS = ["MemTotal", "MemFree", "MemAvailable", "SwapTotal", "SwapFree", "AnonPages",
                "Shmem", "Buffers", "HugePages_Total"]
STATUS_KEYS = ["Name", "Tgid", "Uid", "VmRSS", "RssAnon", "RssFile", "RssShmem", "VmSwap",
               "Pid", "State"]
values = st.one_of(
    st.binary(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70).map(lambda n: b"\t%d kB" % n),
    st.integers(min_value=0, max_value=2**40).map(lambda n: b"\t%d" % n),
    st.text(max_size=20).map(lambda t: t.encode()),
    st.sampled_from([b"", b" kB", b"\t1 MB", b"\t1 kB extra", b"\t0\t0\t0\t0", b"\t\xff kB",
                     b"\t" + b"9" * 5000, b"\t\xd9\xa1\xd9\xa2"]),
)


def structured_garbage(keys: list[str]) -> st.SearchStrategy[bytes]:
    line = st.tuples(st.one_of(st.sampled_from(keys), st.text(max_size=10)), values).map(
        lambda kv: kv[0].encode("utf-8", "surrogatepass") + b":" + kv[1])
    return st.lists(st.one_of(line, st.binary(max_size=30)), max_size=20).map(b"\n".join)


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=600), structured_garbage(MEMINFO_KEYS)))
def test_parse_meminfo_garbage_raises_only_parse_error(data: bytes) -> None:
    try:
        mi = procfs.parse_meminfo(data, "/proc/meminfo")
    except ParseError as e:
        assert e.path == "/proc/meminfo"
    else:
        assert isinstance(mi.mem_total, int) and isinstance(mi.mem_available, int)


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=600), structured_garbage(STATUS_KEYS)))
def test_parse_status_garbage_raises_only_parse_error(data: bytes) -> None:
    try:
        s = procfs.parse_status(data, "/proc/9/status")
    except ParseError as e:
        assert e.path == "/proc/9/status"
    else:
        assert s.tgid >= 0 and s.uid >= 0 and isinstance(s.name, str)


@given(st.binary(max_size=400))
def test_parse_cgroup_never_raises(data: bytes) -> None:
    m = procfs.parse_cgroup(data)
    assert isinstance(m.unified, str) and isinstance(m.memory_v1, str)


@given(st.text(max_size=400))
def test_parse_mounts_never_raises(data: str) -> None:
    m = cgroup.parse_mounts(data)
    assert isinstance(m.unified, str) and isinstance(m.memory_v1, str)
