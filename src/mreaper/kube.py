"""Kubernetes pods from cgroup paths: which pod, QoS class and container a process is in.

Pure: a cgroup v2 path as /proc/<pid>/cgroup shows it in, a `Pod` or None out.  The
path is the only source, and a pod cannot change it: kubelet creates the pod cgroups
and the runtime the container ones, both as root, and a container cannot move its
processes out of its own cgroup namespace.  kubelet's layouts, for its two drivers:

  systemd:  /kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/<ctr>.scope
            /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/<ctr>.scope
            /kubepods.slice/kubepods-pod<uid>.slice/<ctr>.scope                (Guaranteed)
            (systemd escapes the '-' of the uid as '_'; <ctr> is cri-containerd-<id>,
            crio-<id> or docker-<id>; CRI-O's conmon sits in crio-conmon-<id>.scope)
  cgroupfs: /kubepods/besteffort/pod<uid>/<id>, /kubepods/burstable/pod<uid>/<id>,
            /kubepods/pod<uid>/<id>                                             (Guaranteed)

Anchored: kubelet's names must begin the path.  A user to whom systemd delegates a
subtree (user@.service) can create "kubepods.slice/kubepods-besteffort.slice/..." in it,
but there it follows /user.slice/..., and is no pod.  The one thing allowed before
kubelet's names is a run of ".." steps: where mreaper's container has a cgroup namespace
of its own (containerd's default with cgroup v2), the kernel shows other cgroups relative
to mreaper's own (cgroup_path_ns(): "/../../../kubepods-besteffort.slice/..."), and the
steps stop at the nearest common ancestor, so what follows starts below it: at
kubepods.slice, a QoS slice or a pod slice.  Only root (kubelet) creates cgroups next to
those, so a user cannot make a path that begins that way either.

With the cgroupfs driver seen from such a namespace one case stays open: "/../../pod<uid>/"
is a Guaranteed pod if the steps went up to /kubepods, or a pod of mreaper's own QoS
class (Burstable, for the DaemonSet) if they went up to that class's directory; the
path alone cannot tell, so its class is UNKNOWN (ranked with Guaranteed: the side on
which nothing is killed early).  The systemd driver names the class in every pod slice.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass


class QoS(enum.Enum):
    """A pod's QoS class, spelled as Kubernetes spells it (status.qosClass)."""

    BEST_EFFORT = "BestEffort"
    BURSTABLE = "Burstable"
    GUARANTEED = "Guaranteed"
    UNKNOWN = "unknown"    # a pod, class not in the path (see the module's docstring)


# Kubernetes' eviction order: every BestEffort pod before any Burstable one, and those
# before any Guaranteed one.  Processes outside pods (kubelet, the runtime, system
# services) rank with Guaranteed pods: the kernel's oom_score, which kubelet's
# oom_score_adj already sets by class (Guaranteed -997), orders those among themselves.
TIER_OF = {QoS.BEST_EFFORT: 0, QoS.BURSTABLE: 1, QoS.GUARANTEED: 2, QoS.UNKNOWN: 2}
NOT_A_POD_TIER = 2


@dataclass(frozen=True, slots=True)
class Pod:
    """Where in kubelet's tree a process is.  `container`: the runtime's container id,
    "" when the process is in the pod's cgroup but in no container's (a pod whose
    containers are not created yet, CRI-O's conmon, a layout not known here)."""

    qos: QoS
    uid: str
    container: str

    def describe(self) -> str:
        """"pod <uid> (<QoS>) container <id12>": how reports and explain name it."""
        ctr = f" container {self.container[:12]}" if self.container else " (no container)"
        return f"pod {self.uid} ({self.qos.value}){ctr}"

    def to_dict(self) -> dict[str, str]:
        return {"pod_uid": self.uid, "qos": self.qos.value, "container_id": self.container}


_QOS_NAMES = {"besteffort": QoS.BEST_EFFORT, "burstable": QoS.BURSTABLE}
# a pod uid: a UUID (API pods) or 32 hex digits (static pods' hash); systemd writes '_'
# for '-', and either is taken in both layouts (a class lost to a misread uid would put
# a Burstable pod among the Guaranteed ones)
_UID_CHARS = frozenset("0123456789abcdef-_")
_HEX = frozenset("0123456789abcdef")
_RUNTIME_PREFIXES = ("cri-containerd-", "crio-", "docker-")
MAX_UID = 64       # UUID: 36; a static pod's hash: 32
MAX_ID = 128       # containerd/CRI-O/Docker ids: 64 hex digits
MAX_DEPTH = 4096   # PATH_MAX / 2: more ".." steps than a cgroup tree can have


def pod_of(cgroup: str) -> Pod | None:
    """The pod of a process in cgroup v2 path `cgroup` (as /proc/<pid>/cgroup shows it,
    also relative to a cgroup namespace), or None when it is in none.  Pure.

    Cheap where it does not apply: a path that neither names kubepods nor starts with
    ".." steps is no pod, at a substring test.  Every ranking asks again for every
    process, and a node's processes share few cgroups: answers for paths of up to
    CACHE_PATH chars are kept (at most CACHE_SIZE of them, so at most ~1 MiB whatever
    cgroups users create)."""
    if "kubepods" not in cgroup and not cgroup.startswith("/.."):
        return None
    if len(cgroup) <= CACHE_PATH:
        return _pod_of_cached(cgroup)
    return _pod_of(cgroup)


CACHE_PATH = 512
CACHE_SIZE = 2048


@functools.lru_cache(maxsize=CACHE_SIZE)
def _pod_of_cached(cgroup: str) -> Pod | None:
    return _pod_of(cgroup)


def _pod_of(cgroup: str) -> Pod | None:
    if not cgroup.startswith("/"):
        return None
    parts = cgroup[1:].split("/", MAX_DEPTH)
    steps = 0
    while steps < len(parts) and parts[steps] == "..":
        steps += 1
    rest = parts[steps:]
    if not rest or not rest[0]:
        return None
    if rest[0].endswith(".slice"):
        return _systemd(rest, namespaced=steps > 0)
    return _cgroupfs(rest, namespaced=steps > 0)


def _systemd(rest: list[str], *, namespaced: bool) -> Pod | None:
    i = 0
    if rest[0] == "kubepods.slice":
        i = 1
    elif not namespaced:
        return None  # on the host's view, kubelet's tree starts at /kubepods.slice
    if i >= len(rest):
        return None
    qos: QoS | None = None
    for name, cls in _QOS_NAMES.items():
        if rest[i] == f"kubepods-{name}.slice":
            qos, i = cls, i + 1
            break
    if i >= len(rest):
        return None  # a QoS slice itself (kubelet's own, no pod)
    slice_name = rest[i]
    for name, cls in _QOS_NAMES.items():
        prefix = f"kubepods-{name}-pod"
        if slice_name.startswith(prefix):
            if qos not in (None, cls):
                return None  # a burstable pod slice under the besteffort slice: not kubelet's
            if qos is None and i == 1:
                return None  # kubelet puts these pod slices in their QoS slice only
            qos, uid = cls, slice_name[len(prefix):]
            break
    else:
        if qos is not None or not slice_name.startswith("kubepods-pod"):
            return None
        qos, uid = QoS.GUARANTEED, slice_name[len("kubepods-pod"):]
    if not uid.endswith(".slice"):
        return None
    uid = uid[:-len(".slice")]
    if not _is_uid(uid):
        return None
    unit = rest[i + 1] if i + 1 < len(rest) else ""
    return Pod(qos, uid.replace("_", "-"), _systemd_container(unit))


def _systemd_container(unit: str) -> str:
    """The container id of a runtime's scope unit name, or ""."""
    if not unit.endswith(".scope") or unit.startswith("crio-conmon-"):
        return ""
    for prefix in _RUNTIME_PREFIXES:
        if unit.startswith(prefix):
            cid = unit[len(prefix):-len(".scope")]
            return cid if _is_id(cid) else ""
    return ""


def _cgroupfs(rest: list[str], *, namespaced: bool) -> Pod | None:
    i = 0
    qos: QoS | None = None
    if rest[0] == "kubepods":
        i = 1
    elif not namespaced:
        return None
    if i < len(rest) and rest[i] in _QOS_NAMES:
        qos, i = _QOS_NAMES[rest[i]], i + 1
    if i >= len(rest) or not rest[i].startswith("pod"):
        return None
    uid = rest[i][len("pod"):]
    if not _is_uid(uid):
        return None
    uid = uid.replace("_", "-")
    if qos is None:
        # directly under /kubepods: Guaranteed; after ".." steps that did not name
        # kubepods, the steps may have stopped at a QoS directory: unknown
        qos = QoS.GUARANTEED if i == 1 else QoS.UNKNOWN
    cid = rest[i + 1] if i + 1 < len(rest) else ""
    return Pod(qos, uid, cid if _is_id(cid) else "")


def _is_uid(uid: str) -> bool:
    return 0 < len(uid) <= MAX_UID and set(uid) <= _UID_CHARS and uid.strip("-_") == uid


def _is_id(cid: str) -> bool:
    return 0 < len(cid) <= MAX_ID and set(cid) <= _HEX


def tier(cgroup: str) -> int:
    """The eviction tier of a process in `cgroup`: 0 BestEffort, 1 Burstable, 2 the rest."""
    pod = pod_of(cgroup)
    return NOT_A_POD_TIER if pod is None else TIER_OF[pod.qos]


# The sandbox's infra process: the pause image (registry.k8s.io/pause, also CRI-O's and
# Docker's default) runs "/pause" (argv[0]; options such as -v may follow) in a container
# of its own, and holds ~0.3-1 MiB all its life.  Killing it tears down the pod's
# namespaces and frees nothing.  A pod's own process may call itself "/pause" (argv is
# its to choose), so the name alone shelters nothing: only a process that also lives in
# a container cgroup of a pod and holds no more than PAUSE_MAX_RSS counts, which bounds
# what a look-alike can shelter to that much memory.
PAUSE_ARGV0 = "/pause"
PAUSE_MAX_RSS = 8 << 20


def is_pause(cgroup: str, cmdline: tuple[str, ...], rss: int) -> bool:
    """True for a pod's sandbox (pause) process, by the rule above."""
    if not cmdline or cmdline[0] != PAUSE_ARGV0 or rss > PAUSE_MAX_RSS:
        return False
    pod = pod_of(cgroup)
    return pod is not None and pod.container != ""
