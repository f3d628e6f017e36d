"""policy.rank with kill.pods: Kubernetes' QoS order before the score, the pause process
never, and nothing changed where no process is in a pod.  Pure: candidate snapshots
with kubelet's cgroup paths (this machine runs no kubelet; tests/lab/test_pods.py
ranks and kills real processes in look-alike cgroups)."""

from __future__ import annotations

import dataclasses

from mreaper import policy
from mreaper.kube import QoS
from mreaper.policy import Action, Candidate, Rule

MiB = 1 << 20
CID = "ab" * 32
PAUSE_ID = "cd" * 32


def sd(qos: str, pod: str, ctr: str = CID) -> str:
    uid = f"{pod:0>8}-0000-4000-8000-000000000000".replace("-", "_")
    if qos == "guaranteed":
        return f"/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{ctr}.scope"
    return (f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{uid}.slice/"
            f"cri-containerd-{ctr}.scope")


def cand(pid: int, cgroup: str, *, rss_mib: int = 100, oom_score: int = 100, adj: int = 0,
         cmdline: tuple[str, ...] = ("app",)) -> Candidate:
    return Candidate(pid=pid, starttime=pid, name=cmdline[0].rsplit("/", 1)[-1],
                     cmdline=cmdline, exe="", uid=0, cgroup=cgroup, rss=rss_mib * MiB,
                     swap=0, oom_score=oom_score, oom_score_adj=adj)


def node() -> list[Candidate]:
    """A node under pressure: the biggest scores are not in BestEffort pods."""
    return [
        cand(10, sd("guaranteed", "1"), rss_mib=8000, oom_score=1999),
        cand(11, sd("burstable", "2"), rss_mib=4000, oom_score=1500),
        cand(12, sd("burstable", "2", "ef" * 32), rss_mib=3000, oom_score=1400),
        cand(13, sd("besteffort", "3"), rss_mib=20, oom_score=1001),
        cand(14, sd("besteffort", "3", PAUSE_ID), rss_mib=1, oom_score=2000,
             cmdline=("/pause",)),
        cand(15, "/system.slice/cron.service", rss_mib=9000, oom_score=1800),
        cand(16, "/user.slice/user-1000.slice/user@1000.service/kubepods.slice/"
             "kubepods-besteffort.slice/x", rss_mib=50, oom_score=10),
    ]


def order(ranked: list[policy.Ranked]) -> list[int]:
    return [r.candidate.pid for r in ranked if r.eligible]


def test_qos_order_before_score() -> None:
    ranked = policy.rank(node(), [])  # on by default
    # BestEffort (the small one), then Burstable by score, then the rest by score; the
    # user's look-alike cgroup is no pod: ranked with the rest
    assert order(ranked) == [13, 11, 12, 10, 15, 16]
    assert policy.choose(ranked) is not None
    assert policy.choose(ranked).candidate.pid == 13  # type: ignore[union-attr]
    by_pid = {r.candidate.pid: r for r in ranked}
    assert by_pid[13].pod is not None and by_pid[13].pod.qos is QoS.BEST_EFFORT
    assert by_pid[16].pod is None and by_pid[15].pod is None


def test_never_guaranteed_while_besteffort_or_burstable() -> None:
    """Whatever is left, a Guaranteed container is chosen only when no BestEffort and no
    Burstable one is eligible."""
    left = node()
    seen = []
    while (victim := policy.choose(policy.rank(left, []))) is not None:
        seen.append(victim.candidate.pid)
        left = [c for c in left if c.pid != victim.candidate.pid]
    assert seen.index(10) > max(seen.index(11), seen.index(12), seen.index(13))
    assert 14 not in seen  # the pause process, never


def test_pause_excluded_and_must_live() -> None:
    by_pid = {r.candidate.pid: r for r in policy.rank(node(), [])}
    pause = by_pid[14]
    assert not pause.eligible and pause.must_live
    assert pause.excluded is not None and "pause" in pause.excluded


def test_pause_name_shelters_no_big_process() -> None:
    """A pod's process may call itself /pause: over PAUSE_MAX_RSS it is ranked as any
    other; outside a pod's container cgroup the name means nothing."""
    fake = cand(20, sd("besteffort", "4"), rss_mib=500, oom_score=1500, cmdline=("/pause",))
    host = cand(21, "/system.slice/x.service", rss_mib=1, oom_score=5, cmdline=("/pause",))
    nocontainer = cand(22, sd("besteffort", "4").rsplit("/", 1)[0], rss_mib=1,
                       cmdline=("/pause",))
    ranked = policy.rank([fake, host, nocontainer], [])
    assert all(r.eligible for r in ranked)
    assert order(ranked)[:2] == [20, 22]


def test_rules_order_within_a_tier_only() -> None:
    """A prefer rule moves a Guaranteed container up among the rest, never ahead of a
    Burstable one; an avoid rule cannot hold a BestEffort one behind a Burstable one."""
    rules = [Rule(Action.PREFER, cgroup="kubepods-pod", adjust=100000),
             Rule(Action.AVOID, cgroup="kubepods-besteffort", adjust=-100000)]
    assert order(policy.rank(node(), rules))[:4] == [13, 11, 12, 10]


def test_protected_besteffort_gives_way_to_burstable() -> None:
    rules = [Rule(Action.PROTECT, cgroup="kubepods-besteffort")]
    assert order(policy.rank(node(), rules))[0] == 11


def test_off() -> None:
    """kill.pods = false: the plain score order, the pause process eligible."""
    ranked = policy.rank(node(), [], pods=False)
    assert order(ranked) == [14, 10, 15, 11, 12, 13, 16]
    assert all(r.pod is None for r in ranked)


def test_no_pods_no_change() -> None:
    plain = [c for c in node() if "/kubepods.slice/" not in c.cgroup or
             c.cgroup.startswith("/user.slice")]
    assert [r.candidate.pid for r in policy.rank(plain, [])] == \
           [r.candidate.pid for r in policy.rank(plain, [], pods=False)]


def test_explain_names_pod_and_qos() -> None:
    table = policy.explain_table(policy.rank(node(), []))
    lines = {line.split()[1]: line for line in table.splitlines()[1:] if line.split()}
    assert "pod 00000003-0000-4000-8000-000000000000 (BestEffort) container abababababab" \
        in lines["13"]
    assert "(Guaranteed)" in lines["10"]
    assert "excluded: the pod's sandbox (pause) process" in lines["14"]
    assert "pod " not in lines["15"]


def test_config_key() -> None:
    import pytest

    from mreaper import config

    assert config.Config().pods is True
    assert config.apply(config.Config(), {"kill": {"pods": False}}, "t.toml").pods is False
    with pytest.raises(config.ConfigError, match=r"kill\.pods = 'no'.*true or false"):
        config.apply(config.Config(), {"kill": {"pods": "no"}}, "t.toml")
    assert "pods = false" in config.to_toml(config.Config(pods=False))


def test_families_keep_kubernetes_order() -> None:
    """A growing family in a Guaranteed container (30 compilers) is not killed whole
    while a BestEffort container is eligible; the same family in a BestEffort container
    is, measured against BestEffort processes only."""
    from mreaper import families

    def fam(qos: str) -> list[Candidate]:
        cg = sd(qos, "7")
        out = [Candidate(pid=100, starttime=1000, name="make", cmdline=("make",), exe="",
                         uid=0, cgroup=cg, rss=4 * MiB, swap=0, oom_score=4,
                         oom_score_adj=0, ppid=1, pgrp=100, session=50)]
        out += [Candidate(pid=101 + i, starttime=1010 + i, name="cc1", cmdline=("cc1",),
                          exe="", uid=0, cgroup=cg, rss=8 * MiB, swap=0, oom_score=8,
                          oom_score_adj=0, ppid=100, pgrp=100, session=50)
                for i in range(30)]
        return out

    small_be = cand(10, sd("besteffort", "8"), rss_mib=20, oom_score=20)
    big_guaranteed = cand(11, sd("guaranteed", "9"), rss_mib=900, oom_score=900)
    for qos, others, want in (("guaranteed", [small_be], False),
                              ("besteffort", [small_be, big_guaranteed], True)):
        cands = fam(qos) + others
        ranked = policy.rank(cands, [])
        growth = {(c.pid, c.starttime): c.rss for c in cands if c.name == "cc1"}
        found = families.group(ranked, growth, weight=1.0)
        family, why = families.choose(found, ranked, growth, weight=1.0)
        assert (family is not None) is want, (qos, why)
    # without pods the Guaranteed family outranks the small BestEffort process
    cands = [*fam("guaranteed"), small_be]
    ranked = policy.rank(cands, [], pods=False)
    growth = {(c.pid, c.starttime): c.rss for c in cands if c.name == "cc1"}
    family, why = families.choose(families.group(ranked, growth, weight=1.0), ranked,
                                  growth, weight=1.0)
    assert family is not None, why


def over(c: Candidate, mib: int | None) -> Candidate:
    return dataclasses.replace(c, over_request=None if mib is None else mib * MiB)


def test_usage_over_request_before_score_within_a_tier() -> None:
    # two Burstable containers: the one further over its request first, even with the
    # lower oom_score; a BestEffort one still before both, a Guaranteed one after
    low = over(cand(21, sd("burstable", "4"), oom_score=300), 900)
    high = over(cand(22, sd("burstable", "5"), oom_score=1500), 100)
    under = over(cand(23, sd("burstable", "6"), oom_score=1800), -500)
    be = cand(24, sd("besteffort", "7"), oom_score=1)
    gu = over(cand(25, sd("guaranteed", "8"), oom_score=1999), 0)
    ranked = policy.rank([gu, under, high, low, be], [])
    # below its request counts as not over it: after those over, by score
    assert order(ranked) == [24, 21, 22, 23, 25]
    assert "900.0 MiB over its memory request" in policy.explain_table(ranked)
    assert "500.0 MiB under its memory request" in policy.explain_table(ranked)


def test_without_requests_shown_order_by_score() -> None:
    a = cand(21, sd("burstable", "4"), oom_score=300)
    b = cand(22, sd("burstable", "5"), oom_score=1500)
    assert order(policy.rank([a, b], [])) == [22, 21]
    # outside pods, or with kill.pods off, a request figure changes nothing
    c = over(cand(23, "/system.slice/a.service", oom_score=10), 5000)
    d = cand(24, "/system.slice/b.service", oom_score=20)
    assert order(policy.rank([c, d], [])) == [24, 23]
    assert order(policy.rank([over(a, 900), b], [], pods=False)) == [22, 21]
