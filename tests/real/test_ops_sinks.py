"""Operations sinks against real processes: metrics scraped over HTTP and from the
textfile, the events file (also on a full disk), pre- and post-kill hooks with their
exact environment, a hanging hook, hostile process names."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import wait_until
from mreaper import hooks as hooks_mod
from mreaper.cli_history import add_history_parser, cmd_history
from mreaper.events import EventsSink, history_table, read_events
from mreaper.hooks import Hooks
from mreaper.linux import procfs
from mreaper.metrics import MetricsSink
from mreaper.reap import KillOptions, KillReport, Mrelease, ReaperPool, Victim, kill_and_reap
from mreaper.report import Episode, Fanout, LogSink, Sample

SpawnFactory = Callable[..., subprocess.Popen[bytes]]
REASON = "kill: MemAvailable 1.0 GiB <= 1.2 GiB"


@pytest.fixture
def real_report(spawn: SpawnFactory) -> KillReport:
    """The report of a real kill: a `sleep` child pinned, SIGKILLed and reaped."""
    p = spawn(["sleep", "1000"])
    with Victim.open(p.pid) as victim:
        report = kill_and_reap(victim, KillOptions(), reason=REASON)
    assert report.exited and report.pid == p.pid
    return report


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse it: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return samples_of(text)


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def free_port_is_closed(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).close()
    except OSError:
        return True
    return False


# --- metrics --------------------------------------------------------------------------------


def test_metrics_over_http_after_a_real_kill(real_report: KillReport) -> None:
    sink = MetricsSink("127.0.0.1:0")
    try:
        assert sink.port and sink._server is not None
        assert sink._server.server_address[0] == "127.0.0.1"
        before = scrape(sink.port)
        assert ("mreaper_kill_to_free_seconds_count", ()) in before
        sink.kill(real_report, "machine")
        sink.observe_decision(0.0042, "machine")
        sink.sample(Sample("machine", mem_available=3 << 30, swap_free=1 << 30,
                           psi_some_avg10=2.5, psi_full_avg10=0.5,
                           distance={"warn": 100 << 20, "term": 200 << 20, "kill": -(1 << 20)}))
        m = scrape(sink.port)
    finally:
        sink.close()
    r = real_report
    outcome = r.mrelease.value
    assert m[("mreaper_kills_total", (("outcome", outcome), ("reason_level", "kill"),
                                      ("scope", "machine")))] == 1
    errno_label = r.mrelease_errno if r.mrelease is not Mrelease.NOT_CALLED else "not-called"
    assert m[("mreaper_mrelease_total", (("errno", errno_label),))] == 1
    if r.freed_bytes and r.freed_bytes > 0:
        assert m[("mreaper_freed_bytes_total", (("scope", "machine"),))] == r.freed_bytes
    assert r.kill_to_free_s is not None
    assert m[("mreaper_kill_to_free_seconds_count", ())] == 1
    assert m[("mreaper_kill_to_free_seconds_sum", ())] == pytest.approx(r.kill_to_free_s)
    assert m[("mreaper_kill_to_free_seconds_bucket", (("le", "30.0"),))] == 1
    assert m[("mreaper_kill_to_free_seconds_bucket", (("le", "0.001"),))] == (
        1 if r.kill_to_free_s <= 0.001 else 0)
    assert m[("mreaper_detection_to_kill_seconds_count", (("scope", "machine"),))] == 1
    assert m[("mreaper_detection_to_kill_seconds_bucket",
              (("le", "0.005"), ("scope", "machine")))] == 1
    assert m[("mreaper_last_kill_timestamp_seconds", (("scope", "machine"),))] == r.wall_time
    assert m[("mreaper_mem_available_bytes", (("scope", "machine"),))] == 3 << 30
    assert m[("mreaper_swap_free_bytes", (("scope", "machine"),))] == 1 << 30
    assert m[("mreaper_psi_avg10", (("kind", "some"), ("scope", "machine")))] == 2.5
    assert m[("mreaper_psi_avg10", (("kind", "full"), ("scope", "machine")))] == 0.5
    assert m[("mreaper_level_distance_bytes", (("level", "kill"), ("scope", "machine")))] == \
        -(1 << 20)
    assert not any(name.startswith(("python_", "process_")) for name, _ in m)  # own registry
    assert free_port_is_closed(sink.port)


def test_metrics_textfile_written_atomically_and_parseable(real_report: KillReport,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "mreaper.prom"
    sink = MetricsSink("", str(path))
    assert sink.port is None
    assert ("mreaper_kill_to_free_seconds_count", ()) in samples_of(path.read_text())
    ino = path.stat().st_ino
    sink.kill(real_report, "machine")
    assert path.stat().st_ino != ino  # replaced by rename, never rewritten in place
    m = samples_of(path.read_text())
    assert m[("mreaper_kill_to_free_seconds_count", ())] == 1
    assert sum(v for (name, _), v in m.items() if name == "mreaper_kills_total") == 1
    sink.close()
    assert sorted(os.listdir(tmp_path)) == ["mreaper.prom"]  # no temporary file left


def test_metrics_port_in_use_is_an_error() -> None:
    sink = MetricsSink("127.0.0.1:0")
    try:
        assert sink.port is not None
        with pytest.raises(OSError) as info:
            MetricsSink(f"127.0.0.1:{sink.port}")
        assert info.value.errno == errno.EADDRINUSE
    finally:
        sink.close()


# --- events -----------------------------------------------------------------------------------


def test_events_round_trip_a_real_kill(real_report: KillReport, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "events.jsonl"
    sink = Fanout([LogSink(), EventsSink(str(path))])
    now = time.time()
    sink.episode(Episode("machine", "start", "warn", "warn: x", now - 7200, 0.0, 1 << 30))
    sink.episode(Episode("machine", "peak", "kill", REASON, now - 1, 5.0, 1 << 29))
    sink.kill(real_report, "machine")
    sink.episode(Episode("machine", "end", "kill", "pressure over", now, 6.0, 1 << 30))
    sink.close()
    events = read_events(str(path))
    assert [e["event"] for e in events] == ["episode", "episode", "kill", "episode"]
    kill = events[2]
    assert kill == json.loads(json.dumps({"event": "kill", "scope": "machine",
                                          **real_report.to_dict(), "pod_uid": None,
                                          "qos": None, "container_id": None}))
    assert [e["event"] for e in read_events(str(path), since="1h")] == ["episode", "kill",
                                                                         "episode"]
    assert read_events(str(path), last=2) == events[2:]
    table = history_table(events)
    assert f"{real_report.pid} sleep" in table
    assert real_report.mrelease.value in table

    parser = argparse.ArgumentParser(prog="mreaper")
    add_history_parser(parser.add_subparsers(dest="command"))
    assert cmd_history(parser.parse_args(["history", "--events", str(path), "--since", "10m",
                                          "--last", "2"])) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and f"{real_report.pid} sleep" in out[1] and "end/kill" in out[2]


@pytest.fixture
def tiny_disk(root: None, tmp_path: Path) -> Iterator[Path]:
    """A 16 KiB tmpfs, unmounted at the end."""
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(where)],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_events_on_a_full_disk(tiny_disk: Path, real_report: KillReport,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    short_writes = []
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        n = real_write(fd, data)
        if n < len(data):
            short_writes.append(n)
        return n

    monkeypatch.setattr(os, "write", write)
    path = tiny_disk / "events.jsonl"
    sink = EventsSink(str(path))
    sink.kill(real_report, "machine")
    filler = tiny_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as full:
            for _ in range(64):
                os.write(fd, b"x" * 1024)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    written, failures = 1, 0
    for _ in range(20):  # fill the events file's last page, then fail
        size = path.stat().st_size
        try:
            sink.kill(real_report, "machine")
            written += 1
        except OSError as e:
            assert e.errno == errno.ENOSPC
            assert path.stat().st_size == size  # a partial line was cut off again
            failures += 1
            if failures == 2:
                break
    assert failures == 2
    assert short_writes  # the kernel took part of a line before ENOSPC: it was cut off
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(x)["event"] == "kill" for x in lines[:-1])
    filler.unlink()
    sink.kill(real_report, "machine")  # space is back: the next line is written whole
    sink.episode(Episode("machine", "end", "kill", "over", time.time(), 1.0, None))
    sink.close()
    bad: list[tuple[int, str]] = []
    events = read_events(str(path), bad_lines=bad)
    assert bad == []
    assert [e["event"] for e in events] == ["kill"] * (written + 1) + ["episode"]


# --- hooks --------------------------------------------------------------------------------------

DUMP = ("import os, sys; out = sys.argv[1]; fds = sorted(os.listdir('/proc/self/fd')); "
        "open(out + '.env', 'wb').write(open('/proc/self/environ', 'rb').read()); "
        "open(out + '.argv', 'wb').write(open('/proc/self/cmdline', 'rb').read()); "
        "open(out + '.fds', 'w').write(' '.join(fds))")


def dump_hook(out: Path, *extra: str) -> tuple[str, ...]:
    """A hook writing its exact initial environment (/proc/self/environ, untouched by
    Python's start-up) and argv next to `out`."""
    return (sys.executable, "-c", DUMP, str(out), *extra)


def read_env(out: Path) -> dict[bytes, bytes]:
    raw = Path(f"{out}.env").read_bytes()
    return dict(item.split(b"=", 1) for item in raw.split(b"\0") if item)


def read_argv(out: Path) -> list[bytes]:
    return Path(f"{out}.argv").read_bytes().rstrip(b"\0").split(b"\0")


def test_pre_and_post_kill_hooks_get_exactly_the_documented_environment(
        spawn: SpawnFactory, tmp_path: Path) -> None:
    p = spawn(["sleep", "1000"])
    pre, post = tmp_path / "pre", tmp_path / "post"
    hk = Hooks(dump_hook(pre), 10.0, dump_hook(post))
    victim = Victim.open(p.pid)
    expected_cgroup = victim.cgroups.unified.encode()
    with ReaperPool(1, before_kill=hk.before_kill) as pool:
        report = pool.submit(victim, reason=REASON).result(timeout=30)
    assert hk.last_pre is not None and hk.last_pre.returncode == 0
    env = read_env(pre)
    assert set(env) == {k.encode() for k in hooks_mod.COMMON_VARS}
    assert env == {
        b"PATH": b"/usr/sbin:/usr/bin:/sbin:/bin", b"MREAPER_EVENT": b"pre_kill",
        b"MREAPER_PID": str(p.pid).encode(), b"MREAPER_NAME": b"sleep",
        b"MREAPER_UID": str(os.getuid()).encode(), b"MREAPER_CGROUP": expected_cgroup,
        b"MREAPER_CMDLINE": b"sleep 1000", b"MREAPER_RSS": str(report.holdings.vm_rss).encode(),
        b"MREAPER_REASON": REASON.encode(), b"MREAPER_SCOPE": b"machine",
        b"MREAPER_POD_UID": b"", b"MREAPER_QOS": b"", b"MREAPER_CONTAINER_ID": b""}
    # close_fds: stdin, stdout, stderr and the directory being listed, nothing of ours
    assert Path(f"{pre}.fds").read_text().split() == ["0", "1", "2", "3"]
    assert report.exited

    hk.kill(report, "machine")
    assert hk.wait_idle(30)
    env = read_env(post)
    assert set(env) == {k.encode() for k in hooks_mod.COMMON_VARS + hooks_mod.POST_VARS}
    assert env[b"MREAPER_EVENT"] == b"post_kill"
    assert env[b"MREAPER_PID"] == str(p.pid).encode()
    assert env[b"MREAPER_OUTCOME"] == report.mrelease.value.encode()
    assert env[b"MREAPER_FREED"] == (b"" if report.freed_bytes is None
                                     else str(report.freed_bytes).encode())
    assert report.kill_to_free_s is not None
    assert env[b"MREAPER_KILL_TO_FREE_MS"] == f"{report.kill_to_free_s * 1000:.1f}".encode()
    hk.close()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    out = []
    for pid in procfs.list_pids():
        with contextlib.suppress(procfs.ProcessGone, procfs.ParseError, OSError):
            data = Path(f"/proc/{pid}/stat").read_text()
            fields = data[data.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                out.append(pid)
    return out


def test_hanging_pre_kill_hook_is_killed_and_the_kill_happens(spawn: SpawnFactory,
                                                              tmp_path: Path) -> None:
    p = spawn(["sleep", "1000"])
    started = tmp_path / "started"
    hk = Hooks(("/bin/sh", "-c", f"sleep 100 & touch {started}; sleep 100"), 2.0, ())
    victim = Victim.open(p.pid)
    t0 = time.monotonic()
    with ReaperPool(1, before_kill=hk.before_kill) as pool:
        report = pool.submit(victim, reason=REASON).result(timeout=30)
    elapsed = time.monotonic() - t0
    run = hk.last_pre
    assert run is not None and run.timed_out and run.pid is not None
    pgid = run.pid
    assert run.returncode == -9
    assert started.exists()  # it did run, with a child in the background
    assert 2.0 <= elapsed < 10
    assert report.exited and p.wait(timeout=5) == -9  # the victim died all the same
    wait_until(lambda: not group_members(pgid), 10, "the hook's process group to be gone")


@pytest.mark.parametrize("comm", ["$(touch /tmp/x);", "a;b\nc`id`|"])
def test_hostile_names_cannot_inject(spawn: SpawnFactory, tmp_path: Path, comm: str) -> None:
    canary = tmp_path / "injected"
    hostile_arg = (f"$(touch {canary}); `touch {canary}`; touch {canary} #\n"
                   f"MREAPER_PID=1\n")
    argv = [sys.executable, "-c",
            "import sys, time; open('/proc/self/comm', 'w').write(sys.argv[1]); "
            "time.sleep(1000)", comm, hostile_arg]
    p = spawn([os.fsencode(a) for a in argv] + [b"bad\xff\xfeutf8"])
    expected_comm = comm.encode()[:15].decode()
    wait_until(lambda: Path(f"/proc/{p.pid}/comm").read_text().rstrip("\n") == expected_comm,
               10, "the child to rename itself")
    tmp_x_before = os.path.exists("/tmp/x")
    out = tmp_path / "dump"
    placeholders = ("$MREAPER_NAME", "${MREAPER_NAME}", "{name}", "%(name)s", "%s")
    hk = Hooks(dump_hook(out, *placeholders), 10.0, ())
    victim = Victim.open(p.pid)
    name = victim.name
    with ReaperPool(1, before_kill=hk.before_kill) as pool:
        pool.submit(victim, reason=REASON).result(timeout=30)
    env = read_env(out)
    assert env[b"MREAPER_NAME"] == name.encode()
    assert name == expected_comm.replace("\n", "\\n")  # procfs's own escaping, nothing more
    assert env[b"MREAPER_PID"] == str(p.pid).encode()
    cmdline = env[b"MREAPER_CMDLINE"]
    assert hostile_arg.encode() in cmdline and b"bad\\xff\\xfeutf8" in cmdline
    assert read_argv(out)[4:] == [x.encode() for x in placeholders]  # argv untouched
    assert not canary.exists()
    if not tmp_x_before:
        assert not os.path.exists("/tmp/x")


def test_post_kill_hooks_never_block_and_are_bounded(real_report: KillReport,
                                                     tmp_path: Path) -> None:
    hk = Hooks((), 1.0, ("/bin/sleep", "2"), max_post=4)
    t0 = time.monotonic()
    for _ in range(6):
        hk.kill(real_report, "machine")
    assert time.monotonic() - t0 < 1.0  # threads started, nothing waited for
    assert hk.dropped == 2
    wait_until(lambda: hk.running == 4 and hk.last_post is None, 5, "four hooks running")
    assert hk.wait_idle(30)
    assert hk.last_post is not None and hk.last_post.returncode == 0
    hk.kill(real_report, "machine")  # room again
    assert hk.dropped == 2 and hk.running == 1
    t0 = time.monotonic()
    hk.close()  # waits a moment for the running hook, not for ever
    assert time.monotonic() - t0 < 3
    hk.kill(real_report, "machine")  # closed: nothing started
    assert hk.wait_idle(5) and hk.running == 0 and hk.dropped == 2


def test_post_kill_hook_timeout_kills_its_group(real_report: KillReport) -> None:
    hk = Hooks((), 1.0, ("/bin/sh", "-c", "sleep 100 & sleep 100"), post_kill_timeout=1.0)
    hk.kill(real_report, "machine")
    assert hk.wait_idle(10)
    run = hk.last_post
    assert run is not None and run.timed_out and run.pid is not None
    pgid = run.pid
    wait_until(lambda: not group_members(pgid), 10, "the post hook's group to be gone")
