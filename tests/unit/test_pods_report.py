"""A victim in a pod is named by pod uid, QoS class and container id: the log line, the
events line and the metrics (kill reports built by hand: what the kill sequence fills
in is tested with real kills in tests/lab/test_pods.py)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from mreaper import metrics
from mreaper.events import EventsSink
from mreaper.reap import Holdings, KillReport, Mrelease, SignalSent
from mreaper.report import LogSink

MiB = 1 << 20
UID = "0f4c1b3e-9a8d-4c2e-b7a1-2d3e4f5a6b7c"
CID = "4b9e1c" + "a" * 58
POD_CGROUP = (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
              f"{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope")


def report(cgroup: str) -> KillReport:
    return KillReport(
        pid=4242, starttime=1, name="hog", cmdline=("hog",), uid=0, cgroup=cgroup, memcg="",
        holdings=Holdings(vm_rss=300 * MiB, rss_anon=290 * MiB, rss_file=10 * MiB,
                          rss_shmem=0, vm_swap=0),
        reason="kill: x", wall_time=1_700_000_000.0, signals=(SignalSent("SIGKILL", 0.0),),
        mrelease=Mrelease.REAPED, mrelease_errno="0", mrelease_attempts=1, mrelease_s=0.001,
        kill_to_free_s=0.01, kill_to_exit_s=0.02, exited=True, freed_bytes=290 * MiB,
        freed_source="MemAvailable")


def test_log_line_names_pod(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mreaper"):
        LogSink().kill(report(POD_CGROUP), "machine")
        LogSink().kill(report("/system.slice/cron.service"), "machine")
    pod_line, plain_line = [r.getMessage() for r in caplog.records]
    assert pod_line.endswith(f"; in pod {UID} (BestEffort) container {CID[:12]}")
    assert "pod" not in plain_line


def test_events_line_names_pod(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = EventsSink(str(path))
    sink.kill(report(POD_CGROUP), "machine")
    sink.kill(replace(report(POD_CGROUP), cgroup=POD_CGROUP.rsplit("/", 1)[0]), "machine")
    sink.kill(report("/system.slice/cron.service"), "machine")
    sink.close()
    first, no_ctr, plain = (json.loads(line) for line in path.read_text().splitlines())
    assert (first["pod_uid"], first["qos"], first["container_id"]) == (UID, "BestEffort", CID)
    assert (no_ctr["pod_uid"], no_ctr["container_id"]) == (UID, "")
    assert (plain["pod_uid"], plain["qos"], plain["container_id"]) == (None, None, None)


def test_metrics_count_pod_kills_by_class(tmp_path: Path) -> None:
    path = tmp_path / "mreaper.prom"
    sink = metrics.MetricsSink("", str(path))
    sink.kill(report(POD_CGROUP), "machine")
    sink.kill(report("/system.slice/cron.service"), "machine")
    text = path.read_text()
    sink.close()
    assert 'mreaper_pod_kills_total{qos="BestEffort"} 1.0' in text
    assert UID not in text  # no label per pod


def test_hook_environment_names_pod() -> None:
    from mreaper import hooks

    env = hooks.report_env(report(POD_CGROUP), "machine")
    assert (env["MREAPER_POD_UID"], env["MREAPER_QOS"], env["MREAPER_CONTAINER_ID"]) == \
        (UID, "BestEffort", CID)
    env = hooks.hook_env(hooks.PRE_KILL, pid=1, name="x", uid=0, cgroup="/system.slice/x",
                         cmdline=("x",), rss=1, reason="r", scope="machine")
    assert (env["MREAPER_POD_UID"], env["MREAPER_QOS"], env["MREAPER_CONTAINER_ID"]) == \
        ("", "", "")
    assert tuple(env) == hooks.COMMON_VARS
