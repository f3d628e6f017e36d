"""Families as candidates: processes that take memory together, grouped and ranked as one.

Pure, over ranked candidate snapshots (`policy.Ranked`, whatever produced them: a full
scan or an incremental table) and each one's growth in the current pressure episode.

Ranking single processes picks the biggest one: a `make -j` of 200 compilers, a test
runner's workers, a forking server, together holding most of the memory, never
outrank one bigger idle service, which dies first (issue 15, seen in the lab VM for
mreaper, earlyoom and nohang alike).  So processes are grouped by what makes them one
workload, and a group that outranks every single process is killed whole:

* process group (a shell job: `make` and its compilers), session (a login, a terminal),
* parent tree (a process and its descendants down to TREE_LEVELS generations: a pool and
  its workers, so a pool that respawns its killed workers is killed at its parent),
* leaf cgroup (a systemd unit, a container).

A family's value is what it holds (its members' private memory, what killing them
frees) plus `weight` times what it grew in the episode; a single process is valued the
same way.  A family is killed whole only when two or more of its members grow and its
value without its biggest member is above every single eligible process's: a family
holding one leak is not a family of allocators, and its leak dies alone.  Among
overlapping families (a session holds a process group holds a tree) the smallest
within 10 % of the best value is chosen: an idle shell or editor in the same session
does not die with the build.

Never a family (`excluded`, with the reason, as explain shows it):
* one holding a process that must live (protect rule, oom_score_adj -1000,
  user.oomd_omit), one an avoid rule touches (avoid means later, not with the herd),
  one with a member outside the scope;
* mreaper's own process group, session, cgroup, or a tree holding mreaper: the daemon
  cannot see every member of those (itself, its parent: the scan leaves them out).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mreaper import policy
from mreaper.reap import fmt_bytes

MIN_MEMBERS = 2
TREE_LEVELS = 3  # a process belongs to the trees of at most this many ancestors
CLOSE = 0.9  # a smaller family within this share of the best value is preferred

Key = tuple[int, int]  # (pid, starttime)


@dataclass(frozen=True, slots=True)
class Own:
    """Where mreaper itself sits: families holding it are never killed whole."""

    pgrp: int = 0
    session: int = 0
    cgroup: str = ""
    ancestors: frozenset[int] = frozenset()  # mreaper's pid and every ancestor's


@dataclass(frozen=True)
class Family:
    kind: str                          # "process group" | "session" | "tree" | "cgroup"
    label: str                         # "process group 1234 'make'", "tree of 55 'pool'"...
    members: tuple[policy.Ranked, ...]  # parents before their children
    holds: int                         # bytes: what killing them frees
    growth: int                        # bytes grown in this episode
    value: int                         # holds + weight * growth
    excluded: str | None = None

    @property
    def eligible(self) -> bool:
        return self.excluded is None

    def describe(self) -> str:
        return (f"{self.label}: {len(self.members)} processes holding {fmt_bytes(self.holds)}, "
                f"grown {fmt_bytes(self.growth)}")


def value_of(holds: int, growth: int, weight: float) -> int:
    return holds + int(weight * max(growth, 0))


def _key(r: policy.Ranked) -> Key:
    return (r.candidate.pid, r.candidate.starttime)


def _depth_order(members: Iterable[policy.Ranked]) -> tuple[policy.Ranked, ...]:
    """Parents before their children (a parent that respawns its workers dies first).
    Depths are memoised: linear in the family, however deep its chain of forks."""
    by_pid = {r.candidate.pid: r for r in members}
    depth: dict[int, int] = {}
    for start in by_pid:
        chain, pid = [], start
        while pid in by_pid and pid not in depth and pid not in chain:
            chain.append(pid)
            pid = by_pid[pid].candidate.ppid
        d = depth.get(pid, -1) if pid in by_pid else -1
        for p in reversed(chain):
            d += 1
            depth[p] = d
    return tuple(sorted(by_pid.values(), key=lambda r: (depth[r.candidate.pid], r.candidate.pid)))


def _keys(c: policy.Candidate, by_pid: Mapping[int, policy.Ranked]
          ) -> Iterable[tuple[str, str | int]]:
    """The families `c` belongs to: its process group, session, leaf cgroup, and the
    trees of its nearest TREE_LEVELS ancestors among the candidates (a pool and its
    workers: 1; make, sh, cc: 2).  Bounded so a hostile chain of thousands of nested
    forks costs linear time, not quadratic."""
    if c.pgrp > 0:
        yield ("process group", c.pgrp)
    if c.session > 0:
        yield ("session", c.session)
    if c.cgroup not in ("", "/"):
        yield ("cgroup", c.cgroup)
    pid, seen = c.ppid, {c.pid}
    for _ in range(TREE_LEVELS):
        parent = by_pid.get(pid)
        if parent is None or pid in seen:
            break
        seen.add(pid)
        yield ("tree", pid)
        pid = parent.candidate.ppid


def group(ranked: Sequence[policy.Ranked], growth: Mapping[Key, int], *, weight: float,
          own: Own = Own(), growing_only: bool = False) -> list[Family]:
    """Every family of at least two processes among `ranked`, valued and judged,
    best value first.  `growth`: bytes each process grew in the episode (absent: 0).

    `growing_only`: only the families `choose` may pick, those with MIN_MEMBERS or more
    growing members.  The daemon's kill path asks for these: at 10,000 idle processes
    valuing and judging every family took 91 ms, and few processes grow."""
    by_pid = {r.candidate.pid: r for r in ranked}
    wanted: set[tuple[str, str | int]] | None = None
    if growing_only:
        growers: dict[tuple[str, str | int], int] = {}
        for r in ranked:
            if growth.get(_key(r), 0) > 0:
                for k in (*_keys(r.candidate, by_pid), ("tree", r.candidate.pid)):
                    growers[k] = growers.get(k, 0) + 1
        wanted = {k for k, n in growers.items() if n >= MIN_MEMBERS}
        if not wanted:
            return []
    groups: dict[tuple[str, str | int], list[policy.Ranked]] = {}
    for r in ranked:
        for k in _keys(r.candidate, by_pid):
            if wanted is None or k in wanted:
                # A tree holds its root too, first.
                groups.setdefault(k, [by_pid[int(k[1])]] if k[0] == "tree" else []).append(r)
    names = {pid: r.candidate.name for pid, r in by_pid.items()}
    out = []
    for (kind, ident), members in groups.items():
        if len(members) < MIN_MEMBERS:
            continue
        if kind == "cgroup":
            label = f"cgroup {ident}"
        elif kind == "tree":
            label = f"tree of {ident} {policy.printable(names.get(int(ident), '?'))!r}"
        else:
            leader = names.get(int(ident))
            label = f"{kind} {ident}" + (f" {policy.printable(leader)!r}" if leader else "")
        holds = sum(r.candidate.frees for r in members)
        grown = sum(max(growth.get(_key(r), 0), 0) for r in members)
        out.append(Family(kind, label, _depth_order(members), holds, grown,
                          value_of(holds, grown, weight),
                          _exclusion(kind, ident, members, own)))
    out.sort(key=lambda f: (f.excluded is not None, -f.value, len(f.members), f.label))
    return out


def _exclusion(kind: str, ident: str | int, members: Sequence[policy.Ranked],
               own: Own) -> str | None:
    if ((kind == "process group" and ident == own.pgrp)
            or (kind == "session" and ident == own.session)
            or (kind == "cgroup" and ident == own.cgroup)
            or (kind == "tree" and ident in own.ancestors)):
        return f"mreaper's own {kind}"
    for r in members:
        c = r.candidate
        who = f"{c.pid} {policy.printable(c.name)!r}"
        if r.must_live:
            return f"holds {who}, which must live: {r.excluded}"
        if any(": -" in t for t in r.touched_by):
            return f"holds {who}, which an avoid rule touches"
        if r.excluded is not None and "outside scope" in r.excluded:
            return f"holds {who}: {r.excluded}"
    return None


def choose(families: Sequence[Family], ranked: Sequence[policy.Ranked],
           growth: Mapping[Key, int], *, weight: float) -> tuple[Family | None, str]:
    """The family to kill whole, or None; and why, in either case (for the log and
    explain)."""
    def growers(f: Family) -> int:
        return sum(1 for r in f.members if growth.get(_key(r), 0) > 0)

    # Kubernetes' QoS order (policy.Ranked.tier, kill.pods) holds for families too: one
    # is killed whole only in the first tier that has an eligible process (a family is
    # in the tier of its most sheltered member), and is measured against that tier's
    # processes.  Without pods every process is in one tier: no change.
    first_tier = min((r.tier for r in ranked if r.eligible), default=None)
    eligible = [f for f in families if f.eligible and growers(f) >= MIN_MEMBERS
                and (first_tier is None or max(r.tier for r in f.members) <= first_tier)]
    if not eligible:
        return None, "no family with two or more growing members may be killed whole"
    best_value = max(f.value for f in eligible)
    near = [f for f in eligible if f.value >= best_value * CLOSE]
    family = min(near, key=lambda f: (len(f.members), -f.value, f.label))
    singles = [(value_of(r.candidate.frees, growth.get(_key(r), 0), weight), r)
               for r in ranked if r.eligible and r.tier == first_tier]
    top = max(singles, key=lambda s: s[0], default=None)
    # Without its biggest member the family must still outrank every single process: a
    # family that holds a leak is not a family of allocators (its leak dies alone).
    biggest = max(value_of(r.candidate.frees, growth.get(_key(r), 0), weight)
                  for r in family.members)
    rest = family.value - biggest
    if top is not None and top[0] >= rest:
        c = top[1].candidate
        return None, (f"{family.label} (value {fmt_bytes(family.value)}, "
                      f"{fmt_bytes(rest)} without its biggest member) does not outrank "
                      f"{c.pid} {policy.printable(c.name)!r} (value {fmt_bytes(top[0])})")
    beaten = "no single process" if top is None else (
        f"{top[1].candidate.pid} {policy.printable(top[1].candidate.name)!r} "
        f"(value {fmt_bytes(top[0])})")
    return family, (f"family {family.describe()} in this episode; value {fmt_bytes(family.value)} "
                    f"(growth weight {weight:g}) outranks {beaten}")


def explain_families(families: Sequence[Family], limit: int | None = 10) -> str:
    """A human table of families, best first, with why a family may not die whole."""
    shown = list(families if limit is None else families[:limit])
    if not shown:
        return "(no families of two or more candidates)"
    lines = []
    for f in shown:
        pids = " ".join(str(r.candidate.pid) for r in f.members[:8])
        more = f" +{len(f.members) - 8}" if len(f.members) > 8 else ""
        why = f.excluded or ("eligible" if f.growth > 0 else "not growing: not killed whole")
        lines.append(f"{f.describe()}; value {fmt_bytes(f.value)}; {why}; pids {pids}{more}")
    if len(families) > len(shown):
        lines.append(f"... {len(families) - len(shown)} more families not shown")
    return "\n".join(lines)
