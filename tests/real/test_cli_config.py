"""The `mreaper config|run|explain` commands as a user runs them: bad flags and files give
exit 2 and one exact line on stderr (and `run` kills nothing); good ones print TOML that
loads back, and a ranked table."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess
from mreaper import cli, config
from mreaper.config import Config
from mreaper.linux import procfs
from mreaper.reap import fmt_bytes

MREAPER = Path(sys.executable).with_name("mreaper")
pytestmark = pytest.mark.skipif(not MREAPER.exists(), reason=f"no {MREAPER} (pip install -e .)")

SIZE_HELP = ('a size like "512M", "2G", "1.5GiB" or a number of bytes '
             "(binary units K, M, G, T)")
LEVEL_HELP = ('a percentage like "5%", a size with a unit like "512M", "2G", "1.5GiB" or '
              '"4096B" (binary units K, M, G, T; B for bytes), a list of both (the lower '
              'wins), or "off"')
PERCENT_RANGE = "a percentage must be within 0-100%"
PSI_HELP = ('"some|full <stall_us> <window_us>" with the window 500000-10000000 us '
            'and 0 < stall <= window (e.g. "full 300000 1000000"), or "off"')
WHEN_HELP = ("an expression over memory, swap and psi with & (and), | (or) and parentheses, "
             'e.g. "memory & swap | psi"; or "any" / "all" of the three')
SORT_HELP = 'one of "oom_score", "rss", "private"'
TIMEOUT_HELP = "a number of seconds from 0 to 3600"
CL = "command line"

Spawn = Callable[..., subprocess.Popen[bytes]]


def mreaper(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed command; a hang (a daemon that should have refused to start)
    ends in TimeoutExpired after `timeout` s, with the child killed."""
    return subprocess.run([str(MREAPER), *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture
def empty(tmp_path: Path) -> str:
    """An empty configuration file, so /etc/mreaper/mreaper.toml never plays a part."""
    path = tmp_path / "empty.toml"
    path.write_text("")
    return str(path)


def command_args(command: str, args: list[str]) -> list[str]:
    # --dry-run on `run`: a belt and braces should a bad value ever be accepted
    return [command, *args, "--dry-run"] if command == "run" else [command, *args]


def check_refused(command: str, args: list[str], spawn: Spawn
                  ) -> subprocess.CompletedProcess[str]:
    bystander = spawn(["sleep", "1000"]) if command == "run" else None
    result = mreaper(*command_args(command, args))
    assert result.returncode == 2, result
    assert result.stdout == ""
    if bystander is not None:
        assert bystander.poll() is None, "mreaper run killed a process on a bad configuration"
    return result


# --- bad values: exit 2 and the exact message -------------------------------------------

# (id, flags after the command, the message after "mreaper <command>: ")
BAD_FLAGS: list[tuple[str, list[str], str]] = [
    ("memory-kill-150%", ["--memory-kill", "150%"], f"{CL}: memory.kill = '150%': {PERCENT_RANGE}"),
    ("memory-kill-minus-1%", ["--memory-kill=-1%"], f"{CL}: memory.kill = '-1%': {PERCENT_RANGE}"),
    ("memory-warn-abc%", ["--memory-warn", "abc%"], f"{CL}: memory.warn = 'abc%': {LEVEL_HELP}"),
    ("memory-warn-12X", ["--memory-warn", "12X"], f"{CL}: memory.warn = '12X': {LEVEL_HELP}"),
    ("memory-term-list-bad-item", ["--memory-term", "5%,12X"],
     f"{CL}: memory.term = ['5%', '12X']: {LEVEL_HELP}"),
    ("memory-kill-empty", ["--memory-kill", ""], f"{CL}: memory.kill = '': {LEVEL_HELP}"),
    ("memory-kill-bare-5", ["--memory-kill", "5"],
     f"{CL}: memory.kill = '5': a bare number is ambiguous: write \"5%\" (5 % of MemTotal) "
     'or "5B" (5 bytes); sizes take a unit: B, K, M, G or T'),
    ("memory-kill-100%", ["--memory-kill", "100%"],
     f"{CL}: memory.kill = '100%': 100% would always hold (MemAvailable is never above "
     'MemTotal), leaving the daemon at this level for good: give a percentage below 100%, '
     'or "off"'),
    ("memory-kill-arabic-indic-5%", ["--memory-kill", "\u0665%"],
     f"{CL}: memory.kill = '\u0665%': {LEVEL_HELP}"),
    ("memory-kill-5_0%", ["--memory-kill", "5_0%"], f"{CL}: memory.kill = '5_0%': {LEVEL_HELP}"),
    ("memory-kill-above-term", ["--memory-kill", "6%"],
     f"{CL}: memory.kill = '6%': must be at or below memory.term (5%)"),
    ("swap-term-above-warn", ["--swap-term", "50%"],
     f"{CL}: swap.term = '50%': must be at or below swap.warn (10%)"),
    ("swap-kill-150%", ["--swap-kill", "150%"], f"{CL}: swap.kill = '150%': {PERCENT_RANGE}"),
    ("reapers-0", ["--reapers", "0"], f"{CL}: daemon.reapers = 0: an integer from 1 to 16"),
    ("reapers-17", ["--reapers", "17"], f"{CL}: daemon.reapers = 17: an integer from 1 to 16"),
    ("psi-kill-full-1-2", ["--psi-kill", "full 1 2"], f"{CL}: psi.kill = 'full 1 2': {PSI_HELP}"),
    ("psi-warn-stall-0", ["--psi-warn", "some 0 1000000"],
     f"{CL}: psi.warn = 'some 0 1000000': {PSI_HELP}"),
    ("psi-term-wrong-kind", ["--psi-term", "half 100000 1000000"],
     f"{CL}: psi.term = 'half 100000 1000000': {PSI_HELP}"),
    ("psi-kill-two-fields", ["--psi-kill", "some 100000"],
     f"{CL}: psi.kill = 'some 100000': {PSI_HELP}"),
    ("psi-kill-window-too-large", ["--psi-kill", "some 100000 20000000"],
     f"{CL}: psi.kill = 'some 100000 20000000': {PSI_HELP}"),
    ("when-x", ["--when", "x"], f"{CL}: detect.when = 'x': {WHEN_HELP}"),
    ("when-dangling-and", ["--when", "memory &"], f"{CL}: detect.when = 'memory &': {WHEN_HELP}"),
    ("when-empty", ["--when", ""], f"{CL}: detect.when = '': {WHEN_HELP}"),
    ("when-no-operator", ["--when", "memory swap"],
     f"{CL}: detect.when = 'memory swap': {WHEN_HELP}"),
    ("when-open-paren", ["--when", "(psi"], f"{CL}: detect.when = '(psi': {WHEN_HELP}"),
    ("sort-by-size", ["--sort-by", "size"], f"{CL}: kill.sort_by = 'size': {SORT_HELP}"),
    ("sort-by-RSS", ["--sort-by", "RSS"], f"{CL}: kill.sort_by = 'RSS': {SORT_HELP}"),
    ("min-rss-12X", ["--min-rss", "12X"], f"{CL}: kill.min_rss = '12X': {SIZE_HELP}"),
    ("min-rss-percent", ["--min-rss", "5%"], f"{CL}: kill.min_rss = '5%': {SIZE_HELP}"),
    ("min-rss-negative", ["--min-rss=-5"], f"{CL}: kill.min_rss = '-5': {SIZE_HELP}"),
    ("term-timeout-minus-1", ["--term-timeout", "-1"],
     f"{CL}: kill.term_timeout = -1.0: {TIMEOUT_HELP}"),
    ("term-timeout-3601", ["--term-timeout", "3601"],
     f"{CL}: kill.term_timeout = 3601.0: {TIMEOUT_HELP}"),
    ("prefer-bad-regex", ["--prefer", "("],
     f"{CL}: rule[1].name = '(': not a valid regular expression: missing ), unterminated "
     "subpattern at position 0"),
    ("avoid-bad-regex", ["--avoid", "["],
     f"{CL}: rule[1].name = '[': not a valid regular expression: unterminated character set "
     "at position 0"),
    ("protect-bad-regex-after-prefer", ["--protect", "*", "--prefer", "ok"],
     f"{CL}: rule[2].name = '*': not a valid regular expression: nothing to repeat at "
     "position 0"),
]


def test_bad_flag_table_is_large_and_unique() -> None:
    assert len(BAD_FLAGS) >= 25
    assert len({case_id for case_id, _, _ in BAD_FLAGS}) == len(BAD_FLAGS)


@pytest.mark.parametrize("command", ["config", "run"])
@pytest.mark.parametrize(("flags", "message"),
                         [pytest.param(f, m, id=i) for i, f, m in BAD_FLAGS])
def test_bad_flag(command: str, flags: list[str], message: str, empty: str,
                  spawn: Spawn) -> None:
    result = check_refused(command, ["--config", empty, *flags], spawn)
    assert result.stderr == f"mreaper {command}: {message}\n"


def test_bad_flag_in_explain(empty: str) -> None:
    result = mreaper("explain", "--config", empty, "--reapers", "0")
    assert result.returncode == 2
    assert result.stderr == f"mreaper explain: {CL}: daemon.reapers = 0: an integer from 1 to 16\n"
    assert result.stdout == ""


# (id, flags, a phrase of argparse's message)
ARGPARSE: list[tuple[str, list[str], str]] = [
    ("reapers-abc", ["--reapers", "abc"],
     "argument --reapers: 'abc' is not a whole number (ASCII digits)"),
    ("reapers-float", ["--reapers", "2.5"],
     "argument --reapers: '2.5' is not a whole number (ASCII digits)"),
    ("reapers-arabic-indic", ["--reapers", "\u0664"],
     "argument --reapers: '\u0664' is not a whole number (ASCII digits)"),
    ("term-timeout-abc", ["--term-timeout", "abc"],
     "argument --term-timeout: 'abc' is not a number (ASCII digits, e.g. 5 or 0.5)"),
    ("term-timeout-nan", ["--term-timeout", "nan"],
     "argument --term-timeout: 'nan' is not a number (ASCII digits, e.g. 5 or 0.5)"),
    ("term-timeout-fullwidth", ["--term-timeout", "\uff15"],
     "argument --term-timeout: '\uff15' is not a number (ASCII digits, e.g. 5 or 0.5)"),
    ("memory-kill-missing", ["--memory-kill"], "argument --memory-kill: expected one argument"),
    ("memory-kill-dash-value", ["--memory-kill", "-1%"],
     "argument --memory-kill: expected one argument"),
    ("unknown-flag", ["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("command", ["config", "run"])
@pytest.mark.parametrize(("flags", "phrase"), [pytest.param(f, p, id=i) for i, f, p in ARGPARSE])
def test_argparse_errors(command: str, flags: list[str], phrase: str, empty: str,
                         spawn: Spawn) -> None:
    result = check_refused(command, ["--config", empty, *flags], spawn)
    assert result.stderr.startswith("usage: mreaper ")
    # the subcommand's parser names itself; unknown arguments are the top parser's
    prog = "mreaper" if phrase.startswith("unrecognized") else f"mreaper {command}"
    assert f"\n{prog}: error: {phrase}\n" in result.stderr


# --- bad files ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["config", "run"])
def test_config_file_missing(command: str, tmp_path: Path, spawn: Spawn) -> None:
    path = tmp_path / "nonexistent.toml"
    result = check_refused(command, ["--config", str(path)], spawn)
    assert result.stderr == f"mreaper {command}: {path}: --config = '{path}': no such file\n"


@pytest.mark.parametrize("command", ["config", "run"])
def test_config_file_is_a_directory(command: str, tmp_path: Path, spawn: Spawn) -> None:
    result = check_refused(command, ["--config", str(tmp_path)], spawn)
    assert result.stderr == (f"mreaper {command}: {tmp_path}: --config = '{tmp_path}': "
                             "is a directory, not a file\n")


@pytest.mark.parametrize("command", ["config", "run"])
def test_config_file_bad_value_wins_over_good_flags(command: str, tmp_path: Path,
                                                    spawn: Spawn) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[daemon]\nreapers = 0\n")
    result = check_refused(command, ["--config", str(path), "--reapers", "4"], spawn)
    assert result.stderr == (f"mreaper {command}: {path}: daemon.reapers = 0: "
                             "an integer from 1 to 16\n")


@pytest.mark.parametrize("command", ["config", "run"])
def test_flag_crossing_a_file_level(command: str, tmp_path: Path, spawn: Spawn) -> None:
    path = tmp_path / "levels.toml"
    path.write_text('[memory]\nterm = "1%"\nkill = "0.5%"\n')
    result = check_refused(command, ["--config", str(path), "--memory-kill", "2%"], spawn)
    assert result.stderr == (f"mreaper {command}: {CL}: memory.kill = '2%': must be at or "
                             "below memory.term (1%)\n")


@pytest.mark.parametrize("command", ["config", "run"])
def test_config_file_syntax_error(command: str, tmp_path: Path, spawn: Spawn) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[daemon\n")
    result = check_refused(command, ["--config", str(path)], spawn)
    assert result.stderr.startswith(f"mreaper {command}: {path}: (syntax) = ")
    assert result.stderr.endswith(": valid TOML\n")
    assert result.stderr.count("\n") == 1


# --- good configurations ------------------------------------------------------------------

GOOD = """
[daemon]
reapers = 3
nice = 0
log = "plain"

[detect]
when = "memory & (swap | psi)"
poll_max = 0.5

[memory]
warn = ["15%", "8G"]
term = ["5%", "2G"]
kill = ["1%", "512M"]

[swap]
term = "off"

[psi]
term = "some 300000 2000000"

[kill]
sort_by = "rss"
min_rss = "64M"

[[rule]]
action = "avoid"
name = "^sshd$"
adjust = -1000

[[rule]]
action = "protect"
user = "root"
cgroup = "^/system\\\\.slice/"
"""


def _facts(cfg: Config) -> dict[str, object]:
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)
           if f.name not in ("origin", "rules")}
    out["rules"] = [(r.action, *(getattr(r, k).pattern if getattr(r, k) else None
                                 for k in ("name", "cmdline", "exe", "cgroup")), r.uid, r.adjust)
                    for r in cfg.rules]
    return out


def test_config_prints_toml_that_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    result = mreaper("config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines()[0] == f"# effective configuration (from {path})"
    printed = tmp_path / "printed.toml"
    printed.write_text(result.stdout)
    original = config.load(str(path), required=True)
    assert original.reapers == 3 and original.memory["kill"] != Config().memory["kill"]
    assert _facts(config.load(str(printed), required=True)) == _facts(original)


def test_config_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    result = mreaper("config", "--config", str(path), "--reapers", "5", "--memory-kill",
                     "0.5%, 100M", "--when", "psi", "--prefer", "^chrome$", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (f"# effective configuration (from {path} "
                                             "+ command line)")
    printed = tmp_path / "printed.toml"
    printed.write_text(result.stdout)
    got = config.load(str(printed), required=True)
    want = config.apply(config.load(str(path), required=True), {
        "daemon": {"reapers": 5, "dry_run": True},
        "memory": {"kill": ["0.5%", "100M"]},
        "detect": {"when": "psi"}}, "x")
    assert _facts(got)["rules"] == [*_facts(want)["rules"],
                                    (config.Action.PREFER, "^chrome$", None, None, None, None, 0)]
    assert {k: v for k, v in _facts(got).items() if k != "rules"} == \
        {k: v for k, v in _facts(want).items() if k != "rules"}


def test_config_without_a_file_prints_the_defaults(tmp_path: Path, empty: str) -> None:
    result = mreaper("config", "--config", empty)
    assert result.returncode == 0, result.stderr
    printed = tmp_path / "printed.toml"
    printed.write_text(result.stdout)
    assert _facts(config.load(str(printed), required=True)) == _facts(Config())


# --- explain --------------------------------------------------------------------------------


def _table(stdout: str) -> tuple[list[str], list[str], list[str]]:
    """(header words, process rows, trailing lines) of the first table: the lines before
    the header (a "scope ...:" title) are not part of it, nor what follows its first
    blank line (the families)."""
    lines = stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["#", "PID"])
    body = lines[at + 1:]
    if "" in body:
        body = body[:body.index("")]
    rows = [ln for ln in body if not ln.startswith("...") and ln != "(no candidates)"]
    rest = [ln for ln in body if ln not in rows]
    return lines[at].split(), rows, rest


def test_explain_prints_a_table(empty: str, spawn: Spawn) -> None:
    child = spawn(["sleep", "1000"])
    result = mreaper("explain", "--config", empty, "--all")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "scope machine: every process"
    header, rows, _ = _table(result.stdout)
    assert header[:7] == ["#", "PID", "NAME", "RSS", "OOM_SCORE", "ADJ", "SCORE"]
    assert " ".join(header[7:]) == "RULES / EXCLUDED"
    assert rows
    for row in rows:
        cells = row.split()
        assert cells[0] == "-" or cells[0].isdigit(), row
        assert cells[1].isdigit(), row
    assert str(child.pid) in {row.split()[1] for row in rows}
    assert child.poll() is None


def test_explain_all_lists_more_than_the_top_20(empty: str, spawn: Spawn) -> None:
    for _ in range(25):  # more than 20 candidates, whatever else runs here
        spawn(["sleep", "1000"])
    top = mreaper("explain", "--config", empty)
    every = mreaper("explain", "--config", empty, "--all")
    assert top.returncode == 0 and every.returncode == 0, (top.stderr, every.stderr)
    _, top_rows, top_rest = _table(top.stdout)
    _, all_rows, all_rest = _table(every.stdout)
    assert len(top_rows) == 20
    assert len(top_rest) == 1 and top_rest[0].startswith("... ")
    assert top_rest[0].endswith(" excluded)")
    assert len(all_rows) > len(top_rows)
    assert all_rest == []


def test_explain_shows_a_flag_rule(empty: str, spawn: Spawn) -> None:
    child = spawn(["sleep", "1000"])
    result = mreaper("explain", "--config", empty, "--all", "--protect", "^sleep$")
    assert result.returncode == 0, result.stderr
    _, rows, _ = _table(result.stdout)
    (row,) = [r for r in rows if r.split()[1] == str(child.pid)]
    assert row.split()[0] == "-"
    assert "protect" in row and "excluded" in row


# --- bugs ---------------------------------------------------------------------------------


def test_bug_huge_min_rss_is_exit_2_not_a_traceback(empty: str) -> None:
    """config.parse_size: int(float('1' * 400)) raises OverflowError, which cli.main does
    not catch: a traceback and exit 1."""
    result = mreaper("config", "--config", empty, "--min-rss", "1" * 400)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert result.stderr.startswith(f"mreaper config: {CL}: kill.min_rss = '111")


def test_bug_psi_non_ascii_digit_is_exit_2_not_a_traceback(empty: str) -> None:
    """config.parse_psi: '\u00b2'.isdigit() but int('\u00b2') raises ValueError."""
    result = mreaper("config", "--config", empty, "--psi-kill", "full \u00b2 1000000")
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert result.stderr == f"mreaper config: {CL}: psi.kill = 'full \u00b2 1000000': {PSI_HELP}\n"


def test_bug_flag_rules_are_numbered_after_the_file_rules(tmp_path: Path) -> None:
    """cli.load_config applies the flag rules as a document of their own, so the first
    flag rule is labelled 'rule 1' like the file's first rule, and explain shows two
    different rules under one name (a bad flag regex is reported as rule[1] too)."""
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\naction = "avoid"\nname = "^sshd$"\n')
    args = cli.build_parser().parse_args(["config", "--config", str(path), "--prefer", "^x$"])
    cfg = cli.load_config(args)
    labels = [r.label for r in cfg.rules]
    assert len(labels) == 2
    assert labels[0].startswith("rule 1 ")
    assert labels[1].startswith("rule 2 "), labels


def test_running_children_survive_all_of_this(spawn: Spawn) -> None:
    """A bystander started before a refused `run` with several bad flags at once."""
    bystander = spawn(["sleep", "1000"])
    result = mreaper("run", "--reapers", "0", "--memory-kill", "150%", "--dry-run",
                     "--config", os.devnull)
    assert result.returncode == 2
    assert result.stderr.startswith("mreaper run: ")
    assert bystander.poll() is None


# --- `config` refuses what `run` refuses (issue 11): install.sh validates with `config` -----


def run_both(args: list[str], spawn: Spawn, env: dict[str, str] | None = None
             ) -> dict[str, subprocess.CompletedProcess[str]]:
    """`config ARGS` and `run ARGS --dry-run`, with a bystander that `run` must not kill."""
    bystander = spawn(["sleep", "1000"])
    out = {}
    for command in ("config", "run"):
        out[command] = subprocess.run([str(MREAPER), *command_args(command, args)],
                                      stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      timeout=60, check=False,
                                      env={**os.environ, **(env or {})})
    assert bystander.poll() is None
    return out


def test_config_refuses_metrics_without_prometheus_client_as_run_does(
        tmp_path: Path, spawn: Spawn) -> None:
    """prometheus-client hidden by a package of that name that cannot be imported, first
    on PYTHONPATH: `config` said "valid" and `run` refused to start."""
    hidden = tmp_path / "hide" / "prometheus_client"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("hidden by the test")\n')
    conf = tmp_path / "metrics.toml"
    conf.write_text('[metrics]\nlisten = "127.0.0.1:9772"\n')
    results = run_both(["--config", str(conf)], spawn, {"PYTHONPATH": str(hidden.parent)})
    message = ("metrics.listen = '127.0.0.1:9772': metrics are configured (listen "
               "'127.0.0.1:9772', textfile '') but the Python package prometheus-client is "
               "missing: install it with `pip install 'mreaper[metrics]'` (Debian: `apt "
               "install python3-prometheus-client`), or turn metrics off\n")
    for command, result in results.items():
        assert result.returncode == 2, (command, result)
        assert result.stdout == ""
        origin = f"{conf} + command line" if command == "run" else str(conf)  # --dry-run
        assert result.stderr == f"mreaper {command}: {origin}: {message}"


def test_config_refuses_a_level_above_this_machines_memtotal_as_run_does(
        tmp_path: Path, spawn: Spawn) -> None:
    """ "40G" on a smaller machine: MemAvailable <= 40G always, so the daemon would sit at
    the kill level for good, killing one process after another."""
    total = procfs.read_meminfo().mem_total
    above = (total >> 30) + 1
    conf = tmp_path / "big.toml"
    conf.write_text(f'[memory]\nwarn = "off"\nterm = "off"\nkill = "{above}G"\n')
    results = run_both(["--config", str(conf)], spawn)
    for command, result in results.items():
        assert result.returncode == 2, (command, result)
        assert result.stdout == ""
        origin = f"{conf} + command line" if command == "run" else str(conf)  # --dry-run
        assert result.stderr.startswith(
            f"mreaper {command}: {origin}: memory.kill = '{above}G': {above}.0 GiB is at or "
            f"above this machine's MemTotal ({fmt_bytes(total)}): MemAvailable is never above "
            "MemTotal, so the level would always hold"), result.stderr
    # just below MemTotal is this machine's business (a test's threshold, a small VM)
    below = total // (1 << 20) - 1
    ok = mreaper("config", "--config", str(conf), "--memory-kill", f"{below}M")
    assert ok.returncode == 0, ok.stderr
    assert f'kill = "{below}M"' in ok.stdout


def test_a_reload_to_a_level_above_memtotal_is_refused_and_the_daemon_runs_on(
        tmp_path: Path) -> None:
    """SIGHUP goes through the same checks as the start: a reload to "kill = 40G" on a
    smaller machine would have left the daemon killing at every look."""
    conf = tmp_path / "mreaper.toml"
    conf.write_text("[daemon]\nreapers = 2\n")
    daemon = DaemonProcess("--config", str(conf), "--dry-run", "--psi-warn", "off",
                           "--psi-kill", "off")
    try:
        above = (procfs.read_meminfo().mem_total >> 30) + 1
        conf.write_text(f'[memory]\nwarn = "off"\nterm = "off"\nkill = "{above}G"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        m = daemon.wait_for(r"reload refused, keeping the running configuration: (.*)")
        assert m.group(1).startswith(f"{conf} + command line: memory.kill = '{above}G': "
                                     f"{above}.0 GiB is at or above this machine's MemTotal")
        assert daemon.proc.poll() is None
        assert not any("killing" in line or "would kill" in line for line in daemon.lines)
    finally:
        assert daemon.stop() == 0
