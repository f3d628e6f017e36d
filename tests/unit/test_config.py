"""Unit tests of mreaper.config: defaults, value parsers, the `when` expression, rules,
overlays, the TOML round trip, and a table of bad documents with their exact messages.

The help texts below are written out literally (not imported) on purpose: they are
part of the user interface, and a change to them should show up here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mreaper import config
from mreaper.config import Config, ConfigError, Level, PsiTrigger, Threshold
from mreaper.policy import Action, SortBy

MiB = 1 << 20
GiB = 1 << 30

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
KNOWN_SECTIONS = ("unknown key; known here: daemon, detect, memory, swap, psi, kill, rule, "
                  "scope, events, metrics, hooks, status")
KNOWN_SCOPE = ("unknown key; known here: name, cgroup, when, headroom, psi, events, unit, "
               "select")
SCOPE_WHEN_HELP = ("an expression over headroom, psi and events with & (and), | (or) and "
                   'parentheses, e.g. "headroom & psi | events"; or "any" / "all" of the three')
SCOPE_CGROUP_HELP = "a cgroup path or glob under the cgroup2 mount"
SCOPE_BELOW_ROOT = "a cgroup below the root, without '..' (the root is the machine scope)"
SCOPE_NAME_HELP = "1-128 characters: letters, digits, _ . : / * ? [ ] -"
SCOPE_UNIQUE = 'scope names must be unique and not "machine"'
EVENTS_HELP = "a list of memory.events counters: low, high, max, oom, oom_kill, oom_group_kill"
KNOWN_DAEMON = ("unknown key; known here: dry_run, reapers, mlockall, oom_score_adj, nice, "
                "realtime, log, recovery_timeout")
KNOWN_DETECT = "unknown key; known here: when, poll_min, poll_max, scan_interval"
KNOWN_LEVELS = "unknown key; known here: warn, term, kill"
KNOWN_KILL = ("unknown key; known here: term_timeout, sort_by, min_rss, mrelease, demote, "
              "families, growth_weight, pods")
KNOWN_RULE = "unknown key; known here: action, name, cmdline, exe, cgroup, user, adjust"
TRUE_FALSE = "true or false"
PATH_HELP = 'an absolute path, or "" for off'
EVENTS_PATH_HELP = 'an absolute path, "-" for standard output, or "" for off'
LISTEN_HELP = 'HOST:PORT (e.g. "127.0.0.1:9772", "[::1]:9772") with port 1-65535, or ""'
ARGV_HELP = ("a command as a list of strings, the first an absolute path, run without a "
             'shell (e.g. ["/usr/local/bin/notify", "--urgent"]), or [] for none')
ACTIONS = 'one of "prefer", "avoid", "protect"'


def write(tmp_path: Path, text: str, name: str = "mreaper.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_text(tmp_path: Path, text: str) -> Config:
    return config.load(write(tmp_path, text), required=True)


def rule_facts(cfg: Config) -> list[tuple[object, ...]]:
    """The rules without their labels, patterns by their text."""
    return [(r.action, *(getattr(r, k).pattern if getattr(r, k) is not None else None
                         for k in ("name", "cmdline", "exe", "cgroup")), r.uid, r.adjust)
            for r in cfg.rules]


def assert_same_config(a: Config, b: Config) -> None:
    """Field by field, everything but the origin; rules by their facts."""
    for f in dataclasses.fields(Config):
        if f.name in ("origin", "rules"):
            continue
        assert getattr(a, f.name) == getattr(b, f.name), f.name
    assert rule_facts(a) == rule_facts(b)


# --- defaults ------------------------------------------------------------------------------


def test_defaults_are_coherent() -> None:
    cfg = Config()
    assert cfg.origin == "built-in defaults"
    assert 0 < cfg.poll_min <= cfg.poll_max
    assert 1 <= cfg.reapers <= 16
    for section in ("memory", "swap"):
        levels = getattr(cfg, section)
        assert set(levels) == set(config.LEVELS)
        for total in (1 << 30, 16 << 30, 1 << 40):
            values = [levels[lvl].bytes_of(total) for lvl in config.LEVELS]
            assert values == sorted(values, reverse=True), (section, total)
    for lvl in config.LEVELS:
        trig = cfg.psi[lvl]
        if trig is not None:  # every default trigger is one parse_psi accepts back
            assert config.parse_psi(str(trig), "t", f"psi.{lvl}") == trig
    assert config.parse_when(config.format_when(cfg.when), "t", "detect.when") == cfg.when
    assert cfg.rules == ()


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    text = config.to_toml(Config())
    path = write(tmp_path, text)
    loaded = config.load(path, required=True)
    assert loaded.origin == path
    assert_same_config(loaded, Config())
    # and the document of the loaded configuration is the same document
    assert config.to_toml(loaded).splitlines()[1:] == text.splitlines()[1:]


def test_empty_file_and_empty_sections_are_the_defaults(tmp_path: Path) -> None:
    assert_same_config(load_text(tmp_path, ""), Config())
    sections = "".join(f"[{s}]\n" for s in ("daemon", "detect", "memory", "swap", "psi", "kill",
                                              "events", "metrics", "hooks", "status"))
    assert_same_config(load_text(tmp_path, sections), Config())


def test_missing_default_file_is_fine_when_not_required(tmp_path: Path) -> None:
    cfg = config.load(str(tmp_path / "absent.toml"), required=False)
    assert cfg == Config()


def test_a_full_document_round_trips(tmp_path: Path) -> None:
    text = """
[daemon]
dry_run = true
reapers = 16
mlockall = false
oom_score_adj = 1000
nice = 19
realtime = true
log = "journal"
recovery_timeout = 0.1

[detect]
when = "all"
poll_min = 0.001
poll_max = 10
scan_interval = 600

[memory]
warn = ["20%", "4G"]
term = "off"
kill = "1048576B"

[swap]
warn = "off"
term = "off"
kill = "off"

[psi]
warn = "off"
term = "some 10000 500000"
kill = "full 10000000 10000000"

[kill]
term_timeout = 0
sort_by = "rss"
min_rss = "1.5GiB"
mrelease = false
demote = true

[events]
path = "-"

[metrics]
listen = "[::1]:9772"
textfile = "/var/lib/node_exporter/mreaper.prom"

[hooks]
pre_kill = ["/bin/echo", "--urgent", "it's \\"quoted\\""]
pre_kill_timeout = 60
post_kill = []

[status]
socket = ""

[[scope]]
name = "web"
cgroup = "system.slice/nginx.service"
when = "headroom & psi"
headroom = { warn = "20%", kill = "64M" }
psi = { kill = "off" }
events = { kill = ["oom", "oom_kill"] }
unit = "cgroup"
select = "growth"

[[scope]]
cgroup = "/user.slice/*"

[[rule]]
action = "avoid"
name = '^Xorg$'
cmdline = "--no-kill \\\\d+"
adjust = -500

[[rule]]
action = "protect"
exe = "^/usr/lib/systemd/"
cgroup = "system\\\\.slice"
user = "root"

[[rule]]
action = "prefer"
user = 1000
"""
    first = load_text(tmp_path, text)
    assert first.dry_run and first.realtime and not first.mlockall
    assert first.when == (("memory", "swap", "psi"),)
    assert first.memory["warn"] == Level((Threshold(percent=20.0), Threshold(size=4 * GiB)))
    assert first.memory["term"] == Level()
    assert first.swap == {lvl: Level() for lvl in config.LEVELS}
    assert first.psi == {"warn": None, "term": PsiTrigger("some", 10_000, 500_000),
                         "kill": PsiTrigger("full", 10_000_000, 10_000_000)}
    assert first.min_rss == 3 * GiB // 2
    assert (first.events_path, first.metrics_listen, first.status_socket) == ("-", "[::1]:9772", "")
    assert first.pre_kill == ("/bin/echo", "--urgent", 'it\'s "quoted"')
    assert first.pre_kill_timeout == 60.0 and first.post_kill == ()
    web, users = first.scopes
    assert (web.name, web.cgroup, web.unit, web.select) == (
        "web", "system.slice/nginx.service", "cgroup", "growth")
    assert web.when == (("headroom", "psi"),)
    assert web.headroom["kill"] == Level((Threshold(size=64 * MiB),))
    assert web.psi["kill"] is None and web.events["kill"] == ("oom", "oom_kill")
    assert (users.name, users.cgroup) == ("/user.slice/*", "/user.slice/*")
    assert first.rules[0].cmdline is not None
    assert first.rules[0].cmdline.pattern == "--no-kill \\d+"
    second = config.load(write(tmp_path, config.to_toml(first), "again.toml"), required=True)
    assert_same_config(first, second)


# --- value parsers ------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (0, 0),
    (4096, 4096),
    ("100", 100),
    ("512M", 512 * MiB),
    ("512m", 512 * MiB),
    ("2G", 2 * GiB),
    ("1.5GiB", 3 * GiB // 2),
    ("1.5 GiB", 3 * GiB // 2),
    ("4K", 4096),
    ("4k", 4096),
    ("4KB", 4096),
    ("4KiB", 4096),
    (" 7 M ", 7 * MiB),
    ("1T", 1 << 40),
    ("0.5K", 512),
])
def test_parse_size(value: object, expected: int) -> None:
    assert config.parse_size(value, "o", "k") == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("off", Level()),
    ([], Level()),
    ("5%", Level((Threshold(percent=5.0),))),
    ("0%", Level((Threshold(percent=0.0),))),
    ("99.5%", Level((Threshold(percent=99.5),))),
    ("2.5%", Level((Threshold(percent=2.5),))),
    (" 7 % ", Level((Threshold(percent=7.0),))),
    ("512M", Level((Threshold(size=512 * MiB),))),
    ("1024B", Level((Threshold(size=1024),))),
    ("0B", Level((Threshold(size=0),))),
    (["5%", "1G"], Level((Threshold(percent=5.0), Threshold(size=GiB)))),
    (["1G", "5%", "100B"], Level((Threshold(size=GiB), Threshold(percent=5.0),
                                  Threshold(size=100)))),
])
def test_parse_level(value: object, expected: Level) -> None:
    assert config.parse_level(value, "o", "k") == expected


def test_level_lists_the_lower_wins() -> None:
    level = config.parse_level(["5%", "1G"], "o", "k")
    assert level.bytes_of(16 * GiB) == int(16 * GiB * 5 / 100)   # 819 MiB < 1 GiB
    assert level.bytes_of(64 * GiB) == GiB                        # 3.2 GiB > 1 GiB
    assert level.bytes_of(20 * GiB) == GiB                        # exactly equal
    assert Level().bytes_of(16 * GiB) is None
    assert config.parse_level("10%", "o", "k").bytes_of(1000) == 100
    assert config.parse_level("512M", "o", "k").bytes_of(GiB) == 512 * MiB


def test_level_to_toml() -> None:
    assert config.parse_level("5%", "o", "k").to_toml() == "5%"
    assert config.parse_level("512M", "o", "k").to_toml() == "512M"
    assert config.parse_level(["5%", "1G"], "o", "k").to_toml() == ["5%", "1G"]
    assert config.parse_level("1.5G", "o", "k").to_toml() == "1536M"
    assert config.parse_level("4097B", "o", "k").to_toml() == "4097B"
    assert config.parse_level("0.00001%", "o", "k").to_toml() == "0.00001%"


@pytest.mark.parametrize(("value", "expected"), [
    ("off", None),
    ("some 150000 1000000", PsiTrigger("some", 150_000, 1_000_000)),
    ("full 500000 500000", PsiTrigger("full", 500_000, 500_000)),
    ("some 1 10000000", PsiTrigger("some", 1, 10_000_000)),
    ("  full   300000   1000000 ", PsiTrigger("full", 300_000, 1_000_000)),
])
def test_parse_psi(value: object, expected: PsiTrigger | None) -> None:
    trig = config.parse_psi(value, "o", "k")
    assert trig == expected
    if trig is not None:
        assert str(trig) == " ".join(value.split())  # type: ignore[union-attr]


@pytest.mark.parametrize(("text", "expected"), [
    ("memory", (("memory",),)),
    ("psi", (("psi",),)),
    ("memory & swap | psi", (("memory", "swap"), ("psi",))),
    ("memory&swap|psi", (("memory", "swap"), ("psi",))),
    ("psi | memory & swap", (("psi",), ("memory", "swap"))),
    ("memory & (swap | psi)", (("memory", "swap"), ("memory", "psi"))),
    ("(memory | swap) & psi", (("memory", "psi"), ("swap", "psi"))),
    ("(memory | swap) & (swap | psi)",
     (("memory", "swap"), ("memory", "psi"), ("swap",), ("swap", "psi"))),
    ("memory & memory", (("memory",),)),
    ("((memory))", (("memory",),)),
    ("  memory  &  swap  ", (("memory", "swap"),)),
    ("any", (("memory",), ("swap",), ("psi",))),
    ("all", (("memory", "swap", "psi"),)),
])
def test_parse_when(text: str, expected: config.When) -> None:
    assert config.parse_when(text, "o", "detect.when") == expected


def test_format_when_parses_back() -> None:
    for text in ("memory & swap | psi", "memory & (swap | psi)", "any", "all", "psi"):
        when = config.parse_when(text, "o", "k")
        assert config.parse_when(config.format_when(when), "o", "k") == when
    assert config.format_when((("memory", "swap"), ("psi",))) == "memory & swap | psi"


_SOURCE = st.sampled_from(config.SOURCES)


def _expr(depth: int) -> st.SearchStrategy[str]:
    if depth == 0:
        return _SOURCE
    sub = _expr(depth - 1)
    return st.one_of(_SOURCE,
                     st.tuples(sub, st.sampled_from(["&", "|"]), sub).map(" ".join),
                     sub.map(lambda s: f"({s})"))


def _evaluate_text(text: str, env: dict[str, bool]) -> bool:
    py = text.replace("&", " and ").replace("|", " or ")
    return bool(eval(py, {}, dict(env)))


@settings(max_examples=200, deadline=None)
@given(_expr(3), st.booleans(), st.booleans(), st.booleans())
def test_when_normal_form_means_the_expression(text: str, m: bool, s: bool, p: bool) -> None:
    """The DNF holds exactly when the expression does (& binds tighter than |, as `and`
    does over `or` in Python)."""
    env = {"memory": m, "swap": s, "psi": p}
    dnf = config.parse_when(text, "o", "k")
    assert any(all(env[x] for x in term) for term in dnf) == _evaluate_text(text, env)


# --- rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(("matcher", "value", "attr", "expected"), [
    ("name", "^Xorg$", "name", "^Xorg$"),
    ("cmdline", "--foo [0-9]+", "cmdline", "--foo [0-9]+"),
    ("exe", "^/usr/bin/", "exe", "^/usr/bin/"),
    ("cgroup", "^/system\\.slice/", "cgroup", "^/system\\.slice/"),
])
def test_rule_pattern_matchers(matcher: str, value: str, attr: str, expected: str) -> None:
    cfg = config.apply(Config(), {"rule": [{"action": "avoid", matcher: value}]}, "o")
    (rule,) = cfg.rules
    assert rule.action is Action.AVOID
    assert getattr(rule, attr).pattern == expected
    assert rule.adjust == 0
    assert rule.label == f"rule 1 (avoid {matcher}={value!r})"
    others = {"name", "cmdline", "exe", "cgroup"} - {attr}
    assert all(getattr(rule, o) is None for o in others)
    assert rule.uid is None


@pytest.mark.parametrize(("user", "uid"), [("root", 0), (0, 0), (1000, 1000),
                                            (4294967294, 4294967294)])
def test_rule_user_by_name_and_uid(user: object, uid: int) -> None:
    cfg = config.apply(Config(), {"rule": [{"action": "protect", "user": user}]}, "o")
    assert cfg.rules[0].uid == uid
    assert cfg.rules[0].action is Action.PROTECT


def test_rule_adjust_and_order() -> None:
    data = {"rule": [{"action": "prefer", "name": "chrome", "adjust": 100_000},
                     {"action": "avoid", "name": "sshd", "adjust": -100_000},
                     {"action": "avoid", "name": "x", "user": "root", "cmdline": "y"}]}
    cfg = config.apply(Config(), data, "o")
    assert [(r.action, r.adjust) for r in cfg.rules] == [
        (Action.PREFER, 100_000), (Action.AVOID, -100_000), (Action.AVOID, 0)]
    assert cfg.rules[2].uid == 0
    assert cfg.rules[2].label == "rule 3 (avoid name='x' user='root' cmdline='y')"


# --- overlays -----------------------------------------------------------------------------


def test_apply_keeps_untouched_values() -> None:
    base = config.apply(Config(), {
        "daemon": {"reapers": 4, "nice": 5},
        "memory": {"warn": "20%", "term": "10%"},
        "psi": {"term": "some 200000 2000000"},
        "rule": [{"action": "avoid", "name": "a"}],
    }, "base")
    over = config.apply(base, {"memory": {"kill": "1%"}, "psi": {"warn": "off"},
                               "kill": {"sort_by": "rss"}}, "over")
    assert over.origin == "over"
    assert over.reapers == 4 and over.nice == 5
    assert over.memory == {"warn": Level((Threshold(percent=20.0),)),
                           "term": Level((Threshold(percent=10.0),)),
                           "kill": Level((Threshold(percent=1.0),))}
    assert over.swap == Config().swap
    assert over.psi == {"warn": None, "term": PsiTrigger("some", 200_000, 2_000_000),
                        "kill": Config().psi["kill"]}
    assert over.sort_by is SortBy.RSS
    assert rule_facts(over) == rule_facts(base)
    # the overlay did not change the base it was laid on
    assert base.memory["kill"] == Config().memory["kill"] and base.psi["warn"] is not None
    # rules given in an overlay replace the base's
    again = config.apply(over, {"rule": [{"action": "prefer", "name": "b"}]}, "again")
    assert [r.name.pattern for r in again.rules if r.name] == ["b"]
    # an empty overlay changes only the origin
    same = config.apply(over, {}, "empty")
    assert dataclasses.replace(same, origin="over") == over


def test_apply_checks_coherence_of_the_result() -> None:
    """A level that is fine alone is refused when the overlay makes the levels cross."""
    base = config.apply(Config(), {"memory": {"term": "1%", "kill": "1%"}}, "base")
    with pytest.raises(ConfigError) as e:
        config.apply(base, {"memory": {"term": "20%"}}, "over")
    assert str(e.value) == "over: memory.term = '20%': must be at or below memory.warn (10%)"


def test_config_error_attributes() -> None:
    e = ConfigError("f.toml", "daemon.reapers", 0, "an integer from 1 to 16")
    assert (e.origin, e.key, e.value, e.allowed) == ("f.toml", "daemon.reapers", 0,
                                                      "an integer from 1 to 16")
    assert str(e) == "f.toml: daemon.reapers = 0: an integer from 1 to 16"
    assert isinstance(e, ValueError)


# --- the table of bad documents ---------------------------------------------------------

# (id, TOML document, the message after "<path>: ")
BAD: list[tuple[str, str, str]] = [
    # structure
    ("unknown-section", "[foo]\nx = 1\n", f"foo = {{'x': 1}}: {KNOWN_SECTIONS}"),
    ("unknown-top-level-key", "reapers = 2\n", f"reapers = 2: {KNOWN_SECTIONS}"),
    ("section-not-a-table", "daemon = 5\n", "daemon = 5: a table ([daemon])"),
    ("memory-not-a-table", 'memory = "5%"\n', "memory = '5%': a table ([memory])"),
    ("kill-array-of-tables", "[[kill]]\nterm_timeout = 1\n",
     "kill = [{'term_timeout': 1}]: a table ([kill])"),
    # unknown key in each section
    ("daemon-unknown", "[daemon]\nthreads = 4\n", f"daemon.threads = 4: {KNOWN_DAEMON}"),
    ("detect-unknown", "[detect]\ninterval = 1\n", f"detect.interval = 1: {KNOWN_DETECT}"),
    ("memory-unknown", '[memory]\nmin = "5%"\n', f"memory.min = '5%': {KNOWN_LEVELS}"),
    ("swap-unknown", '[swap]\ncrit = "1%"\n', f"swap.crit = '1%': {KNOWN_LEVELS}"),
    ("psi-unknown", '[psi]\nsome = "some 1 1000000"\n',
     f"psi.some = 'some 1 1000000': {KNOWN_LEVELS}, gate"),
    ("kill-unknown", "[kill]\nsignal = 9\n", f"kill.signal = 9: {KNOWN_KILL}"),
    ("rule-unknown", '[[rule]]\naction = "avoid"\nname = "x"\nregex = "y"\n',
     f"rule[1].regex = 'y': {KNOWN_RULE}"),
    # [daemon] types and ranges
    ("reapers-string", '[daemon]\nreapers = "2"\n',
     "daemon.reapers = '2': an integer from 1 to 16"),
    ("reapers-bool", "[daemon]\nreapers = true\n",
     "daemon.reapers = True: an integer from 1 to 16"),
    ("reapers-float", "[daemon]\nreapers = 2.0\n",
     "daemon.reapers = 2.0: an integer from 1 to 16"),
    ("reapers-0", "[daemon]\nreapers = 0\n", "daemon.reapers = 0: an integer from 1 to 16"),
    ("reapers-17", "[daemon]\nreapers = 17\n", "daemon.reapers = 17: an integer from 1 to 16"),
    ("oom-score-adj-low", "[daemon]\noom_score_adj = -1001\n",
     "daemon.oom_score_adj = -1001: an integer from -1000 to 1000"),
    ("oom-score-adj-high", "[daemon]\noom_score_adj = 1001\n",
     "daemon.oom_score_adj = 1001: an integer from -1000 to 1000"),
    ("nice-20", "[daemon]\nnice = 20\n", "daemon.nice = 20: an integer from -20 to 19"),
    ("nice-minus-21", "[daemon]\nnice = -21\n", "daemon.nice = -21: an integer from -20 to 19"),
    ("nice-string", '[daemon]\nnice = "low"\n', "daemon.nice = 'low': an integer from -20 to 19"),
    ("dry-run-int", "[daemon]\ndry_run = 1\n", f"daemon.dry_run = 1: {TRUE_FALSE}"),
    ("mlockall-string", '[daemon]\nmlockall = "yes"\n', f"daemon.mlockall = 'yes': {TRUE_FALSE}"),
    ("realtime-int", "[daemon]\nrealtime = 0\n", f"daemon.realtime = 0: {TRUE_FALSE}"),
    ("log-unknown", '[daemon]\nlog = "syslog"\n',
     "daemon.log = 'syslog': one of \"auto\", \"plain\", \"journal\""),
    ("log-int", "[daemon]\nlog = 1\n", "daemon.log = 1: one of \"auto\", \"plain\", \"journal\""),
    ("recovery-timeout-0.05", "[daemon]\nrecovery_timeout = 0.05\n",
     "daemon.recovery_timeout = 0.05: a number of seconds from 0.1 to 120"),
    ("recovery-timeout-121", "[daemon]\nrecovery_timeout = 121\n",
     "daemon.recovery_timeout = 121: a number of seconds from 0.1 to 120"),
    ("recovery-timeout-bool", "[daemon]\nrecovery_timeout = true\n",
     "daemon.recovery_timeout = True: a number of seconds from 0.1 to 120"),
    ("recovery-timeout-string", '[daemon]\nrecovery_timeout = "5s"\n',
     "daemon.recovery_timeout = '5s': a number of seconds from 0.1 to 120"),
    ("recovery-timeout-nan", "[daemon]\nrecovery_timeout = nan\n",
     "daemon.recovery_timeout = nan: a number of seconds from 0.1 to 120"),
    ("recovery-timeout-inf", "[daemon]\nrecovery_timeout = inf\n",
     "daemon.recovery_timeout = inf: a number of seconds from 0.1 to 120"),
    # [detect]
    ("poll-min-0", "[detect]\npoll_min = 0\n",
     "detect.poll_min = 0: a number of seconds from 0.001 to 1"),
    ("poll-min-2", "[detect]\npoll_min = 2\n",
     "detect.poll_min = 2: a number of seconds from 0.001 to 1"),
    ("poll-max-0.001", "[detect]\npoll_max = 0.001\n",
     "detect.poll_max = 0.001: a number of seconds from 0.01 to 10"),
    ("poll-max-11", "[detect]\npoll_max = 11\n",
     "detect.poll_max = 11: a number of seconds from 0.01 to 10"),
    ("poll-max-bool", "[detect]\npoll_max = false\n",
     "detect.poll_max = False: a number of seconds from 0.01 to 10"),
    ("scan-interval-low", "[detect]\nscan_interval = 0.05\n",
     "detect.scan_interval = 0.05: a number of seconds from 0.1 to 600"),
    ("scan-interval-high", "[detect]\nscan_interval = 601\n",
     "detect.scan_interval = 601: a number of seconds from 0.1 to 600"),
    ("poll-min-above-poll-max", "[detect]\npoll_min = 0.5\npoll_max = 0.2\n",
     "detect.poll_min = 0.5: must not exceed detect.poll_max (0.2)"),
    ("poll-max-below-default-min", "[detect]\npoll_min = 0.9\npoll_max = 0.5\n",
     "detect.poll_min = 0.9: must not exceed detect.poll_max (0.5)"),
    # when
    ("when-dangling-and", '[detect]\nwhen = "memory &"\n',
     f"detect.when = 'memory &': {WHEN_HELP}"),
    ("when-unknown-source", '[detect]\nwhen = "foo"\n', f"detect.when = 'foo': {WHEN_HELP}"),
    ("when-open-paren", '[detect]\nwhen = "(memory"\n', f"detect.when = '(memory': {WHEN_HELP}"),
    ("when-close-paren", '[detect]\nwhen = "memory)"\n', f"detect.when = 'memory)': {WHEN_HELP}"),
    ("when-no-operator", '[detect]\nwhen = "memory swap"\n',
     f"detect.when = 'memory swap': {WHEN_HELP}"),
    ("when-empty", '[detect]\nwhen = ""\n', f"detect.when = '': {WHEN_HELP}"),
    ("when-blank", '[detect]\nwhen = "   "\n', f"detect.when = '   ': {WHEN_HELP}"),
    ("when-double-and", '[detect]\nwhen = "memory && swap"\n',
     f"detect.when = 'memory && swap': {WHEN_HELP}"),
    ("when-capital", '[detect]\nwhen = "Memory"\n', f"detect.when = 'Memory': {WHEN_HELP}"),
    ("when-empty-parens", '[detect]\nwhen = "()"\n', f"detect.when = '()': {WHEN_HELP}"),
    ("when-int", "[detect]\nwhen = 1\n", f"detect.when = 1: {WHEN_HELP}"),
    ("when-list", '[detect]\nwhen = ["memory"]\n', f"detect.when = ['memory']: {WHEN_HELP}"),
    # levels: percentages and sizes
    ("memory-kill-150%", '[memory]\nkill = "150%"\n', f"memory.kill = '150%': {PERCENT_RANGE}"),
    ("memory-warn-minus-1%", '[memory]\nwarn = "-1%"\n',
     f"memory.warn = '-1%': {PERCENT_RANGE}"),
    ("swap-term-abc%", '[swap]\nterm = "abc%"\n', f"swap.term = 'abc%': {LEVEL_HELP}"),
    ("swap-kill-inf%", '[swap]\nkill = "inf%"\n', f"swap.kill = 'inf%': {PERCENT_RANGE}"),
    ("memory-kill-12X", '[memory]\nkill = "12X"\n', f"memory.kill = '12X': {LEVEL_HELP}"),
    ("memory-kill-minus-5-string", '[memory]\nkill = "-5"\n',
     f"memory.kill = '-5': {LEVEL_HELP}"),
    ("memory-kill-minus-5-int", "[memory]\nkill = -5\n", f"memory.kill = -5: {LEVEL_HELP}"),
    ("memory-warn-bool", "[memory]\nwarn = true\n", f"memory.warn = True: {LEVEL_HELP}"),
    ("memory-warn-float", "[memory]\nwarn = 1.5\n",
     'memory.warn = 1.5: a bare number is ambiguous: write "1.5%" (1.5 % of MemTotal), or a '
     'size with a unit: B, K, M, G or T (e.g. "512M")'),
    ("memory-warn-empty-string", '[memory]\nwarn = ""\n', f"memory.warn = '': {LEVEL_HELP}"),
    ("memory-term-nested-list", '[memory]\nterm = [["5%"]]\n',
     f"memory.term = [['5%']]: {LEVEL_HELP}"),
    ("memory-term-list-bad-item", '[memory]\nterm = ["5%", "12X"]\n',
     f"memory.term = ['5%', '12X']: {LEVEL_HELP}"),
    ("memory-term-list-with-off", '[memory]\nterm = ["off", "5%"]\n',
     f"memory.term = ['off', '5%']: {LEVEL_HELP}"),
    ("swap-warn-list-bad-percent", '[swap]\nwarn = ["1G", "101%"]\n',
     f"swap.warn = ['1G', '101%']: {PERCENT_RANGE}"),
    ("memory-kill-table", "[memory]\nkill = {size = 1}\n",
     f"memory.kill = {{'size': 1}}: {LEVEL_HELP}"),
    # level ordering
    ("memory-kill-above-term", '[memory]\nkill = "6%"\n',
     "memory.kill = '6%': must be at or below memory.term (5%)"),
    ("memory-term-above-warn", '[memory]\nterm = "20%"\n',
     "memory.term = '20%': must be at or below memory.warn (10%)"),
    ("swap-term-above-warn", '[swap]\nterm = "50%"\n',
     "swap.term = '50%': must be at or below swap.warn (10%)"),
    ("memory-kill-above-warn-term-off", '[memory]\nwarn = "5%"\nterm = "off"\nkill = "8%"\n',
     "memory.kill = '8%': must be at or below memory.warn (5%)"),
    ("memory-sizes-crossed", '[memory]\nwarn = "1G"\nterm = "2G"\nkill = "off"\n',
     "memory.term = '2G': must be at or below memory.warn (1.0 GiB)"),
    ("memory-size-above-percent-on-1GiB", '[memory]\nkill = "100M"\n',
     "memory.kill = '100M': must be at or below memory.term (5%): on a 1 GiB total it is "
     "100.0 MiB against 51.2 MiB"),
    ("memory-percent-above-size-on-1TiB", '[memory]\nwarn = ["15%", "8G"]\n',
     "memory.warn = ['15%', '8G']: must be at or above memory.term (5%): on a 1 TiB total it "
     "is 8.0 GiB against 51.2 GiB"),
    # [psi]
    ("psi-wrong-kind", '[psi]\nkill = "half 400000 1000000"\n',
     f"psi.kill = 'half 400000 1000000': {PSI_HELP}"),
    ("psi-window-too-small", '[psi]\nwarn = "some 50000 100000"\n',
     f"psi.warn = 'some 50000 100000': {PSI_HELP}"),
    ("psi-window-too-large", '[psi]\nwarn = "some 50000 20000000"\n',
     f"psi.warn = 'some 50000 20000000': {PSI_HELP}"),
    ("psi-stall-0", '[psi]\nterm = "full 0 1000000"\n',
     f"psi.term = 'full 0 1000000': {PSI_HELP}"),
    ("psi-stall-above-window", '[psi]\nterm = "full 2000000 1000000"\n',
     f"psi.term = 'full 2000000 1000000': {PSI_HELP}"),
    ("psi-two-fields", '[psi]\nkill = "some 1000000"\n', f"psi.kill = 'some 1000000': {PSI_HELP}"),
    ("psi-four-fields", '[psi]\nkill = "some 1 1000000 5"\n',
     f"psi.kill = 'some 1 1000000 5': {PSI_HELP}"),
    ("psi-non-digits", '[psi]\nkill = "some 1e5 1000000"\n',
     f"psi.kill = 'some 1e5 1000000': {PSI_HELP}"),
    ("psi-negative", '[psi]\nkill = "some -5 1000000"\n',
     f"psi.kill = 'some -5 1000000': {PSI_HELP}"),
    ("psi-int", "[psi]\nwarn = 150000\n", f"psi.warn = 150000: {PSI_HELP}"),
    ("psi-bool", "[psi]\nwarn = false\n", f"psi.warn = False: {PSI_HELP}"),
    ("psi-capital-kind", '[psi]\nwarn = "SOME 150000 1000000"\n',
     f"psi.warn = 'SOME 150000 1000000': {PSI_HELP}"),
    # [kill]
    ("term-timeout-minus-1", "[kill]\nterm_timeout = -1\n",
     "kill.term_timeout = -1: a number of seconds from 0 to 3600"),
    ("term-timeout-3601", "[kill]\nterm_timeout = 3601\n",
     "kill.term_timeout = 3601: a number of seconds from 0 to 3600"),
    ("term-timeout-string", '[kill]\nterm_timeout = "5"\n',
     "kill.term_timeout = '5': a number of seconds from 0 to 3600"),
    ("sort-by-size", '[kill]\nsort_by = "size"\n',
     "kill.sort_by = 'size': one of \"oom_score\", \"rss\", \"private\""),
    ("sort-by-upper", '[kill]\nsort_by = "RSS"\n',
     "kill.sort_by = 'RSS': one of \"oom_score\", \"rss\", \"private\""),
    ("min-rss-12X", '[kill]\nmin_rss = "12X"\n', f"kill.min_rss = '12X': {SIZE_HELP}"),
    ("min-rss-minus-5", "[kill]\nmin_rss = -5\n", "kill.min_rss = -5: a size must not be negative"),
    ("min-rss-minus-5-string", '[kill]\nmin_rss = "-5"\n', f"kill.min_rss = '-5': {SIZE_HELP}"),
    ("min-rss-bool", "[kill]\nmin_rss = true\n", f"kill.min_rss = True: {SIZE_HELP}"),
    ("min-rss-percent", '[kill]\nmin_rss = "5%"\n', f"kill.min_rss = '5%': {SIZE_HELP}"),
    ("min-rss-float", "[kill]\nmin_rss = 1.5\n", f"kill.min_rss = 1.5: {SIZE_HELP}"),
    ("mrelease-int", "[kill]\nmrelease = 1\n", f"kill.mrelease = 1: {TRUE_FALSE}"),
    ("demote-string", '[kill]\ndemote = "no"\n', f"kill.demote = 'no': {TRUE_FALSE}"),
    # [events] [metrics] [hooks] [status]
    ("events-unknown", '[events]\nfile = "/x"\n',
     "events.file = '/x': unknown key; known here: path"),
    ("events-path-relative", '[events]\npath = "events.jsonl"\n',
     f"events.path = 'events.jsonl': {EVENTS_PATH_HELP}"),
    ("events-path-int", "[events]\npath = 1\n", f"events.path = 1: {EVENTS_PATH_HELP}"),
    ("metrics-unknown", '[metrics]\nport = 9772\n',
     "metrics.port = 9772: unknown key; known here: listen, textfile"),
    ("metrics-listen-no-port", '[metrics]\nlisten = "localhost"\n',
     f"metrics.listen = 'localhost': {LISTEN_HELP}"),
    ("metrics-listen-port-0", '[metrics]\nlisten = "127.0.0.1:0"\n',
     f"metrics.listen = '127.0.0.1:0': {LISTEN_HELP}"),
    ("metrics-listen-port-65536", '[metrics]\nlisten = "[::1]:65536"\n',
     f"metrics.listen = '[::1]:65536': {LISTEN_HELP}"),
    ("metrics-listen-int", "[metrics]\nlisten = 9772\n", f"metrics.listen = 9772: {LISTEN_HELP}"),
    ("metrics-textfile-relative", '[metrics]\ntextfile = "m.prom"\n',
     f"metrics.textfile = 'm.prom': {PATH_HELP}"),
    ("metrics-textfile-stdout", '[metrics]\ntextfile = "-"\n',
     f"metrics.textfile = '-': {PATH_HELP}"),
    ("hooks-unknown", '[hooks]\non_kill = []\n',
     "hooks.on_kill = []: unknown key; known here: pre_kill, pre_kill_timeout, post_kill"),
    ("hooks-pre-kill-string", '[hooks]\npre_kill = "/bin/true"\n',
     f"hooks.pre_kill = '/bin/true': {ARGV_HELP}"),
    ("hooks-post-kill-relative", '[hooks]\npost_kill = ["notify", "-u"]\n',
     f"hooks.post_kill = ['notify', '-u']: {ARGV_HELP}"),
    ("hooks-post-kill-not-strings", '[hooks]\npost_kill = ["/bin/echo", 1]\n',
     f"hooks.post_kill = ['/bin/echo', 1]: {ARGV_HELP}"),
    ("hooks-pre-kill-timeout-61", "[hooks]\npre_kill_timeout = 61\n",
     "hooks.pre_kill_timeout = 61: a number of seconds from 0 to 60"),
    ("hooks-pre-kill-timeout-negative", "[hooks]\npre_kill_timeout = -0.5\n",
     "hooks.pre_kill_timeout = -0.5: a number of seconds from 0 to 60"),
    ("status-unknown", '[status]\npath = "/run/x"\n',
     "status.path = '/run/x': unknown key; known here: socket"),
    ("status-socket-relative", '[status]\nsocket = "status.sock"\n',
     f"status.socket = 'status.sock': {PATH_HELP}"),
    # [[scope]]
    ("scope-not-an-array", "scope = 5\n", "scope = 5: an array of tables ([[scope]])"),
    ("scope-item-not-a-table", "scope = [1]\n", "scope[1] = 1: a table with at least cgroup"),
    ("scope-missing-cgroup", '[[scope]]\nname = "x"\n',
     f"scope[1].cgroup: required: {SCOPE_CGROUP_HELP}"),
    ("scope-cgroup-int", "[[scope]]\ncgroup = 5\n", f"scope[1].cgroup = 5: {SCOPE_CGROUP_HELP}"),
    ("scope-cgroup-root", '[[scope]]\ncgroup = "/"\n',
     f"scope[1].cgroup = '/': {SCOPE_BELOW_ROOT}"),
    ("scope-cgroup-dotdot", '[[scope]]\ncgroup = "a/../b"\n',
     f"scope[1].cgroup = 'a/../b': {SCOPE_BELOW_ROOT}"),
    ("scope-unknown", '[[scope]]\ncgroup = "a"\nlimit = 1\n', f"scope[1].limit = 1: {KNOWN_SCOPE}"),
    ("scope-name-space", '[[scope]]\ncgroup = "a"\nname = "has space"\n',
     f"scope[1].name = 'has space': {SCOPE_NAME_HELP}"),
    ("scope-name-machine", '[[scope]]\ncgroup = "a"\nname = "machine"\n',
     f"scope.name = 'machine': {SCOPE_UNIQUE}"),
    ("scope-name-duplicate", '[[scope]]\ncgroup = "a"\n\n[[scope]]\ncgroup = "b"\nname = "a"\n',
     f"scope.name = 'a': {SCOPE_UNIQUE}"),
    ("scope-when-memory", '[[scope]]\ncgroup = "a"\nwhen = "memory"\n',
     f"scope[1].when = 'memory': {SCOPE_WHEN_HELP}"),
    ("scope-headroom-not-a-table", '[[scope]]\ncgroup = "a"\nheadroom = "5%"\n',
     "scope[1].headroom = '5%': a table with warn, term and/or kill"),
    ("scope-headroom-unknown-level", '[[scope]]\ncgroup = "a"\nheadroom = { crit = "1%" }\n',
     f"scope[1].headroom.crit = '1%': {KNOWN_LEVELS}"),
    ("scope-headroom-150%", '[[scope]]\ncgroup = "a"\nheadroom = { kill = "150%" }\n',
     f"scope[1].headroom.kill = '150%': {PERCENT_RANGE}"),
    ("scope-headroom-crossed", '[[scope]]\ncgroup = "a"\nheadroom = { kill = "20%" }\n',
     "scope[1].headroom.kill = '20%': must be at or below scope[1].headroom.warn (10%)"),
    ("scope-psi-bad", '[[scope]]\ncgroup = "a"\npsi = { kill = "full 1 2" }\n',
     f"scope[1].psi.kill = 'full 1 2': {PSI_HELP}"),
    ("scope-events-bad-counter", '[[scope]]\ncgroup = "a"\nevents = { warn = ["oops"] }\n',
     f"scope[1].events.warn = ['oops']: {EVENTS_HELP}"),
    ("scope-events-not-a-list", '[[scope]]\ncgroup = "a"\nevents = { warn = "high" }\n',
     f"scope[1].events.warn = 'high': {EVENTS_HELP}"),
    ("scope-unit", '[[scope]]\ncgroup = "a"\nunit = "pod"\n',
     "scope[1].unit = 'pod': one of \"process\", \"cgroup\""),
    ("scope-select", '[[scope]]\ncgroup = "a"\nselect = "random"\n',
     "scope[1].select = 'random': one of \"size\", \"growth\", \"pressure\""),
    ("hooks-pre-kill-missing", '[hooks]\npre_kill = ["/nonexistent/notify"]\n',
     "hooks.pre_kill = ['/nonexistent/notify']: /nonexistent/notify: No such file or directory"),
    ("hooks-pre-kill-directory", '[hooks]\npre_kill = ["/"]\n',
     "hooks.pre_kill = ['/']: / is not an executable file"),
    ("hooks-post-kill-not-executable", '[hooks]\npost_kill = ["/etc/passwd"]\n',
     "hooks.post_kill = ['/etc/passwd']: /etc/passwd is not an executable file"),
    # [[rule]]
    ("rule-not-an-array", "rule = 5\n", "rule = 5: an array of tables ([[rule]])"),
    ("rule-single-table", '[rule]\naction = "avoid"\nname = "x"\n',
     "rule = {'action': 'avoid', 'name': 'x'}: an array of tables ([[rule]])"),
    ("rule-item-not-a-table", "rule = [1]\n",
     "rule[1] = 1: a table with action and at least one matcher"),
    ("rule-missing-action", '[[rule]]\nname = "x"\n',
     f"rule[1].action: required: {ACTIONS}"),
    ("rule-unknown-action", '[[rule]]\naction = "kill"\nname = "x"\n',
     f"rule[1].action = 'kill': {ACTIONS}"),
    ("rule-no-matcher", '[[rule]]\naction = "avoid"\n',
     "rule[1] = {'action': 'avoid'}: needs at least one matcher: name, cmdline, exe, cgroup "
     "or user"),
    ("rule-bad-regex", '[[rule]]\naction = "prefer"\nname = "("\n',
     "rule[1].name = '(': not a valid regular expression: missing ), unterminated subpattern "
     "at position 0"),
    ("rule-bad-regex-exe", '[[rule]]\naction = "avoid"\nexe = "["\n',
     "rule[1].exe = '[': not a valid regular expression: unterminated character set "
     "at position 0"),
    ("rule-bad-regex-cgroup", '[[rule]]\naction = "avoid"\ncgroup = "*"\n',
     "rule[1].cgroup = '*': not a valid regular expression: nothing to repeat at position 0"),
    ("rule-regex-not-a-string", '[[rule]]\naction = "avoid"\ncmdline = 5\n',
     "rule[1].cmdline = 5: a regular expression (string)"),
    ("rule-unknown-user", '[[rule]]\naction = "avoid"\nuser = "no-such-user-mreaper"\n',
     "rule[1].user = 'no-such-user-mreaper': no such user on this system"),
    ("rule-negative-uid", '[[rule]]\naction = "avoid"\nuser = -1\n',
     "rule[1].user = -1: a user name or a numeric uid"),
    ("rule-uid-minus-1-as-u32", '[[rule]]\naction = "avoid"\nuser = 4294967295\n',
     "rule[1].user = 4294967295: a user name or a numeric uid"),
    ("rule-user-bool", '[[rule]]\naction = "avoid"\nuser = true\n',
     "rule[1].user = True: a user name or a numeric uid"),
    ("rule-adjust-on-protect", '[[rule]]\naction = "protect"\nname = "x"\nadjust = 10\n',
     "rule[1].adjust = 10: a protect rule takes no adjust: protected processes are never "
     "killed"),
    ("rule-adjust-too-high", '[[rule]]\naction = "prefer"\nname = "x"\nadjust = 100001\n',
     "rule[1].adjust = 100001: an integer from -100000 to 100000"),
    ("rule-adjust-too-low", '[[rule]]\naction = "avoid"\nname = "x"\nadjust = -100001\n',
     "rule[1].adjust = -100001: an integer from -100000 to 100000"),
    ("rule-adjust-string", '[[rule]]\naction = "prefer"\nname = "x"\nadjust = "5"\n',
     "rule[1].adjust = '5': an integer from -100000 to 100000"),
    ("rule-second-is-bad", '[[rule]]\naction = "avoid"\nname = "x"\n\n[[rule]]\naction = "x"\n'
     'name = "y"\n', f"rule[2].action = 'x': {ACTIONS}"),
]


def test_bad_table_is_large_and_unique() -> None:
    assert len(BAD) >= 60
    assert len({case_id for case_id, _, _ in BAD}) == len(BAD)


@pytest.mark.parametrize(("document", "message"), [pytest.param(d, m, id=i) for i, d, m in BAD])
def test_bad_document(tmp_path: Path, document: str, message: str) -> None:
    path = write(tmp_path, document)
    with pytest.raises(ConfigError) as e:
        config.load(path, required=True)
    assert str(e.value) == f"{path}: {message}"
    assert e.value.origin == path


@pytest.mark.parametrize("document", [
    "[daemon\n",
    "reapers = \n",
    "[daemon]\nreapers = 2\nreapers = 3\n",
    '[daemon]\nlog = "unterminated\n',
    "[daemon]\nreapers = 2 3\n",
])
def test_toml_syntax_error(tmp_path: Path, document: str) -> None:
    path = write(tmp_path, document)
    with pytest.raises(ConfigError) as e:
        config.load(path, required=True)
    detail = e.value.value  # tomllib's own text, which this test does not pin down
    assert isinstance(detail, str)
    assert str(e.value) == f"{path}: (syntax) = {detail!r}: valid TOML"
    assert str(e.value).startswith(f"{path}: (syntax) = ")
    assert e.value.key == "(syntax)"
    assert re.search(r"\(at line \d+, column \d+\)", detail)


_FIX = "mreaper runs as root, so fix it with: chown root:root {0} && chmod go-w {0}"


@pytest.mark.root
@pytest.mark.parametrize(("mode", "uid", "problem"), [
    (0o666, 0, "writable by group and others (mode 0666)"),
    (0o620, 0, "writable by group (mode 0620)"),
    (0o644, 1000, "owned by uid 1000, not root"),
    (0o646, 1000, "owned by uid 1000, not root and writable by others (mode 0646)"),
])
def test_config_file_another_user_could_change(tmp_path: Path, mode: int, uid: int,
                                               problem: str) -> None:
    path = write(tmp_path, "")
    os.chmod(path, mode)
    os.chown(path, uid, -1)
    with pytest.raises(ConfigError) as e:
        config.load(path, required=True)
    assert str(e.value) == f"{path}: --config = '{path}': refused: {problem}; {_FIX.format(path)}"


@pytest.mark.root
def test_hook_another_user_could_change(tmp_path: Path) -> None:
    exe = tmp_path / "notify"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o777)
    path = write(tmp_path, f'[hooks]\npost_kill = ["{exe}", "-u"]\n')
    with pytest.raises(ConfigError) as e:
        config.load(path, required=True)
    assert str(e.value) == (f"{path}: hooks.post_kill = '{exe}': refused: writable by group and "
                            f"others (mode 0777); {_FIX.format(exe)}")


def test_config_file_missing(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as e:
        config.load(path, required=True)
    assert str(e.value) == f"{path}: --config = '{path}': no such file"


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(str(tmp_path), required=True)
    assert str(e.value) == f"{tmp_path}: --config = '{tmp_path}': is a directory, not a file"
    # a directory is an error even where a missing file would not be
    with pytest.raises(ConfigError):
        config.load(str(tmp_path), required=False)


# --- bugs: values that escape as something other than ConfigError -----------------------
# Each of these should be refused with a ConfigError naming the file and the key; today
# they raise a bare exception (a traceback from `mreaper config`, a crash on reload).


def test_bug_huge_size_is_a_config_error(tmp_path: Path) -> None:
    """parse_size: float('1' * 400) is inf, int(inf) raises OverflowError."""
    path = write(tmp_path, f'[kill]\nmin_rss = "{"1" * 400}"\n')
    with pytest.raises(ConfigError) as e:
        config.load(path, required=True)
    assert (e.value.origin, e.value.key) == (path, "kill.min_rss")


def test_bug_psi_non_ascii_digit_is_a_config_error(tmp_path: Path) -> None:
    """parse_psi: '²'.isdigit() is True but int('²') raises ValueError."""
    path = write(tmp_path, '[psi]\nkill = "full \u00b2 1000000"\n')
    with pytest.raises(ConfigError) as e:
        config.load(path, required=True)
    assert str(e.value) == f"{path}: psi.kill = 'full \u00b2 1000000': {PSI_HELP}"


@pytest.mark.parametrize(("action", "adjust"), [("prefer", -5), ("avoid", 5)])
def test_bug_adjust_against_the_action_is_a_config_error(tmp_path: Path, action: str,
                                                         adjust: int) -> None:
    """_rule: Rule.__post_init__ refuses a prefer rule that lowers the score (and an avoid
    rule that raises it) with a plain ValueError, which _rule does not turn into a
    ConfigError."""
    path = write(tmp_path, f'[[rule]]\naction = "{action}"\nname = "x"\nadjust = {adjust}\n')
    with pytest.raises(ConfigError) as e:
        config.load(path, required=True)
    assert (e.value.origin, e.value.key, e.value.value) == (path, "rule[1].adjust", adjust)


def test_bug_user_with_nul_is_a_config_error(tmp_path: Path) -> None:
    """_uid: pwd.getpwnam('a\\0b') raises ValueError (embedded null byte), not KeyError."""
    path = write(tmp_path, '[[rule]]\naction = "avoid"\nuser = "a\\u0000b"\n')
    with pytest.raises(ConfigError) as e:
        config.load(path, required=True)
    assert str(e.value) == f"{path}: rule[1].user = 'a\\x00b': no such user on this system"


def test_bug_deeply_nested_when_does_not_crash() -> None:
    """parse_when recurses three frames per parenthesis: 400 levels raise RecursionError."""
    text = "(" * 400 + "memory" + ")" * 400
    try:
        when = config.parse_when(text, "o", "detect.when")
    except ConfigError:
        return  # refusing it is fine too
    assert when == (("memory",),)


# --- bugs: to_toml output that does not load back as the same configuration -------------


def test_bug_to_toml_escapes_control_characters(tmp_path: Path) -> None:
    """_toml_value escapes only backslash and quote; a newline (or any control character
    but tab) in a pattern makes a document tomllib refuses."""
    cfg = config.apply(Config(), {"rule": [{"action": "avoid", "cmdline": "a\nb\x01c"}]}, "o")
    loaded = config.load(write(tmp_path, config.to_toml(cfg)), required=True)
    assert rule_facts(loaded) == rule_facts(cfg)


def test_bug_to_toml_keeps_percent_precision(tmp_path: Path) -> None:
    """Threshold.__str__ uses '{:g}', six significant digits: 12.3456789% comes back as
    12.3457%."""
    cfg = config.apply(Config(), {"memory": {"warn": "12.3456789%"}}, "o")
    loaded = config.load(write(tmp_path, config.to_toml(cfg)), required=True)
    assert loaded.memory == cfg.memory


# --- levels take a unit, ASCII digits, and never a level that always holds (issue 11) -------

BARE_SMALL = ('a bare number is ambiguous: write "5%" (5 % of MemTotal) or "5B" (5 bytes); '
              "sizes take a unit: B, K, M, G or T")


@pytest.mark.parametrize(("doc", "message"), [
    ("[memory]\nkill = 5\n", f"memory.kill = 5: {BARE_SMALL}"),
    ('[memory]\nkill = "5"\n', f"memory.kill = '5': {BARE_SMALL}"),
    ('[memory]\nkill = ["5", "1G"]\n', f"memory.kill = ['5', '1G']: {BARE_SMALL}"),
    ("[swap]\nkill = 2\n",
     'swap.kill = 2: a bare number is ambiguous: write "2%" (2 % of SwapTotal) or "2B" '
     "(2 bytes); sizes take a unit: B, K, M, G or T"),
    ("[memory]\nkill = 536870912\n",
     'memory.kill = 536870912: a bare number is ambiguous: write "536870912B" (536870912 '
     'bytes, 512.0 MiB) or a percentage of MemTotal like "5%"; sizes take a unit: B, K, M, '
     "G or T"),
    ('[psi]\ngate = "20"\n',
     "psi.gate = '20': a bare number is ambiguous: write \"20%\" (20 % of MemTotal) or "
     '"20B" (20 bytes); sizes take a unit: B, K, M, G or T'),
    ('[[scope]]\nname = "w"\ncgroup = "w"\nheadroom = { kill = 3 }\n',
     "scope[1].headroom.kill = 3: a bare number is ambiguous: write \"3%\" (3 % of the "
     "cgroup's limit) or \"3B\" (3 bytes); sizes take a unit: B, K, M, G or T"),
])
def test_a_bare_number_level_is_refused_with_both_readings(tmp_path: Path, doc: str,
                                                          message: str) -> None:
    """`kill = 5` was 5 bytes, silently; earlyoom's `-m 5` is 5 %: neither is guessed."""
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        config.load(path, required=True)
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize("value", ["\u0665%", "\uff15%", "5_0%", "1e1%", "\u0665M", "\uff15G",
                                   "\u0665", " 5 0%", "0x10%", "+5%"])
def test_a_level_in_other_than_ascii_digits_is_refused(value: str) -> None:
    """float() reads an Arabic-Indic or fullwidth five, "5_0" and "1e1": a level does not."""
    with pytest.raises(ConfigError) as info:
        config.parse_level(value, "o", "memory.kill")
    assert info.value.allowed == LEVEL_HELP


@pytest.mark.parametrize(("section", "always"), [
    ("memory", "MemAvailable is never above MemTotal"),
    ("swap", "SwapFree is never above SwapTotal")])
@pytest.mark.parametrize("level", ["warn", "term", "kill"])
def test_a_percentage_of_100_is_refused_as_always_holding(tmp_path: Path, section: str,
                                                          always: str, level: str) -> None:
    path = write(tmp_path, f'[{section}]\nwarn = "off"\nterm = "off"\nkill = "off"\n'
                           f'{level} = "100%"\n'.replace(f'{level} = "off"\n', "", 1))
    with pytest.raises(ConfigError) as info:
        config.load(path, required=True)
    assert str(info.value) == (
        f"{path}: {section}.{level} = '100%': 100% would always hold ({always}), leaving the "
        'daemon at this level for good: give a percentage below 100%, or "off"')


def test_headroom_of_100_percent_is_refused_and_a_gate_of_100_percent_is_not() -> None:
    with pytest.raises(ConfigError, match=r"headroom.kill = '100%': 100% would always hold "
                                          r"\(a cgroup's headroom is never above its limit\)"):
        config.apply(Config(), {"scope": [{"name": "w", "cgroup": "w",
                                           "headroom": {"kill": "100%"}}]}, "o")
    # psi.gate = 100 %: the gate always open, PSI always counts: a meaning, not a mistake
    cfg = config.apply(Config(), {"psi": {"gate": "100%"}}, "o")
    assert cfg.psi_gate.bytes_of(GiB) == GiB


def test_levels_at_or_above_this_machines_total_are_refused() -> None:
    """A size is only known too large against MemTotal/SwapTotal, at run start."""
    cfg = config.apply(Config(), {"memory": {"warn": "40G", "term": "off", "kill": "1G"}}, "o")
    config.check_totals(cfg, 64 * GiB, 0)   # a 64 GiB machine: fine
    with pytest.raises(ConfigError) as info:
        config.check_totals(cfg, 16 * GiB, 0)
    assert str(info.value) == (
        "o: memory.warn = '40G': 40.0 GiB is at or above this machine's MemTotal (16.0 GiB): "
        "MemAvailable is never above MemTotal, so the level would always hold and the daemon "
        "would stay at it for good; give a size below MemTotal or a percentage below 100%")
    kill = config.apply(Config(), {"memory": {"warn": "off", "term": "off", "kill": "1G"}}, "o")
    with pytest.raises(ConfigError, match=r"^o: memory.kill = '1G': 1.0 GiB is at or above"):
        config.check_totals(kill, GiB, 0)  # equal: MemAvailable <= MemTotal, always
    # a list: the lower wins, so ["5%", "40G"] is 5 % wherever 40G is more
    listed = config.apply(Config(), {"memory": {"warn": ["10%", "40G"], "term": "off"}}, "o")
    config.check_totals(listed, 16 * GiB, 0)
    swap = config.apply(Config(), {"swap": {"warn": "8G", "term": "off", "kill": "off"}}, "o")
    config.check_totals(swap, 16 * GiB, 0)  # no swap: the swap source is neutral
    with pytest.raises(ConfigError, match=r"swap.warn = '8G': 8.0 GiB is at or above this "
                                          r"machine's SwapTotal \(4.0 GiB\): SwapFree"):
        config.check_totals(swap, 16 * GiB, 4 * GiB)


@given(st.integers(min_value=0, max_value=(1 << 62)),
       st.floats(min_value=0, max_value=99.999, allow_nan=False))
@settings(max_examples=200, deadline=None)
def test_levels_write_back_with_units_and_load_back_equal(size: int, pct: float) -> None:
    """to_toml writes every level with its unit (a bare number would now be refused)."""
    level = config.parse_level([f"{size}B", f"{config._percent_text(pct)}%"], "o", "k")
    written = level.to_toml()
    assert isinstance(written, list) and all(isinstance(w, str) for w in written)
    assert config.parse_level(written, "o", "k") == level
