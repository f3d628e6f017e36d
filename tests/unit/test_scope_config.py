"""Unit tests of [[scope]] in the configuration file: defaults, every key, glob
patterns, the exact error for each kind of bad document, and the round trip through
config.to_toml.

These are pure parsing tests: the documents are written to tmp_path and loaded with
config.load, so every error message carries the real file path.  No cgroup is read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mreaper import config
from mreaper.config import Config, ConfigError, Level, PsiTrigger, ScopeConfig, Threshold

MiB = 1 << 20
GiB = 1 << 30


def load_text(tmp_path: Path, text: str, name: str = "mreaper.toml") -> Config:
    path = tmp_path / name
    path.write_text(text)
    return config.load(str(path), required=True)


def scope_doc(body: str) -> str:
    return "[[scope]]\n" + body + "\n"


# --- defaults and each key ------------------------------------------------------------------


def test_scope_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, scope_doc('cgroup = "system.slice"'))
    assert len(cfg.scopes) == 1
    sc = cfg.scopes[0]
    assert sc == ScopeConfig(name="system.slice", cgroup="system.slice")
    assert sc.when == (("headroom",), ("psi",), ("events",))
    assert sc.unit == "process"
    assert sc.select == "size"
    assert dict(sc.headroom) == {"warn": Level((Threshold(percent=10.0),)), "term": Level(),
                                 "kill": Level((Threshold(percent=3.0),))}
    assert dict(sc.psi) == {"warn": PsiTrigger("some", 300_000, 2_000_000), "term": None,
                            "kill": PsiTrigger("full", 600_000, 2_000_000)}
    assert dict(sc.events) == {"warn": ("high",), "term": (), "kill": ("oom",)}
    # the rest of the configuration is untouched
    assert dataclasses.replace(cfg, scopes=(), origin=Config().origin) == Config()


def test_no_scope_section_means_no_scopes(tmp_path: Path) -> None:
    assert load_text(tmp_path, "").scopes == ()
    assert load_text(tmp_path, "scope = []\n").scopes == ()


def test_every_scope_key(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, scope_doc("""
name = "db"
cgroup = "/system.slice/postgresql.service"
when = "headroom & psi | events"
unit = "cgroup"
select = "growth"
headroom = { warn = ["10%", "2G"], term = "64M", kill = ["2%", "32M"] }
psi = { warn = "off", kill = "some 100000 1000000" }
events = { warn = ["high", "max"], kill = ["oom_kill", "oom_group_kill"] }
"""))
    assert cfg.scopes == (ScopeConfig(
        name="db", cgroup="/system.slice/postgresql.service",
        when=(("headroom", "psi"), ("events",)),
        headroom={"warn": Level((Threshold(percent=10.0), Threshold(size=2 * GiB))),
                  "term": Level((Threshold(size=64 * MiB),)),
                  "kill": Level((Threshold(percent=2.0), Threshold(size=32 * MiB)))},
        psi={"warn": None, "term": None, "kill": PsiTrigger("some", 100_000, 1_000_000)},
        events={"warn": ("high", "max"), "term": (), "kill": ("oom_kill", "oom_group_kill")},
        unit="cgroup", select="growth"),)


def test_partial_tables_keep_the_other_levels(tmp_path: Path) -> None:
    sc = load_text(tmp_path, scope_doc("""
cgroup = "a"
headroom = { kill = "1%" }
psi = { term = "full 500000 2000000" }
events = { term = ["max"] }
""")).scopes[0]
    assert dict(sc.headroom) == {"warn": Level((Threshold(percent=10.0),)), "term": Level(),
                                 "kill": Level((Threshold(percent=1.0),))}
    assert dict(sc.psi) == {"warn": PsiTrigger("some", 300_000, 2_000_000),
                            "term": PsiTrigger("full", 500_000, 2_000_000),
                            "kill": PsiTrigger("full", 600_000, 2_000_000)}
    assert dict(sc.events) == {"warn": ("high",), "term": ("max",), "kill": ("oom",)}


def test_levels_off_and_empty_events(tmp_path: Path) -> None:
    sc = load_text(tmp_path, scope_doc("""
cgroup = "a"
headroom = { warn = "off", term = "off", kill = "off" }
psi = { warn = "off", kill = "off" }
events = { warn = [], kill = [] }
""")).scopes[0]
    assert dict(sc.headroom) == {"warn": Level(), "term": Level(), "kill": Level()}
    assert dict(sc.psi) == {"warn": None, "term": None, "kill": None}
    assert dict(sc.events) == {"warn": (), "term": (), "kill": ()}


@pytest.mark.parametrize(("text", "expected"), [
    ("any", (("headroom",), ("psi",), ("events",))),
    ("all", (("headroom", "psi", "events"),)),
    ("events", (("events",),)),
    ("headroom & (psi | events)", (("headroom", "psi"), ("headroom", "events"))),
    ("  psi|headroom  ", (("psi",), ("headroom",))),
])
def test_scope_when(tmp_path: Path, text: str, expected: tuple[tuple[str, ...], ...]) -> None:
    sc = load_text(tmp_path, scope_doc(f'cgroup = "a"\nwhen = "{text}"')).scopes[0]
    assert sc.when == expected


@pytest.mark.parametrize("unit", ["process", "cgroup"])
@pytest.mark.parametrize("select", ["size", "growth", "pressure"])
def test_unit_and_select(tmp_path: Path, unit: str, select: str) -> None:
    sc = load_text(tmp_path, scope_doc(
        f'cgroup = "a"\nunit = "{unit}"\nselect = "{select}"')).scopes[0]
    assert (sc.unit, sc.select) == (unit, select)


@pytest.mark.parametrize("pattern", [
    "machine.slice/*.scope",
    "/user.slice/user-*.slice",
    "/sys/fs/cgroup/system.slice/*",
    "a/*/b",
])
def test_glob_patterns_with_star_name_themselves(tmp_path: Path, pattern: str) -> None:
    sc = load_text(tmp_path, scope_doc(f'cgroup = "{pattern}"')).scopes[0]
    assert (sc.name, sc.cgroup) == (pattern, pattern)


def test_glob_pattern_with_a_name(tmp_path: Path) -> None:
    sc = load_text(tmp_path, scope_doc('name = "vms"\ncgroup = "machine.slice/machine-[a-z]?*"')
                   ).scopes[0]
    assert (sc.name, sc.cgroup) == ("vms", "machine.slice/machine-[a-z]?*")


@pytest.mark.parametrize("pattern", ["machine.slice/machine-qemu?*.scope", "a/b[0-9]"])
def test_glob_patterns_with_question_mark_or_brackets_load_without_a_name(
        tmp_path: Path, pattern: str) -> None:
    """`?` and `[...]` are glob characters the scope machinery honours (cgroup.resolve,
    scope.scope_name), like `*`.  Without `name`, the name defaults to the pattern, so
    the pattern must be accepted as a name too: a valid cgroup pattern must not be
    refused as a bad `name` the user never wrote."""
    sc = load_text(tmp_path, scope_doc(f'cgroup = "{pattern}"')).scopes[0]
    assert sc.cgroup == pattern


@pytest.mark.parametrize("pattern", [".", "./", "/./"])
def test_cgroup_naming_the_root_through_dot_is_refused(tmp_path: Path, pattern: str) -> None:
    """The root is the machine scope: "/" and "" are refused, and so must be "." and its
    spellings, which cgroup.resolve turns into the cgroup2 mount itself (the root)."""
    path = tmp_path / "mreaper.toml"
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, scope_doc(f'cgroup = "{pattern}"'))
    assert str(info.value) == (
        f"{path}: scope[1].cgroup = {pattern!r}: a cgroup below the root, without '..' "
        "(the root is the machine scope)")


def test_two_scopes_keep_their_order(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, scope_doc('cgroup = "b"') + scope_doc('name = "a"\ncgroup = "b/c"'))
    assert [(s.name, s.cgroup) for s in cfg.scopes] == [("b", "b"), ("a", "b/c")]


def test_name_characters_allowed(tmp_path: Path) -> None:
    name = "A-z_0.9:x/y*" + "n" * 52
    assert len(name) == 64
    sc = load_text(tmp_path, scope_doc(f'name = "{name}"\ncgroup = "a"')).scopes[0]
    assert sc.name == name


# --- bad documents --------------------------------------------------------------------------

CGROUP_HELP = "a cgroup path or glob under the cgroup2 mount"
ROOT_HELP = "a cgroup below the root, without '..' (the root is the machine scope)"
NAME_HELP = "1-128 characters: letters, digits, _ . : / * ? [ ] -"
UNIQUE_HELP = 'scope names must be unique and not "machine"'
KNOWN_SCOPE_KEYS = ("unknown key; known here: name, cgroup, when, headroom, psi, events, unit, "
                    "select")
KNOWN_LEVELS = "unknown key; known here: warn, term, kill"
TABLE_HELP = "a table with warn, term and/or kill"
LEVEL_HELP = ('a percentage like "5%", a size with a unit like "512M", "2G", "1.5GiB" or '
              '"4096B" (binary units K, M, G, T; B for bytes), a list of both (the lower '
              'wins), or "off"')
PSI_HELP = ('"some|full <stall_us> <window_us>" with the window 500000-10000000 us and '
            '0 < stall <= window (e.g. "full 300000 1000000"), or "off"')
EVENTS_HELP = "a list of memory.events counters: low, high, max, oom, oom_kill, oom_group_kill"
WHEN_HELP = ('an expression over headroom, psi and events with & (and), | (or) and '
             'parentheses, e.g. "headroom & psi | events"; or "any" / "all" of the three')

BAD: list[tuple[str, str, str]] = [
    # (id, document, message after "<path>: ")
    ("missing-cgroup", scope_doc('name = "a"'),
     f"scope[1].cgroup: required: {CGROUP_HELP}"),
    ("empty-table", "[[scope]]\n", f"scope[1].cgroup: required: {CGROUP_HELP}"),
    ("cgroup-root", scope_doc('cgroup = "/"'), f"scope[1].cgroup = '/': {ROOT_HELP}"),
    ("cgroup-empty", scope_doc('cgroup = ""'), f"scope[1].cgroup = '': {ROOT_HELP}"),
    ("cgroup-slashes", scope_doc('cgroup = "///"'), f"scope[1].cgroup = '///': {ROOT_HELP}"),
    ("cgroup-dotdot", scope_doc('cgroup = "a/../b"'),
     f"scope[1].cgroup = 'a/../b': {ROOT_HELP}"),
    ("cgroup-dotdot-lead", scope_doc('cgroup = "../etc"'),
     f"scope[1].cgroup = '../etc': {ROOT_HELP}"),
    ("cgroup-int", scope_doc("cgroup = 5"), f"scope[1].cgroup = 5: {CGROUP_HELP}"),
    ("cgroup-list", scope_doc('cgroup = ["a"]'), f"scope[1].cgroup = ['a']: {CGROUP_HELP}"),
    ("name-space", scope_doc('name = "a b"\ncgroup = "a"'), f"scope[1].name = 'a b': {NAME_HELP}"),
    ("name-empty", scope_doc('name = ""\ncgroup = "a"'), f"scope[1].name = '': {NAME_HELP}"),
    ("name-at", scope_doc('name = "x@y"\ncgroup = "a"'), f"scope[1].name = 'x@y': {NAME_HELP}"),
    ("name-newline", scope_doc('name = "a\\nb"\ncgroup = "a"'),
     f"scope[1].name = 'a\\nb': {NAME_HELP}"),
    ("name-too-long", scope_doc(f'name = "{"n" * 129}"\ncgroup = "a"'),
     f"scope[1].name = '{'n' * 129}': {NAME_HELP}"),
    ("name-int", scope_doc('name = 3\ncgroup = "a"'),
     "scope[1].name = 3: a short name for logs and metrics"),
    ("name-duplicate",
     scope_doc('name = "a"\ncgroup = "x"') + scope_doc('name = "a"\ncgroup = "y"'),
     f"scope.name = 'a': {UNIQUE_HELP}"),
    ("name-duplicate-default", scope_doc('cgroup = "x"') + scope_doc('cgroup = "x"'),
     f"scope.name = 'x': {UNIQUE_HELP}"),
    ("name-machine", scope_doc('name = "machine"\ncgroup = "a"'),
     f"scope.name = 'machine': {UNIQUE_HELP}"),
    ("unknown-key", scope_doc('cgroup = "a"\nlimit = 5'),
     f"scope[1].limit = 5: {KNOWN_SCOPE_KEYS}"),
    ("unknown-key-before-missing-cgroup", scope_doc("path = 'a'"),
     f"scope[1].path = 'a': {KNOWN_SCOPE_KEYS}"),
    ("headroom-not-table", scope_doc('cgroup = "a"\nheadroom = "10%"'),
     f"scope[1].headroom = '10%': {TABLE_HELP}"),
    ("psi-not-table", scope_doc('cgroup = "a"\npsi = "off"'),
     f"scope[1].psi = 'off': {TABLE_HELP}"),
    ("events-not-table", scope_doc('cgroup = "a"\nevents = ["oom"]'),
     f"scope[1].events = ['oom']: {TABLE_HELP}"),
    ("headroom-unknown-level", scope_doc('cgroup = "a"\nheadroom = { panic = "1%" }'),
     f"scope[1].headroom.panic = '1%': {KNOWN_LEVELS}"),
    ("psi-unknown-level", scope_doc('cgroup = "a"\npsi = { high = "off" }'),
     f"scope[1].psi.high = 'off': {KNOWN_LEVELS}"),
    ("events-unknown-level", scope_doc('cgroup = "a"\nevents = { critical = [] }'),
     f"scope[1].events.critical = []: {KNOWN_LEVELS}"),
    ("headroom-percent-range", scope_doc('cgroup = "a"\nheadroom = { warn = "110%" }'),
     "scope[1].headroom.warn = '110%': a percentage must be within 0-100%"),
    ("headroom-words", scope_doc('cgroup = "a"\nheadroom = { kill = "lots" }'),
     f"scope[1].headroom.kill = 'lots': {LEVEL_HELP}"),
    ("headroom-negative", scope_doc('cgroup = "a"\nheadroom = { kill = -1 }'),
     f"scope[1].headroom.kill = -1: {LEVEL_HELP}"),
    ("headroom-bool", scope_doc('cgroup = "a"\nheadroom = { kill = true }'),
     f"scope[1].headroom.kill = True: {LEVEL_HELP}"),
    ("headroom-kill-above-warn", scope_doc('cgroup = "a"\nheadroom = { kill = "20%" }'),
     "scope[1].headroom.kill = '20%': must be at or below scope[1].headroom.warn (10%)"),
    ("headroom-sizes-out-of-order",
     scope_doc('cgroup = "a"\nheadroom = { warn = "1G", kill = "2G" }'),
     "scope[1].headroom.kill = '2G': must be at or below scope[1].headroom.warn (1.0 GiB)"),
    ("headroom-kill-above-term", scope_doc('cgroup = "a"\nheadroom = { term = "2%" }'),
     "scope[1].headroom.term = '2%': must be at or above scope[1].headroom.kill (3%)"),
    ("headroom-size-above-percent",
     scope_doc('cgroup = "a"\nheadroom = { kill = "200G" }'),
     "scope[1].headroom.kill = '200G': must be at or below scope[1].headroom.warn (10%): on a "
     "1 GiB total it is 200.0 GiB against 102.4 MiB"),
    ("psi-window-too-short", scope_doc('cgroup = "a"\npsi = { warn = "some 100 100" }'),
     f"scope[1].psi.warn = 'some 100 100': {PSI_HELP}"),
    ("psi-stall-above-window", scope_doc('cgroup = "a"\npsi = { kill = "full 3000000 2000000" }'),
     f"scope[1].psi.kill = 'full 3000000 2000000': {PSI_HELP}"),
    ("psi-kind", scope_doc('cgroup = "a"\npsi = { kill = "most 100000 1000000" }'),
     f"scope[1].psi.kill = 'most 100000 1000000': {PSI_HELP}"),
    ("psi-int", scope_doc('cgroup = "a"\npsi = { kill = 1 }'),
     f"scope[1].psi.kill = 1: {PSI_HELP}"),
    ("events-string", scope_doc('cgroup = "a"\nevents = { warn = "high" }'),
     f"scope[1].events.warn = 'high': {EVENTS_HELP}"),
    ("events-unknown-counter", scope_doc('cgroup = "a"\nevents = { kill = ["oom", "oom_kills"] }'),
     f"scope[1].events.kill = ['oom', 'oom_kills']: {EVENTS_HELP}"),
    ("events-int-counter", scope_doc('cgroup = "a"\nevents = { kill = [1] }'),
     f"scope[1].events.kill = [1]: {EVENTS_HELP}"),
    ("unit", scope_doc('cgroup = "a"\nunit = "pod"'),
     "scope[1].unit = 'pod': one of \"process\", \"cgroup\""),
    ("select", scope_doc('cgroup = "a"\nselect = "rss"'),
     "scope[1].select = 'rss': one of \"size\", \"growth\", \"pressure\""),
    ("when-machine-source", scope_doc('cgroup = "a"\nwhen = "memory"'),
     f"scope[1].when = 'memory': {WHEN_HELP}"),
    ("when-swap-in-expr", scope_doc('cgroup = "a"\nwhen = "headroom | swap"'),
     f"scope[1].when = 'headroom | swap': {WHEN_HELP}"),
    ("when-dangling", scope_doc('cgroup = "a"\nwhen = "headroom &"'),
     f"scope[1].when = 'headroom &': {WHEN_HELP}"),
    ("when-unclosed", scope_doc('cgroup = "a"\nwhen = "(headroom | psi"'),
     f"scope[1].when = '(headroom | psi': {WHEN_HELP}"),
    ("when-empty", scope_doc('cgroup = "a"\nwhen = ""'), f"scope[1].when = '': {WHEN_HELP}"),
    ("when-list", scope_doc('cgroup = "a"\nwhen = ["headroom"]'),
     f"scope[1].when = ['headroom']: {WHEN_HELP}"),
    ("scope-string", 'scope = "a"\n', "scope = 'a': an array of tables ([[scope]])"),
    ("scope-table", 'scope = { cgroup = "a" }\n',
     "scope = {'cgroup': 'a'}: an array of tables ([[scope]])"),
    ("scope-section", '[scope]\ncgroup = "a"\n',
     "scope = {'cgroup': 'a'}: an array of tables ([[scope]])"),
    ("scope-array-of-int", "scope = [1]\n", "scope[1] = 1: a table with at least cgroup"),
    ("second-scope-bad", scope_doc('cgroup = "a"') + scope_doc('cgroup = "b"\nunit = "x"'),
     "scope[2].unit = 'x': one of \"process\", \"cgroup\""),
]


def test_bad_table_is_large_enough() -> None:
    assert len(BAD) >= 25
    assert len({case_id for case_id, _, _ in BAD}) == len(BAD)


@pytest.mark.parametrize(("document", "message"), [(d, m) for _, d, m in BAD],
                         ids=[case_id for case_id, _, _ in BAD])
def test_bad_scope_documents(tmp_path: Path, document: str, message: str) -> None:
    path = tmp_path / "mreaper.toml"
    path.write_text(document)
    with pytest.raises(ConfigError) as info:
        config.load(str(path), required=True)
    assert str(info.value) == f"{path}: {message}"
    assert info.value.origin == str(path)


# --- round trip -------------------------------------------------------------------------------


def test_two_scopes_round_trip_through_to_toml(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, """
[memory]
kill = "2%"

[[scope]]
name = "svc"
cgroup = "system.slice/*.service"
when = "headroom & psi | events"
unit = "cgroup"
select = "pressure"
headroom = { warn = "1.5G", term = "off", kill = ["2.5%", "64M"] }
psi = { warn = "off", term = "some 200000 2000000", kill = "full 500000 1000000" }
events = { warn = ["high", "max"], term = [], kill = ["oom", "oom_kill", "oom_group_kill"] }

[[scope]]
cgroup = "/user.slice/user-1000.slice"
when = "all"
""")
    assert len(cfg.scopes) == 2
    text = config.to_toml(cfg)
    again = load_text(tmp_path, text, "again.toml")
    assert again.scopes == cfg.scopes
    assert dataclasses.replace(again, origin=cfg.origin) == cfg
    # and once more: the written form is a fixed point
    assert config.to_toml(dataclasses.replace(again, origin=cfg.origin)) == text


def test_default_scope_round_trips(tmp_path: Path) -> None:
    cfg = Config(scopes=(ScopeConfig(name="a", cgroup="a"),
                         ScopeConfig(name="b", cgroup="/b/*", unit="cgroup")))
    again = load_text(tmp_path, config.to_toml(cfg))
    assert again.scopes == cfg.scopes
