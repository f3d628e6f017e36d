"""podmem: a pod container's usage over its memory request, read from cgroup files.

Fixture trees of a cgroup2 mount and /proc: this host runs no kubelet, and its cgroup2
tree has no memory controller (hybrid: no memory.min/low/current), so the files kubelet's
MemoryQoS writes cannot be produced here.  The lab's pod tests build real slices.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_policy import write_proc

from mreaper import podmem, policy
from mreaper.proctable import ProcTable

MiB = 1 << 20
CID = "ab" * 32
CID2 = "cd" * 32
UID = "0000000a_0000_4000_8000_000000000000"
POD = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID}.slice"


def ctr(cid: str = CID, pod: str = POD) -> str:
    return f"{pod}/cri-containerd-{cid}.scope"


def put(root: Path, path: str, **files: int | str) -> Path:
    d = root / path.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (d / name.replace("_", ".")).write_text(f"{value}\n")
    return d


def test_container_request_in_memory_min(tmp_path: Path) -> None:
    put(tmp_path, ctr(), memory_min=512 * MiB, memory_low=0, memory_current=900 * MiB)
    assert podmem.over_request(str(tmp_path), ctr()) == 388 * MiB
    req = podmem.Requests(str(tmp_path))
    assert req.over(ctr()) == 388 * MiB
    # a process in a cgroup the container made below its own counts with the container
    assert podmem.container_cgroup(ctr() + "/sub/deeper") == ctr()
    assert req.over(ctr() + "/sub") == 388 * MiB


def test_pod_request_in_memory_low(tmp_path: Path) -> None:
    # v1.36 TieredReservation: a Burstable pod's request in the pod's memory.low only
    put(tmp_path, POD, memory_min=0, memory_low=256 * MiB, memory_current=200 * MiB)
    put(tmp_path, ctr(), memory_min=0, memory_low=0, memory_current=150 * MiB)
    assert podmem.over_request(str(tmp_path), ctr()) == -56 * MiB


def test_no_request_shown_is_unknown(tmp_path: Path) -> None:
    # MemoryQoS off: kubelet writes neither file (the kernel's 0 stays)
    put(tmp_path, POD, memory_min=0, memory_low=0, memory_current=200 * MiB)
    put(tmp_path, ctr(), memory_min=0, memory_low=0, memory_current=150 * MiB)
    assert podmem.over_request(str(tmp_path), ctr()) is None
    # no memory controller at all (this host's unified tree): no files
    put(tmp_path, ctr(CID2))
    assert podmem.over_request(str(tmp_path), ctr(CID2)) is None


def test_vanished_container_is_unknown_not_an_error(tmp_path: Path) -> None:
    # the container exited between the listing and the read: its cgroup is gone
    assert podmem.over_request(str(tmp_path), ctr()) is None
    # or went away between the request and the usage
    d = put(tmp_path, ctr(), memory_min=512 * MiB)
    assert not (d / "memory.current").exists()
    assert podmem.over_request(str(tmp_path), ctr()) is None


@pytest.mark.parametrize("cgroup", [
    "/system.slice/cron.service",
    POD,                                     # the pod's own cgroup: no container
    f"/../../kubepods-burstable-pod{UID}.slice/cri-containerd-{CID}.scope",  # namespaced
    "/user.slice/user-1000.slice/user@1000.service/" + ctr().lstrip("/"),    # look-alike
    "",
])
def test_only_containers_read(tmp_path: Path, cgroup: str) -> None:
    # files a look-alike or a namespaced path could point at are never read
    put(tmp_path, cgroup or "/", memory_min=MiB, memory_current=9 * MiB)
    assert podmem.Requests(str(tmp_path)).over(cgroup) is None


def test_process_table_fills_over_request(tmp_path: Path) -> None:
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    put(cg, ctr(), memory_min=100 * MiB, memory_current=300 * MiB)
    put(cg, ctr(CID2), memory_min=0, memory_low=0, memory_current=300 * MiB)
    write_proc(proc, 100, cgroup=f"0::{ctr()}\n".encode())
    write_proc(proc, 101, cgroup=f"0::{ctr(CID2)}\n".encode())
    write_proc(proc, 102)
    table = ProcTable(str(proc))
    table.refresh()
    table.read_requests(str(cg))
    by_pid = {c.pid: c.over_request for c in table.candidates()}
    assert by_pid == {100: 200 * MiB, 101: None, 102: None}
    # usage moves without the process changing: read again on the next call
    (cg / ctr().lstrip("/") / "memory.current").write_text(f"{50 * MiB}\n")
    table.read_requests(str(cg))
    assert {c.pid: c.over_request for c in table.candidates()}[100] == -50 * MiB
    # and explain's scan gets the same figures
    candidates, _ = policy.scan(str(proc))
    assert {c.pid: c.over_request
            for c in podmem.with_requests(candidates, str(cg))}[100] == -50 * MiB
