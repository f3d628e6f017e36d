"""How far a pod's container is over its memory request, where the cgroup shows it.

Kubernetes ranks pods for eviction by "usage above request" within a QoS class; the
request is in the pod spec, which a node agent does not read.  kubelet's MemoryQoS
(cgroup v2 only) writes it to the cgroup: v1.22-1.27 set memory.min of each container
with a memory request and of its pod; v1.36's TieredReservation sets memory.min of a
Guaranteed pod's cgroup and memory.low of a Burstable one's (KEP-2570).  Without the
feature (the default before v1.37; from v1.37 without memoryReservationPolicy) neither
is written and the request is not shown: then nothing is known and the order stays by
score (policy.rank_key).

The I/O at the edge of the pure ranking: the daemon fills Candidate.over_request once
per refresh (ProcTable.read_requests), for processes in a pod's container only, with
two or three small reads per container cgroup (cached per path for the refresh): a
node runs at most a few hundred containers.  Root writes these files (kubelet); a pod
cannot, and its usage above its own request is what it controls: the point.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from mreaper import kube

if TYPE_CHECKING:
    from mreaper import policy


def container_cgroup(cgroup: str) -> str | None:
    """The container's cgroup holding a process in `cgroup` (the path itself, or its
    ancestor right below the pod's cgroup when the process sits deeper), or None when
    the path is in no pod's container or is relative to a cgroup namespace (".."
    steps: no place under our cgroup2 mount to read it from)."""
    pod = kube.pod_of(cgroup)
    if pod is None or not pod.container or "/.." in cgroup:
        return None
    path = cgroup.rstrip("/")
    while True:
        parent = path.rsplit("/", 1)[0]
        up = kube.pod_of(parent) if parent else None
        if up is None or not up.container:
            return path
        path = parent


def _read_int(path: str) -> int | None:
    """A one-number cgroup file, or None: absent, gone (ENOENT/ENODEV: the cgroup was
    removed mid-read), unreadable or "max"."""
    try:
        with open(path, "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _request(cgroup_dir: str) -> int | None:
    """The memory request kubelet wrote to this cgroup (memory.min, else memory.low),
    or None when neither is set (0: the kernel's default)."""
    for name in ("memory.min", "memory.low"):
        value = _read_int(os.path.join(cgroup_dir, name))
        if value:
            return value
    return None


def over_request(unified: str, container: str) -> int | None:
    """Bytes the container at cgroup v2 path `container` uses above its memory request
    (negative: below it), or None when the cgroups show no request or are gone.  The
    container's own request first (memory.current of the container against its
    memory.min/low); else its pod's (the pod's memory.current against the pod's)."""
    for path in (container, container.rsplit("/", 1)[0]):
        where = os.path.join(unified, path.lstrip("/"))
        request = _request(where)
        if request is None:
            continue
        usage = _read_int(os.path.join(where, "memory.current"))
        return None if usage is None else usage - request
    return None


class Requests:
    """over_request answers for one refresh, per container cgroup."""

    def __init__(self, unified: str) -> None:
        self.unified = unified
        self._by_path: dict[str, int | None] = {}     # a process's cgroup path
        self._by_container: dict[str, int | None] = {}

    def over(self, cgroup: str) -> int | None:
        if cgroup in self._by_path:
            return self._by_path[cgroup]
        container = container_cgroup(cgroup)
        over = None
        if container is not None:
            if container not in self._by_container:
                self._by_container[container] = over_request(self.unified, container)
            over = self._by_container[container]
        self._by_path[cgroup] = over
        return over


def with_requests(candidates: list[policy.Candidate], unified: str) -> list[policy.Candidate]:
    """`candidates` with over_request filled (one Requests for the lot): what `explain`
    ranks, as the daemon's ProcTable.read_requests does."""
    if not unified:
        return candidates
    requests = Requests(unified)
    return [dataclasses.replace(c, over_request=over)
            if (over := requests.over(c.cgroup)) != c.over_request else c
            for c in candidates]
