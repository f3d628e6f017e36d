"""Choose the victim: snapshot the candidates from /proc, apply prefer/avoid/protect rules, rank.

Two halves.  `scan` is the only I/O: one cheap pass over /proc that keeps every process
that may ever be a victim, as frozen `Candidate` facts.  `rank`, `choose` and
`explain_table` are pure: the same candidates and rules always give the same order, so
`mreaper explain` shows exactly what the daemon would decide, and tests need no /proc.

The score starts from the kernel's own oom_score (or the RSS in MiB) and every matching
prefer/avoid rule moves it; a protect rule, oom_score_adj -1000, a minimum RSS or a
cgroup scope take a process out of the running, and say why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mreaper import kube, reap
from mreaper.linux import procfs

if TYPE_CHECKING:
    import regex

MiB = 1 << 20

OOM_SCORE_ADJ_MIN = reap.OOM_SCORE_ADJ_MIN

DEFAULT_ADJUST = 300  # prefer +300, avoid -300: oom_score units, or MiB in RSS mode


# --- the facts -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """A snapshot of one process that may be killed: facts only, no judgement.

    `name` is the kernel's comm as /proc/<pid>/status shows it (the kernel escapes a
    newline there as the two characters backslash-n); bytes that are not UTF-8 appear
    as \\xNN escapes, in the name, the cmdline, the exe path and the cgroup path alike.
    """

    pid: int
    starttime: int              # clock ticks since boot: with pid, the process's identity
    name: str
    cmdline: tuple[str, ...]
    exe: str                    # readlink /proc/<pid>/exe; "" when unreadable
    uid: int                    # real uid
    cgroup: str                 # cgroup v2 path from /proc/<pid>/cgroup; "" when none
    rss: int                    # bytes (VmRSS)
    swap: int                   # bytes (VmSwap)
    oom_score: int
    oom_score_adj: int
    # The family a process belongs to (families.py): its parent, process group, session.
    ppid: int = 0
    pgrp: int = 0
    session: int = 0
    # Bytes a kill would free of its own (procfs.read_private: smaps_rollup Private_Dirty),
    # read under pressure only; None when not read.  A forked child's RSS counts the pages
    # it shares with its parent: killing it frees only these.
    private: int | None = None
    # Kubernetes: bytes its pod container uses above its memory request, where kubelet's
    # MemoryQoS shows the request in the cgroup (podmem.py); None when not shown or not
    # read (outside pods, kill.pods off).  Ranks within a QoS tier (rank_key).
    over_request: int | None = None

    @property
    def frees(self) -> int:
        """What killing it alone is expected to free: its private memory when read,
        else its RSS."""
        return self.rss if self.private is None else self.private


# --- bounded patterns ----------------------------------------------------------------------
#
# A process's own user chooses its name and cmdline (`exec -a`), so every pattern is
# input to a search over text a hostile user wrote.  Python's `re` cannot be stopped
# once a search runs ("(a+)+$" against "aaa...ab" takes years, holding the GIL), so
# rules match with the `regex` engine (PyPI `regex`, Debian `python3-regex`): the same
# syntax and semantics (VERSION0), and a timeout.  Three bounds, each documented in
# docs/configuration.md:
#   * at load, patterns whose matching time can grow exponentially (or worse: a
#     backreference) with the text are refused, with the reason;
#   * at most MATCH_MAX_CHARS of any text are searched;
#   * a search gives up after MATCH_TIMEOUT s, and one ranking lets each user's
#     processes make searches time out for about GIVE_UP_BUDGET s (see Matching):
#     past it, that user's further searches end at once.  A rule that gave up on a
#     process's text gives it no shelter (see Rule.applies).

MATCH_MAX_CHARS = 4096
MATCH_TIMEOUT = 0.05
GIVE_UP_BUDGET = 0.25
NOISE_CPU = 0.002
_NOISE_RETRIES = 4

_FLAGS = ("IGNORECASE", "MULTILINE", "DOTALL", "VERBOSE", "ASCII", "UNICODE")
_REPEATS = frozenset({"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"})
_BACKREFS = frozenset({"GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE",
                       "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE"})


class PatternRefused(ValueError):
    """A pattern that is not a regular expression, or whose matching cannot be bounded."""


class Pattern:
    """A rule's regular expression, checked for bounded matching, searched with a timeout.
    `pattern` is the text as written (what explain and `mreaper config` show)."""

    __slots__ = ("_compiled", "flags", "pattern")

    def __init__(self, pattern: str, flags: int = 0) -> None:
        if not isinstance(pattern, str):
            raise PatternRefused(f"{pattern!r}: a regular expression must be a string")
        try:
            # The stdlib parser: the syntax rules accept is re's, and its tree is what
            # _unbounded() judges; regex then compiles the same text with re's semantics.
            tree = _sre_parse(pattern, flags)
        except re.error as e:
            raise PatternRefused(f"not a valid regular expression: {e}") from None
        except OverflowError as e:  # "a{4294967296}": the repetition number is too large
            raise PatternRefused(f"not a valid regular expression: {e}") from None
        except RecursionError:      # the parser recurses on each nested group
            raise PatternRefused("not a valid regular expression: groups nested too "
                                 "deeply") from None
        unknown = flags & ~sum(int(getattr(re, flag)) for flag in _FLAGS)
        if unknown:
            raise PatternRefused(f"flags {unknown:#x}: only {', '.join(_FLAGS)} are known")
        try:
            reason = _unbounded(tree, inside=None)
        except RecursionError:
            reason = "groups nested too deeply to judge"
        if reason is not None:
            raise PatternRefused(reason)
        engine = _engine()
        # by name: the two modules number some flags differently (ASCII: 256 and 128)
        engine_flags = engine.VERSION0
        for flag in _FLAGS:
            if flags & getattr(re, flag):
                engine_flags |= getattr(engine, flag)
        try:
            self._compiled: regex.Pattern[str] = engine.compile(pattern, engine_flags)
        except (engine.error, OverflowError, RecursionError) as e:
            raise PatternRefused(f"not a valid regular expression for the matching engine: "
                                 f"{e}") from None
        self.pattern = pattern
        self.flags = flags

    def search(self, text: str, timeout: float = MATCH_TIMEOUT) -> bool:
        """re.search on the first MATCH_MAX_CHARS of `text`; TimeoutError past `timeout`."""
        # concurrent: the engine lets go of the GIL while it searches (text is an
        # immutable str), so the status server and signal handling run meanwhile.
        return self._compiled.search(text[:MATCH_MAX_CHARS], concurrent=True,
                                     timeout=timeout) is not None

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Pattern) and self.pattern == other.pattern
                and self.flags == other.flags)

    def __hash__(self) -> int:
        return hash((self.pattern, self.flags))

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r})"


REGEX_HINT = ("the Python package regex: pip install regex, or on Debian and Ubuntu "
              "apt install python3-regex")


def _engine() -> Any:
    """The regex module, imported when the first pattern is compiled: a configuration
    without patterns runs without it (as an offline `install.sh --wheel` leaves it)."""
    try:
        import regex
    except ImportError:
        raise PatternRefused(f"rule patterns need {REGEX_HINT}") from None
    return regex


def _sre_parse(pattern: str, flags: int) -> Any:
    with warnings.catch_warnings():  # sre_parse is deprecated as a module, not as a parser
        warnings.simplefilter("ignore", DeprecationWarning)
        import sre_parse
    return sre_parse.parse(pattern, flags)


def _unbounded(tree: Any, inside: str | None) -> str | None:
    """Why matching `tree` (an sre_parse tree) can take exponential time, or None.
    `inside`: the text of the enclosing repeat that may run more than once, if any.

    Conservative: refused are backreferences (matching with them is NP-hard), a repeat
    of variable count inside a repeat that may run more than once ("(a+)+", "(\\w+\\s?)*",
    "(a+){3}"), and alternatives under such a repeat that may begin with the same
    character ("(a|aa)*", "(a|a)+"): each of those lets one text be split in
    exponentially many ways, which a backtracking engine tries one by one."""
    for op, av in tree:
        name = str(op)
        if name in _BACKREFS:
            return ("a backreference (\\1, (?P=name), (?(1)...)): matching with one cannot be "
                    "bounded; match the text itself")
        if name in _REPEATS:
            low, high, body = av
            if inside is not None and low != high:
                return (f"a repeat of variable count inside a repeat ({inside}): matching "
                        "time can grow exponentially with the text, which the process's "
                        "user chooses; write it without the nesting (e.g. a+ for (a+)+)")
            reason = _unbounded(body, inside if inside is not None or high <= 1
                                else _repeat_text(low, high))
        elif name == "SUBPATTERN":
            reason = _unbounded(av[-1], inside)
        elif name == "BRANCH":
            alternatives = av[1]
            if inside is not None and not _distinct_heads(alternatives):
                return (f"alternatives that can begin alike inside a repeat ({inside}): "
                        "matching time can grow exponentially with the text; make each "
                        "alternative begin with its own character, or move the repeat")
            reason = next((r for alt in alternatives
                           if (r := _unbounded(alt, inside)) is not None), None)
        elif name in ("ASSERT", "ASSERT_NOT"):
            reason = _unbounded(av[1], inside)
        elif name == "ATOMIC_GROUP":
            reason = _unbounded(av, inside)
        else:
            continue  # a literal, a class, an anchor: one step each
        if reason is not None:
            return reason
    return None


def _repeat_text(low: int, high: int) -> str:
    """A repeat as a pattern would write it: *, +, {2}, {1,3}, {2,}."""
    unbounded = high > 65535  # sre_parse's MAXREPEAT
    if unbounded and low <= 1:
        return "*" if low == 0 else "+"
    if low == high:
        return f"{{{low}}}"
    return f"{{{low},{'' if unbounded else high}}}"


def _distinct_heads(alternatives: Sequence[Any]) -> bool:
    """True when every alternative begins with a plain literal character, each its own
    even ignoring case (a "(?i)" anywhere makes "a" and "A" the same)."""
    heads = []
    for alt in alternatives:
        if not alt or str(alt[0][0]) != "LITERAL":
            return False
        heads.append(chr(alt[0][1]).casefold())
    return len(set(heads)) == len(heads)


class Outcome(enum.Enum):
    """What matching a rule against a process gave."""

    MATCH = "match"
    NO_MATCH = "no match"
    # A search used up its time on this process's text (CPU spent: the text, which its
    # user chose, is hard for the pattern) or its user's budget was spent already.
    GAVE_UP = "gave up"
    # A search timed out again and again with little CPU used: this thread was not run
    # (a loaded machine), the text was not the cause.
    UNDECIDED = "undecided"


class Matching:
    """The bounds of one ranking, per user: the time that user's processes made searches
    run until they timed out, so one user's hostile names cannot stall the ranking of
    all.  `spent`: time-outs that used CPU (the text was hard); `waited`: time-outs
    during which this thread hardly ran (a loaded machine).  Seconds, wall clock."""

    def __init__(self, budget: float = GIVE_UP_BUDGET, timeout: float = MATCH_TIMEOUT) -> None:
        self.budget = budget
        self.timeout = timeout
        self.spent: dict[int, float] = {}
        self.waited: dict[int, float] = {}

    def search(self, pattern: Pattern, text: str, uid: int) -> Outcome:
        """pattern.search(text) for a process of user `uid`, within the bounds.

        A time-out after NOISE_CPU of CPU or more is the text's doing (an honest search
        of MATCH_MAX_CHARS takes a small fraction of that): GAVE_UP.  With less, this
        thread was not run (or waited on page faults): tried again a few times, then
        UNDECIDED.  Once a user's `spent` or `waited` reaches the budget, that user's
        further searches end at once with GAVE_UP or UNDECIDED."""
        if self.spent.get(uid, 0.0) >= self.budget:
            return Outcome.GAVE_UP
        for _ in range(_NOISE_RETRIES):
            if self.waited.get(uid, 0.0) >= self.budget:
                break
            cpu, wall = time.thread_time(), time.monotonic()
            try:
                return Outcome.MATCH if pattern.search(text, self.timeout) else Outcome.NO_MATCH
            except TimeoutError:
                used, took = time.thread_time() - cpu, time.monotonic() - wall
            if used >= NOISE_CPU:
                self.spent[uid] = self.spent.get(uid, 0.0) + took
                return Outcome.GAVE_UP
            self.waited[uid] = self.waited.get(uid, 0.0) + took
        return Outcome.UNDECIDED


# --- the rules ---------------------------------------------------------------------------


class Action(enum.Enum):
    """What a matching rule does to a process."""

    PREFER = "prefer"    # raise its score: kill it sooner
    AVOID = "avoid"      # lower its score: kill it later
    PROTECT = "protect"  # never kill it


@dataclass(frozen=True)
class Rule:
    """One prefer/avoid/protect rule.  It matches a process when ALL of its given
    matchers match: patterns searched (as `re.search` would, within the bounds of
    `Pattern`) in the name, the cmdline joined by spaces, the exe path and the cgroup
    v2 path; `uid` by equality.  A pattern may be given as a string or an `re.Pattern`:
    it becomes a `Pattern`, or the rule is refused (PatternRefused, a ValueError)."""

    action: Action
    name: Pattern | None = None
    cmdline: Pattern | None = None
    exe: Pattern | None = None
    cgroup: Pattern | None = None
    uid: int | None = None
    adjust: int = 0   # 0: the action's default (prefer +300, avoid -300); ignored for protect
    label: str = ""   # how explain names it; "" lets rank() say 'rule N (avoid name=...)'

    def __post_init__(self) -> None:
        if not isinstance(self.action, Action):
            raise ValueError(f"rule action {self.action!r}: must be one of "
                             f"{', '.join(a.value for a in Action)}")
        for field_name in _PATTERN_FIELDS:
            value: object = getattr(self, field_name)
            if value is None or isinstance(value, Pattern):
                continue
            flags = 0
            if isinstance(value, re.Pattern) and isinstance(value.pattern, str):
                text, flags = value.pattern, int(value.flags & ~re.UNICODE)
            elif isinstance(value, str):
                text = value
            else:
                raise ValueError(f"rule {field_name}={value!r}: must be a regular "
                                 "expression (a string)")
            try:
                compiled = Pattern(text, flags)
            except PatternRefused as e:
                raise PatternRefused(f"rule {field_name}={text!r}: {e}") from None
            object.__setattr__(self, field_name, compiled)
        if self.uid is not None and (isinstance(self.uid, bool) or not isinstance(self.uid, int)
                                     or self.uid < 0):
            raise ValueError(f"rule uid={self.uid!r}: must be a user ID (an integer >= 0)")
        if isinstance(self.adjust, bool) or not isinstance(self.adjust, int):
            raise ValueError(f"rule adjust={self.adjust!r}: must be an integer")
        if self.action is Action.PREFER and self.adjust < 0:
            raise ValueError(f"prefer rule with adjust {self.adjust}: a prefer rule raises the "
                             "score; use an avoid rule to lower it")
        if self.action is Action.AVOID and self.adjust > 0:
            raise ValueError(f"avoid rule with adjust +{self.adjust}: an avoid rule lowers the "
                             "score; give a negative adjust or use a prefer rule")
        if (self.name is None and self.cmdline is None and self.exe is None
                and self.cgroup is None and self.uid is None):
            raise ValueError(f"{self.action.value} rule without a matcher: give at least one "
                             "of name, cmdline, exe, cgroup, uid")

    @property
    def effective_adjust(self) -> int:
        """The score change this rule applies (0 for protect)."""
        if self.action is Action.PROTECT:
            return 0
        if self.adjust:
            return self.adjust
        return DEFAULT_ADJUST if self.action is Action.PREFER else -DEFAULT_ADJUST

    def describe(self) -> str:
        """'avoid name=^Xorg$ uid=0': the action and its matchers, as a config would say."""
        parts = [self.action.value]
        for field_name in ("name", "cmdline", "exe", "cgroup"):  # as a config lists them
            pattern: Pattern | None = getattr(self, field_name)
            if pattern is not None:
                parts.append(f"{field_name}={pattern.pattern}")
        if self.uid is not None:
            parts.append(f"uid={self.uid}")
        if self.adjust and self.action is not Action.PROTECT:
            parts.append(f"adjust={self.adjust:+d}")
        return " ".join(parts)

    def judge(self, candidate: Candidate, matching: Matching | None = None) -> Outcome:
        """Match every matcher given against `candidate`, within `matching`'s bounds
        (a fresh one if None).  One matcher that does not match decides NO_MATCH."""
        if self.uid is not None and candidate.uid != self.uid:
            return Outcome.NO_MATCH
        m = matching if matching is not None else Matching()
        outcome = Outcome.MATCH
        for field_name in _PATTERN_FIELDS:
            pattern: Pattern | None = getattr(self, field_name)
            if pattern is None:
                continue
            text = (" ".join(candidate.cmdline) if field_name == "cmdline"
                    else getattr(candidate, field_name))
            got = m.search(pattern, text, candidate.uid)
            if got is Outcome.NO_MATCH:
                return got
            if got is Outcome.GAVE_UP or outcome is Outcome.MATCH:
                outcome = got
        return outcome

    def applies(self, outcome: Outcome) -> bool:
        """Whether the rule acts on a process it judged `outcome`.

        GAVE_UP: the process's own text was too hard for the pattern, and its user
        chooses that text, so the rule gives it no shelter: protect and avoid do not
        apply, prefer does.  UNDECIDED (this machine too loaded to finish a short
        search): the other way round, as nothing must be killed by mistake."""
        if outcome is Outcome.MATCH or outcome is Outcome.NO_MATCH:
            return outcome is Outcome.MATCH
        return (self.action is Action.PREFER) == (outcome is Outcome.GAVE_UP)

    def matches(self, candidate: Candidate) -> bool:
        """True when the rule acts on `candidate` (see judge and applies)."""
        return self.applies(self.judge(candidate))


_PATTERN_FIELDS = ("name", "exe", "cgroup", "cmdline")  # cmdline last: the longest text


# --- the ranking ---------------------------------------------------------------------------


class SortBy(enum.Enum):
    """What the base score is."""

    OOM_SCORE = "oom_score"  # the kernel's badness, oom_score_adj included (0..2000)
    RSS = "rss"              # resident memory in MiB, oom_score_adj ignored
    PRIVATE = "private"      # what a kill frees: private memory in MiB (RSS until read)


@dataclass(frozen=True)
class Ranked:
    """A candidate with its score and why: the rules that touched it, and the exclusion."""

    candidate: Candidate
    score: int
    touched_by: tuple[str, ...]  # e.g. "rule 1 (prefer name=chrome): +300", "...: protect"
    excluded: str | None         # None: eligible; else why not
    # True when the process must not die at all (a protect rule, oom_score_adj -1000,
    # user.oomd_omit), not merely be passed over (min_rss, outside the scope): a cgroup
    # holding it must not be killed as a whole either.
    must_live: bool = False
    # Kubernetes: the pod the process is in (None: none, or pods=False), and its tier
    # (kube.TIER_OF), which orders before the score.
    pod: kube.Pod | None = None
    tier: int = kube.NOT_A_POD_TIER
    # Bytes above its request (Candidate.over_request) when in a pod and over it, else 0:
    # orders within the tier before the score, as kubelet's eviction does.
    over: int = 0

    @property
    def eligible(self) -> bool:
        return self.excluded is None


def rule_label(rule: Rule, number: int) -> str:
    """How explain names `rule`, the `number`-th (1-based) of its list."""
    return rule.label or f"rule {number} ({rule.describe()})"


def in_scope(cgroup: str, scope: str) -> bool:
    """True when cgroup v2 path `cgroup` is `scope` or below it, on '/' boundaries:
    "/a/b" holds "/a/b" and "/a/b/c", never "/a/bc".  A process without a cgroup v2
    path ("") is in no scope."""
    if not cgroup.startswith("/"):
        return False
    scope = scope.rstrip("/")
    return not scope or cgroup == scope or cgroup.startswith(scope + "/")


def rank(candidates: Sequence[Candidate], rules: Sequence[Rule], *,
         sort_by: SortBy = SortBy.OOM_SCORE, min_rss: int = 0,
         scope_cgroup: str | None = None,
         cgroup_preferences: Mapping[str, str] | None = None,
         pods: bool = True) -> list[Ranked]:
    """Score and order `candidates`.  Pure.

    `cgroup_preferences` maps cgroup v2 paths to systemd's ManagedOOMPreference= as
    found in the user.oomd_omit / user.oomd_avoid xattrs: "omit" excludes every process
    in that cgroup or below it, "avoid" adds the avoid adjustment (-300).

    Base score: oom_score, or rss // MiB with SortBy.RSS.  Every matching prefer/avoid
    rule adds its adjustment.  Excluded (kept in the list, with the reason): a match of
    a protect rule, oom_score_adj -1000, rss below `min_rss` bytes, a cgroup outside
    `scope_cgroup`.  The first three (and user.oomd_omit) also set `must_live`: the
    process must not die at all, so neither may a cgroup holding it.

    `pods` (kill.pods): processes in kubelet's pod cgroups rank by QoS class before
    score, as Kubernetes evicts: every BestEffort one before any Burstable one, those
    before any Guaranteed one or any process outside pods (kube.TIER_OF); a pod's
    sandbox (pause) process is excluded and must live (kube.is_pause).  Without pods on
    the machine every process is in one tier and nothing changes.  Within a tier, the
    containers above their memory request where the cgroup shows it
    (Candidate.over_request) come first, furthest above first, as kubelet ranks
    evictions; the others (below their request, or no request shown) after, by score.

    Order: eligible first, by tier, then bytes over request descending, then score
    descending, then larger rss, then lower pid; the excluded after, in the same order.
    """
    if min_rss < 0:
        raise ValueError(f"min_rss {min_rss!r}: must be >= 0 bytes")
    if scope_cgroup is not None and not scope_cgroup.startswith("/"):
        raise ValueError(f"scope_cgroup {scope_cgroup!r}: must be a cgroup v2 path such as "
                         "/system.slice/foo.service")
    labelled = [(rule, rule_label(rule, i)) for i, rule in enumerate(rules, 1)]
    matching = Matching()  # one budget per user for the whole ranking
    ranked = []
    for c in candidates:
        score = (c.oom_score if sort_by is SortBy.OOM_SCORE else c.rss // MiB
                 if sort_by is SortBy.RSS else c.frees // MiB)
        touched: list[str] = []
        reasons: list[str] = []
        must_live = False
        for rule, label in labelled:
            outcome = rule.judge(c, matching)
            applies = rule.applies(outcome)
            if outcome is Outcome.GAVE_UP or outcome is Outcome.UNDECIDED:
                why = ("gave up matching this process's text" if outcome is Outcome.GAVE_UP
                       else "matching undecided (machine too loaded)")
                touched.append(f"{label}: {why}, {'applied' if applies else 'not applied'}")
            if not applies:
                continue
            if rule.action is Action.PROTECT:
                touched.append(f"{label}: protect")
                reasons.append(f"protected by {label}")
                must_live = True
            else:
                score += rule.effective_adjust
                touched.append(f"{label}: {rule.effective_adjust:+d}")
        if cgroup_preferences:
            pref = preference_of(c.cgroup, cgroup_preferences)
            if pref is not None:
                where, what = pref
                if what == "omit":
                    reasons.append(f"user.oomd_omit on {where}")
                    must_live = True
                elif what == "avoid":
                    score -= DEFAULT_ADJUST
                    touched.append(f"user.oomd_avoid on {where}: "
                                   f"{-DEFAULT_ADJUST:+d}")
        pod = kube.pod_of(c.cgroup) if pods else None
        if pod is not None and kube.is_pause(c.cgroup, c.cmdline, c.rss):
            reasons.append("the pod's sandbox (pause) process")
            must_live = True
        if c.oom_score_adj <= OOM_SCORE_ADJ_MIN:
            reasons.append(f"oom_score_adj {c.oom_score_adj}")
            must_live = True
        if scope_cgroup is not None and not in_scope(c.cgroup, scope_cgroup):
            reasons.append(f"cgroup {c.cgroup or '(none)'} outside scope {scope_cgroup}")
        if c.rss < min_rss:
            reasons.append(f"rss {reap.fmt_bytes(c.rss)} below min_rss {reap.fmt_bytes(min_rss)}")
        ranked.append(Ranked(candidate=c, score=score, touched_by=tuple(touched),
                             excluded="; ".join(reasons) if reasons else None,
                             must_live=must_live, pod=pod,
                             tier=kube.NOT_A_POD_TIER if pod is None else kube.TIER_OF[pod.qos],
                             over=0 if pod is None or c.over_request is None
                             else max(c.over_request, 0)))
    ranked.sort(key=rank_key)
    return ranked


def rank_key(r: Ranked) -> tuple[bool, int, int, int, int, int]:
    """The order of a `rank` result: eligible first, by pod tier (Kubernetes QoS), by
    bytes over the pod container's memory request descending, by score descending, then
    larger rss, then lower pid.  Each entry's place depends on its own facts only, so
    rankings of parts of a list merge into the ranking of the whole (the process table's
    incremental ranking relies on it)."""
    return (r.excluded is not None, r.tier, -r.over, -r.score, -r.candidate.rss,
            r.candidate.pid)


def preference_of(cgroup: str, preferences: Mapping[str, str]) -> tuple[str, str] | None:
    """The nearest (deepest) cgroup at or above `cgroup` with a preference, and it."""
    path = cgroup.rstrip("/") or "/"
    while True:
        if path in preferences:
            return path, preferences[path]
        if path in ("/", ""):
            return None
        path = path.rsplit("/", 1)[0] or "/"


def choose(ranked: Sequence[Ranked]) -> Ranked | None:
    """The victim: the first eligible entry of a `rank` result, or None."""
    for r in ranked:
        if r.excluded is None:
            return r
    return None


# --- the explanation ---------------------------------------------------------------------

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` with control and other non-printable characters escaped (\\n, \\xNN,
    \\uNNNN), so a name from the kernel or the user cannot break a line or a terminal."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        else:
            out.append(ascii(ch)[1:-1])
    return "".join(out)


_HEADER = ("#", "PID", "NAME", "RSS", "OOM_SCORE", "ADJ", "SCORE", "RULES / EXCLUDED")


def explain_table(ranked: Sequence[Ranked], limit: int | None = 20) -> str:
    """A human table of a `rank` result: one process per line, the victim first.
    Pure.  `limit`: at most this many rows (None: all), with a count of the rest."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit {limit!r}: must be >= 0 or None")
    shown = list(ranked if limit is None else ranked[:limit])
    rows: list[tuple[str, ...]] = [_HEADER]
    position = 0
    for r in shown:
        c = r.candidate
        if r.excluded is None:
            position += 1
            number = str(position)
        else:
            number = "-"
        why = list(r.touched_by)
        if r.pod is not None:
            why.insert(0, r.pod.describe())
            if c.over_request is not None:
                why.insert(1, f"{reap.fmt_bytes(abs(c.over_request))} "
                              f"{'over' if c.over_request >= 0 else 'under'} its memory request")
        if r.excluded is not None:
            why.append(f"excluded: {r.excluded}")
        rows.append((number, str(c.pid), printable(c.name), reap.fmt_bytes(c.rss),
                     str(c.oom_score), str(c.oom_score_adj), str(r.score),
                     printable("; ".join(why))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER) - 1)]
    numeric = {0, 1, 3, 4, 5, 6}
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=False))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    if not ranked:
        lines.append("(no candidates)")
    hidden = ranked[len(shown):]
    if hidden:
        eligible = sum(1 for r in hidden if r.excluded is None)
        lines.append(f"... {len(hidden)} more not shown ({eligible} eligible, "
                     f"{len(hidden) - eligible} excluded)")
    return "\n".join(lines)


# --- the scan: the only I/O ----------------------------------------------------------------


def scan(proc: str = procfs.PROC, *, between: Callable[[], None] | None = None,
         private: bool = False) -> tuple[list[Candidate], list[str]]:
    """Snapshot every process under `proc` that may ever be a victim.

    Skipped silently, as they are never candidates: what `reap.refusal` refuses (PID 1,
    kernel threads, mreaper itself and its parent, threads), zombies and processes with
    no memory to free (no mm, RSS and swap 0), and processes that exit mid-scan.  An
    entry that cannot be read or parsed is skipped with a warning naming the file.
    oom_score_adj -1000 processes are kept: `rank` excludes them, explain shows them.

    Cheap by design, it runs every second while memory is calm: stat first, so kernel
    threads and zombies cost one read; then status, and only then the rest.  The files
    of one process are read one after the other, not atomically; the victim is pinned
    later by pid and starttime (reap.Victim.open), so a PID reused mid-scan can at worst
    mis-rank once, never get the wrong process killed.

    `between` is called before each process: the daemon's background scan parks there
    while the loop decides on a kill (see daemon.CandidateCache.hold).  `private`: also
    read the private memory of each forked child of another candidate (smaps_rollup:
    ~6 ms per GiB resident, so the daemon asks for it under pressure only).
    """
    # One way to read processes: the first refresh of a fresh process table.  Imported
    # here: the table is built on this module's snapshot (observe).
    from mreaper.proctable import ProcTable

    table = ProcTable(proc)
    done = table.refresh(between=between)
    candidates = table.candidates()
    if private:
        candidates = _with_private(candidates, proc, between)
    return candidates, list(done.warnings)


def _with_private(candidates: list[Candidate], proc: str,
                  between: Callable[[], None] | None) -> list[Candidate]:
    """Private memory for the candidates whose parent is a candidate too: only a forked
    child can share pages copy-on-write with a living parent; for any other process
    its anonymous RSS is what its kill frees.  Bounded so on purpose: smaps_rollup walks
    the page tables holding a reference to the mm, and a victim whose mm we hold at
    its exit gives its memory back only when our walk ends."""
    pids = {c.pid for c in candidates}
    out = []
    for c in candidates:
        judged = c
        if c.ppid in pids:
            if between is not None:
                between()
            with contextlib.suppress(procfs.ProcessGone, procfs.ParseError, OSError):
                judged = dataclasses.replace(c, private=min(procfs.read_private(c.pid, proc),
                                                            c.rss))
        out.append(judged)
    return out


def snapshot(pid: int, proc: str = procfs.PROC, *, private: bool = False) -> Candidate | None:
    """One process as a Candidate, or None if it can never be one (kernel thread,
    zombie, no mm, ...).  Raises ProcessGone/ParseError like the readers."""
    found = observe(pid, proc, private=private)
    return None if found is None else found[0]


def observe(pid: int, proc: str = procfs.PROC, *, private: bool = False
            ) -> tuple[Candidate, procfs.Stat, procfs.Status] | None:
    """snapshot(), with the stat and status it was made from (the process table keeps
    the process group, session and anonymous RSS from them)."""
    stat = procfs.read_stat(pid, proc)
    if (stat.state in ("Z", "X") and stat.num_threads <= 1) or reap.refusal(stat) is not None:
        return None  # decided on stat alone: a kernel thread or a zombie costs one read
    # A leader in state Z with live threads is no zombie: it called pthread_exit and
    # the other threads hold the memory; read_status and read_cmdline read them.
    status = procfs.read_status(pid, proc)
    if _never(stat, status):
        return None
    candidate = _candidate(stat, status, cmdline=procfs.read_cmdline(pid, proc),
                           cgroup=procfs.read_cgroup(pid, proc).unified,
                           exe=_read_exe(pid, proc, status.mm_tid),
                           oom=procfs.read_oom_score(pid, proc),
                           private=procfs.read_private(pid, proc) if private else None)
    return candidate, stat, status


def candidate_of(victim: reap.Victim, proc: str = procfs.PROC) -> Candidate | None:
    """The pinned victim as a Candidate, from what Victim.open read right after
    pinning (only the exe link is read here): the same judgement as snapshot(), for
    ranking the victim again alone before it is signalled."""
    if _never(victim.stat, victim.status):
        return None
    return _candidate(victim.stat, victim.status, cmdline=victim.cmdline,
                      cgroup=victim.cgroups.unified,
                      exe=_read_exe(victim.pid, proc, victim.status.mm_tid),
                      oom=(victim.oom_score, victim.oom_score_adj))


def _never(stat: procfs.Stat, status: procfs.Status) -> bool:
    """Never a candidate: no mm (a zombie, a process past exit_mm, a kernel thread:
    nothing to free), or what reap.refusal refuses (thread ids included).  Not the
    leader's state alone: a leader that called pthread_exit shows Z while its other
    threads hold the memory, and read_status gives their figures (has_mm)."""
    return not status.has_mm or reap.refusal(stat, status.tgid) is not None


def _candidate(stat: procfs.Stat, status: procfs.Status, *, cmdline: tuple[str, ...],
               cgroup: str, exe: str, oom: tuple[int, int],
               private: int | None = None) -> Candidate:
    return Candidate(pid=stat.pid, starttime=stat.starttime, name=status.name or stat.comm,
                     cmdline=cmdline, exe=exe, uid=status.uid, cgroup=cgroup,
                     rss=status.vm_rss, swap=status.vm_swap, oom_score=oom[0],
                     oom_score_adj=oom[1], ppid=stat.ppid, pgrp=stat.pgrp,
                     session=stat.session,
                     private=None if private is None else min(private, status.rss_anon))


def _read_exe(pid: int, proc: str, mm_tid: int = 0) -> str:
    """readlink /proc/<pid>/exe (of thread `mm_tid` when the leader has exited: the
    kernel finds the exe through the task's mm, which the leader no longer has); ""
    when we may not (another user's process without CAP_SYS_PTRACE), or it is gone."""
    path = f"{proc}/{pid}/task/{mm_tid}/exe" if mm_tid else f"{proc}/{pid}/exe"
    try:
        target = os.readlink(os.fsencode(path))
    except OSError:
        return ""
    return target.decode("utf-8", "backslashreplace")
