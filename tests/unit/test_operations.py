"""Operations sinks without real processes: events lines, history parsing and table, metric
labels, hook environments, build_sink wiring, `mreaper history` arguments."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import errno
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mreaper import config, hooks, metrics, sinks
from mreaper.cli_history import add_history_parser, cmd_history
from mreaper.events import EventsSink, HistoryError, history_table, parse_since, read_events
from mreaper.reap import Holdings, KillReport, Mrelease, SignalSent
from mreaper.report import Episode, Fanout, LogSink, Sample

MiB = 1 << 20
T0 = 1_700_000_000.0


def report(**kw: object) -> KillReport:
    base = KillReport(
        pid=4242, starttime=987654, name="hog", cmdline=("python3", "-c", "x"), uid=1000,
        cgroup="/user.slice/a b", memcg="",
        holdings=Holdings(vm_rss=300 * MiB, rss_anon=290 * MiB, rss_file=10 * MiB,
                          rss_shmem=0, vm_swap=0),
        reason="kill: MemAvailable 1.0 GiB <= 1.2 GiB", wall_time=T0,
        signals=(SignalSent("SIGKILL", 0.0),), mrelease=Mrelease.REAPED, mrelease_errno="0",
        mrelease_attempts=1, mrelease_s=0.002, kill_to_free_s=0.0125, kill_to_exit_s=0.02,
        exited=True, freed_bytes=290 * MiB, freed_source="MemAvailable")
    return replace(base, **kw)  # type: ignore[arg-type]


def episode(phase: str = "start", at: float = T0, severity: str = "warn") -> Episode:
    return Episode(scope="machine", phase=phase, severity=severity, reason="warn: x",
                   wall_time=at, duration_s=0.0 if phase == "start" else 12.5,
                   mem_available=1 << 30)


# --- events: writing --------------------------------------------------------------------


def test_events_lines_are_the_report_and_the_episode(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = EventsSink(str(path))
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600  # opened at start
    r = report()
    sink.kill(r, "machine")
    sink.episode(episode())
    sink.sample(Sample("machine", 1, None, None, None, {}))  # no line
    sink.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == {"event": "kill", "scope": "machine", **r.to_dict(),
                                    "pod_uid": None, "qos": None, "container_id": None}
    assert json.loads(lines[1]) == episode().to_dict()


def test_events_append_and_survive_rotation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(episode("start", T0 - 10).to_dict()) + "\n")
    sink = EventsSink(str(path))
    sink.episode(episode())
    os.rename(path, tmp_path / "events.jsonl.1")  # logrotate without copytruncate
    sink.episode(episode("end"))
    sink.close()
    assert len((tmp_path / "events.jsonl.1").read_text().splitlines()) == 2
    assert [e["phase"] for e in read_events(str(path))] == ["end"]


def test_events_a_failed_write_leaves_no_partial_line(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    sink = EventsSink(str(path))
    sink.episode(episode())
    size = path.stat().st_size
    real_write = os.write
    calls = 0

    def half_then_enospc(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        if fd != sink._fd:
            return real_write(fd, data)
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OSError) as info:
        sink.kill(report(), "machine")
    assert info.value.errno == errno.ENOSPC
    assert path.stat().st_size == size  # the half line was cut off again
    monkeypatch.setattr(os, "write", real_write)
    sink.episode(episode("end"))  # reopened, whole
    sink.close()
    bad: list[tuple[int, str]] = []
    assert [e["phase"] for e in read_events(str(path), bad_lines=bad)] == ["start", "end"]
    assert bad == []


def test_events_to_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    sink = EventsSink("-")
    sink.kill(report(), "machine")
    sink.close()
    out = capfd.readouterr().out
    assert json.loads(out)["event"] == "kill" and out.endswith("\n")


def test_events_unopenable_path_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        EventsSink(str(tmp_path / "no" / "such" / "events.jsonl"))


# --- events: reading back ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "back"), [("30s", 30), ("10m", 600), ("2h", 7200),
                                            ("1d", 86400), ("1.5h", 5400), (" 5 m ", 300)])
def test_since_relative(text: str, back: float) -> None:
    assert parse_since(text, now=T0) == T0 - back


def test_since_iso() -> None:
    assert parse_since("2023-11-14T22:13:20+00:00") == T0
    assert parse_since("2023-11-14 22:13:20Z") == T0
    naive = dt.datetime(2023, 11, 14, 12, 0).astimezone().timestamp()
    assert parse_since("2023-11-14T12:00") == naive
    assert parse_since("2023-11-14") == dt.datetime(2023, 11, 14).astimezone().timestamp()


@pytest.mark.parametrize("bad", ["", "yesterday", "10x", "-5m", "2023-13-01", "m10"])
def test_since_bad_values_name_argument_value_and_allowed(bad: str) -> None:
    with pytest.raises(HistoryError) as info:
        parse_since(bad)
    msg = str(info.value)
    assert msg.startswith(f"--since = {bad!r}: ")
    assert "ISO" in msg and "10m" in msg and "1d" in msg


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_last_bad_values(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "e"
    path.write_text("")
    with pytest.raises(HistoryError, match=r"^--last = .*: a positive whole number"):
        read_events(str(path), last=bad)  # type: ignore[arg-type]


def _events_file(tmp_path: Path) -> Path:
    path = tmp_path / "events.jsonl"
    sink = EventsSink(str(path))
    for i in range(5):
        sink.episode(episode("start", T0 + 100 * i))
        sink.kill(report(pid=1000 + i, wall_time=T0 + 100 * i + 1), "machine")
        sink.episode(episode("end", T0 + 100 * i + 2, "kill"))
    sink.close()
    return path


def test_read_events_last_and_since(tmp_path: Path) -> None:
    path = str(_events_file(tmp_path))
    everything = read_events(path)
    assert len(everything) == 15
    assert [e["wall_time"] for e in everything] == sorted(e["wall_time"] for e in everything)
    last4 = read_events(path, last=4)
    assert last4 == everything[-4:]
    since = read_events(path, since=T0 + 300)
    assert [e.get("pid") for e in since if e["event"] == "kill"] == [1003, 1004]
    assert read_events(path, since="1h", now=T0 + 301 + 3600) == since[1:]
    assert read_events(path, since=T0 + 300, last=1) == everything[-1:]
    iso = dt.datetime.fromtimestamp(T0 + 300, dt.UTC).isoformat()
    assert read_events(path, since=iso) == since


def test_read_events_skips_unreadable_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = json.dumps(episode().to_dict())
    path.write_text(f"{good}\n{{\"event\": \"kill\", \"pi\n[1, 2]\n\n{good}\n")
    bad: list[tuple[int, str]] = []
    assert len(read_events(str(path), bad_lines=bad)) == 2
    assert [number for number, _ in bad] == [2, 3]
    assert bad[0][1].startswith("not JSON") and bad[1][1] == "not a JSON object but list"


def test_history_table(tmp_path: Path) -> None:
    rows = read_events(str(_events_file(tmp_path)), last=3)
    table = history_table(rows).splitlines()
    assert table[0].split()[:3] == ["time", "scope", "event"]
    for col in ("rss", "outcome", "kill-to-free ms", "freed"):
        assert col in table[0]
    assert len(table) == 4
    kill = table[2]
    when = dt.datetime.fromtimestamp(T0 + 401).strftime("%Y-%m-%d %H:%M:%S")
    assert kill.startswith(when)
    for text in ("machine", "kill", "1004 hog", "300.0 MiB", "reaped", "12.5", "290.0 MiB"):
        assert text in kill
    assert "start/warn" in table[1]
    assert "end/kill" in table[3] and "after 12.5 s" in table[3]


def test_history_table_escapes_hostile_names() -> None:
    r = report(name="evil\n\x1b[2Jname\t", mrelease=Mrelease.NOT_CALLED, kill_to_free_s=None,
               freed_bytes=None)
    table = history_table([{"event": "kill", "scope": "machine", **r.to_dict()}])
    lines = table.splitlines()
    assert len(lines) == 2
    assert "\x1b" not in table and "\t" not in table
    assert "evil\\n\\x1b[2Jname\\t" in lines[1]
    assert "not-called" in lines[1] and " ? " in lines[1]


# --- `mreaper history` ---------------------------------------------------------------------


def _history(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mreaper")
    add_history_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_history(parser.parse_args(["history", *argv]))


def test_cmd_history_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(_events_file(tmp_path))
    assert _history(["--events", path, "--last", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "1004 hog" in out[1]
    assert _history(["--events", path, "--since", "2023-11-14T22:18:20+00:00", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [e["wall_time"] for e in lines] == [T0 + 300 + i for i in (0, 1, 2)] + [
        T0 + 400 + i for i in (0, 1, 2)]


@pytest.mark.parametrize(("argv", "words"), [
    (["--since", "yesterday"], ["--since", "'yesterday'", "ISO", "10m"]),
    (["--last", "0"], ["--last", "'0'", "positive whole number"]),
    (["--last", "x"], ["--last", "'x'", "positive whole number"]),
])
def test_cmd_history_bad_arguments(argv: list[str], words: list[str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _history(["--events", "/nonexistent", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err


def test_cmd_history_missing_file_and_no_path(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert _history(["--events", str(tmp_path / "nope")]) == 1
    assert "No such file" in capsys.readouterr().err
    conf = tmp_path / "m.toml"
    conf.write_text("")
    assert _history(["--config", str(conf)]) == 2
    assert "give --events PATH" in capsys.readouterr().err
    conf.write_text('[events]\npath = "-"\n')
    assert _history(["--config", str(conf)]) == 2
    assert "standard output" in capsys.readouterr().err
    path = _events_file(tmp_path)
    conf.write_text(f'[events]\npath = "{path}"\n')
    assert _history(["--config", str(conf), "--last", "1"]) == 0
    assert "end/kill" in capsys.readouterr().out


# --- metrics labels ------------------------------------------------------------------------


@pytest.mark.parametrize(("reason", "level"), [
    ("kill: MemAvailable 1 GiB <= 2 GiB", "kill"), ("term: psi full", "term"),
    ("warn: x", "warn"), ("mreaper kill", "other"), ("", "other"), ("kill", "other"),
    ("killer: x", "other"), ("kill: MemAvailable 1 GiB <= 2 GiB; top score 900", "kill")])
def test_reason_level(reason: str, level: str) -> None:
    assert metrics.reason_level(reason) == level
    assert metrics.reason_level(reason, "machine") == level


@pytest.mark.parametrize(("reason", "scope", "level"), [
    ("web term: memory.current 1 GiB; top score 3", "web", "term"),
    ("web@/sys/a b kill: x; chose cgroup /a: y", "web@/sys/a b", "kill"),
    ("web kill: x", "other-scope", "other")])
def test_reason_level_in_a_cgroup_scope(reason: str, scope: str, level: str) -> None:
    assert metrics.reason_level(reason, scope) == level


@pytest.mark.parametrize(("reason", "scope"), [
    ("kill: MemAvailable 1 GiB <= 2 GiB; top score 900", "machine"),
    ("web term: memory.current 1 GiB; top score 3", "web"),
    ("web@/sys/a b kill: x; top score 1", "web@/sys/a b"),
    ("mreaper kill", "machine"), ("", "machine")])
def test_hook_scope_from_reason(reason: str, scope: str) -> None:
    assert hooks.scope_of(reason) == scope


def test_mrelease_errno_label() -> None:
    assert metrics.mrelease_errno_label(report()) == "0"
    assert metrics.mrelease_errno_label(report(mrelease=Mrelease.EXITED_FIRST,
                                               mrelease_errno="ESRCH")) == "ESRCH"
    assert metrics.mrelease_errno_label(report(mrelease=Mrelease.NOT_CALLED,
                                               mrelease_errno="")) == "not-called"


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:9772", ("127.0.0.1", 9772)), ("[::1]:9772", ("::1", 9772)),
    ("9772", ("127.0.0.1", 9772)), ("localhost:0", ("localhost", 0))])
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert metrics.parse_listen(text) == want


@pytest.mark.parametrize("bad", ["", "host:", ":80", "1.2.3.4:99999", "a b:1"])
def test_parse_listen_bad(bad: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        metrics.parse_listen(bad)


def test_metrics_textfile_rate_limited_on_samples(tmp_path: Path) -> None:
    now = [100.0]
    path = tmp_path / "mreaper.prom"
    sink = metrics.MetricsSink("", str(path), clock=lambda: now[0])
    sample = Sample("machine", 5 << 30, None, 1.5, 0.25, {"warn": 1 << 30, "kill": None})
    written = path.stat().st_mtime_ns
    path.unlink()
    now[0] += 9.9
    sink.sample(sample)
    assert not path.exists()  # less than 10 s since the last write
    now[0] += 0.1
    sink.sample(sample)
    text = path.read_text()
    assert 'mreaper_mem_available_bytes{scope="machine"} 5.36870912e+09' in text
    assert "mreaper_swap_free_bytes{" not in text
    assert 'mreaper_psi_avg10{kind="full",scope="machine"} 0.25' in text
    assert 'mreaper_level_distance_bytes{level="warn",scope="machine"}' in text
    assert 'level="kill"' not in text
    assert written
    path.unlink()
    sink.kill(report(), "machine")  # a kill always writes
    assert "mreaper_kills_total" in path.read_text()
    sink.close()


def test_metrics_without_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(metrics.MetricsUnavailable, match="prometheus-client"):
        metrics.MetricsSink("127.0.0.1:0")
    cfg = dataclasses.replace(config.Config(), metrics_listen="127.0.0.1:9772")
    with pytest.raises(config.ConfigError) as info:
        sinks.build_sink(cfg)
    assert info.value.key == "metrics.listen"
    assert "pip install 'mreaper[metrics]'" in str(info.value)


def test_metrics_module_imports_without_prometheus_client() -> None:
    code = ("import sys; sys.modules['prometheus_client'] = None; "
            "import mreaper.sinks, mreaper.metrics, mreaper.daemon; "
            "from mreaper import config; "
            "s, h = mreaper.sinks.build_sink(config.Config()); print(type(s).__name__, h)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "Fanout None"


# --- hook environment ------------------------------------------------------------------------


def test_hook_env_exact_keys_and_verbatim_values() -> None:
    hostile = "$(rm -rf /); `id` | x\n'\"\\"
    env = hooks.hook_env("pre_kill", pid=7, name=hostile, uid=1000, cgroup="/a\0b",
                         cmdline=("sh", "-c", hostile), rss=123, reason="kill: r",
                         scope="machine")
    assert tuple(env) == hooks.COMMON_VARS
    assert env["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["MREAPER_NAME"] == hostile
    assert env["MREAPER_CMDLINE"] == f"sh -c {hostile}"
    assert env["MREAPER_CGROUP"] == "/ab"  # NUL stripped
    assert env["MREAPER_PID"] == "7" and env["MREAPER_RSS"] == "123"
    assert env["MREAPER_EVENT"] == "pre_kill" and env["MREAPER_SCOPE"] == "machine"


def test_report_env_post_kill_fields() -> None:
    env = hooks.report_env(report(), "machine")
    assert set(env) == set(hooks.COMMON_VARS) | set(hooks.POST_VARS)
    assert env["MREAPER_EVENT"] == "post_kill"
    assert env["MREAPER_FREED"] == str(290 * MiB)
    assert env["MREAPER_OUTCOME"] == "reaped"
    assert env["MREAPER_KILL_TO_FREE_MS"] == "12.5"
    env = hooks.report_env(report(freed_bytes=None, kill_to_free_s=None), "machine")
    assert env["MREAPER_FREED"] == "" and env["MREAPER_KILL_TO_FREE_MS"] == ""


def test_hook_env_unencodable_text_is_escaped() -> None:
    env = hooks.hook_env("pre_kill", pid=1, name="a\ud800b", uid=0, cgroup="", cmdline=(),
                         rss=0, reason="", scope="machine")
    os.fsencode(env["MREAPER_NAME"])
    assert env["MREAPER_NAME"] == "a\\ud800b"


def test_hook_that_cannot_start_is_reported(tmp_path: Path) -> None:
    run = hooks.run_hook("pre_kill", [str(tmp_path / "missing")], {"PATH": "/bin"}, 1.0)
    assert run.pid is None and run.error


# --- build_sink ---------------------------------------------------------------------------------


def test_build_sink_default_is_log_only() -> None:
    sink, hk = sinks.build_sink(config.Config())
    assert isinstance(sink, Fanout) and hk is None
    assert [type(s) for s in sink.sinks] == [LogSink]


def test_build_sink_everything(tmp_path: Path) -> None:
    cfg = config.apply(config.Config(), {
        "events": {"path": str(tmp_path / "events.jsonl")},
        "metrics": {"textfile": str(tmp_path / "m.prom")},
        "hooks": {"pre_kill": ["/bin/true"], "post_kill": ["/bin/true"],
                  "pre_kill_timeout": 0.5}}, "test")
    sink, hk = sinks.build_sink(cfg)
    assert isinstance(sink, Fanout)
    assert [type(s).__name__ for s in sink.sinks] == ["LogSink", "EventsSink", "MetricsSink",
                                                       "Hooks"]
    assert hk is sink.sinks[-1]
    assert hk.pre_kill == ("/bin/true",) and hk.pre_kill_timeout == 0.5
    sinks.observe_decision(sink, 0.004)
    m = sink.sinks[2]
    assert isinstance(m, metrics.MetricsSink)
    assert "mreaper_detection_to_kill_seconds_count{scope=\"machine\"} 1.0" in m.exposition()
    sink.close()


def test_build_sink_errors_name_the_key(tmp_path: Path) -> None:
    cfg = dataclasses.replace(config.Config(), events_path=str(tmp_path / "no" / "e.jsonl"),
                              origin="/etc/x.toml")
    with pytest.raises(config.ConfigError) as info:
        sinks.build_sink(cfg)
    assert info.value.key == "events.path" and "/etc/x.toml" in str(info.value)
    cfg = dataclasses.replace(config.Config(), metrics_textfile=str(tmp_path / "no" / "m.prom"))
    with pytest.raises(config.ConfigError) as info:
        sinks.build_sink(cfg)
    assert info.value.key == "metrics.textfile"


def test_observe_decision_without_metrics_is_a_noop() -> None:
    sinks.observe_decision(Fanout([LogSink()]), 0.1)
    sinks.observe_decision(LogSink(), 0.1)
