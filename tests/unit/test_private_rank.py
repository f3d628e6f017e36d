"""Ranking by what a kill frees: kill.sort_by = "private"."""

from __future__ import annotations

from mreaper import policy
from mreaper.policy import Candidate, SortBy

MiB = 1 << 20


def cand(pid: int, rss: int, private: int | None) -> Candidate:
    return Candidate(pid=pid, starttime=1, name=f"p{pid}", cmdline=(), exe="", uid=0,
                     cgroup="/", rss=rss, swap=0, oom_score=rss // MiB, oom_score_adj=0,
                     private=private)


def test_a_forked_child_ranks_by_its_own_pages_not_its_rss() -> None:
    child = cand(10, rss=150 * MiB, private=16 * MiB)   # 134 MiB shared with its parent
    loner = cand(11, rss=60 * MiB, private=58 * MiB)
    by_rss = policy.rank([child, loner], [], sort_by=SortBy.RSS)
    by_private = policy.rank([child, loner], [], sort_by=SortBy.PRIVATE)
    assert [r.candidate.pid for r in by_rss] == [10, 11]
    assert [r.candidate.pid for r in by_private] == [11, 10]
    assert [r.score for r in by_private] == [58, 16]


def test_private_not_read_falls_back_to_rss() -> None:
    unread = cand(12, rss=40 * MiB, private=None)
    assert unread.frees == 40 * MiB
    assert policy.rank([unread], [], sort_by=SortBy.PRIVATE)[0].score == 40
