"""Rule patterns match in bounded time whatever text a process's user chose.

A process's name and cmdline are chosen by its user (`exec -a`), so a rule's pattern
runs on hostile text.  Refused at load: the forms whose matching time can grow
exponentially (nested variable repeats, alternatives that begin alike under a repeat,
backreferences).  The rest is searched on at most MATCH_MAX_CHARS characters with a
time-out, and a ranking spends a bounded time per user on searches that give up.

Every ranking that could hang runs in a child process with a generous time-out: with
Python's `re` (before this design) such a search never returns and holds the GIL, so
not even a thread's join(timeout) in this process would come back.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mreaper import config, policy
from mreaper.config import ConfigError
from mreaper.policy import Action, Candidate, Outcome, Pattern, PatternRefused, Rule

# forms refused at load, and the words of the reason
REFUSED = [
    ("(a+)+$", "inside a repeat"),
    (r"(\w+\s?)*$", "inside a repeat"),
    ("(a*)*b", "inside a repeat"),
    ("(a+){3}x", "inside a repeat"),
    ("(x+x+)+y", "inside a repeat"),
    ("(a|aa)*$", "alternatives that can begin alike"),
    ("(a|a)+$", "alternatives that can begin alike"),
    (r"(?:\d|[0-9]x)+$", "alternatives that can begin alike"),
    ("(?i)(ab|AB)+$", "alternatives that can begin alike"),
    (r"(a)\1", "backreference"),
    (r"(?P<x>a)(?P=x)", "backreference"),
    (r"(a)?(?(1)b|c)", "backreference"),
]

# what rules really say: accepted
ACCEPTED = [
    "^(sshd|postgres)$", "^(?!mr-)", "java.*-jar", r"--type=renderer\b", "(foo|bar)+",
    "(ab){2}x", "[a-z]+$", r"^/opt/app/", r"/batch\.slice/", "^python3? ", "(?i)chrome",
    r"\.jar(:|$)", "(a{2})+", "^$",
]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mreaper.toml"
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


@pytest.mark.parametrize(("pattern", "why"), REFUSED)
def test_unboundable_patterns_are_refused_at_load_naming_file_key_and_value(
        tmp_path: Path, pattern: str, why: str) -> None:
    path = write(tmp_path, f"[[rule]]\naction = \"protect\"\ncmdline = '{pattern}'\n")
    with pytest.raises(ConfigError) as e:
        config.load(path, required=True)
    assert e.value.origin == path and e.value.key == "rule[1].cmdline"
    assert e.value.value == pattern
    assert str(e.value).startswith(f"{path}: rule[1].cmdline = {pattern!r}: ")
    assert why in str(e.value)


@pytest.mark.parametrize(("pattern", "why"), REFUSED)
def test_unboundable_patterns_are_refused_by_rule_too(pattern: str, why: str) -> None:
    with pytest.raises(PatternRefused, match=re.escape(why)):
        Rule(Action.PROTECT, name=pattern)
    with pytest.raises(PatternRefused, match=re.escape(why)):
        Rule(Action.PROTECT, name=re.compile(pattern))


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_usual_patterns_are_accepted_and_keep_re_semantics(tmp_path: Path, pattern: str) -> None:
    path = write(tmp_path, f"[[rule]]\naction = \"avoid\"\nname = '{pattern}'\n")
    rule = config.load(path, required=True).rules[0]
    assert rule.name is not None and rule.name.pattern == pattern
    for text in ("sshd", "postgres", "mr-x", "java -jar x.jar", "aaa", "ababx", "Chrome",
                 "/opt/app/bin", "python3 -m x", "", "a.jar:b", "aaaa"):
        assert rule.name.search(text) == (re.search(pattern, text) is not None), text


def test_flags_of_a_compiled_re_pattern_keep_their_meaning() -> None:
    # re and regex number ASCII differently (256, 128): passed by name
    rule = Rule(Action.AVOID, name=re.compile(r"^\w+$", re.ASCII | re.IGNORECASE))
    assert rule.name is not None
    assert rule.name.search("ABC_1") and not rule.name.search("é")
    assert Rule(Action.AVOID, name=re.compile(r"^\w+$")).name.search("é")  # type: ignore[union-attr]


def test_matching_looks_at_the_first_4096_characters_only() -> None:
    # the documented bound: what lies past it is not seen
    p = Pattern("x$")
    assert policy.MATCH_MAX_CHARS == 4096
    assert p.search("a" * 4095 + "x")
    assert not p.search("a" * 4096 + "x")


def cand(pid: int, *, uid: int = 1000, name: str = "p", cmdline: tuple[str, ...] = ()
         ) -> Candidate:
    return Candidate(pid=pid, starttime=1, name=name, cmdline=cmdline, exe="", uid=uid,
                     cgroup="/", rss=100 << 20, swap=0, oom_score=500, oom_score_adj=0)


def _run_child(code: str, timeout: float = 120) -> str:
    """Run `code` in a child Python; a hang fails the test (TimeoutExpired), never
    this process."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=timeout, check=False)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_a_slow_pattern_on_hostile_text_gives_up_and_gives_no_shelter() -> None:
    """"(foo)+$" is fine on honest text, and quadratic on "foofoo...!" with a
    backtracking engine: a 128 KiB cmdline would take minutes.  Bounded: the ranking
    returns, the hostile process is not protected (its user chose the text), and an
    honest protected process of another user stays protected."""
    out = _run_child("""
        import time
        from mreaper.policy import Action, Candidate, Rule, rank
        def cand(pid, uid, cmdline):
            return Candidate(pid=pid, starttime=1, name="p", cmdline=cmdline, exe="",
                             uid=uid, cgroup="/", rss=100 << 20, swap=0, oom_score=500,
                             oom_score_adj=0)
        hostile = "foo" * 43690 + "!"
        candidates = [cand(pid, 1000, (hostile,)) for pid in range(100, 300)]
        candidates.append(cand(1, 0, ("/usr/sbin/keeper", "foofoo")))
        rules = [Rule(Action.PROTECT, cmdline="(foo)+$", label="keep")]
        t = time.monotonic()
        ranked = rank(candidates, rules)
        by_pid = {r.candidate.pid: r for r in ranked}
        print(round(time.monotonic() - t, 2))
        print(by_pid[100].excluded, "|", by_pid[100].touched_by)
        print(by_pid[1].excluded, "|", by_pid[1].touched_by)
        print(sum(1 for r in ranked if r.eligible))
    """)
    elapsed, first, keeper, eligible = out.splitlines()
    assert "keep: gave up matching this process's text, not applied" in first
    assert first.startswith("None |")          # no shelter for the hostile text
    assert keeper.startswith("protected by keep |")
    assert "gave up" not in keeper
    assert int(eligible) == 200
    print("ranking 200 hostile + 1 honest candidates took", elapsed, "s")


class Recording(Pattern):
    """A Pattern that counts its searches."""

    __slots__ = ("calls",)

    def __init__(self, pattern: str) -> None:
        super().__init__(pattern)
        self.calls = 0

    def search(self, text: str, timeout: float = policy.MATCH_TIMEOUT) -> bool:
        self.calls += 1
        return super().search(text, timeout)


def test_one_users_budget_is_spent_then_its_searches_end_at_once() -> None:
    m = policy.Matching(budget=0.2)
    slow = Recording("(foo)+$")
    hostile = "foo" * 1365 + "!"
    outcomes = {m.search(slow, hostile, 1000) for _ in range(50)}
    # GAVE_UP; UNDECIDED only if this thread hardly ran (a very loaded machine)
    assert outcomes <= {Outcome.GAVE_UP, Outcome.UNDECIDED}
    assert max(m.spent.get(1000, 0.0), m.waited.get(1000, 0.0)) >= 0.2
    calls = slow.calls
    assert calls < 50 * 4  # the budget ended the searches, not the 50 x 4 tries
    assert m.search(slow, hostile, 1000) in outcomes and slow.calls == calls
    # another user's honest search is still done
    assert m.search(slow, "foofoo", 0) is Outcome.MATCH
    assert m.search(slow, "bar", 0) is Outcome.NO_MATCH
    assert slow.calls == calls + 2


@pytest.mark.parametrize(("action", "applies"), [(Action.PROTECT, False), (Action.AVOID, False),
                                                  (Action.PREFER, True)])
def test_a_rule_that_gave_up_never_shelters(action: Action, applies: bool) -> None:
    rule = Rule(action, name="x")
    assert rule.applies(Outcome.GAVE_UP) is applies
    # a search this machine was too loaded to run (not the text's fault): nothing is
    # killed by mistake, so the rule acts the other way round
    assert rule.applies(Outcome.UNDECIDED) is not applies
    assert rule.applies(Outcome.MATCH) and not rule.applies(Outcome.NO_MATCH)


def test_a_matcher_that_does_not_match_decides_even_if_another_gave_up() -> None:
    m = policy.Matching(budget=0.0)  # every search of uid 1000 gives up at once
    rule = Rule(Action.PROTECT, name="^x$", uid=0)
    assert rule.judge(cand(1, uid=1000, name="x"), m) is Outcome.NO_MATCH  # uid decides
    rule = Rule(Action.PROTECT, name="^x$", cmdline="y")
    assert rule.judge(cand(1, uid=1000, name="x"), m) is Outcome.GAVE_UP
