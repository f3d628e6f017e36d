"""The process table on fixture /proc trees: its incremental ranking equals a full scan's.

Why fixture trees: the property needs processes whose sizes, names, start times and
PIDs change on command between two refreshes (an exec, a PID reused), which this host
cannot produce at will.  The fake /proc is the one test_policy.py builds.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from test_policy import BASE, write_proc

from mreaper import policy
from mreaper.policy import Action, Rule, SortBy
from mreaper.proctable import IncrementalRanking, ProcTable

NAMES = ("worker", "db", "protected-one", "hog", "sh")
RULES = [Rule(Action.PROTECT, name=re.compile("^protected")),
         Rule(Action.PREFER, name=re.compile("^hog$"), adjust=500),
         Rule(Action.AVOID, cmdline=re.compile("--db"))]


def put(root: Path, pid: int, *, name: str, starttime: int, rss_kb: int, oom: int,
        adj: int = 0) -> None:
    d = root / str(pid)
    if d.exists():
        shutil.rmtree(d)
    write_proc(root, pid, comm=name.encode(), starttime=starttime, rss_kb=rss_kb,
               oom_score=f"{oom}\n".encode(), oom_score_adj=f"{adj}\n".encode(),
               cmdline=f"/usr/bin/{name}\0--{name}\0".encode(),
               exe=f"/usr/bin/{name}".encode())


def full(root: Path, rules: list[Rule], sort_by: SortBy) -> list[policy.Ranked]:
    candidates, warnings = policy.scan(str(root))
    assert warnings == []
    return policy.rank(candidates, rules, sort_by=sort_by, min_rss=1 << 20)


def test_incremental_ranking_equals_a_full_scan(tmp_path: Path) -> None:
    for i, name in enumerate(NAMES):
        put(tmp_path, BASE + i, name=name, starttime=100 + i, rss_kb=1024 * (i + 1),
            oom=100 * i, adj=-1000 if name == "db" else 0)
    table = ProcTable(str(tmp_path))
    ranking = IncrementalRanking(RULES, sort_by=SortBy.OOM_SCORE, min_rss=1 << 20)
    table.refresh()
    assert ranking.update(table) == full(tmp_path, RULES, SortBy.OOM_SCORE)
    assert ranking.judged_last == len(NAMES)
    # One grows, one execs into a protected name, one exits, one is new.
    put(tmp_path, BASE, name="worker", starttime=100, rss_kb=900_000, oom=400)
    put(tmp_path, BASE + 4, name="protected-one", starttime=104, rss_kb=8192, oom=450)
    shutil.rmtree(tmp_path / str(BASE + 1))
    put(tmp_path, BASE + 9, name="hog", starttime=999, rss_kb=4096, oom=10)
    done = table.refresh()
    assert (done.added, done.removed, sorted(done.changed)) == ((BASE + 9,), (BASE + 1,),
                                                                [BASE, BASE + 4])
    ranked = ranking.update(table)
    assert ranked == full(tmp_path, RULES, SortBy.OOM_SCORE)
    assert ranking.judged_last == 3  # the two changed and the new one, not the others
    # the preferred hogs (800, new 510), then the grown worker; the rest excluded
    assert [r.candidate.pid for r in ranked if r.eligible] == [BASE + 3, BASE + 9, BASE]
    assert next(r for r in ranked if r.candidate.pid == BASE + 4).excluded is not None


def test_unchanged_processes_cost_two_reads(tmp_path: Path) -> None:
    """A process whose statm and oom_score did not change is not read again: here its
    status and cmdline turn to garbage after the first refresh, and nothing notices;
    once its statm changes it is read again (and the garbage reported by file)."""
    put(tmp_path, BASE, name="worker", starttime=100, rss_kb=2048, oom=5)
    table = ProcTable(str(tmp_path))
    table.refresh()
    before = table.entries[BASE].candidate
    (tmp_path / str(BASE) / "status").write_bytes(b"garbage\n")
    (tmp_path / str(BASE) / "cmdline").write_bytes(b"other\0")
    done = table.refresh()
    assert done.warnings == () and done.changed == ()
    assert table.entries[BASE].candidate is before
    (tmp_path / str(BASE) / "statm").write_bytes(b"9999 600 0 1 0 100 0\n")
    done = table.refresh()
    assert BASE not in table.entries
    assert len(done.warnings) == 1 and f"{tmp_path}/{BASE}/status" in done.warnings[0]


def test_a_reused_pid_is_read_as_a_new_process(tmp_path: Path) -> None:
    put(tmp_path, BASE, name="worker", starttime=100, rss_kb=2048, oom=5)
    table = ProcTable(str(tmp_path))
    table.refresh()
    put(tmp_path, BASE, name="hog", starttime=777, rss_kb=4096, oom=7)
    done = table.refresh()
    assert done.removed == (BASE,) and done.added == (BASE,)
    c = table.entries[BASE].candidate
    assert (c.starttime, c.name, c.cmdline) == (777, "hog", ("/usr/bin/hog", "--hog"))


def test_suspect_pid_is_read_again_in_full(tmp_path: Path) -> None:
    """The daemon marks a PID whose identity did not match when it tried to pin it: the
    next refresh reads it whole even if its statm and oom_score look the same."""
    put(tmp_path, BASE, name="worker", starttime=100, rss_kb=2048, oom=5)
    table = ProcTable(str(tmp_path))
    table.refresh()
    put(tmp_path, BASE, name="worker", starttime=555, rss_kb=2048, oom=5)
    table.refresh()
    assert table.entries[BASE].starttime == 100  # same sizes: not noticed
    table.suspect(BASE)
    table.refresh()
    assert table.entries[BASE].starttime == 555


def test_growth_and_private_memory(tmp_path: Path) -> None:
    put(tmp_path, BASE, name="worker", starttime=100, rss_kb=2048, oom=5)
    table = ProcTable(str(tmp_path))
    table.refresh()
    table.mark()
    put(tmp_path, BASE, name="worker", starttime=100, rss_kb=6144, oom=6)
    put(tmp_path, BASE + 1, name="hog", starttime=200, rss_kb=1024, oom=1)
    table.refresh()
    e, new = table.entries[BASE], table.entries[BASE + 1]
    assert (e.rss_anon, e.growth) == (6144 * 1024, 4096 * 1024)
    assert (new.ppid, new.growth) == (100, 1024 * 1024)  # new since the mark: all of it
    assert [x.pid for x in table.read_new()] == []
    put(tmp_path, BASE + 2, name="sh", starttime=300, rss_kb=1024, oom=1)
    assert [x.pid for x in table.read_new()] == [BASE + 2]
    assert BASE + 2 not in table.entries  # read_new does not change the table


# --- the property: any sequence of changes -------------------------------------------------

op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 7), st.sampled_from(NAMES),
              st.integers(0, 4096), st.integers(0, 1000)),
    st.tuples(st.just("remove"), st.integers(0, 7)),
    st.tuples(st.just("resize"), st.integers(0, 7), st.integers(0, 4096), st.integers(0, 1000)),
    st.tuples(st.just("exec"), st.integers(0, 7), st.sampled_from(NAMES)),
    st.tuples(st.just("reuse"), st.integers(0, 7), st.sampled_from(NAMES)),
    st.just(("refresh",)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(op, max_size=30), st.sampled_from(list(SortBy)))
def test_any_sequence_of_changes_ranks_as_a_full_scan(ops: list[tuple[object, ...]],
                                                      sort_by: SortBy) -> None:
    """Processes appear, vanish, change size, exec into another name (a new image: its
    statm changes) and PIDs are reused by other processes (their statm differs); at
    every refresh the table's ranking is the full scan's, whether the changes were put
    in place one by one or everything was sorted again."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table = ProcTable(tmp)
        ranking = IncrementalRanking(RULES, sort_by=sort_by, min_rss=1 << 20)
        live: dict[int, dict[str, int | str]] = {}
        # Every size each PID has shown: a new image (exec) or a new process in a used
        # PID gets a statm of its own.  One with the very same statm goes unseen until
        # it changes (the module says so; the daemon re-reads a PID whose pinning found
        # another process: test_suspect_pid_is_read_again_in_full).
        used_rss: dict[int, set[int]] = {}
        clock = [1000]

        def write(pid: int) -> None:
            p = live[pid]
            used_rss.setdefault(pid, set()).add(int(p["rss"]))
            put(root, pid, name=str(p["name"]), starttime=int(p["start"]),
                rss_kb=int(p["rss"]), oom=int(p["oom"]))

        def new_rss(pid: int, rss: int) -> int:
            while rss in used_rss.get(pid, ()):
                rss += 4
            return rss

        # 40 bystanders that never change: small changes are then put in place by
        # bisection (IncrementalRanking.update), many ones sorted again.
        for i in range(40):
            live[BASE + 100 + i] = {"name": NAMES[i % len(NAMES)], "start": 10 + i,
                                    "rss": 1024 + 512 * (i % 7), "oom": (37 * i) % 1000}
            write(BASE + 100 + i)
        for o in [*ops, ("refresh",)]:
            kind = o[0]
            pid = BASE + int(o[1]) if len(o) > 1 else 0  # type: ignore[call-overload]
            if kind == "add" and pid not in live:
                clock[0] += 1
                live[pid] = {"name": str(o[2]), "start": clock[0],
                             "rss": new_rss(pid, int(o[3])),  # type: ignore[call-overload]
                             "oom": int(o[4])}  # type: ignore[call-overload]
                write(pid)
            elif kind == "remove" and pid in live:
                del live[pid]
                shutil.rmtree(root / str(pid))
            elif kind == "resize" and pid in live:
                live[pid].update(rss=int(o[2]), oom=int(o[3]))  # type: ignore[call-overload]
                write(pid)
            elif kind in ("exec", "reuse") and pid in live:
                p = live[pid]
                p["name"] = str(o[2])
                p["rss"] = new_rss(pid, int(p["rss"]))
                if kind == "reuse":
                    clock[0] += 1
                    p["start"] = clock[0]
                write(pid)
            elif kind == "refresh":
                table.refresh()
                assert ranking.update(table) == full(root, RULES, sort_by)


def test_decision_ranks_new_processes_in_without_a_refresh(tmp_path: Path) -> None:
    """At decision time the daemon does not refresh: the processes listed now that the
    last refresh did not see are read, judged alone and put in their place.  The result
    is the full scan's ranking (same facts), and the table itself is left to the scan
    thread."""
    from mreaper.config import Config
    from mreaper.daemon import CandidateCache

    for i, name in enumerate(NAMES):
        put(tmp_path, BASE + i, name=name, starttime=100 + i, rss_kb=1024 * (i + 1),
            oom=100 * i)
    cfg = Config(rules=tuple(RULES))
    cache = CandidateCache(cfg, "", proc=str(tmp_path))
    cache.refresh()
    put(tmp_path, BASE + 7, name="hog", starttime=700, rss_kb=50_000, oom=999)
    put(tmp_path, BASE + 8, name="worker", starttime=800, rss_kb=1024, oom=1)
    candidates, _prefs, ranked, _age = cache.get()
    assert ranked == policy.rank(policy.scan(str(tmp_path))[0], RULES)
    assert ranked[0].candidate.pid == BASE + 7
    assert {c.pid for c in candidates} == {BASE + i for i in (*range(len(NAMES)), 7, 8)}
    assert len(cache.peek()) == len(NAMES)  # nothing published by a decision


def test_a_status_client_gets_a_fresh_ranking_while_calm(tmp_path: Path) -> None:
    """Calm, nothing keeps the ranking fresh; a status client's question refreshes one
    older than scan_interval (and only then: peek without build reads nothing)."""
    import dataclasses
    import time

    from mreaper.config import Config
    from mreaper.daemon import CandidateCache

    put(tmp_path, BASE, name="worker", starttime=100, rss_kb=1024, oom=1)
    cache = CandidateCache(dataclasses.replace(Config(), scan_interval=0.1), "",
                           proc=str(tmp_path))
    cache.start()
    try:
        assert [r.candidate.oom_score for r in cache.peek(build=True)] == [1]
        time.sleep(0.05)  # the scan thread back to its calm wait
        # Changed in place, each file replaced whole (the scan thread may be reading).
        d = tmp_path / str(BASE)
        for name, content in (("oom_score", b"77\n"), ("statm", b"2250 2250 0 1 0 100 0\n")):
            (d / f"{name}.new").write_bytes(content)
            os.replace(d / f"{name}.new", d / name)
        time.sleep(0.2)  # older than scan_interval
        assert [r.candidate.oom_score for r in cache.peek()] == [1]
        assert [r.candidate.oom_score for r in cache.peek(build=True)] == [77]
    finally:
        cache.stop()


def test_new_processes_are_found_after_the_last_pid_without_listing(tmp_path: Path) -> None:
    """/proc/loadavg's last field is the last PID allocated: a decision probes the PIDs
    after the one the refresh saw instead of listing /proc (here a process outside that
    range, which a listing would show, is not looked at: the range alone is read)."""
    def loadavg(last: int) -> None:
        (tmp_path / "loadavg").write_text(f"0.10 0.20 0.30 1/123 {last}\n")

    put(tmp_path, BASE, name="worker", starttime=100, rss_kb=1024, oom=1)
    loadavg(BASE)
    table = ProcTable(str(tmp_path))
    table.refresh()
    assert table.last_pid == BASE
    put(tmp_path, BASE - 50, name="sh", starttime=50, rss_kb=1024, oom=1)  # not a new PID
    assert [e.pid for e in table.read_new(since=table.last_pid)] == []
    put(tmp_path, BASE + 3, name="hog", starttime=300, rss_kb=1024, oom=1)
    loadavg(BASE + 5)  # BASE+1..+5 allocated since; only +3 is a process now
    assert [e.pid for e in table.read_new(since=table.last_pid)] == [BASE + 3]
    # Too many PIDs since (or no loadavg): the listing, as before.
    loadavg(BASE + 100_000)
    assert sorted(e.pid for e in table.read_new(since=table.last_pid)) == [BASE - 50, BASE + 3]
