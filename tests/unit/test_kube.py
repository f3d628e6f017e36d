"""kube.pod_of: kubelet's cgroup layouts (both drivers), as the host and as a cgroup
namespace show them, and paths that look like them but are not (fixture paths: this
machine runs no kubelet; tests/lab/test_pods.py has systemd build real ones)."""

from __future__ import annotations

import pytest

from mreaper import kube
from mreaper.kube import Pod, QoS

UID = "0f4c1b3e-9a8d-4c2e-b7a1-2d3e4f5a6b7c"
SD_UID = UID.replace("-", "_")
CID = "4b9e1c" + "a" * 58
SANDBOX = "9" * 64

BE = f"kubepods-besteffort-pod{SD_UID}.slice"
BU = f"kubepods-burstable-pod{SD_UID}.slice"
GU = f"kubepods-pod{SD_UID}.slice"


@pytest.mark.parametrize(("path", "want"), [
    # systemd driver, the host's view
    (f"/kubepods.slice/kubepods-besteffort.slice/{BE}/cri-containerd-{CID}.scope",
     Pod(QoS.BEST_EFFORT, UID, CID)),
    (f"/kubepods.slice/kubepods-burstable.slice/{BU}/crio-{CID}.scope",
     Pod(QoS.BURSTABLE, UID, CID)),
    (f"/kubepods.slice/{GU}/docker-{CID}.scope", Pod(QoS.GUARANTEED, UID, CID)),
    # a process in a sub-cgroup of its container (systemd in a container, nested cgroups)
    (f"/kubepods.slice/{GU}/cri-containerd-{CID}.scope/init.scope",
     Pod(QoS.GUARANTEED, UID, CID)),
    # a pod with no container yet, and CRI-O's conmon next to the container
    (f"/kubepods.slice/kubepods-besteffort.slice/{BE}", Pod(QoS.BEST_EFFORT, UID, "")),
    (f"/kubepods.slice/kubepods-burstable.slice/{BU}/crio-conmon-{CID}.scope",
     Pod(QoS.BURSTABLE, UID, "")),
    # a container scope without an id, or with one that is no id
    (f"/kubepods.slice/{GU}/cri-containerd-.scope", Pod(QoS.GUARANTEED, UID, "")),
    (f"/kubepods.slice/{GU}/cri-containerd-xyz.scope", Pod(QoS.GUARANTEED, UID, "")),
    # static pods: a 32-hex-digit uid
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
     + "c" * 32 + f".slice/cri-containerd-{CID}.scope", Pod(QoS.BURSTABLE, "c" * 32, CID)),
    # cgroupfs driver
    (f"/kubepods/besteffort/pod{UID}/{CID}", Pod(QoS.BEST_EFFORT, UID, CID)),
    (f"/kubepods/burstable/pod{UID}/{CID}", Pod(QoS.BURSTABLE, UID, CID)),
    (f"/kubepods/pod{UID}/{CID}", Pod(QoS.GUARANTEED, UID, CID)),
    (f"/kubepods/burstable/pod{UID}", Pod(QoS.BURSTABLE, UID, "")),
    (f"/kubepods/burstable/pod{SD_UID}/{CID}", Pod(QoS.BURSTABLE, UID, CID)),  # '_' taken
    # from mreaper's own cgroup namespace (kernel: cgroup_path_ns), steps up to the
    # nearest common ancestor: /, kubepods.slice, or a QoS slice
    (f"/../../../kubepods.slice/{GU}/cri-containerd-{CID}.scope",
     Pod(QoS.GUARANTEED, UID, CID)),
    (f"/../../../kubepods-besteffort.slice/{BE}/cri-containerd-{CID}.scope",
     Pod(QoS.BEST_EFFORT, UID, CID)),
    (f"/../../../{GU}/cri-containerd-{CID}.scope", Pod(QoS.GUARANTEED, UID, CID)),
    (f"/../../{BU}/cri-containerd-{CID}.scope", Pod(QoS.BURSTABLE, UID, CID)),
    (f"/../../../besteffort/pod{UID}/{CID}", Pod(QoS.BEST_EFFORT, UID, CID)),
    (f"/../../../../kubepods/pod{UID}/{CID}", Pod(QoS.GUARANTEED, UID, CID)),
    # cgroupfs, steps that stop at kubepods or at a QoS directory: the path cannot tell
    (f"/../../pod{UID}/{CID}", Pod(QoS.UNKNOWN, UID, CID)),
])
def test_kubelet_layouts(path: str, want: Pod) -> None:
    assert kube.pod_of(path) == want


@pytest.mark.parametrize("path", [
    "", "/", "kubepods.slice/kubepods-pod1.slice",  # not absolute
    "/kubepods.slice", "/kubepods.slice/kubepods-besteffort.slice", "/kubepods",
    "/kubepods/besteffort", "/..", "/../..",
    # a user's delegated subtree with kubelet's names lower down: anchored, no pod
    f"/user.slice/user-1000.slice/user@1000.service/kubepods.slice/{GU}/cri-containerd-{CID}.scope",
    f"/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods/besteffort/pod{UID}/{CID}",
    f"/../../user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-besteffort.slice/{BE}",
    # kubelet's names without kubepods.slice on the host's view
    f"/kubepods-besteffort.slice/{BE}/cri-containerd-{CID}.scope",
    f"/{GU}/cri-containerd-{CID}.scope", f"/besteffort/pod{UID}/{CID}", f"/pod{UID}/{CID}",
    # classes that do not agree, pod slices outside their class's slice
    f"/kubepods.slice/kubepods-besteffort.slice/{BU}/cri-containerd-{CID}.scope",
    f"/kubepods.slice/{BE}/cri-containerd-{CID}.scope",
    f"/kubepods.slice/kubepods-burstable.slice/{GU}",
    # a uid that is no uid: empty, unicode, upper case, a slash trick, far too long
    "/kubepods.slice/kubepods-pod.slice", "/kubepods/pod/x",
    "/kubepods.slice/kubepods-podé1.slice", f"/kubepods/pod{UID.upper()}/{CID}",
    "/kubepods.slice/kubepods-pod" + "a" * 5000 + ".slice",
    "/kubepods.slice/kubepods-pod-.slice", "/kubepods/pod_abc/x", "/kubepods/podxyz/x",
    "/kubepods.slice/kubepods-pod\udcff.slice",
    # a cgroup named like a sibling container, from within the pod: no way to tell
    f"/../{CID}", "/../cri-containerd-abc.scope",
])
def test_not_pods(path: str) -> None:
    assert kube.pod_of(path) is None


def test_hostile_lengths() -> None:
    """Very long and very deep paths: a bounded answer, no exception."""
    deep = "/.." * 100_000 + f"/kubepods/pod{UID}/{CID}"
    assert kube.pod_of(deep) is None  # deeper than any cgroup tree: not believed
    long_ctr = f"/kubepods/pod{UID}/" + "a" * 1_000_000
    assert kube.pod_of(long_ctr) == Pod(QoS.GUARANTEED, UID, "")
    tail = f"/kubepods/pod{UID}/{CID}" + "/x" * 100_000
    assert kube.pod_of(tail) == Pod(QoS.GUARANTEED, UID, CID)
    assert kube.pod_of("/" + "é" * 10_000) is None


def test_tiers() -> None:
    assert kube.tier(f"/kubepods/besteffort/pod{UID}/{CID}") == 0
    assert kube.tier(f"/kubepods.slice/kubepods-burstable.slice/{BU}") == 1
    assert kube.tier(f"/kubepods.slice/{GU}/cri-containerd-{CID}.scope") == 2
    assert kube.tier(f"/../../pod{UID}/{CID}") == 2
    assert kube.tier("/system.slice/kubelet.service") == 2
    assert kube.tier("") == 2


def test_pause() -> None:
    sandbox = f"/kubepods.slice/kubepods-besteffort.slice/{BE}/cri-containerd-{SANDBOX}.scope"
    assert kube.is_pause(sandbox, ("/pause",), 300 << 10)
    # the name alone shelters nothing: not in a pod's container, or too big, or other argv
    assert not kube.is_pause("/user.slice/user-1000.slice/session-1.scope", ("/pause",), 1 << 20)
    assert not kube.is_pause(f"/kubepods.slice/kubepods-besteffort.slice/{BE}", ("/pause",),
                             1 << 20)
    assert not kube.is_pause(sandbox, ("/pause",), kube.PAUSE_MAX_RSS + 1)
    assert kube.is_pause(sandbox, ("/pause", "-v"), 1 << 20)
    assert not kube.is_pause(sandbox, ("pause",), 1 << 20)
    assert not kube.is_pause(sandbox, ("/pause2",), 1 << 20)
    assert not kube.is_pause(sandbox, (), 1 << 20)


def test_describe() -> None:
    pod = Pod(QoS.BURSTABLE, UID, CID)
    assert pod.describe() == f"pod {UID} (Burstable) container {CID[:12]}"
    assert Pod(QoS.BEST_EFFORT, UID, "").describe() == f"pod {UID} (BestEffort) (no container)"
    assert pod.to_dict() == {"pod_uid": UID, "qos": "Burstable", "container_id": CID}


def test_cache_is_bounded() -> None:
    """Answers are kept for short paths only, and at most CACHE_SIZE of them: a user who
    creates many long cgroups named like kubelet's costs time, not unbounded memory."""
    long_pod = f"/kubepods/pod{UID}/{CID}" + "/x" * kube.CACHE_PATH
    before = kube._pod_of_cached.cache_info().currsize
    assert kube.pod_of(long_pod) == Pod(QoS.GUARANTEED, UID, CID)
    assert kube._pod_of_cached.cache_info().currsize == before  # not kept
    for i in range(kube.CACHE_SIZE + 10):
        kube.pod_of(f"/kubepods/pod{i:x}/{CID}")
    assert kube._pod_of_cached.cache_info().currsize == kube.CACHE_SIZE
