"""Calm means idle: while memory is plentiful the daemon looks and does nothing else.

The daemon runs in the test (no mlockall, nice or oom_score_adj), dry run, status socket
off, PSI off.  Its MemAvailable comes from a fake meminfo (the only fake: the scan,
the table and the sinks are real), so "calm" and "near a level" are the test's to set
whatever else runs on this shared machine.  Looks are counted, not seconds: the fake
meminfo is called once per look, and stops the daemon after a given number.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mreaper import config
from mreaper.config import Config
from mreaper.daemon import CandidateCache, Daemon
from mreaper.linux import procfs
from mreaper.report import LogSink, Sample

GiB = 1 << 30
MiB = 1 << 20
TOTAL = 64 * GiB


def calm_config() -> Config:
    data: dict[str, Any] = {
        "daemon": {"mlockall": False, "nice": 0, "oom_score_adj": 0, "dry_run": True},
        # 20 ms looks; a scan interval at its minimum: the old background scan ran every
        # 0.1 s whatever the memory, and every look fed the sinks once a second.
        "detect": {"when": "memory", "poll_min": 0.02, "poll_max": 0.02,
                   "scan_interval": 0.1},
        "psi": {"warn": "off", "term": "off", "kill": "off"},
        "status": {"socket": ""},
    }
    return config.apply(Config(), data, "test")


def scripted_meminfo(script: list[tuple[int, int]], daemon: list[Daemon],
                     at_look: Callable[[int], None] = lambda _n: None
                     ) -> Callable[[], procfs.MemInfo]:
    """MemAvailable per look from `script` [(looks, bytes)...]; stops the daemon after
    the last look."""
    looks = [0]
    plan = [avail for n, avail in script for _ in range(n)]

    def meminfo() -> procfs.MemInfo:
        n = looks[0]
        looks[0] += 1
        at_look(n)
        if n + 1 >= len(plan):
            daemon[0].request_stop()
        avail = plan[min(n, len(plan) - 1)]
        return procfs.MemInfo(mem_total=TOTAL, mem_free=avail, mem_available=avail,
                              swap_total=0, swap_free=0, anon_pages=0, shmem=0)
    return meminfo


class CountingLog(LogSink):
    """The daemon's own log sink, counting the samples it is handed."""

    def __init__(self) -> None:
        self.samples = 0

    def sample(self, sample: Sample) -> None:
        self.samples += 1


class Gauges(CountingLog):
    wants_samples = True  # as the metrics sink: it records gauges


def count_refreshes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every refresh of the candidate cache (the scan), from any thread."""
    calls = [0]
    real = CandidateCache.refresh

    def counted(self: CandidateCache, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        real(self, *args, **kwargs)

    monkeypatch.setattr(CandidateCache, "refresh", counted)
    return calls


def test_while_calm_the_scan_does_not_run_and_no_sink_is_fed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """200 calm looks (MemAvailable 60 of 64 GiB): the scan thread fills the table once
    at start-up and never again, the log sink gets no sample, our own cgroup's limit is
    read at most once.  Then 100 looks just above the warn level: the ranking is kept
    fresh (more refreshes), still without samples for a sink that records none."""
    sink = CountingLog()
    holder: list[Daemon] = []
    refreshes: dict[str, int] = {}
    calls = count_refreshes(monkeypatch)

    def at_look(n: int) -> None:
        if n == 199:  # the last calm look
            refreshes["calm"] = calls[0]
            refreshes["own"] = getattr(holder[0], "own_checks", 0)
            refreshes["samples"] = sink.samples

    warn = TOTAL // 10
    meminfo = scripted_meminfo([(200, 60 * GiB), (100, warn + 64 * MiB)], holder, at_look)
    daemon = Daemon(calm_config(), meminfo=meminfo, sink=sink)
    holder.append(daemon)
    assert daemon.run() == 0
    assert refreshes["calm"] == 1, f"the scan ran {refreshes['calm']} times while calm"
    assert refreshes["samples"] == 0
    assert refreshes["own"] <= 1
    assert calls[0] > 1, "never refreshed near warn"
    assert sink.samples == 0


def test_a_sink_that_records_gauges_is_fed() -> None:
    """The gate is the sink's wish, not a broken sampler: a gauge sink gets samples."""
    sink = Gauges()
    holder: list[Daemon] = []
    # 0.02 s looks; a sample is due every second: 150 looks hold at least two.
    daemon = Daemon(calm_config(), meminfo=scripted_meminfo([(150, 60 * GiB)], holder),
                    sink=sink)
    holder.append(daemon)
    assert daemon.run() == 0
    assert sink.samples >= 1
