"""families.py: grouping, valuing and judging families of candidates (pure)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mreaper import families, policy
from mreaper.families import Own
from mreaper.policy import Action, Candidate, Rule

MiB = 1 << 20


def cand(pid: int, *, ppid: int = 1, pgrp: int = 0, session: int = 0, cgroup: str = "",
         rss: int = 10 * MiB, name: str = "", private: int | None = None) -> Candidate:
    return Candidate(pid=pid, starttime=pid * 10, name=name or f"p{pid}", cmdline=(), exe="",
                     uid=1000, cgroup=cgroup, rss=rss, swap=0, oom_score=rss // MiB,
                     oom_score_adj=0, ppid=ppid, pgrp=pgrp, session=session, private=private)


def build(n: int = 30, *, each: int = 8 * MiB, bystander: int = 250 * MiB) -> list[Candidate]:
    """A `make` (pid 100) with n compilers in its process group and session 50, and an
    idle service (pid 10) bigger than any of them."""
    out = [cand(10, rss=bystander, pgrp=10, session=10, name="service"),
           cand(100, pgrp=100, session=50, name="make", rss=4 * MiB)]
    out += [cand(101 + i, ppid=100, pgrp=100, session=50, name="cc1", rss=each)
            for i in range(n)]
    return out


def grew(cands: list[Candidate], pids: set[int]) -> dict[tuple[int, int], int]:
    return {(c.pid, c.starttime): c.rss for c in cands if c.pid in pids}  # all new


def test_a_growing_family_outranks_a_bigger_idle_process() -> None:
    cands = build()
    ranked = policy.rank(cands, [])
    growth = grew(cands, {c.pid for c in cands if c.name == "cc1"})
    found = families.group(ranked, growth, weight=1.0)
    family, why = families.choose(found, ranked, growth, weight=1.0)
    assert family is not None, why
    # The process group and the tree hold the same processes: either, never the service.
    assert {r.candidate.pid for r in family.members} == set(range(100, 131))
    assert family.members[0].candidate.pid == 100  # the parent first
    assert "outranks 10 'service'" in why


def test_growth_off_the_bigger_idle_process_outranks_the_family() -> None:
    cands = build()
    ranked = policy.rank(cands, [])
    growth = grew(cands, {c.pid for c in cands if c.name == "cc1"})
    family, why = families.choose(families.group(ranked, growth, weight=0.0), ranked, growth,
                                  weight=0.0)
    assert family is None and "does not outrank 10 'service'" in why


def test_a_family_that_does_not_grow_is_not_killed_whole() -> None:
    cands = build(bystander=50 * MiB)
    ranked = policy.rank(cands, [])
    family, why = families.choose(families.group(ranked, {}, weight=1.0), ranked, {},
                                  weight=1.0)
    assert family is None and "two or more growing members" in why


def test_a_family_holding_one_leak_is_not_killed_whole_its_leak_dies_alone() -> None:
    """A service's leaking worker beside its idle siblings: the family outranks the leak
    only by the leak itself."""
    cands = [cand(10, pgrp=10, session=10, name="service", rss=40 * MiB)]
    cands += [cand(11 + i, ppid=10, pgrp=10, session=10, rss=20 * MiB) for i in range(5)]
    cands.append(cand(30, ppid=10, pgrp=10, session=10, name="leak", rss=400 * MiB))
    ranked = policy.rank(cands, [])
    growth = {(30, 300): 300 * MiB, (11, 110): 1 * MiB}  # the leak, and one sibling a bit
    family, why = families.choose(families.group(ranked, growth, weight=1.0), ranked, growth,
                                  weight=1.0)
    assert family is None and "without its biggest member" in why, why


def test_a_protected_or_avoided_member_keeps_the_family_whole_from_death() -> None:
    cands = build()
    growth = grew(cands, {c.pid for c in cands if c.name == "cc1"})
    for action in (Action.PROTECT, Action.AVOID):
        rules = [Rule(action, name=re.compile("^make$"))]
        ranked = policy.rank(cands, rules)
        found = families.group(ranked, growth, weight=1.0)
        holding = [f for f in found if any(r.candidate.pid == 100 for r in f.members)]
        assert holding and all(f.excluded and "100 'make'" in f.excluded for f in holding)
        family, _ = families.choose(found, ranked, growth, weight=1.0)
        # What is left without the make: no family holds it.
        assert family is None or 100 not in {r.candidate.pid for r in family.members}


def test_mreapers_own_group_session_cgroup_and_ancestors_are_never_a_family() -> None:
    cands = [cand(200 + i, ppid=199, pgrp=7, session=8, cgroup="/own.service")
             for i in range(3)] + [cand(199, ppid=1, pgrp=7, session=8, cgroup="/own.service")]
    ranked = policy.rank(cands, [])
    own = Own(pgrp=7, session=8, cgroup="/own.service", ancestors=frozenset({199, 1}))
    found = families.group(ranked, {}, weight=1.0, own=own)
    assert found and all(f.excluded and f.excluded.startswith("mreaper's own") for f in found)


def test_the_smallest_family_near_the_best_value_is_chosen() -> None:
    """The build's session also holds an idle shell: the process group is chosen."""
    cands = [*build(), cand(50, pgrp=50, session=50, name="bash", rss=3 * MiB)]
    ranked = policy.rank(cands, [])
    growth = grew(cands, {c.pid for c in cands if c.name == "cc1"})
    family, _ = families.choose(families.group(ranked, growth, weight=1.0), ranked, growth,
                                weight=1.0)
    assert family is not None and 50 not in {r.candidate.pid for r in family.members}


def test_a_family_is_valued_by_private_memory_not_shared_rss() -> None:
    """Forked workers' RSS counts the parent's pages: private memory is what a kill frees."""
    cands = [cand(100, pgrp=100, rss=200 * MiB, private=200 * MiB, name="pool")]
    cands += [cand(101 + i, ppid=100, pgrp=100, rss=200 * MiB, private=2 * MiB)
              for i in range(10)]
    found = families.group(policy.rank(cands, []), {}, weight=1.0)
    assert found[0].holds == 220 * MiB


def test_a_deep_chain_of_forks_costs_linear_time() -> None:
    """A hostile user's chain of 20,000 nested processes: every tree is bounded (each
    process joins at most TREE_LEVELS trees), so grouping is linear, not quadratic."""
    chain = [cand(1000 + i, ppid=999 + i, pgrp=5, session=5) for i in range(20_000)]
    ranked = policy.rank(chain, [])
    found = families.group(ranked, {}, weight=1.0)
    # Its process group, its session, its own tree, and TREE_LEVELS ancestors' trees.
    assert sum(len(f.members) for f in found) <= 20_000 * (families.TREE_LEVELS + 3)
    trees = [f for f in found if f.kind == "tree"]
    assert trees and max(len(f.members) for f in trees) <= families.TREE_LEVELS + 1


def test_explain_names_the_family_its_size_growth_and_why() -> None:
    cands = build()
    ranked = policy.rank(cands, [Rule(Action.PROTECT, name=re.compile("^service$"))])
    growth = grew(cands, {c.pid for c in cands if c.name == "cc1"})
    text = families.explain_families(families.group(ranked, growth, weight=1.0))
    assert "31 processes holding" in text and "grown 240.0 MiB" in text
    assert "eligible" in text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 4), st.integers(0, 3),
                          st.integers(0, 3), st.integers(1, 64), st.integers(-8, 16)),
                min_size=1, max_size=40),
       st.sampled_from([0.0, 1.0, 4.0]))
def test_the_kill_paths_growing_only_grouping_chooses_as_the_full_one(
        rows: list[tuple[int, int, int, int, int, int]], weight: float) -> None:
    """The daemon groups only the families with two or more growing members (the rest
    cannot be chosen, and valuing every family of 10,000 processes took 91 ms): the
    choice, and why, must be the full grouping's."""
    cands = [cand(100 + i, ppid=100 + parent if parent < i else 1, pgrp=pgrp, session=sess,
                  cgroup=f"/cg{cg}" if cg else "", rss=mib * MiB)
             for i, (parent, pgrp, sess, cg, mib, _) in enumerate(rows)]
    growth = {(c.pid, c.starttime): g * MiB for c, (*_, g) in zip(cands, rows, strict=True)}
    ranked = policy.rank(cands, [])
    full = families.group(ranked, growth, weight=weight)
    lean = families.group(ranked, growth, weight=weight, growing_only=True)
    assert {f.label for f in lean} <= {f.label for f in full}
    picked_full, why_full = families.choose(full, ranked, growth, weight=weight)
    picked_lean, why_lean = families.choose(lean, ranked, growth, weight=weight)
    assert why_lean == why_full
    assert picked_lean == picked_full
