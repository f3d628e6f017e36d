"""Reports: where kill reports and pressure episodes go (log, events file, metrics, hooks).

The daemon knows one `Sink`; `Fanout` passes each event to every configured sink and
keeps going when one of them fails (a full disk or a broken metrics endpoint must
never stop a kill).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from mreaper import kube
from mreaper.reap import KillReport

log = logging.getLogger("mreaper")


@dataclass(frozen=True, slots=True)
class Episode:
    """One phase of a pressure episode in a scope: it starts, it peaks (each time it
    reaches a higher level), it ends."""

    scope: str
    phase: str            # "start" | "peak" | "end"
    severity: str         # "warn" | "term" | "kill" (the highest so far at "end")
    reason: str
    wall_time: float
    duration_s: float     # since the start (0 at "start")
    mem_available: int | None = None

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["event"] = "episode"
        return d


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at a scope's pressure, for gauges: the figures and how far each is
    from its levels (bytes above the level; negative = past it)."""

    scope: str
    mem_available: int | None
    swap_free: int | None
    psi_some_avg10: float | None
    psi_full_avg10: float | None
    distance: dict[str, int | None]   # level name -> bytes of headroom above it


class Sink(Protocol):
    def kill(self, report: KillReport, scope: str) -> None: ...
    def episode(self, event: Episode) -> None: ...
    def sample(self, sample: Sample) -> None: ...
    def close(self) -> None: ...


def pod_fields(report: KillReport) -> dict[str, str | None]:
    """The victim's pod as events carry it: pod_uid, qos (Kubernetes' spelling) and
    container_id ("" in the pod's cgroup but no container's); all None outside pods."""
    pod = kube.pod_of(report.cgroup)
    if pod is None:
        return {"pod_uid": None, "qos": None, "container_id": None}
    return dict(pod.to_dict())


def pod_suffix(report: KillReport) -> str:
    """"; in pod <uid> (<QoS>) container <id>" for a victim in a pod, else ""."""
    pod = kube.pod_of(report.cgroup)
    return "" if pod is None else f"; in {pod.describe()}"


class LogSink:
    """One line per kill (the report) and per episode start and end."""

    wants_samples = False  # a log line per second would be noise

    def kill(self, report: KillReport, scope: str) -> None:
        prefix = "" if scope == "machine" else f"[{scope}] "
        log.warning("%s%s%s", prefix, report.human(), pod_suffix(report))

    def episode(self, event: Episode) -> None:
        prefix = "" if event.scope == "machine" else f"[{event.scope}] "
        if event.phase == "start":
            log.warning("%spressure: %s", prefix, event.reason)
        elif event.phase == "end":
            log.info("%spressure over after %.1f s (peak: %s)", prefix, event.duration_s,
                     event.severity)

    def sample(self, sample: Sample) -> None:
        pass

    def close(self) -> None:
        pass


class Fanout:
    """Every event to every sink; a failing sink is logged once per kind and skipped."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)
        self._failed: set[tuple[int, str]] = set()

    def _each(self, what: str, *args: object) -> None:
        for i, sink in enumerate(self.sinks):
            try:
                getattr(sink, what)(*args)
            except Exception as e:
                if (i, what) not in self._failed:
                    self._failed.add((i, what))
                    log.error("%s sink %s failed (further failures not logged): %s",
                              type(sink).__name__, what, e)

    def kill(self, report: KillReport, scope: str) -> None:
        self._each("kill", report, scope)

    def episode(self, event: Episode) -> None:
        self._each("episode", event)

    def sample(self, sample: Sample) -> None:
        self._each("sample", sample)

    def close(self) -> None:
        self._each("close")
