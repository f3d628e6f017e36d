"""Metrics: kill counters, kill-to-free histogram and pressure gauges for Prometheus.

Served over HTTP on a configured address (127.0.0.1 unless told otherwise) and/or
written atomically to a file for node-exporter's textfile collector, from a registry
of our own (never prometheus_client's global one).  prometheus_client is imported
only when a MetricsSink is built, so the daemon runs without it when metrics are off.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mreaper import kube
from mreaper.reap import KillReport, Mrelease
from mreaper.report import Episode, Sample

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("mreaper")

DEFAULT_LISTEN = "127.0.0.1:9772"
TEXTFILE_EVERY = 10.0  # seconds: at most one textfile write per this on samples
REASON_LEVELS = ("warn", "term", "kill")
# kill-to-free: 1 ms (process_mrelease on a small victim) .. 30 s (a starved plain kill)
KILL_TO_FREE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0)
# detection to kill decision: sub-millisecond (cached ranking) .. seconds (a slow scan)
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0)
_LISTEN_RE = re.compile(r"^(?:(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):)?(\d{1,5})$")
INSTALL_HINT = ("install it with `pip install 'mreaper[metrics]'` (Debian: "
                "`apt install python3-prometheus-client`), or turn metrics off")


class MetricsUnavailable(RuntimeError):
    """Metrics are configured but the prometheus-client package is not installed."""


def require_client(listen: str, textfile: str) -> None:
    """Raise MetricsUnavailable, saying how to install it, without prometheus_client.
    `mreaper config` calls this too, so a configuration it calls valid is one `run`
    starts with."""
    try:
        import prometheus_client  # noqa: F401 - imported to know it can be
    except ImportError:
        raise MetricsUnavailable(
            f"metrics are configured (listen {listen!r}, textfile {textfile!r}) but the "
            f"Python package prometheus-client is missing: {INSTALL_HINT}") from None


def parse_listen(listen: str) -> tuple[str, int]:
    """"HOST:PORT", "[V6]:PORT" or a bare "PORT" (on 127.0.0.1) -> (host, port)."""
    m = _LISTEN_RE.match(listen.strip())
    if m is None or not 0 <= int(m.group(2)) <= 65535:
        raise ValueError(f"metrics listen address {listen!r}: allowed is HOST:PORT "
                         "(e.g. \"127.0.0.1:9772\", \"[::1]:9772\") with port 0-65535")
    host = (m.group(1) or "127.0.0.1").strip("[]")
    return host, int(m.group(2))


def reason_level(reason: str, scope: str = "") -> str:
    """The level a kill was made at, from the report's reason: "kill: MemAvailable ..."
    or, in a cgroup scope, "<scope> kill: ..." -> "kill"; "other" for a reason without
    a level (e.g. `mreaper kill`)."""
    if scope and reason.startswith(scope + " "):
        reason = reason[len(scope) + 1:]
    head, colon, _ = reason.partition(":")
    return head if colon and head in REASON_LEVELS else "other"


def mrelease_errno_label(report: KillReport) -> str:
    """The errno name process_mrelease gave ("0" on success), or "not-called"."""
    if report.mrelease is Mrelease.NOT_CALLED or not report.mrelease_errno:
        return "not-called"
    return report.mrelease_errno


class MetricsSink:
    """Prometheus metrics from kill reports and samples.

    `listen` "" = no HTTP server; "HOST:PORT" (port 0 picks a free one, see `.port`).
    `textfile` "" = none; else a path (ending in .prom for node-exporter) rewritten
    atomically (tmp + rename) after each kill and at most every TEXTFILE_EVERY seconds
    on samples.  Raises MetricsUnavailable without prometheus-client and OSError when
    the address cannot be bound.
    """

    def __init__(self, listen: str = DEFAULT_LISTEN, textfile: str = "", *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        require_client(listen, textfile)
        import prometheus_client as pc

        self._pc = pc
        self.listen = listen
        self.textfile = textfile
        self._clock = clock
        self._written_at: float | None = None
        self.registry: CollectorRegistry = pc.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.kills: Counter = pc.Counter(
            "mreaper_kills", "Kills, by scope, the level the kill was made at (warn/term/kill, "
            "other: not from a level) and process_mrelease outcome",
            ("scope", "reason_level", "outcome"), registry=r)
        # by class, not by pod: a pod uid as a label would leave a series per pod killed
        self.pod_kills: Counter = pc.Counter(
            "mreaper_pod_kills", "Kills of processes in Kubernetes pods, by QoS class "
            "(BestEffort, Burstable, Guaranteed, unknown)", ("qos",), registry=r)
        self.freed: Counter = pc.Counter(
            "mreaper_freed_bytes", "Bytes freed by kills, as measured (negative measurements "
            "are not counted)", ("scope",), registry=r)
        self.mrelease: Counter = pc.Counter(
            "mreaper_mrelease", "process_mrelease results by errno name (0: success; "
            "not-called: exited on SIGTERM, disabled, or already gone)", ("errno",), registry=r)
        self.kill_to_free: Histogram = pc.Histogram(
            "mreaper_kill_to_free_seconds", "SIGKILL to the victim's memory released",
            registry=r, buckets=KILL_TO_FREE_BUCKETS)
        self.decision: Histogram = pc.Histogram(
            "mreaper_detection_to_kill_seconds", "Pressure seen to victim chosen and handed to "
            "the reaper (the daemon's 'decided in'; no SIGTERM grace, no pre-kill hook)",
            ("scope",), registry=r, buckets=DECISION_BUCKETS)
        self.mem_available: Gauge = pc.Gauge(
            "mreaper_mem_available_bytes", "MemAvailable (or the scope's equivalent)",
            ("scope",), registry=r)
        self.swap_free: Gauge = pc.Gauge(
            "mreaper_swap_free_bytes", "SwapFree (absent without swap)", ("scope",), registry=r)
        self.psi: Gauge = pc.Gauge(
            "mreaper_psi_avg10", "Memory pressure stall, avg10 percentage", ("scope", "kind"),
            registry=r)
        self.distance: Gauge = pc.Gauge(
            "mreaper_level_distance_bytes", "Headroom above each level (negative: past it)",
            ("scope", "level"), registry=r)
        self.last_kill: Gauge = pc.Gauge(
            "mreaper_last_kill_timestamp_seconds", "When the last kill began (Unix time)",
            ("scope",), registry=r)
        self._server: WSGIServer | None = None
        self.port: int | None = None
        if listen:
            host, port = parse_listen(listen)
            server, _thread = pc.start_http_server(port, addr=host, registry=r)
            self._server = server
            self.port = int(server.server_address[1])
            log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host,
                     self.port)
        if textfile:
            if not textfile.endswith(".prom"):
                log.warning("metrics textfile %s: node-exporter reads only files ending in "
                            ".prom", textfile)
            try:
                self.write_textfile()
            except BaseException:
                self.close_server()
                raise

    # -- the Sink protocol
    def kill(self, report: KillReport, scope: str) -> None:
        self.kills.labels(scope, reason_level(report.reason, scope),
                          report.mrelease.value).inc()
        pod = kube.pod_of(report.cgroup)
        if pod is not None:
            self.pod_kills.labels(pod.qos.value).inc()
        if report.freed_bytes is not None and report.freed_bytes > 0:
            self.freed.labels(scope).inc(report.freed_bytes)
        self.mrelease.labels(mrelease_errno_label(report)).inc()
        if report.kill_to_free_s is not None:
            self.kill_to_free.observe(report.kill_to_free_s)
        self.last_kill.labels(scope).set(report.wall_time)
        if self.textfile:
            self.write_textfile()

    def episode(self, event: Episode) -> None:
        pass

    def sample(self, sample: Sample) -> None:
        s = sample.scope
        _set(self.mem_available, (s,), sample.mem_available)
        _set(self.swap_free, (s,), sample.swap_free)
        _set(self.psi, (s, "some"), sample.psi_some_avg10)
        _set(self.psi, (s, "full"), sample.psi_full_avg10)
        for level, value in sample.distance.items():
            _set(self.distance, (s, level), value)
        if self.textfile and (self._written_at is None
                              or self._clock() - self._written_at >= TEXTFILE_EVERY):
            self.write_textfile()

    def observe_decision(self, seconds: float, scope: str = "machine") -> None:
        """Time from pressure seen to the kill decision (the daemon calls this)."""
        self.decision.labels(scope).observe(seconds)

    def close(self) -> None:
        self.close_server()
        if self.textfile:
            self.write_textfile()

    def close_server(self) -> None:
        """Stop serving HTTP (the port is free when this returns)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- output
    def write_textfile(self) -> None:
        """Write the textfile atomically (a temporary file next to it, then rename)."""
        self._written_at = self._clock()
        self._pc.write_to_textfile(self.textfile, self.registry)

    def exposition(self) -> str:
        """The current metrics in the Prometheus text format."""
        return self._pc.generate_latest(self.registry).decode()


def _set(gauge: Gauge, labels: tuple[str, ...], value: float | None) -> None:
    """Set a labelled gauge, or drop the series when the figure is unknown."""
    if value is None:
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)
    else:
        gauge.labels(*labels).set(value)
