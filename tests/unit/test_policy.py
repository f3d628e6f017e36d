"""Unit tests of mreaper.policy: rules, ranking, choice and explanation on hand-built
candidates, and scan() on fixture /proc trees."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mreaper import policy
from mreaper.linux.procfs import PF_KTHREAD
from mreaper.policy import Action, Candidate, Ranked, Rule, SortBy, choose, explain_table, rank

MiB = 1 << 20


def cand(pid: int, *, name: str = "proc", cmdline: tuple[str, ...] = (), exe: str = "",
         uid: int = 1000, cgroup: str = "/user.slice", rss: int = 100 * MiB, swap: int = 0,
         oom_score: int = 500, oom_score_adj: int = 0, starttime: int = 1000) -> Candidate:
    return Candidate(pid=pid, starttime=starttime, name=name, cmdline=cmdline or (name,),
                     exe=exe or f"/usr/bin/{name}", uid=uid, cgroup=cgroup, rss=rss, swap=swap,
                     oom_score=oom_score, oom_score_adj=oom_score_adj)


def by_pid(ranked: Sequence[Ranked]) -> dict[int, Ranked]:
    return {r.candidate.pid: r for r in ranked}


def pids(ranked: Sequence[Ranked]) -> list[int]:
    return [r.candidate.pid for r in ranked]


# --- rules ---------------------------------------------------------------------------------


def test_rule_without_matcher_is_invalid() -> None:
    with pytest.raises(ValueError, match="without a matcher"):
        Rule(Action.PREFER)
    with pytest.raises(ValueError, match="without a matcher"):
        Rule(Action.PROTECT, adjust=10, label="x")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"action": Action.PREFER, "name": re.compile("x"), "adjust": -5}, "prefer rule with adjust"),
    ({"action": Action.AVOID, "name": re.compile("x"), "adjust": 5}, "avoid rule with adjust"),
    ({"action": Action.AVOID, "uid": -1}, "uid=-1"),
    ({"action": Action.AVOID, "uid": True}, "uid=True"),
    ({"action": "avoid", "uid": 0}, "rule action"),
    ({"action": Action.AVOID, "name": 42}, "must be a regular expression"),
    ({"action": Action.AVOID, "name": "(a+)+$"}, "inside a repeat (+)"),
])
def test_rule_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Rule(**kwargs)  # type: ignore[arg-type]


def test_rule_uid_zero_is_a_matcher() -> None:
    rule = Rule(Action.AVOID, uid=0)
    assert rule.matches(cand(1, uid=0))
    assert not rule.matches(cand(1, uid=1000))


def test_rule_describe_and_default_adjust() -> None:
    assert Rule(Action.PREFER, name=re.compile("chrome")).effective_adjust == 300
    assert Rule(Action.AVOID, name=re.compile("x")).effective_adjust == -300
    assert Rule(Action.AVOID, name=re.compile("x"), adjust=-50).effective_adjust == -50
    assert Rule(Action.PROTECT, name=re.compile("x"), adjust=50).effective_adjust == 0
    rule = Rule(Action.AVOID, name=re.compile("^Xorg$"), uid=0, adjust=-500)
    assert rule.describe() == "avoid name=^Xorg$ uid=0 adjust=-500"


# --- rank: each matcher, each action --------------------------------------------------------


MATCHERS = [
    ("name", re.compile("^firefox$"), {"name": "firefox"}, {"name": "firefox-bin"}),
    ("cmdline", re.compile(r"--type=renderer\b"),
     {"cmdline": ("chrome", "--type=renderer", "--x")}, {"cmdline": ("chrome", "--type=gpu")}),
    ("exe", re.compile(r"^/opt/app/"), {"exe": "/opt/app/bin/run"}, {"exe": "/usr/opt/app/x"}),
    ("cgroup", re.compile(r"/batch\.slice/"), {"cgroup": "/batch.slice/job1.scope"},
     {"cgroup": "/user.slice/batch.scope"}),
    ("uid", 1234, {"uid": 1234}, {"uid": 12345}),
]


@pytest.mark.parametrize(("field", "matcher", "hit", "miss"), MATCHERS,
                         ids=[m[0] for m in MATCHERS])
@pytest.mark.parametrize(("action", "expected"), [
    (Action.PREFER, 800), (Action.AVOID, 200), (Action.PROTECT, None)])
def test_each_matcher_each_action(field: str, matcher: object, hit: dict[str, object],
                                  miss: dict[str, object], *, action: Action,
                                  expected: int | None) -> None:
    rule = Rule(action, **{field: matcher})  # type: ignore[arg-type]
    ranked = by_pid(rank([cand(1, **hit), cand(2, **miss)], [rule]))  # type: ignore[arg-type]
    label = f"rule 1 ({rule.describe()})"
    assert ranked[2].score == 500 and ranked[2].touched_by == () and ranked[2].excluded is None
    if action is Action.PROTECT:
        assert ranked[1].excluded == f"protected by {label}"
        assert ranked[1].touched_by == (f"{label}: protect",)
        assert ranked[1].score == 500
    else:
        assert ranked[1].excluded is None
        assert ranked[1].score == expected
        sign = "+300" if action is Action.PREFER else "-300"
        assert ranked[1].touched_by == (f"{label}: {sign}",)


def test_cmdline_matches_the_joined_argv() -> None:
    rule = Rule(Action.PREFER, cmdline=re.compile(r"^python3 -m http\.server$"))
    assert rule.matches(cand(1, cmdline=("python3", "-m", "http.server")))
    assert not rule.matches(cand(1, cmdline=("python3", "-m", "http.server", "8080")))


def test_combined_matchers_need_all() -> None:
    rule = Rule(Action.PREFER, name=re.compile("^java$"), uid=1000,
                cgroup=re.compile(r"^/user\.slice"))
    ranked = by_pid(rank([
        cand(1, name="java", uid=1000, cgroup="/user.slice/a"),
        cand(2, name="java", uid=0, cgroup="/user.slice/a"),
        cand(3, name="java", uid=1000, cgroup="/system.slice/a"),
        cand(4, name="javac", uid=1000, cgroup="/user.slice/a"),
    ], [rule]))
    assert [ranked[p].score for p in (1, 2, 3, 4)] == [800, 500, 500, 500]


def test_explicit_adjust_and_stacking() -> None:
    rules = [Rule(Action.PREFER, name=re.compile("^a"), adjust=50),
             Rule(Action.AVOID, uid=1000, adjust=-20, label="my avoid"),
             Rule(Action.PREFER, exe=re.compile("bin"))]
    r = by_pid(rank([cand(1, name="abc", uid=1000)], rules))[1]
    assert r.score == 500 + 50 - 20 + 300
    assert r.touched_by == ("rule 1 (prefer name=^a adjust=+50): +50", "my avoid: -20",
                            "rule 3 (prefer exe=bin): +300")


def test_protect_wins_over_prefer() -> None:
    rules = [Rule(Action.PREFER, name=re.compile("sshd"), adjust=2000),
             Rule(Action.PROTECT, name=re.compile("^sshd$"), label="keep ssh")]
    ranked = rank([cand(1, name="sshd"), cand(2, name="other", oom_score=1)], rules)
    assert pids(ranked) == [2, 1]
    assert ranked[1].excluded == "protected by keep ssh"
    assert ranked[1].score == 2500
    assert choose(ranked) is ranked[0]


def test_oom_score_adj_minus_1000_excluded() -> None:
    ranked = rank([cand(1, oom_score=0, oom_score_adj=-1000), cand(2, oom_score=0)], [])
    assert pids(ranked) == [2, 1]
    assert ranked[1].excluded == "oom_score_adj -1000"
    assert by_pid(rank([cand(3, oom_score_adj=-999)], []))[3].excluded is None


def test_min_rss() -> None:
    ranked = by_pid(rank([cand(1, rss=12 * MiB, oom_score=900), cand(2, rss=64 * MiB)], [],
                         min_rss=64 * MiB))
    assert ranked[1].excluded == "rss 12.0 MiB below min_rss 64.0 MiB"
    assert ranked[2].excluded is None  # equal to the minimum is enough
    with pytest.raises(ValueError, match="min_rss"):
        rank([], [], min_rss=-1)


@pytest.mark.parametrize(("scope", "cgroup", "inside"), [
    ("/a/b", "/a/b", True),
    ("/a/b", "/a/b/c", True),
    ("/a/b", "/a/b/c/d.scope", True),
    ("/a/b", "/a/bc", False),
    ("/a/b", "/a/bc/d", False),
    ("/a/b", "/a", False),
    ("/a/b", "/", False),
    ("/a/b", "", False),
    ("/a/b/", "/a/b/c", True),
    ("/a/b/", "/a/bc", False),
    ("/", "/anything/at/all", True),
    ("/", "/", True),
    ("/", "", False),
])
def test_scope_cgroup_on_slash_boundaries(scope: str, cgroup: str, inside: bool) -> None:
    r = rank([cand(1, cgroup=cgroup)], [], scope_cgroup=scope)[0]
    if inside:
        assert r.excluded is None
    else:
        assert r.excluded == f"cgroup {cgroup or '(none)'} outside scope {scope}"


def test_scope_cgroup_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="scope_cgroup"):
        rank([], [], scope_cgroup="system.slice")


def test_several_exclusions_are_all_said() -> None:
    rules = [Rule(Action.PROTECT, name=re.compile("x"), label="rule 1")]
    r = rank([cand(1, name="x", rss=MiB, oom_score_adj=-1000, cgroup="/o")], rules,
             min_rss=2 * MiB, scope_cgroup="/s")[0]
    assert r.excluded == ("protected by rule 1; oom_score_adj -1000; cgroup /o outside scope /s; "
                          "rss 1.0 MiB below min_rss 2.0 MiB")


def test_ties_larger_rss_then_lower_pid() -> None:
    ranked = rank([cand(7, rss=10 * MiB), cand(5, rss=10 * MiB), cand(9, rss=20 * MiB),
                   cand(3, rss=5 * MiB, oom_score=501)], [])
    assert pids(ranked) == [3, 9, 5, 7]


def test_excluded_after_in_the_same_order() -> None:
    protect = Rule(Action.PROTECT, uid=0)
    ranked = rank([cand(1, uid=0, oom_score=10), cand(2, uid=0, oom_score=900),
                   cand(3, oom_score=5), cand(4, uid=0, oom_score=900, rss=200 * MiB)], [protect])
    assert pids(ranked) == [3, 4, 2, 1]
    assert [r.excluded is None for r in ranked] == [True, False, False, False]


def test_rss_mode() -> None:
    candidates = [cand(1, rss=1000 * MiB + 123, oom_score=10),
                  cand(2, rss=200 * MiB, oom_score=1900, oom_score_adj=1000),
                  cand(3, rss=900 * MiB, name="big")]
    ranked = rank(candidates, [Rule(Action.PREFER, name=re.compile("^big$"), adjust=150)],
                  sort_by=SortBy.RSS)
    assert [(r.candidate.pid, r.score) for r in ranked] == [(3, 1050), (1, 1000), (2, 200)]


def test_choose() -> None:
    assert choose([]) is None
    protect = Rule(Action.PROTECT, uid=0)
    assert choose(rank([cand(1, uid=0)], [protect])) is None
    ranked = rank([cand(1, uid=0, oom_score=999), cand(2, oom_score=3)], [protect])
    chosen = choose(ranked)
    assert chosen is not None and chosen.candidate.pid == 2


def test_rank_is_pure() -> None:
    candidates = [cand(2), cand(1)]
    before = list(candidates)
    assert rank(candidates, []) == rank(candidates, [])
    assert candidates == before


# --- property: what any ranking must be ------------------------------------------------------

_PATTERNS = ["a", "^b", "c$", "x|y", ".", "^$"]

candidates_st = st.lists(st.builds(
    Candidate,
    pid=st.integers(1, 50), starttime=st.integers(0, 10),
    name=st.text("abcxy\n", max_size=4),
    cmdline=st.lists(st.text("abcxy ", max_size=4), max_size=3).map(tuple),
    exe=st.text("abcxy/", max_size=5), uid=st.integers(0, 3),
    cgroup=st.sampled_from(["", "/", "/a", "/a/b", "/a/bc", "/x/a/b"]),
    rss=st.integers(0, 4 * MiB), swap=st.integers(0, MiB),
    oom_score=st.integers(0, 2000), oom_score_adj=st.sampled_from([-1000, -999, 0, 500, 1000]),
), max_size=12)

rules_st = st.lists(st.builds(
    Rule,
    action=st.sampled_from(Action),
    name=st.sampled_from(_PATTERNS).map(re.compile),
    cmdline=st.none() | st.sampled_from(_PATTERNS).map(re.compile),
    exe=st.none() | st.sampled_from(_PATTERNS).map(re.compile),
    cgroup=st.none() | st.sampled_from(["^/a", "b$"]).map(re.compile),
    uid=st.none() | st.integers(0, 3),
    adjust=st.just(0),
), max_size=5)


@settings(max_examples=300, deadline=None)
@given(candidates=candidates_st, rules=rules_st, sort_by=st.sampled_from(SortBy),
       min_rss=st.sampled_from([0, MiB, 3 * MiB]),
       scope=st.sampled_from([None, "/", "/a", "/a/b"]))
def test_rank_properties(candidates: list[Candidate], rules: list[Rule], sort_by: SortBy,
                         min_rss: int, scope: str | None) -> None:
    ranked = rank(candidates, rules, sort_by=sort_by, min_rss=min_rss, scope_cgroup=scope)
    # a permutation of the input
    assert sorted(map(repr, (r.candidate for r in ranked))) == sorted(map(repr, candidates))
    flags = [r.excluded is None for r in ranked]
    # eligible before excluded
    assert flags == sorted(flags, reverse=True)
    eligible = [r for r in ranked if r.excluded is None]
    # eligible sorted by score descending, deterministic tie-break
    keys = [(-r.score, -r.candidate.rss, r.candidate.pid) for r in eligible]
    assert keys == sorted(keys)
    for r in ranked:
        c = r.candidate
        # protect always excluded; so is oom_score_adj -1000
        if any(rule.action is Action.PROTECT and rule.matches(c) for rule in rules):
            assert r.excluded is not None and "protected by" in r.excluded
        if c.oom_score_adj == -1000:
            assert r.excluded is not None
        base = c.oom_score if sort_by is SortBy.OOM_SCORE else c.rss // MiB
        assert r.score == base + sum(rule.effective_adjust for rule in rules if rule.matches(c))
    chosen = choose(ranked)
    assert chosen is (eligible[0] if eligible else None)
    table = explain_table(ranked, limit=None)
    assert len(table.splitlines()) == 1 + max(len(ranked), 1)


# --- explain ---------------------------------------------------------------------------------


def test_explain_table_lines_and_columns() -> None:
    rules = [Rule(Action.PREFER, name=re.compile("chrome")),
             Rule(Action.PROTECT, name=re.compile("^sshd$"))]
    ranked = rank([cand(10, name="chrome", rss=300 * MiB, oom_score=600),
                   cand(20, name="sshd", rss=5 * MiB, oom_score=1),
                   cand(30, name="bash", rss=4 * MiB, oom_score=2, oom_score_adj=-5)], rules)
    lines = explain_table(ranked).splitlines()
    assert lines[0].split() == ["#", "PID", "NAME", "RSS", "OOM_SCORE", "ADJ", "SCORE",
                                "RULES", "/", "EXCLUDED"]
    assert lines[1].split()[:8] == ["1", "10", "chrome", "300.0", "MiB", "600", "0", "900"]
    assert lines[1].endswith("rule 1 (prefer name=chrome): +300")
    assert lines[2].split()[:3] == ["2", "30", "bash"]
    assert lines[2].split()[6:8] == ["-5", "2"]
    assert lines[3].split()[:3] == ["-", "20", "sshd"]
    assert lines[3].endswith("rule 2 (protect name=^sshd$): protect; "
                             "excluded: protected by rule 2 (protect name=^sshd$)")
    assert len(lines) == 4


def test_explain_table_escapes_names() -> None:
    hostile = ["foo) Z (bar", "a\nb", "tab\there", "esc\x1b[2Jx", "cr\rx", "ls\u2028x",
               "\\xff\\xfe"]
    ranked = rank([cand(i + 1, name=n) for i, n in enumerate(hostile)],
                  [Rule(Action.AVOID, name=re.compile("\n"), label="rule\nwith newline")])
    table = explain_table(ranked, limit=None)
    lines = table.splitlines()
    assert len(lines) == 1 + len(hostile)
    assert "\x1b" not in table and "\r" not in table and "\t" not in table
    assert "a\\nb" in table and "esc\\x1b[2Jx" in table and "ls\\u2028x" in table
    assert "foo) Z (bar" in table and "tab\\there" in table and "\\xff\\xfe" in table
    assert "rule\\nwith newline: -300" in table


def test_explain_table_limit() -> None:
    ranked = rank([*[cand(i, oom_score=i) for i in range(1, 6)], cand(9, uid=0)],
                  [Rule(Action.PROTECT, uid=0)])
    lines = explain_table(ranked, limit=2).splitlines()
    assert [ln.split()[1] for ln in lines[1:3]] == ["5", "4"]
    assert lines[3] == "... 4 more not shown (3 eligible, 1 excluded)"
    assert len(explain_table(ranked, limit=None).splitlines()) == 7
    assert explain_table(ranked, limit=0).splitlines()[1] == \
        "... 6 more not shown (5 eligible, 1 excluded)"
    assert explain_table([]).splitlines()[1] == "(no candidates)"
    with pytest.raises(ValueError, match="limit"):
        explain_table(ranked, limit=-1)


# --- scan on fixture trees ---------------------------------------------------------------------
# Why fixture trees: this host cannot produce most of these cases on demand (a comm with
# ") Z (" and a newline, a zombie, a kernel thread with a given flag, a process vanishing
# between two reads, a garbage stat file), and the real ones race.  The fake /proc is
# built in code, so every case sits next to the test that needs it.

BASE = 10_000_000  # above any pid_max (2^22), so never our own or our parent's PID


def write_proc(root: Path, pid: int, *, comm: bytes = b"proc", state: str = "S",
               ppid: int = 100, flags: int = 0x400100, starttime: int = 4242,
               status: bytes | None = None, name: bytes | None = None, tgid: int | None = None,
               uid: int = 1000, rss_kb: int | None = 2048, swap_kb: int = 0,
               cmdline: bytes | None = None, cgroup: bytes = b"0::/user.slice/app.scope\n",
               oom_score: bytes = b"667\n", oom_score_adj: bytes = b"0\n",
               exe: bytes | None = b"/usr/bin/proc", omit: Sequence[str] = ()) -> Path:
    d = root / str(pid)
    d.mkdir()
    # fields 3..52 of /proc/<pid>/stat; rest[N - 3] is field N
    rest = ["0"] * 50
    rest[0], rest[1], rest[6], rest[19] = state, str(ppid), str(flags), str(starttime)
    files: dict[str, bytes] = {
        "stat": f"{pid} (".encode() + comm + b") " + " ".join(rest).encode() + b"\n",
        "cmdline": cmdline if cmdline is not None else comm + b"\0",
        "cgroup": cgroup,
        "oom_score": oom_score,
        "oom_score_adj": oom_score_adj,
        # sizes in 4 KiB pages: total, resident, shared, text, 0, data, 0
        "statm": f"2250 {(rss_kb or 0) // 4} 0 1 0 100 0\n".encode(),
    }
    if status is None:
        vm = (b"" if rss_kb is None else
              f"VmPeak:\t  9000 kB\nVmRSS:\t{rss_kb:8d} kB\nRssAnon:\t{rss_kb:8d} kB\n"
              f"RssFile:\t       0 kB\nRssShmem:\t       0 kB\nVmSwap:\t{swap_kb:8d} kB\n"
              .encode())
        the_name = name if name is not None else comm.replace(b"\\", b"\\\\").replace(b"\n",
                                                                                        b"\\n")
        status = (b"Name:\t" + the_name + b"\nUmask:\t0022\nState:\t" + state.encode() +
                  f" (x)\nTgid:\t{tgid if tgid is not None else pid}\nPid:\t{pid}\n"
                  f"PPid:\t{ppid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n".encode() + vm +
                  b"Threads:\t1\n")
    files["status"] = status
    for fname, content in files.items():
        if fname not in omit:
            (d / fname).write_bytes(content)
    if exe is not None and "exe" not in omit:
        os.symlink(exe, d / "exe")
    return d


def scan_tree(root: Path) -> tuple[dict[int, Candidate], list[str]]:
    candidates, warnings = policy.scan(str(root))
    found = {c.pid: c for c in candidates}
    assert len(found) == len(candidates)
    return found, warnings


def test_scan_plain_process(tmp_path: Path) -> None:
    write_proc(tmp_path, BASE, comm=b"worker", cmdline=b"/usr/bin/worker\0--jobs\x004\0",
               uid=1001, rss_kb=4096, swap_kb=512, oom_score=b"701\n",
               oom_score_adj=b"200\n", exe=b"/usr/bin/worker", starttime=98765)
    (tmp_path / "self").symlink_to(str(BASE))
    (tmp_path / "meminfo").write_text("MemTotal: 1 kB\n")
    found, warnings = scan_tree(tmp_path)
    assert warnings == []
    assert found == {BASE: Candidate(
        pid=BASE, starttime=98765, name="worker", cmdline=("/usr/bin/worker", "--jobs", "4"),
        exe="/usr/bin/worker", uid=1001, cgroup="/user.slice/app.scope", rss=4096 * 1024,
        swap=512 * 1024, oom_score=701, oom_score_adj=200, ppid=100)}


def test_scan_hostile_names(tmp_path: Path) -> None:
    write_proc(tmp_path, BASE + 1, comm=b"foo) Z (bar", starttime=111)
    write_proc(tmp_path, BASE + 2, comm=b"a b\nc) R (d", starttime=222,
               cmdline=b"a b\nc) R (d\0arg with space\0")
    write_proc(tmp_path, BASE + 3, comm=b"bad\xff\xfeutf", starttime=333,
               cmdline=b"/bin/bad\xff\0--opt=\xc3\x28\0", exe=b"/opt/\xffdir/bin")
    found, warnings = scan_tree(tmp_path)
    assert warnings == []
    # ") Z (" in comm must not read as a zombie, nor shift the later fields
    assert found[BASE + 1].name == "foo) Z (bar"
    assert found[BASE + 1].starttime == 111
    # status escapes the newline: one name, one line
    assert found[BASE + 2].name == "a b\\nc) R (d"
    assert found[BASE + 2].starttime == 222
    assert found[BASE + 2].cmdline == ("a b\nc) R (d", "arg with space")
    assert found[BASE + 3].name == "bad\\xff\\xfeutf"
    assert found[BASE + 3].cmdline == ("/bin/bad\\xff", "--opt=\\xc3(")
    assert found[BASE + 3].exe == "/opt/\\xffdir/bin"
    table = explain_table(rank(list(found.values()), []))
    assert len(table.splitlines()) == 4


def test_scan_skips_what_is_never_a_victim(tmp_path: Path) -> None:
    write_proc(tmp_path, 1, comm=b"systemd", ppid=0)
    write_proc(tmp_path, 2, comm=b"kthreadd", ppid=0, flags=PF_KTHREAD | 0x40, rss_kb=None,
               cmdline=b"", exe=None)
    # a kernel thread known by its flag alone (ppid not 2), even if it claims memory
    write_proc(tmp_path, BASE + 1, comm=b"kworker/0:1", ppid=7, flags=PF_KTHREAD, cmdline=b"")
    write_proc(tmp_path, os.getpid(), comm=b"mreaper")
    if os.getppid() > 2:
        write_proc(tmp_path, os.getppid(), comm=b"parent")
    # a thread: its Tgid is another process
    write_proc(tmp_path, BASE + 2, comm=b"thread", tgid=BASE + 9)
    # a zombie: state Z, no Vm lines, empty cmdline
    write_proc(tmp_path, BASE + 3, comm=b"zombie", state="Z", rss_kb=None, cmdline=b"",
               exe=None)
    # past exit_mm but not yet a zombie: no Vm lines
    write_proc(tmp_path, BASE + 4, comm=b"exiting", state="R", rss_kb=None)
    # vanished mid-scan: stat was there, status is gone
    write_proc(tmp_path, BASE + 5, comm=b"vanished", omit=["status", "cmdline", "oom_score"])
    # vanished later, between status and oom_score
    write_proc(tmp_path, BASE + 6, comm=b"vanished2", omit=["oom_score", "oom_score_adj"])
    write_proc(tmp_path, BASE + 7, comm=b"keeper")
    found, warnings = scan_tree(tmp_path)
    assert warnings == []
    assert sorted(found) == [BASE + 7]


def test_scan_keeps_oom_score_adj_minus_1000(tmp_path: Path) -> None:
    write_proc(tmp_path, BASE, comm=b"sshd", oom_score=b"0\n", oom_score_adj=b"-1000\n")
    found, _ = scan_tree(tmp_path)
    assert found[BASE].oom_score_adj == -1000
    r = rank(list(found.values()), [])[0]
    assert r.excluded == "oom_score_adj -1000"
    assert choose([r]) is None


def test_scan_fully_swapped_out_process_is_kept(tmp_path: Path) -> None:
    write_proc(tmp_path, BASE, comm=b"swapped", rss_kb=0, swap_kb=8192)
    found, _ = scan_tree(tmp_path)
    assert found[BASE].rss == 0 and found[BASE].swap == 8192 * 1024


def test_scan_missing_exe_and_v1_only_cgroup(tmp_path: Path) -> None:
    write_proc(tmp_path, BASE, exe=None, cgroup=b"4:memory:/foo\n1:name=systemd:/\n")
    found, warnings = scan_tree(tmp_path)
    assert warnings == []
    assert found[BASE].exe == ""
    assert found[BASE].cgroup == ""


def test_scan_warns_on_garbage_naming_the_file(tmp_path: Path) -> None:
    write_proc(tmp_path, BASE + 1, omit=["stat"])
    (tmp_path / str(BASE + 1) / "stat").write_bytes(b"garbage without a comm\n")
    write_proc(tmp_path, BASE + 2, omit=["stat"])
    (tmp_path / str(BASE + 2) / "stat").write_bytes(f"{BASE + 2} (x) S 1\n".encode())
    write_proc(tmp_path, BASE + 3, status=b"Name:\tnouid\nTgid:\t1\nVmRSS:\t 4 kB\n")
    write_proc(tmp_path, BASE + 4, oom_score=b"lots\n")
    write_proc(tmp_path, BASE + 5, status=b"Name:\tx\nTgid:\t1\nUid:\t0\t0\t0\t0\n"
                                         b"VmRSS:\t 4 MB\n")
    write_proc(tmp_path, BASE + 6, comm=b"fine")
    found, warnings = scan_tree(tmp_path)
    assert sorted(found) == [BASE + 6]
    assert len(warnings) == 5
    for pid, fname in [(BASE + 1, "stat"), (BASE + 2, "stat"), (BASE + 3, "status"),
                       (BASE + 4, "oom_score"), (BASE + 5, "status")]:
        assert any(w.startswith(f"PID {pid} skipped: {tmp_path}/{pid}/{fname}: ")
                   for w in warnings), (pid, warnings)


def test_scan_warns_on_unreadable_file(tmp_path: Path) -> None:
    # As root, mode 000 is no obstacle; a directory where a file should be is: EISDIR.
    write_proc(tmp_path, BASE, omit=["cgroup"])
    (tmp_path / str(BASE) / "cgroup").mkdir()
    found, warnings = scan_tree(tmp_path)
    assert found == {}
    assert warnings == [f"PID {BASE} skipped: {tmp_path}/{BASE}/cgroup: Is a directory"]


# --- the pause point, and the daemon's candidate cache parked on it ------------------------


def test_scan_calls_between_before_each_process(tmp_path: Path) -> None:
    for i in range(5):
        write_proc(tmp_path, BASE + i, starttime=100 + i)
    (tmp_path / "self").symlink_to(str(BASE))
    seen: list[int] = []
    candidates, _ = policy.scan(str(tmp_path), between=lambda: seen.append(len(seen)))
    assert len(seen) == 5 and len(candidates) == 5


def test_candidate_cache_scan_parks_while_the_loop_holds_it(tmp_path: Path) -> None:
    """While the loop decides (hold), the background scan stops at its next process and
    goes on only once the decision is made; the loop's own refresh is never parked."""
    import threading

    from mreaper.config import Config
    from mreaper.daemon import CandidateCache

    for i in range(3):
        write_proc(tmp_path, BASE + i, starttime=100 + i)
    (tmp_path / "self").symlink_to(str(BASE))
    cache = CandidateCache(Config(), "", proc=str(tmp_path))
    done = threading.Event()

    def background() -> None:
        cache.refresh(between=cache._wait_clear)
        done.set()

    with cache.hold():
        t = threading.Thread(target=background, daemon=True)
        t.start()
        assert not done.wait(0.3), "the scan ran on while the loop held it"
        cache.refresh()  # the loop's own scan, in the hold: not parked
        assert len(cache.peek()) == 3
    assert done.wait(10), "the scan stayed parked after the hold ended"
    t.join(10)


def test_candidate_cache_scan_parks_while_a_victim_dies(tmp_path: Path) -> None:
    import threading

    from mreaper.config import Config
    from mreaper.daemon import CandidateCache

    write_proc(tmp_path, BASE, starttime=100)
    (tmp_path / "self").symlink_to(str(BASE))
    cache = CandidateCache(Config(), "", proc=str(tmp_path))
    cache.park(True)
    with cache.hold():
        pass  # the end of a decision does not unpark a scan parked for a dying victim
    done = threading.Event()
    t = threading.Thread(target=lambda: (cache.refresh(between=cache._wait_clear),
                                         done.set()), daemon=True)
    t.start()
    assert not done.wait(0.3), "the scan ran while a victim was dying"
    cache.park(False)
    assert done.wait(10)
    t.join(10)
