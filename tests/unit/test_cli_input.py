"""Input to the `mreaper` command line (issue 11, "small ones"): numbers in ASCII digits only,
and `mreaper history` on a damaged events file or with no events file configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mreaper import cli
from mreaper.events import damage, history_table, read_events

T0 = 1_700_000_000.0

# int() and float() read all of these; a user typing a number means none of them
NOT_ASCII = ["\u0662\u0662\u0667\u0669\u0666",  # Arabic-Indic 22796
             "\uff15",                           # fullwidth 5
             "\u0665",                           # Arabic-Indic 5
             "5_0", " 5", "5 ", "+5", "1e1", "0x10", "nan", "inf", "\u00b2"]


def parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


ARGVS = [
    ["kill", "{}"],
    ["kill", "--term-timeout", "{}", "1"],
    ["status", "--timeout", "{}"],
    ["top", "--interval", "{}"],
    ["history", "--last", "{}"],
    ["history", "--since", "{}m"],
    ["config", "--reapers", "{}"],
    ["config", "--term-timeout", "{}"],
    ["run", "--term-timeout", "{}"],
    ["demo", "--size", "{}"],
]


@pytest.mark.parametrize(("argv", "text"), [
    pytest.param([a.replace("{}", text) for a in argv], text,
                 id=f"{'-'.join(a for a in argv if a != '{}')}-{text!r}")
    for argv in ARGVS for text in NOT_ASCII
    # --since takes spaces around its number and unit (" 5 m ")
    if not (argv[1] == "--since" and text.strip() == "5")])
def test_numbers_on_the_command_line_are_ascii_digits_only(
        argv: list[str], text: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(argv, capsys)
    assert repr(text) in err or repr(text + "m") in err, err


def test_a_pid_in_other_digits_is_refused_by_kill(capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(["kill", "\u0662\u0662\u0667\u0669\u0666"], capsys)
    assert ("argument PID: '\u0662\u0662\u0667\u0669\u0666' is not a process ID (a positive "
            "integer in ASCII digits)") in err


@pytest.mark.parametrize(("argv", "attr", "value"), [
    (["kill", "22796"], "pid", 22796),
    (["kill", "--term-timeout", "2.5", "7"], "term_timeout", 2.5),
    (["kill", "--term-timeout", ".5", "7"], "term_timeout", 0.5),
    (["history", "--last", "3"], "last", 3),
    (["config", "--reapers", "-1"], "reapers", -1),      # range: config's own message
    (["config", "--term-timeout", "-1"], "term_timeout", -1.0),
    (["demo", "--size", "64"], "size", 64),
])
def test_ascii_numbers_are_still_taken(argv: list[str], attr: str, value: object) -> None:
    assert getattr(cli.build_parser().parse_args(argv), attr) == value


# --- `mreaper history` on a damaged file ----------------------------------------------------

GOOD = {"event": "episode", "scope": "machine", "phase": "start", "severity": "warn",
        "reason": "r", "wall_time": T0, "duration_s": 0.0}

DAMAGED = [
    ('{"event":"kill","wall_time":1e20}',
     '"wall_time" is 1e+20: not a time (seconds since the epoch, 0 to 253402214400)'),
    ('{"event":"kill","wall_time":NaN}',
     '"wall_time" is NaN: not a time (seconds since the epoch, 0 to 253402214400)'),
    ('{"event":"kill","wall_time":-Infinity}',
     '"wall_time" is -Infinity: not a time (seconds since the epoch, 0 to 253402214400)'),
    ('{"event":"kill","wall_time":-5}',
     '"wall_time" is -5: not a time (seconds since the epoch, 0 to 253402214400)'),
    ('{"event":"kill","wall_time":"yesterday"}', '"wall_time" is "yesterday", not a number'),
    ('{"event":"kill","wall_time":true}', '"wall_time" is true, not a number'),
    ('{"event":"kill"}', '"wall_time" is missing'),
    ('{"wall_time":1700000000}', '"event" is missing or not a string'),
    ('{"event":7,"wall_time":1700000000}', '"event" is 7, not a string'),
    ("[1, 2]", "not a JSON object but list"),
    ("null", "not a JSON object but null"),
    ('{"event": "kill", "pi', "not JSON (Invalid control character at: line 1 column 22"),
    ("[" * 100_000, "not JSON (nested too deeply)"),
    ("1" * 5000, "not JSON (Exceeds the limit (4300 digits) for integer string conversion"),
]


@pytest.mark.parametrize(("line", "problem"), DAMAGED, ids=[p[:30] for _, p in DAMAGED])
def test_a_damaged_line_is_skipped_and_named(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n")
    bad: list[tuple[int, str]] = []
    events = read_events(str(path), bad_lines=bad)
    assert events == [GOOD, GOOD]
    assert len(bad) == 1 and bad[0][0] == 2
    assert bad[0][1] == problem if not problem.startswith("not JSON (") else \
        bad[0][1].startswith(problem), bad
    history_table(events)


def test_fields_a_row_cannot_show_are_question_marks() -> None:
    """The other fields are shown as stored, or "?": a row never raises (an integer of 400
    digits made float() overflow in the table)."""
    huge = 10 ** 400
    kill = {"event": "kill", "wall_time": T0, "scope": "machine", "pid": huge,
            "holdings": {"vm_rss": huge}, "kill_to_free_s": huge, "freed_bytes": float("nan")}
    episode = {**GOOD, "phase": "end", "duration_s": float("inf")}
    assert damage(kill) is None and damage(episode) is None
    lines = history_table([kill, episode]).splitlines()
    assert len(lines) == 3
    assert "10000000000…" in lines[1] and " ? " in lines[1]
    assert "after" not in lines[2]


def test_cmd_history_reports_each_damaged_line_with_file_and_number(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "events.jsonl"
    lines = [json.dumps(GOOD), '{"event":"kill","wall_time":1e20}'] + ["{"] * 12
    path.write_text("\n".join(lines) + "\n")
    assert cli.main(["history", "--events", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "start/warn" in out and len(out.splitlines()) == 2
    err_lines = err.splitlines()
    assert err_lines[0] == (f"mreaper history: warning: {path}:2: skipped: \"wall_time\" is "
                            "1e+20: not a time (seconds since the epoch, 0 to 253402214400)")
    assert err_lines[1].startswith(f"mreaper history: warning: {path}:3: skipped: not JSON")
    assert len(err_lines) == 11
    assert err_lines[-1] == (f"mreaper history: warning: {path}: skipped 3 more damaged lines "
                             "(13 in all)")


def test_history_without_an_events_file_says_so_and_how_to_set_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Out of the box events are off: the old message was "--events = None: ... set
    [events] path in built-in defaults"."""
    absent = tmp_path / "absent.toml"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli.config, "DEFAULT_PATH", str(absent))
        assert cli.main(["history"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"mreaper history: no events file is configured, so there is no history to show "
        f"({absent} does not exist and the built-in defaults record none); to record kills "
        f"and pressure episodes, put [events] path = \"/var/log/mreaper/events.jsonl\" in "
        f"{absent} and restart the daemon; to read a file, give --events PATH\n")
    conf = tmp_path / "m.toml"
    conf.write_text("[daemon]\nreapers = 2\n")
    assert cli.main(["history", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert f"({conf} has no [events] path)" in err and "None" not in err
