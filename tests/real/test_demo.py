"""`mreaper demo` end to end, as a user runs it: a subprocess on the real kernel.

No timed asserts: how much faster the engine is depends on the machine; what is
checked is that both kills happened, were reported, and left nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mreaper.demo import size_refusal, watched_drop
from mreaper.linux import probe_support, procfs

SRC = Path(__file__).resolve().parents[2] / "src"
MEMCG_ROOT = Path("/sys/fs/cgroup/memory")
MiB = 1 << 20

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="the demo's memory cgroups and SCHED_FIFO starver need root")
needs_mrelease = pytest.mark.skipif(not probe_support().mrelease,
                                    reason="process_mrelease is not available on this kernel")


def run_demo(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "mreaper.cli", "demo", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False,
                          stdin=subprocess.DEVNULL)


def demo_cgroups() -> set[str]:
    if not MEMCG_ROOT.is_dir():
        return set()
    return {p.name for p in MEMCG_ROOT.iterdir() if p.name.startswith("mreaper-demo-")}


def is_demo_child(pid: int) -> bool:
    """True if `pid` is still a hog or a CPU starver (the demo's children run `-c` scripts)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"signal.pause()" in cmdline or b"spinning" in cmdline


def still_there(pid: int, starttime: int) -> bool:
    """The very process (same PID and start time) still exists, zombie or not."""
    try:
        return procfs.read_stat(pid).starttime == starttime
    except procfs.ProcessGone:
        return False


@pytest.fixture(scope="module")
def demo_json() -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("the demo's memory cgroups and SCHED_FIFO starver need root")
    if not probe_support().mrelease:
        pytest.skip("process_mrelease is not available on this kernel")
    before = demo_cgroups()
    done = run_demo("--size", "64", "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    result["_cgroups_before"] = sorted(before)
    return result


@needs_root
@needs_mrelease
def test_demo_reports_both_kills(demo_json: dict[str, Any]) -> None:
    plain, reaped = demo_json["plain"], demo_json["mreaper"]
    for report in (plain, reaped):
        assert report["exited"] is True
        assert [s["name"] for s in report["signals"]] == ["SIGKILL"]
        assert report["kill_to_free_s"] is not None
        assert report["holdings"]["rss_anon"] >= 64 * MiB
        assert report["freed_source"].startswith("memcg ")
    assert plain["mrelease"] == "not-called"
    assert reaped["mrelease"] in ("reaped", "exited-first")
    assert plain["pid"] != reaped["pid"]
    assert demo_json["size_mib"] == 64
    assert demo_json["memcg"] is True
    assert demo_json["mrelease_supported"] is True
    assert demo_json["measured_by"] == "memory cgroup charge"
    # A speedup is computed, but its value is the machine's business.
    assert isinstance(demo_json["speedup"], float)
    assert demo_json["plain_ms"] is not None and demo_json["mreaper_ms"] is not None
    assert "plain SIGKILL: memory back after" in demo_json["comparison"]


@needs_root
@needs_mrelease
def test_demo_leaves_nothing_behind(demo_json: dict[str, Any]) -> None:
    rounds = demo_json["rounds"]
    for name in ("plain", "mreaper"):
        info = rounds[name]
        assert info["memcg"] is not None
        assert not os.path.exists(info["memcg"]), f"{name} round left {info['memcg']}"
        assert not is_demo_child(info["hog_pid"]), f"{name} round's hog is still running"
        if info["starver_pid"] is not None:
            assert not is_demo_child(info["starver_pid"]), f"{name} round's starver still runs"
        # the victim was waited for: not even a zombie of it is left
        assert not still_there(info["hog_pid"], demo_json[name]["starttime"])
    assert demo_cgroups() <= set(demo_json["_cgroups_before"])


@needs_root
def test_demo_human_output() -> None:
    if not probe_support().mrelease:
        pytest.skip("process_mrelease is not available on this kernel")
    before = demo_cgroups()
    done = run_demo("--size", "32")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("mreaper demo: Linux ")
    assert "process_mrelease: yes" in out
    assert "[1/2] plain SIGKILL" in out and "[2/2] mreaper" in out
    assert out.count("  killed ") == 2
    last = out.strip().splitlines()[-1]
    assert last.startswith("plain SIGKILL: memory back after ")
    assert "mreaper (process_mrelease): " in last
    assert demo_cgroups() <= before


def _python_for_nobody() -> str | None:
    """An interpreter uid 65534 can run (the venv's may live under a private /root)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    # The check starts the interpreter again from itself, as the demo does for its hogs.
    check = ("import subprocess, sys; assert sys.version_info >= (3, 11); "
             "subprocess.run([sys.executable, '-c', ''], check=True)")
    for python in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if python and subprocess.run([setpriv, *NOBODY, python, "-c", check], cwd="/",
                                     capture_output=True, check=False).returncode == 0:
            return python
    return None


NOBODY = ["--reuid", "65534", "--regid", "65534", "--clear-groups"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the demo as uid 65534")
@needs_mrelease
def test_demo_unprivileged_runs_without_memcg() -> None:
    python = _python_for_nobody()
    if python is None:
        pytest.skip("no setpriv, or no Python >= 3.11 that uid 65534 may run")
    env = dict(os.environ, PYTHONPATH=str(SRC))
    done = subprocess.run(["setpriv", *NOBODY, python, "-m", "mreaper.cli", "demo", "--size",
                           "32", "--json"], capture_output=True, text=True, timeout=120,
                          env=env, cwd="/", stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["memcg"] is False
    assert any(n.startswith("not root") for n in result["notes"])
    assert result["measured_by"] == "kill reports"
    assert result["starver"] is None or "SCHED_IDLE" in result["starver"]
    for name in ("plain", "mreaper"):
        assert result[name]["exited"] is True
        assert result[name]["uid"] == 65534
        assert result["rounds"][name]["memcg"] is None
        assert not is_demo_child(result["rounds"][name]["hog_pid"])
    assert result["mreaper"]["mrelease"] in ("reaped", "exited-first")


@pytest.mark.parametrize("size", ["100000", "8", "0", "-5", "8193", "15"])
def test_demo_refuses_size_out_of_range(size: str) -> None:
    done = run_demo("--size", size, "--json")
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"--size {size} MiB" in done.stderr
    assert "16..8192" in done.stderr


def test_demo_refuses_when_memavailable_is_short() -> None:
    available = procfs.read_meminfo().mem_available
    if available >= 4 * 8192 * MiB:
        pytest.skip("MemAvailable is large enough for an 8 GiB demo; not running one")
    done = run_demo("--size", "8192")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "--size 8192 MiB" in done.stderr
    assert "MemAvailable" in done.stderr
    assert "32768 MiB" in done.stderr  # what is needed


def test_size_refusal_rules() -> None:
    gib = 1 << 30
    assert size_refusal(256, 24 * gib) is None
    assert size_refusal(16, 64 * MiB) is None  # exactly four times the size
    assert size_refusal(16, 64 * MiB - 1) is not None
    assert "16..8192" in (size_refusal(15, 24 * gib) or "")
    assert "16..8192" in (size_refusal(8193, 1 << 50) or "")
    short = size_refusal(1024, 3 * gib) or ""
    assert "--size 1024 MiB" in short and "4096 MiB" in short and "3072 MiB" in short
    assert "MemAvailable" in (size_refusal(256, None) or "")


def test_watched_drop_allows_for_charge_batching() -> None:
    assert watched_drop(16 * MiB) == 15 * MiB
    assert watched_drop(256 * MiB) == 248 * MiB
    assert 0 < watched_drop(8192 * MiB) < 8192 * MiB
