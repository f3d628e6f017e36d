"""Cgroup scopes for real on this hybrid host.

The scope is a cgroup in the cgroup2 tree (/sys/fs/cgroup/unified here), where PSI
files and cgroup.kill work but no memory controller is enabled; the processes are
bounded by v1 memory cgroups, which also measure what each kill gave back.  The
scope's only signal is therefore its own memory.pressure PSI trigger, fired by a
thrasher that reclaims page cache against its memcg limit.  Pure cgroup v2 with
memory.max is tested in the lab VM.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess
from mreaper.hogs import Hog, MemoryCgroup, MiB, Thrasher
from mreaper.linux import cgroup

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: cgroups")


@pytest.fixture
def unified() -> str:
    mounts = cgroup.find_mounts()
    if not mounts.unified:
        pytest.fail("no cgroup2 mount on this host")
    return mounts.unified


@pytest.fixture
def scope_dir(unified: str) -> Iterator[str]:
    path = os.path.join(unified, f"mreaper-test-scope-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    yield path
    for root, dirs, _ in os.walk(path, topdown=False):
        for d in dirs:
            _rmdir(os.path.join(root, d))
    _rmdir(path)


def _rmdir(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.exists(os.path.join(path, "cgroup.kill")):
            cgroup.kill(path)
        for _ in range(500):
            try:
                os.rmdir(path)
                return
            except OSError:
                time.sleep(0.01)


@pytest.fixture
def memcgs() -> Iterator[list[MemoryCgroup]]:
    made: list[MemoryCgroup] = []
    yield made
    for cg in made:
        cg.remove()


def _config(tmp_path: Path, scope: str, unit: str = "process") -> str:
    """Machine scope off (so nothing outside the cgroup can be chosen for machine-wide
    reasons); one scope whose only source is its PSI trigger."""
    path = tmp_path / "mreaper.toml"
    path.write_text(f"""
[memory]
warn = "off"
term = "off"
kill = "off"
[psi]
warn = "off"
kill = "off"
[detect]
scan_interval = 0.5
[[scope]]
name = "test"
cgroup = "{os.path.basename(scope)}"
when = "psi"
unit = "{unit}"
psi = {{ warn = "off", kill = "some 50000 2000000" }}
""")
    return str(path)


def test_scope_kills_only_inside_its_cgroup(tmp_path: Path, scope_dir: str,
                                            memcgs: list[MemoryCgroup]) -> None:
    memcgs += [MemoryCgroup.create(limit=48 * MiB), MemoryCgroup.create(limit=1024 * MiB)]
    outside = Hog(600 * MiB, memcgs[1], name="mr-outside")  # the machine-wide top candidate
    daemon = DaemonProcess("--config", _config(tmp_path, scope_dir))
    try:
        line = daemon.wait_for(r"scope test: (.*)")
        assert "headroom: no (no memory.current" in line.group(1)
        assert "psi: 1 triggers" in line.group(1)
        assert "cgroup.kill: yes" in line.group(1)
        with Thrasher(memcgs[0], str(tmp_path), anon=36 * MiB, file_size=256 * MiB,
                      also_in=[scope_dir]) as thrasher:
            m = daemon.wait_for(rf"\[test\] killed {thrasher.pid} 'mr-thrash'.*"
                                r"process_mrelease (\S+)", timeout=60)
            assert thrasher.proc.wait(timeout=10) == -9
            assert m.group(1) in ("reaped", "exited-first")
        assert outside.proc.poll() is None
        assert not any("mr-outside" in x and "kill" in x for x in daemon.lines)
    finally:
        assert daemon.stop() == 0
        outside.kill()


def test_scope_kills_a_child_cgroup_whole(tmp_path: Path, scope_dir: str,
                                          memcgs: list[MemoryCgroup]) -> None:
    big, small = os.path.join(scope_dir, "big"), os.path.join(scope_dir, "small")
    os.mkdir(big)
    os.mkdir(small)
    memcgs += [MemoryCgroup.create(limit=400 * MiB), MemoryCgroup.create(limit=48 * MiB),
               MemoryCgroup.create(limit=200 * MiB)]
    members = [Hog(100 * MiB, memcgs[0], name=f"mr-member{i}", also_in=[big]) for i in range(3)]
    survivor = Hog(50 * MiB, memcgs[2], name="mr-small", also_in=[small])
    daemon = DaemonProcess("--config", _config(tmp_path, scope_dir, unit="cgroup"))
    try:
        daemon.wait_for(r"scope test: .*unit: cgroup by size")
        # The pressure comes from a thrasher in `big`, the largest child: the unit
        # killed is `big` whole, thrasher and members together.
        with Thrasher(memcgs[1], str(tmp_path), anon=36 * MiB, file_size=256 * MiB,
                      also_in=[big]) as thrasher:
            m = daemon.wait_for(r"\[test\] killed cgroup (\S+) \((\d) processes: (.*?)\) with "
                                r"cgroup.kill .*freed (\S+ \S+)", timeout=60)
            assert m.group(1) == big
            assert m.group(2) == "4"  # three members and the thrasher
            for h in members:
                assert h.proc.wait(timeout=10) == -9
            assert thrasher.proc.wait(timeout=10) == -9
        assert memcgs[0].usage() < 8 * MiB  # all of the members' memory came back
        assert survivor.proc.poll() is None
    finally:
        assert daemon.stop() == 0
        for h in [*members, survivor]:
            h.kill()
