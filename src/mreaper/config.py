"""Configuration: built-in defaults, the TOML file, CLI overrides, and exact validation.

Every bad value is a `ConfigError` naming the file, the key, the value and what is
allowed; the daemon refuses to start on one and keeps its running configuration on
a bad reload.  Nothing falls back to a default silently.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import posixpath
import pwd
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Any

from mreaper.linux import trust
from mreaper.policy import Action, Pattern, PatternRefused, Rule, SortBy
from mreaper.reap import fmt_bytes

DEFAULT_PATH = "/etc/mreaper/mreaper.toml"
LEVELS = ("warn", "term", "kill")
SOURCES = ("memory", "swap", "psi")


class ConfigError(ValueError):
    """A configuration value we refuse, with where it came from."""

    def __init__(self, origin: str, key: str, value: object, allowed: str) -> None:
        # value None: the key is missing (TOML has no null), so there is no value to show
        shown = key if value is None else f"{key} = {value!r}"
        super().__init__(f"{origin}: {shown}: {allowed}")
        self.origin, self.key, self.value, self.allowed = origin, key, value, allowed


# --- value types -----------------------------------------------------------------------

_SIZE_RE = re.compile(r"\s*([0-9]+)(?:\.([0-9]+))?\s*([KMGT]?)(?:i?B)?\s*",
                      re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SIZE_HELP = ("a size like \"512M\", \"2G\", \"1.5GiB\" or a number of bytes "
             "(binary units K, M, G, T)")
SIZE_LIMIT = 1 << 63
SIZE_TOO_LARGE = "a size must be below 8 EiB (2**63 bytes)"


def parse_size(value: object, origin: str, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(origin, key, value, SIZE_HELP)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(origin, key, value, "a size must not be negative")
        if value >= SIZE_LIMIT:
            raise ConfigError(origin, key, value, SIZE_TOO_LARGE)
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m:
            whole, frac, unit = m.group(1), m.group(2) or "", _UNITS[m.group(3).upper()]
            # Exact decimal arithmetic (a float of 400 digits is inf): first bound the
            # integer part by its length, so no huge number is ever built.
            if len(whole.lstrip("0")) > 20:
                raise ConfigError(origin, key, value, SIZE_TOO_LARGE)
            with localcontext() as ctx:
                ctx.prec = len(whole) + len(frac) + 20   # enough for the product to be exact
                size = int(Decimal(f"{whole}.{frac or '0'}") * unit)
            if size >= SIZE_LIMIT:
                raise ConfigError(origin, key, value, SIZE_TOO_LARGE)
            return size
    raise ConfigError(origin, key, value, SIZE_HELP)


@dataclass(frozen=True, slots=True)
class Threshold:
    """One bound: a percentage of the total, or an absolute size."""

    percent: float | None = None
    size: int | None = None

    def bytes_of(self, total: int) -> int:
        if self.percent is not None:
            return int(total * self.percent / 100)
        assert self.size is not None
        return self.size

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{_percent_text(self.percent)}%"
        assert self.size is not None
        return size_text(self.size)


def _percent_text(pct: float) -> str:
    """The float's shortest repr written out without an exponent ("10", "2.5",
    "0.00001"): it reads back as the very same float (to_toml must load back equal), and
    a level is written in plain digits."""
    text = format(Decimal(repr(pct)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def size_text(size: int) -> str:
    """A size with its unit, exact: "512M", "2G", "4097B" (a level takes no bare number)."""
    for unit in ("T", "G", "M", "K"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}B"


@dataclass(frozen=True, slots=True)
class Level:
    """A level given as one or more thresholds; the lowest wins (earlyoom's -m/-M rule).
    An empty level is off."""

    thresholds: tuple[Threshold, ...] = ()

    def bytes_of(self, total: int) -> int | None:
        if not self.thresholds:
            return None
        return min(t.bytes_of(total) for t in self.thresholds)

    def describe(self) -> str:
        """For logs: "10%", "1.5 GiB", "min(5%, 1.0 GiB)", or "off"."""
        if not self.thresholds:
            return "off"
        parts = [str(t) if t.size is None else fmt_bytes(t.size) for t in self.thresholds]
        return parts[0] if len(parts) == 1 else f"min({', '.join(parts)})"

    def to_toml(self) -> object:
        if not self.thresholds:
            return "off"
        items: list[object] = [str(t) for t in self.thresholds]
        return items[0] if len(items) == 1 else items


LEVEL_HELP = ("a percentage like \"5%\", a size with a unit like "
              "\"512M\", \"2G\", \"1.5GiB\" or \"4096B\" (binary units K, M, G, T; B for "
              "bytes), a list of both (the lower wins), or \"off\"")
PERCENT_RANGE = "a percentage must be within 0-100%"
# re.ASCII: float() also reads "\u0665" (Arabic-Indic), "\uff15" (fullwidth), "5_0",
# "1e1", "nan" and "inf"; a level is written in ASCII digits or refused
_PERCENT_RE = re.compile(r"\s*([0-9]{1,20}(?:\.[0-9]{0,400})?|\.[0-9]{1,400})\s*%\s*", re.ASCII)
_BARE_RE = re.compile(r"\s*[0-9]{1,20}(?:\.[0-9]{0,20})?\s*", re.ASCII)
# a number, but outside 0-100 ("-1%", "150%", "inf%"): said so rather than "not a level"
_OUT_OF_RANGE_RE = re.compile(r"\s*(?:-?\s*[0-9]+(?:\.[0-9]*)?|[+-]?inf(?:inity)?)\s*%\s*",
                              re.IGNORECASE | re.ASCII)
_HAS_UNIT_RE = re.compile(r"[KMGTB]\s*$", re.IGNORECASE | re.ASCII)


def _bare_number(origin: str, key: str, value: object, item: object, total: str) -> ConfigError:
    """A level written as a plain number: earlyoom's -m 5 means 5 %, our size "5" meant 5
    bytes, so neither reading is taken; the message shows both."""
    text = _percent_text(item) if isinstance(item, float) else str(item).strip()
    number = float(text)
    if "." in text:
        readings = (f"write \"{text}%\" ({text} % of {total}), or a size with a unit: "
                    "B, K, M, G or T (e.g. \"512M\")")
    elif number < 100:
        readings = (f"write \"{text}%\" ({text} % of {total}) or \"{text}B\" ({text} bytes); "
                    "sizes take a unit: B, K, M, G or T")
    else:
        readings = (f"write \"{text}B\" ({text} bytes, {fmt_bytes(int(number))}) or a "
                    f"percentage of {total} like \"5%\"; sizes take a unit: B, K, M, G or T")
    return ConfigError(origin, key, value, f"a bare number is ambiguous: {readings}")


def parse_level(value: object, origin: str, key: str, *, total: str = "MemTotal",
                always_at: float | None = 100.0) -> Level:
    """A level: "off", a percentage of `total`, a size with a unit, or a list of them.

    A percentage at or above `always_at` is refused: MemAvailable is never above
    MemTotal (nor SwapFree above SwapTotal, nor a cgroup's headroom above its limit),
    so such a level would always hold and the daemon would stay at it for good.  None:
    up to 100 % is fine (psi.gate: 100 % opens the gate always)."""
    if value in ("off", []):
        return Level()
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, list | bool):
            raise ConfigError(origin, key, value, LEVEL_HELP)
        if isinstance(item, int | float) or (isinstance(item, str)
                                              and _BARE_RE.fullmatch(item)):
            if isinstance(item, int | float) and not (0 <= item < SIZE_LIMIT):
                raise ConfigError(origin, key, value, LEVEL_HELP)  # negative, nan, inf
            raise _bare_number(origin, key, value, item, total)
        if not isinstance(item, str):
            raise ConfigError(origin, key, value, LEVEL_HELP)
        if item.strip().endswith("%"):
            m = _PERCENT_RE.fullmatch(item)
            if m is None:
                raise ConfigError(origin, key, value, PERCENT_RANGE
                                  if _OUT_OF_RANGE_RE.fullmatch(item) else LEVEL_HELP)
            pct = float(m.group(1))
            if pct > 100:
                raise ConfigError(origin, key, value, PERCENT_RANGE)
            if always_at is not None and pct >= always_at:
                raise ConfigError(origin, key, value,
                                  f"{pct:g}% would always hold ({_ALWAYS[total]}), leaving the "
                                  "daemon at this level for good: give a percentage below "
                                  f"{always_at:g}%, or \"off\"")
            out.append(Threshold(percent=pct))
            continue
        if not _HAS_UNIT_RE.search(item):
            raise ConfigError(origin, key, value, LEVEL_HELP)
        try:
            out.append(Threshold(size=parse_size(item, origin, key)))
        except ConfigError as e:
            allowed = SIZE_TOO_LARGE if e.allowed == SIZE_TOO_LARGE else LEVEL_HELP
            raise ConfigError(origin, key, value, allowed) from None
    return Level(tuple(out))


_TOTAL_OF = {"memory": "MemTotal", "swap": "SwapTotal"}
_ALWAYS = {"MemTotal": "MemAvailable is never above MemTotal",
           "SwapTotal": "SwapFree is never above SwapTotal",
           "the cgroup's limit": "a cgroup's headroom is never above its limit"}


@dataclass(frozen=True, slots=True)
class PsiTrigger:
    """A kernel PSI trigger: "<some|full> <stall_us> <window_us>"."""

    kind: str
    stall_us: int
    window_us: int

    def __str__(self) -> str:
        return f"{self.kind} {self.stall_us} {self.window_us}"


_PSI_NUMBER = re.compile(r"[0-9]{1,32}")
PSI_HELP = ("\"some|full <stall_us> <window_us>\" with the window 500000-10000000 us "
            "and 0 < stall <= window (e.g. \"full 300000 1000000\"), or \"off\"")


def parse_psi(value: object, origin: str, key: str) -> PsiTrigger | None:
    if value == "off":
        return None
    if not isinstance(value, str):
        raise ConfigError(origin, key, value, PSI_HELP)
    parts = value.split()
    # ASCII digits only ("\u00b2".isdigit() is true, but int() refuses it), and few of
    # them (int() refuses more than 4300; the window has at most 8 that matter)
    if len(parts) != 3 or parts[0] not in ("some", "full") or not all(
            _PSI_NUMBER.fullmatch(p) for p in parts[1:]):
        raise ConfigError(origin, key, value, PSI_HELP)
    stall, window = int(parts[1]), int(parts[2])
    # kernel/sched/psi.c psi_trigger_create: window 500ms..10s, 0 < threshold <= window.
    if not 500_000 <= window <= 10_000_000 or not 0 < stall <= window:
        raise ConfigError(origin, key, value, PSI_HELP)
    return PsiTrigger(parts[0], stall, window)


# --- the "when" expression: how sources combine ---------------------------------------

_TOKEN = re.compile(r"\s*(?:([a-z_]+)|(&)|(\|)|(\()|(\)))")
SCOPE_SOURCES = ("headroom", "psi", "events")


def when_help(sources: tuple[str, ...]) -> str:
    names = ", ".join(sources[:-1]) + " and " + sources[-1]
    example = f"{sources[0]} & {sources[1]} | {sources[2]}"
    return (f"an expression over {names} with & (and), | (or) and parentheses, "
            f"e.g. \"{example}\"; or \"any\" / \"all\" of the three")


WHEN_HELP = when_help(SOURCES)

When = tuple[tuple[str, ...], ...]  # disjunctive normal form: OR of ANDs of source names

WHEN_MAX_DEPTH = 16   # parentheses nested deeper are refused (the parser recurses on them)
WHEN_MAX_TERMS = 64   # "(a|b|c) & (a|b|c) & ..." grows exponentially in normal form


def parse_when(value: object, origin: str, key: str,
               sources: tuple[str, ...] = SOURCES) -> When:
    """Parse into disjunctive normal form; '&' binds tighter than '|'."""
    if value == "any":
        return tuple((s,) for s in sources)
    if value == "all":
        return (sources,)
    err = ConfigError(origin, key, value, when_help(sources))
    if not isinstance(value, str) or not value.strip():
        raise err
    tokens: list[str] = []
    pos = depth = 0
    text = value.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or (m.group(1) is not None and m.group(1) not in sources):
            raise err
        tokens.append(m.group(m.lastindex or 0))
        pos = m.end()
        depth += {"(": 1, ")": -1}.get(tokens[-1], 0)
        if depth > WHEN_MAX_DEPTH:
            raise ConfigError(origin, key, value,
                              f"parentheses nested more than {WHEN_MAX_DEPTH} deep; "
                              + when_help(sources))

    def too_many() -> ConfigError:
        return ConfigError(origin, key, value,
                           f"expands to more than {WHEN_MAX_TERMS} alternatives (an '&' of "
                           "'|' groups multiplies them); write it more simply, e.g. "
                           "\"any\" or \"all\"")

    # recursive descent over an index (slicing the token list at every step would be
    # quadratic in a long "memory & memory & ..." chain)
    at = 0

    def peek() -> str | None:
        return tokens[at] if at < len(tokens) else None

    def parse_or() -> When:
        nonlocal at
        terms = parse_and()
        while peek() == "|":
            at += 1
            more = parse_and()
            if len(terms) + len(more) > WHEN_MAX_TERMS:
                raise too_many()
            terms = terms + more
        return terms

    def parse_and() -> When:
        nonlocal at
        terms = parse_atom()
        while peek() == "&":
            at += 1
            right = parse_atom()
            if len(terms) * len(right) > WHEN_MAX_TERMS:
                raise too_many()
            terms = tuple(tuple(dict.fromkeys(a + b)) for a in terms for b in right)
        return terms

    def parse_atom() -> When:
        nonlocal at
        tok = peek()
        if tok is not None and tok in sources:
            at += 1
            return ((tok,),)
        if tok == "(":
            at += 1
            inner = parse_or()
            if peek() == ")":
                at += 1
                return inner
        raise err

    result = parse_or()
    if at != len(tokens):
        raise err
    return result


def format_when(when: When) -> str:
    return " | ".join(" & ".join(term) for term in when)


# --- the configuration ------------------------------------------------------------------


def _default_rules() -> tuple[Rule, ...]:
    return ()


EVENT_COUNTERS = ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")
UNITS = ("process", "cgroup")
SELECTS = ("size", "growth", "pressure")


@dataclass(frozen=True)
class ScopeConfig:
    """A cgroup v2 subtree watched on its own: headroom of memory.current against
    memory.max/high, PSI triggers on its memory.pressure, memory.events counters."""

    name: str
    cgroup: str                          # path or glob, absolute or under the cgroup2 mount
    when: When = (("headroom",), ("psi",), ("events",))
    headroom: Mapping[str, Level] = field(default_factory=lambda: {
        "warn": Level((Threshold(percent=10.0),)),
        "term": Level(),
        "kill": Level((Threshold(percent=3.0),)),
    })
    psi: Mapping[str, PsiTrigger | None] = field(default_factory=lambda: {
        "warn": PsiTrigger("some", 300_000, 2_000_000),
        "term": None,
        "kill": PsiTrigger("full", 600_000, 2_000_000),
    })
    events: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {
        "warn": ("high",), "term": (), "kill": ("oom",),
    })
    unit: str = "process"                # or "cgroup": kill a child cgroup whole
    select: str = "size"                 # unit = cgroup: by size, growth or pressure


@dataclass(frozen=True)
class Config:
    """The effective configuration (defaults serve a desktop or a small server)."""

    # [daemon]
    dry_run: bool = False
    reapers: int = 2
    mlockall: bool = True
    oom_score_adj: int = -1000
    nice: int = -10
    realtime: bool = False
    log: str = "auto"
    recovery_timeout: float = 5.0
    # [detect]
    when: When = (("memory", "swap"), ("psi",))
    poll_min: float = 0.01
    poll_max: float = 1.0
    scan_interval: float = 5.0
    # [memory] [swap] (MemAvailable / SwapFree against MemTotal / SwapTotal)
    memory: Mapping[str, Level] = field(default_factory=lambda: {
        "warn": Level((Threshold(percent=10.0),)),
        "term": Level((Threshold(percent=5.0),)),
        "kill": Level((Threshold(percent=2.5),)),
    })
    swap: Mapping[str, Level] = field(default_factory=lambda: {
        "warn": Level((Threshold(percent=10.0),)),
        "term": Level((Threshold(percent=5.0),)),
        "kill": Level((Threshold(percent=2.5),)),
    })
    # [psi]: kernel triggers on /proc/pressure/memory.  Windows are multiples of 2 s,
    # the only ones the kernel accepts without CAP_SYS_RESOURCE.
    psi: Mapping[str, PsiTrigger | None] = field(default_factory=lambda: {
        "warn": PsiTrigger("some", 300_000, 2_000_000),
        "term": None,
        "kill": PsiTrigger("full", 800_000, 2_000_000),
    })
    # PSI counts on the machine scope only while MemAvailable is at or below this.  The
    # kernel charges the stall of a cgroup reclaiming at its own memory.max to every
    # ancestor, up to /proc/pressure/memory: one container at its limit would otherwise
    # make the machine scope kill the biggest process of the machine, an innocent one.
    psi_gate: Level = field(default_factory=lambda: Level((Threshold(percent=20.0),)))
    # [kill]
    term_timeout: float = 5.0
    sort_by: SortBy = SortBy.OOM_SCORE
    min_rss: int = 0
    mrelease: bool = True
    demote: bool = False
    # Families (families.py): kill a growing process group, session, parent tree or leaf
    # cgroup whole when it outranks every single process; growth in the episode counts
    # this many times what is held.
    families: bool = True
    growth_weight: float = 1.0
    pods: bool = True   # Kubernetes QoS order and pause processes (policy.rank)
    # [[rule]]
    rules: tuple[Rule, ...] = field(default_factory=_default_rules)
    # [[scope]]
    scopes: tuple[ScopeConfig, ...] = ()
    # [events]: kill reports and pressure episodes as JSON lines ("" off, "-" stdout)
    events_path: str = ""
    # [metrics]: Prometheus exposition ("" off); listen "HOST:PORT"; textfile for
    # node-exporter's textfile collector
    metrics_listen: str = ""
    metrics_textfile: str = ""
    # [hooks]: argv lists run without a shell, victim details in MREAPER_* variables
    pre_kill: tuple[str, ...] = ()
    pre_kill_timeout: float = 2.0
    post_kill: tuple[str, ...] = ()
    # [status]: root-only UNIX socket for `mreaper status` / `mreaper top` ("" off)
    status_socket: str = "/run/mreaper/status.sock"
    origin: str = "built-in defaults"


_LOGS = ("auto", "plain", "journal")


def _check_type(origin: str, key: str, value: object, kind: type | tuple[type, ...],
                allowed: str) -> None:
    if isinstance(value, bool) and kind is not bool and bool not in (
            kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(origin, key, value, allowed)
    if not isinstance(value, kind):
        raise ConfigError(origin, key, value, allowed)


def _number(origin: str, key: str, value: object, lo: float, hi: float, *,
            unit: str = "seconds") -> float:
    allowed = f"a number of {unit} from {lo:g} to {hi:g}"
    _check_type(origin, key, value, (int, float), allowed)
    assert isinstance(value, int | float)
    if not lo <= value <= hi:
        raise ConfigError(origin, key, value, allowed)
    return float(value)


def _integer(origin: str, key: str, value: object, lo: int, hi: int) -> int:
    allowed = f"an integer from {lo} to {hi}"
    _check_type(origin, key, value, int, allowed)
    assert isinstance(value, int)
    if not lo <= value <= hi:
        raise ConfigError(origin, key, value, allowed)
    return value


def _bool(origin: str, key: str, value: object) -> bool:
    _check_type(origin, key, value, bool, "true or false")
    assert isinstance(value, bool)
    return value


def _choice(origin: str, key: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(origin, key, value, "one of " + ", ".join(f'"{c}"' for c in choices))
    assert isinstance(value, str)
    return value


_DAEMON_KEYS = ("dry_run", "reapers", "mlockall", "oom_score_adj", "nice", "realtime", "log",
                "recovery_timeout")
_DETECT_KEYS = ("when", "poll_min", "poll_max", "scan_interval")
_KILL_KEYS = ("term_timeout", "sort_by", "min_rss", "mrelease", "demote", "families",
              "growth_weight", "pods")
_RULE_KEYS = ("action", "name", "cmdline", "exe", "cgroup", "user", "adjust")
_SECTIONS = ("daemon", "detect", "memory", "swap", "psi", "kill", "rule", "scope", "events",
             "metrics", "hooks", "status")
_SCOPE_KEYS = ("name", "cgroup", "when", "headroom", "psi", "events", "unit", "select")
_SCOPE_NAME_RE = re.compile(r"[A-Za-z0-9_.:/*?\[\]\-]{1,128}")
SCOPE_NAME_HELP = "1-128 characters: letters, digits, _ . : / * ? [ ] -"
_LISTEN_RE = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


def _unknown(origin: str, where: str, table: Mapping[str, object], known: tuple[str, ...]) -> None:
    for key in table:
        if key not in known:
            prefix = f"{where}." if where else ""
            raise ConfigError(origin, f"{prefix}{key}", table[key],
                              "unknown key; known here: " + ", ".join(known))


def _table(origin: str, data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(origin, name, value, "a table ([" + name + "])")
    return value


def apply(base: Config, data: Mapping[str, Any], origin: str, *, rule_start: int = 1) -> Config:
    """Overlay a parsed TOML document (or CLI overrides in the same shape) on `base`.
    The [[rule]] tables are numbered from `rule_start` (in labels and error keys), so
    rules added after others can carry on their numbering."""
    _unknown(origin, "", data, _SECTIONS)
    changes: dict[str, Any] = {"origin": origin}
    d = _table(origin, data, "daemon")
    _unknown(origin, "daemon", d, _DAEMON_KEYS)
    for key in ("dry_run", "mlockall", "realtime"):
        if key in d:
            changes[key] = _bool(origin, f"daemon.{key}", d[key])
    if "reapers" in d:
        changes["reapers"] = _integer(origin, "daemon.reapers", d["reapers"], 1, 16)
    if "oom_score_adj" in d:
        changes["oom_score_adj"] = _integer(origin, "daemon.oom_score_adj", d["oom_score_adj"],
                                            -1000, 1000)
    if "nice" in d:
        changes["nice"] = _integer(origin, "daemon.nice", d["nice"], -20, 19)
    if "log" in d:
        changes["log"] = _choice(origin, "daemon.log", d["log"], _LOGS)
    if "recovery_timeout" in d:
        changes["recovery_timeout"] = _number(origin, "daemon.recovery_timeout",
                                              d["recovery_timeout"], 0.1, 120)

    t = _table(origin, data, "detect")
    _unknown(origin, "detect", t, _DETECT_KEYS)
    if "when" in t:
        changes["when"] = parse_when(t["when"], origin, "detect.when")
    for key, lo, hi in (("poll_min", 0.001, 1.0), ("poll_max", 0.01, 10.0),
                        ("scan_interval", 0.1, 600.0)):
        if key in t:
            changes[key] = _number(origin, f"detect.{key}", t[key], lo, hi)

    given: dict[str, Mapping[str, object]] = {}   # the levels this overlay sets, as written
    for section in ("memory", "swap"):
        s = _table(origin, data, section)
        _unknown(origin, section, s, LEVELS)
        given[section] = s
        if s:
            levels = dict(getattr(base, section))
            for lvl in LEVELS:
                if lvl in s:
                    levels[lvl] = parse_level(s[lvl], origin, f"{section}.{lvl}",
                                              total=_TOTAL_OF[section])
            changes[section] = levels
    p = _table(origin, data, "psi")
    _unknown(origin, "psi", p, (*LEVELS, "gate"))
    if any(lvl in p for lvl in LEVELS):
        triggers = dict(base.psi)
        for lvl in LEVELS:
            if lvl in p:
                triggers[lvl] = parse_psi(p[lvl], origin, f"psi.{lvl}")
        changes["psi"] = triggers
    if "gate" in p:
        # 100 % is meaningful here: the gate always open (PSI always counts)
        changes["psi_gate"] = parse_level(p["gate"], origin, "psi.gate", always_at=None)

    k = _table(origin, data, "kill")
    _unknown(origin, "kill", k, _KILL_KEYS)
    if "term_timeout" in k:
        changes["term_timeout"] = _number(origin, "kill.term_timeout", k["term_timeout"],
                                          0, 3600)
    if "sort_by" in k:
        changes["sort_by"] = SortBy(_choice(origin, "kill.sort_by", k["sort_by"],
                                            tuple(s.value for s in SortBy)))
    if "min_rss" in k:
        changes["min_rss"] = parse_size(k["min_rss"], origin, "kill.min_rss")
    for key in ("mrelease", "demote", "families", "pods"):
        if key in k:
            changes[key] = _bool(origin, f"kill.{key}", k[key])
    if "growth_weight" in k:
        changes["growth_weight"] = _number(origin, "kill.growth_weight", k["growth_weight"],
                                           0, 100, unit="times what is held (0: off)")

    _apply_ops(origin, data, changes)
    if "scope" in data:
        scopes = data["scope"]
        if not isinstance(scopes, list):
            raise ConfigError(origin, "scope", scopes, "an array of tables ([[scope]])")
        changes["scopes"] = tuple(_scope(origin, i, sc) for i, sc in enumerate(scopes, 1))
        names = [sc.name for sc in changes["scopes"]]
        for name in names:
            if names.count(name) > 1 or name == "machine":
                raise ConfigError(origin, "scope.name", name,
                                  "scope names must be unique and not \"machine\"")

    if "rule" in data:
        rules = data["rule"]
        if not isinstance(rules, list):
            raise ConfigError(origin, "rule", rules, "an array of tables ([[rule]])")
        changes["rules"] = tuple(_rule(origin, i, r) for i, r in enumerate(rules, rule_start))

    cfg = dataclasses.replace(base, **changes)
    _check_coherence(cfg, given)
    return cfg


def _path(origin: str, key: str, value: object, *, stdout: bool = False) -> str:
    allowed = ("an absolute path" + (', "-" for standard output' if stdout else "") +
               ', or "" for off')
    _check_type(origin, key, value, str, allowed)
    assert isinstance(value, str)
    if value and not value.startswith("/") and not (stdout and value == "-"):
        raise ConfigError(origin, key, value, allowed)
    if "\0" in value:  # no file has one; open() would raise ValueError later
        raise ConfigError(origin, key, value, "a path without NUL characters")
    return value


def _argv(origin: str, key: str, value: object) -> tuple[str, ...]:
    allowed = ("a command as a list of strings, the first an absolute path, run without a "
               'shell (e.g. ["/usr/local/bin/notify", "--urgent"]), or [] for none')
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ConfigError(origin, key, value, allowed)
    if value and not value[0].startswith("/"):
        raise ConfigError(origin, key, value, allowed)
    if any("\0" in a for a in value):  # os.stat and exec refuse them with ValueError
        raise ConfigError(origin, key, value, "arguments without NUL characters")
    if value:
        # Running as root, the hook's whole path (and its #! interpreter's) must be
        # root's: hooks.run_hook checks it again before every run.
        try:
            trust.check_executable(value[0], enforce=os.geteuid() == 0)
        except trust.Untrusted as e:
            raise ConfigError(origin, key, value[0], e.reason(value[0])) from None
        except trust.NotExecutable as e:
            raise ConfigError(origin, key, value, e.strerror or str(e)) from None
        except OSError as e:
            raise ConfigError(origin, key, value, f"{value[0]}: {e.strerror}") from None
    return tuple(value)


def _apply_ops(origin: str, data: Mapping[str, Any], changes: dict[str, Any]) -> None:
    e = _table(origin, data, "events")
    _unknown(origin, "events", e, ("path",))
    if "path" in e:
        changes["events_path"] = _path(origin, "events.path", e["path"], stdout=True)
    m = _table(origin, data, "metrics")
    _unknown(origin, "metrics", m, ("listen", "textfile"))
    if "listen" in m:
        value = m["listen"]
        allowed = 'HOST:PORT (e.g. "127.0.0.1:9772", "[::1]:9772") with port 1-65535, or ""'
        _check_type(origin, "metrics.listen", value, str, allowed)
        match = _LISTEN_RE.fullmatch(value) if value else None
        if value and (match is None or not 1 <= int(match.group(2)) <= 65535):
            raise ConfigError(origin, "metrics.listen", value, allowed)
        changes["metrics_listen"] = value
    if "textfile" in m:
        changes["metrics_textfile"] = _path(origin, "metrics.textfile", m["textfile"])
    h = _table(origin, data, "hooks")
    _unknown(origin, "hooks", h, ("pre_kill", "pre_kill_timeout", "post_kill"))
    for key in ("pre_kill", "post_kill"):
        if key in h:
            changes[key] = _argv(origin, f"hooks.{key}", h[key])
    if "pre_kill_timeout" in h:
        changes["pre_kill_timeout"] = _number(origin, "hooks.pre_kill_timeout",
                                              h["pre_kill_timeout"], 0.0, 60)
    st = _table(origin, data, "status")
    _unknown(origin, "status", st, ("socket",))
    if "socket" in st:
        changes["status_socket"] = _path(origin, "status.socket", st["socket"])


def _regex(origin: str, key: str, value: object) -> Pattern:
    """A rule's pattern: valid, and of a form whose matching time is bounded whatever
    text a process's user gives it (policy.Pattern says which forms are refused)."""
    _check_type(origin, key, value, str, "a regular expression (string)")
    assert isinstance(value, str)
    try:
        return Pattern(value)
    except PatternRefused as e:
        raise ConfigError(origin, key, value, str(e)) from None


def _uid(origin: str, key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32 - 1:
        return value
    if isinstance(value, str):
        try:
            return pwd.getpwnam(value).pw_uid
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            raise ConfigError(origin, key, value, "no such user on this system") from None
    raise ConfigError(origin, key, value, "a user name or a numeric uid")


def _rule(origin: str, index: int, r: object) -> Rule:
    where = f"rule[{index}]"
    if not isinstance(r, dict):
        raise ConfigError(origin, where, r, "a table with action and at least one matcher")
    _unknown(origin, where, r, _RULE_KEYS)
    if "action" not in r:
        raise ConfigError(origin, f"{where}.action", None,  # None: shown as missing
                          "required: one of \"prefer\", \"avoid\", \"protect\"")
    action = Action(_choice(origin, f"{where}.action", r["action"],
                            tuple(a.value for a in Action)))
    matchers: dict[str, Any] = {}
    for key in ("name", "cmdline", "exe", "cgroup"):
        if key in r:
            matchers[key] = _regex(origin, f"{where}.{key}", r[key])
    if "user" in r:
        matchers["uid"] = _uid(origin, f"{where}.user", r["user"])
    if not matchers:
        raise ConfigError(origin, where, r,
                          "needs at least one matcher: name, cmdline, exe, cgroup or user")
    adjust = 0
    if "adjust" in r:
        if action is Action.PROTECT:
            raise ConfigError(origin, f"{where}.adjust", r["adjust"],
                              "a protect rule takes no adjust: protected processes are never "
                              "killed")
        adjust = _integer(origin, f"{where}.adjust", r["adjust"], -100_000, 100_000)
        # the same rule as policy.Rule's, which would raise a plain ValueError
        if action is Action.PREFER and adjust < 0:
            raise ConfigError(origin, f"{where}.adjust", adjust,
                              "a prefer rule raises the score: an integer from 0 to 100000 "
                              "(0 for the default +300); use an avoid rule to lower it")
        if action is Action.AVOID and adjust > 0:
            raise ConfigError(origin, f"{where}.adjust", adjust,
                              "an avoid rule lowers the score: an integer from -100000 to 0 "
                              "(0 for the default -300); use a prefer rule to raise it")
    shown = " ".join(f"{k}={v!r}" for k, v in r.items() if k not in ("action", "adjust"))
    return Rule(action=action, adjust=adjust, label=f"rule {index} ({action.value} {shown})",
                **matchers)


def _scope(origin: str, index: int, sc: object) -> ScopeConfig:
    where = f"scope[{index}]"
    if not isinstance(sc, dict):
        raise ConfigError(origin, where, sc, "a table with at least cgroup")
    _unknown(origin, where, sc, _SCOPE_KEYS)
    if "cgroup" not in sc:
        raise ConfigError(origin, f"{where}.cgroup", None,
                          "required: a cgroup path or glob under the cgroup2 mount")
    pattern = sc["cgroup"]
    _check_type(origin, f"{where}.cgroup", pattern, str,
                "a cgroup path or glob under the cgroup2 mount")
    assert isinstance(pattern, str)
    # "", "/", ".", "./", "/./": all name the root
    if posixpath.normpath(pattern.strip("/")) == "." or ".." in pattern.split("/"):
        raise ConfigError(origin, f"{where}.cgroup", pattern,
                          "a cgroup below the root, without '..' (the root is the machine scope)")
    changes: dict[str, Any] = {"cgroup": pattern}
    if "name" in sc:
        name = sc["name"]
        _check_type(origin, f"{where}.name", name, str, "a short name for logs and metrics")
        if not _SCOPE_NAME_RE.fullmatch(name):
            raise ConfigError(origin, f"{where}.name", name, SCOPE_NAME_HELP)
    else:
        name = pattern
        if not _SCOPE_NAME_RE.fullmatch(name):
            raise ConfigError(origin, f"{where}.cgroup", pattern,
                              f"without a name the pattern is the scope's name, and a name is "
                              f"{SCOPE_NAME_HELP}; give {where}.name")
    changes["name"] = name
    base = ScopeConfig(name=str(name), cgroup=pattern)
    if "when" in sc:
        changes["when"] = parse_when(sc["when"], origin, f"{where}.when", SCOPE_SOURCES)
    for key in ("headroom", "psi", "events"):
        if key not in sc:
            continue
        table = sc[key]
        if not isinstance(table, dict):
            raise ConfigError(origin, f"{where}.{key}", table,
                              "a table with warn, term and/or kill")
        _unknown(origin, f"{where}.{key}", table, LEVELS)
        merged: dict[str, Any] = dict(getattr(base, key))
        for lvl, value in table.items():
            k = f"{where}.{key}.{lvl}"
            if key == "headroom":
                merged[lvl] = parse_level(value, origin, k, total="the cgroup's limit")
            elif key == "psi":
                merged[lvl] = parse_psi(value, origin, k)
            else:
                allowed = ("a list of memory.events counters: " + ", ".join(EVENT_COUNTERS))
                if not isinstance(value, list) or any(v not in EVENT_COUNTERS for v in value):
                    raise ConfigError(origin, k, value, allowed)
                merged[lvl] = tuple(value)
        changes[key] = merged
    if "unit" in sc:
        changes["unit"] = _choice(origin, f"{where}.unit", sc["unit"], UNITS)
    if "select" in sc:
        changes["select"] = _choice(origin, f"{where}.select", sc["select"], SELECTS)
    scope = dataclasses.replace(base, **changes)
    headroom = sc.get("headroom", {})
    _check_order(origin, f"{where}.headroom", scope.headroom, headroom)
    return scope


def _check_coherence(cfg: Config,
                     given: Mapping[str, Mapping[str, object]] | None = None) -> None:
    origin = cfg.origin
    if cfg.poll_min > cfg.poll_max:
        raise ConfigError(origin, "detect.poll_min", cfg.poll_min,
                          f"must not exceed detect.poll_max ({cfg.poll_max:g})")
    for section in ("memory", "swap"):
        _check_order(origin, section, getattr(cfg, section), (given or {}).get(section, {}))


def check_totals(cfg: Config, mem_total: int, swap_total: int) -> None:
    """The levels against this machine's MemTotal and SwapTotal (known at run start, not
    at parse): a level at or above its total always holds, since MemAvailable never
    exceeds MemTotal nor SwapFree SwapTotal, and would leave the daemon at that level
    for good (a kill level: killing one process after another).  Percentages are below
    100 % by parse_level; this catches the sizes ("40G" on a 16 GiB machine).  Without
    swap (SwapTotal 0) the swap source is neutral (detect.source_states): not checked."""
    for section, total, name, figure in (
            ("memory", mem_total, "MemTotal", "MemAvailable"),
            ("swap", swap_total, "SwapTotal", "SwapFree")):
        if total <= 0:
            continue
        levels: Mapping[str, Level] = getattr(cfg, section)
        for lvl in LEVELS:
            bound = levels[lvl].bytes_of(total)
            if bound is not None and bound >= total:
                raise ConfigError(
                    cfg.origin, f"{section}.{lvl}", levels[lvl].to_toml(),
                    f"{fmt_bytes(bound)} is at or above this machine's {name} "
                    f"({fmt_bytes(total)}): {figure} is never above {name}, so the level "
                    f"would always hold and the daemon would stay at it for good; give a "
                    f"size below {name} or a percentage below 100%")


_NOMINAL_TOTALS = ((1 << 30, "1 GiB"), (1 << 40, "1 TiB"))


def _check_order(origin: str, section: str, levels: Mapping[str, Level],
                 given: Mapping[str, object] | None = None) -> None:
    """warn >= term >= kill.  A level given as % and one as a size can only be ordered
    against a total, so both a small and a large nominal total are checked.

    `given` holds the levels the document being applied sets, as written: of two levels
    out of order, the one it set is blamed (the lower one when it set both or neither)."""
    given = given or {}
    for total, total_text in _NOMINAL_TOTALS:
        values = [(lvl, levels[lvl].bytes_of(total)) for lvl in LEVELS]
        present = [(lvl, v) for lvl, v in values if v is not None]
        for (hi_name, hi), (lo_name, lo) in itertools.pairwise(present):
            if lo <= hi:
                continue
            kinds = {t.size is None for lvl in (hi_name, lo_name)
                     for t in levels[lvl].thresholds}
            if hi_name in given and lo_name not in given:
                blamed, other, relation = hi_name, lo_name, "above"
                shown, against = hi, lo
            else:
                blamed, other, relation = lo_name, hi_name, "below"
                shown, against = lo, hi
            value = given[blamed] if blamed in given else levels[blamed].to_toml()
            allowed = (f"must be at or {relation} {section}.{other} "
                       f"({levels[other].describe()})")
            if len(kinds) > 1:  # a percentage against a size: say on which total
                allowed += (f": on a {total_text} total it is {fmt_bytes(shown)} against "
                            f"{fmt_bytes(against)}")
            raise ConfigError(origin, f"{section}.{blamed}", value, allowed)


def load(path: str | None, *, required: bool) -> Config:
    """Defaults overlaid with the file at `path`.  A missing default file is fine (the
    built-in defaults serve); a missing file the user named is an error, and so is an
    empty path the user gave (`--config ""`)."""
    if path == "" and required:
        raise ConfigError("command line", "--config", path,
                          "an empty path: give the path of a TOML file")
    target = path or DEFAULT_PATH
    if "\0" in target:  # open() would raise ValueError
        raise ConfigError(target, "--config", target, "a path without NUL characters")
    try:
        data = tomllib.loads(_read_config(target).decode())
    except FileNotFoundError:
        if required:
            raise ConfigError(target, "--config", target, "no such file") from None
        return Config()
    except PermissionError:
        raise ConfigError(target, "--config", target, "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(target, "--config", target, "is a directory, not a file") from None
    except trust.TooLarge:
        raise ConfigError(target, "--config", target,
                          f"larger than {MAX_CONFIG_BYTES} bytes (1 MiB): a configuration "
                          "file is a short TOML document") from None
    except OSError as e:  # ENOTDIR, ELOOP, ENAMETOOLONG, EIO, ...
        raise ConfigError(target, "--config", target,
                          f"cannot read it: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(target, "(syntax)", str(e), "valid TOML") from None
    except UnicodeDecodeError as e:  # tomllib decodes the bytes first
        raise ConfigError(target, "(syntax)", str(e), "valid TOML (in UTF-8)") from None
    except RecursionError:  # tomllib recurses on nested arrays and inline tables
        raise ConfigError(target, "(syntax)", "arrays or tables nested too deeply",
                          "valid TOML") from None
    return apply(Config(), data, target)


MAX_CONFIG_BYTES = 1 << 20   # a real configuration is a few KiB


def _read_config(target: str) -> bytes:
    """The bytes of the configuration file, read without ever blocking: a FIFO, a
    device (/dev/zero, /dev/stdin on a terminal or a pipe) or a directory is refused
    before it is opened, and at most MAX_CONFIG_BYTES are read.  Running as root, the
    whole path must be root's (trust.resolve): every directory, every symlink and the
    file itself; the file opened is the one that was checked (same device and inode,
    opened with O_NOFOLLOW on the resolved path)."""
    st = os.stat(target)  # follows symlinks, opens nothing: a FIFO is not touched
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), target)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(target, "--config", target,
                          f"not a regular file but {trust.describe_type(st.st_mode)}: give "
                          "the path of a TOML file")
    if os.geteuid() == 0:
        try:
            # joined, not normalized: a ".." after a symlink is the kernel's to resolve
            resolved = trust.resolve(os.path.join(os.getcwd(), target))
        except trust.Untrusted as e:
            raise ConfigError(target, "--config", target, e.reason(target)) from None
        fd = trust.open_regular(resolved.path, nofollow=True)
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (resolved.st.st_dev, resolved.st.st_ino):
            os.close(fd)
            raise ConfigError(target, "--config", target,
                              "replaced while it was being checked; try again")
    else:
        fd = trust.open_regular(target)
    try:
        return trust.read_fd(fd, MAX_CONFIG_BYTES, target)
    finally:
        os.close(fd)


def to_toml(cfg: Config) -> str:
    """The effective configuration as a TOML document `load` accepts back."""
    out = [f"# effective configuration (from {cfg.origin})", "", "[daemon]"]

    def line(key: str, value: object) -> None:
        out.append(f"{key} = {_toml_value(value)}")

    for key in _DAEMON_KEYS:
        line(key, getattr(cfg, key))
    out += ["", "[detect]"]
    line("when", format_when(cfg.when))
    for key in ("poll_min", "poll_max", "scan_interval"):
        line(key, getattr(cfg, key))
    for section in ("memory", "swap"):
        out += ["", f"[{section}]"]
        levels: Mapping[str, Level] = getattr(cfg, section)
        for lvl in LEVELS:
            line(lvl, levels[lvl].to_toml())
    out += ["", "[psi]"]
    for lvl in LEVELS:
        trig = cfg.psi[lvl]
        line(lvl, str(trig) if trig else "off")
    line("gate", cfg.psi_gate.to_toml())
    out += ["", "[kill]"]
    line("term_timeout", cfg.term_timeout)
    line("sort_by", cfg.sort_by.value)
    line("min_rss", cfg.min_rss)
    line("mrelease", cfg.mrelease)
    line("demote", cfg.demote)
    line("families", cfg.families)
    line("growth_weight", cfg.growth_weight)
    line("pods", cfg.pods)
    for sc in cfg.scopes:
        out += ["", "[[scope]]"]
        line("name", sc.name)
        line("cgroup", sc.cgroup)
        line("when", format_when(sc.when))
        line("unit", sc.unit)
        line("select", sc.select)
        out.append("headroom = { " + ", ".join(
            f"{lvl} = {_toml_value(sc.headroom[lvl].to_toml())}"
            for lvl in LEVELS) + " }")
        out.append("psi = { " + ", ".join(
            f"{lvl} = {_toml_value(str(sc.psi[lvl]) if sc.psi[lvl] else 'off')}"
            for lvl in LEVELS) + " }")
        out.append("events = { " + ", ".join(
            f"{lvl} = {_toml_value(list(sc.events[lvl]))}" for lvl in LEVELS) + " }")
    out += ["", "[events]"]
    line("path", cfg.events_path)
    out += ["", "[metrics]"]
    line("listen", cfg.metrics_listen)
    line("textfile", cfg.metrics_textfile)
    out += ["", "[hooks]"]
    line("pre_kill", list(cfg.pre_kill))
    line("pre_kill_timeout", cfg.pre_kill_timeout)
    line("post_kill", list(cfg.post_kill))
    out += ["", "[status]"]
    line("socket", cfg.status_socket)
    for rule in cfg.rules:
        out += ["", "[[rule]]"]
        line("action", rule.action.value)
        for key in ("name", "cmdline", "exe", "cgroup"):
            pat = getattr(rule, key)
            if pat is not None:
                line(key, pat.pattern)
        if rule.uid is not None:
            line("user", rule.uid)
        if rule.adjust:
            line("adjust", rule.adjust)
    return "\n".join(out) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + _TOML_ESCAPE_RE.sub(_toml_escape, value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


_TOML_ESCAPE_RE = re.compile(r'["\\\x00-\x1f\x7f]')
_TOML_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r",
                 '"': '\\"', "\\": "\\\\"}


def _toml_escape(m: re.Match[str]) -> str:
    """A TOML basic-string escape: the short ones, else \\uXXXX (control characters)."""
    ch = m.group()
    return _TOML_ESCAPES.get(ch) or f"\\u{ord(ch):04X}"
