"""The process table: every process that may be a victim, kept by re-reading only what changes.

A full scan of /proc reads seven files per process (stat, status, cmdline, cgroup, the
exe link, oom_score, oom_score_adj): at 10,000 processes that is over half a second of
CPU.  Most of it never changes.  The table reads the static facts once per process
(identity = pid + start time, name, cmdline, exe, cgroup, uid, parent, process group,
session), and on each refresh reads two small files per known process, `statm` and
`oom_score`.  Only when one of them differs is the process looked at again (stat for its
identity and state, status for its sizes, name and uid, oom_score_adj); only when its
name changed (an exec) are its cmdline, exe and cgroup read again.  Vanished PIDs are
dropped, new ones added.

What a refresh can miss, and why that is safe: a fact that changes without any change
in statm or oom_score (an oom_score_adj clamped at the same score, a cgroup migration, a
setuid) stays stale until the process changes size.  The daemon never signals on the
table's word alone: the victim is pinned by pid and start time and judged again, alone,
from fresh reads (daemon._pin_first, policy.candidate_of), so a stale fact can make a
ranking wrong, never a kill.

`IncrementalRanking` keeps `policy.rank` over the table, judging again only the entries
whose facts changed: `policy.rank` stays pure and the single reference of the order.

Other users: growth and families (process group, session, parent tree, cgroup) read
`Entry.rss_anon` (the private memory estimate: resident minus shared, what a kill
frees) and `Entry.growth` (since `ProcTable.mark()`).

One thread refreshes a table (the daemon's scan thread); `read_new` only reads it, so
the deciding loop may call it at any time.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass

from mreaper import podmem, policy, reap
from mreaper.linux import procfs


@dataclass(slots=True)
class Entry:
    """One process of the table.  `candidate` is replaced (never mutated) when a fact
    changes, so `entry.candidate is old` says "nothing changed" at no cost."""

    candidate: policy.Candidate
    ppid: int
    pgrp: int
    session: int
    rss_anon: int         # bytes: resident minus shared (statm) = RssAnon; what a kill frees
    rss_shared: int       # bytes: RssFile + RssShmem (page cache, shmem: not freed by a kill)
    first_seen: float     # monotonic time the table first saw this process
    base_anon: int        # rss_anon at the last mark() (0 for a process new since then)
    statm: bytes          # raw /proc/<pid>/statm at the last refresh: the change detector
    oom_score: int        # at the last refresh (the candidate's, unless it changed since)
    # A live thread holding the group's mm when the leader called pthread_exit (0: the
    # leader holds it).  The leader's statm then reads all zeros whatever the threads
    # hold: such a process is read again in full on every refresh.
    mm_tid: int = 0
    private_statm: bytes = b""  # statm when candidate.private was read (read_private)

    @property
    def pid(self) -> int:
        return self.candidate.pid

    @property
    def starttime(self) -> int:
        return self.candidate.starttime

    @property
    def growth(self) -> int:
        """Bytes of anonymous memory gained since the last mark() (negative: shrank)."""
        return self.rss_anon - self.base_anon


@dataclass(frozen=True, slots=True)
class Refresh:
    """What one refresh did: PIDs added, dropped and re-read, and the entries it could
    not read (each warning names the PID and the file)."""

    added: tuple[int, ...]
    removed: tuple[int, ...]
    changed: tuple[int, ...]
    warnings: tuple[str, ...]


def _warning(pid: int, proc: str, e: Exception) -> str:
    if isinstance(e, procfs.ParseError):
        return f"PID {pid} skipped: {e}"
    assert isinstance(e, OSError)
    where = e.filename if e.filename is not None else f"{proc}/{pid}"
    return f"PID {pid} skipped: {where}: {e.strerror or e}"


class ProcTable:
    """Every process under `proc` that may ever be a victim, by PID."""

    def __init__(self, proc: str = procfs.PROC,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.proc = proc
        self.clock = clock
        self.entries: dict[int, Entry] = {}
        self.refreshed_at: float | None = None  # None: never refreshed (empty, not "none")
        # Every PID /proc listed at the last refresh, candidates or not (kernel threads,
        # zombies): what a decision need not read again (see read_new).
        self.listed: frozenset[int] = frozenset()
        # The last PID allocated before that listing (None: unknown, /proc/loadavg
        # unreadable): every PID allocated since comes after it (read_new).
        self.last_pid: int | None = None
        try:
            self.pid_max: int | None = procfs.read_pid_max(proc)
        except (OSError, procfs.ParseError):
            self.pid_max = None
        self._marked = False
        # PIDs to read again whole at the next refresh (set.add is atomic: any thread).
        self._suspects: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def candidates(self) -> list[policy.Candidate]:
        return [e.candidate for e in self.entries.values()]

    def suspect(self, pid: int) -> None:
        """Read `pid` again whole at the next refresh, whatever its statm says: the
        daemon found another process behind it when it tried to pin it (a PID reused
        by a process of the same size is invisible to the cheap check)."""
        self._suspects.add(pid)

    def read_private(self, *, between: Callable[[], None] | None = None) -> None:
        """Private memory (smaps_rollup Private_Dirty, at most the RSS) of every forked
        child of another candidate, read again only when its statm changed since: the
        rule of policy._with_private (only a child can share pages copy-on-write with a
        living parent; any other process's anonymous RSS is what its kill frees), kept
        incrementally."""
        entries = self.entries
        for pid, e in list(entries.items()):
            c = e.candidate
            if c.ppid not in entries or (c.private is not None and e.private_statm == e.statm):
                continue
            if between is not None:
                between()
            try:
                private = procfs.read_private(pid, self.proc)
            except (procfs.ProcessGone, procfs.ParseError, OSError):
                continue
            e.candidate = dataclasses.replace(c, private=min(private, c.rss))
            e.private_statm = e.statm

    def read_requests(self, unified: str, *,
                      between: Callable[[], None] | None = None) -> None:
        """How far each pod container's process is above its memory request
        (Candidate.over_request, podmem.py), read again at every call: usage moves
        without the process's statm changing (another process of the container, page
        cache).  Two or three small reads per container cgroup, once per call.
        `between` is called every YIELD_EVERY entries (the daemon's scan parks there)."""
        requests = podmem.Requests(unified)
        for i, e in enumerate(list(self.entries.values())):
            if between is not None and not i % YIELD_EVERY:
                between()
            c = e.candidate
            over = requests.over(c.cgroup)
            if over != c.over_request:
                e.candidate = dataclasses.replace(c, over_request=over)

    def mark(self) -> None:
        """Start counting growth from now: every entry's baseline is its size now, and a
        process added later counts its whole size as growth."""
        for e in self.entries.values():
            e.base_anon = e.rss_anon
        self._marked = True

    # -- I/O: the refresh -----------------------------------------------------------------

    def refresh(self, *, between: Callable[[], None] | None = None) -> Refresh:
        """Bring the table up to date with /proc.  `between` is called before each
        process (the daemon's scan parks there while its loop decides)."""
        last_pid = _last_pid(self.proc)  # before the listing: what it may miss comes after
        listed = procfs.list_pids(self.proc)
        now = set(listed)
        added: list[int] = []
        changed: list[int] = []
        removed = [pid for pid in self.entries if pid not in now]
        warnings: list[str] = []
        for pid in removed:
            del self.entries[pid]
        while self._suspects:
            pid = self._suspects.pop()
            if self.entries.pop(pid, None) is not None:
                removed.append(pid)  # and read as new below, if it is still listed
        for pid in list(self.entries):
            if between is not None:
                between()
            entry = self.entries[pid]
            try:
                what = self._update(entry)
            except procfs.ProcessGone:
                what = "gone"
            except (procfs.ParseError, OSError) as e:
                warnings.append(_warning(pid, self.proc, e))
                now.discard(pid)  # not read again as new in this refresh: once is enough
                what = "gone"
            if what in ("gone", "reused"):  # reused: another process, read as new below
                del self.entries[pid]
                removed.append(pid)
            elif what == "changed":
                changed.append(pid)
        for pid in sorted(now):
            if pid in self.entries:
                continue
            if between is not None:
                between()
            try:
                entry_or_none = self.read_one(pid)
            except procfs.ProcessGone:
                continue
            except (procfs.ParseError, OSError) as e:
                warnings.append(_warning(pid, self.proc, e))
                continue
            if entry_or_none is not None:
                self.entries[pid] = entry_or_none
                added.append(pid)
        self.refreshed_at = self.clock()
        self.listed = frozenset(listed)
        self.last_pid = last_pid
        return Refresh(tuple(added), tuple(removed), tuple(changed), tuple(warnings))

    def read_new(self, known: Container[int] | None = None,
                 since: int | None = None) -> list[Entry]:
        """Entries for the processes created since the last refresh, read but NOT
        added: the deciding loop calls this while the scan thread may be refreshing the
        table, which only that thread changes.

        With `since` (the table's last_pid as of the ranking the decision uses), only
        the PIDs allocated after it are looked at: at 10,000 processes, listing /proc
        alone takes over 10 ms.  Without it, or when the PIDs since wrapped or are too
        many (MAX_PROBE), every PID listed now and not in `known` (default: the table's
        own) is."""
        held = self.entries if known is None else known
        out = []
        for pid in self._new_pids(since):
            if pid in held:
                continue
            try:
                entry = self.read_one(pid)
            except (procfs.ProcessGone, procfs.ParseError, OSError):
                continue
            if entry is not None:
                out.append(entry)
        return out

    def _new_pids(self, since: int | None) -> Iterable[int]:
        now = _last_pid(self.proc) if since is not None else None
        if since is None or now is None:
            return procfs.list_pids(self.proc)
        if now >= since:
            count = now - since
            if count <= MAX_PROBE:
                return range(since + 1, now + 1)
        elif self.pid_max is not None:  # wrapped at pid_max (PIDs restart above 300)
            count = self.pid_max - since + now
            if count <= MAX_PROBE:
                return [*range(since + 1, self.pid_max), *range(1, now + 1)]
        return procfs.list_pids(self.proc)

    def read_one(self, pid: int) -> Entry | None:
        """Every fact of one process, or None when it can never be a victim."""
        statm = procfs.read_statm(pid, self.proc)  # first: a change after it shows next time
        found = policy.observe(pid, self.proc)
        if found is None:
            return None
        candidate, stat, status = found
        return Entry(candidate=candidate, ppid=stat.ppid, pgrp=stat.pgrp, session=stat.session,
                     rss_anon=status.rss_anon, rss_shared=status.rss_file + status.rss_shmem,
                     first_seen=self.clock(), base_anon=status.rss_anon if not self._marked
                     else 0, statm=statm, oom_score=candidate.oom_score,
                     mm_tid=status.mm_tid)

    def _update(self, e: Entry) -> str:
        """Refresh one known entry: "same", "changed", "reused" (the PID now names
        another process) or "gone" (exited, a zombie, or no longer a candidate)."""
        pid, proc = e.pid, self.proc
        statm = procfs.read_statm(pid, proc)
        oom_score = procfs.read_int(f"{proc}/{pid}/oom_score", pid)
        if statm == e.statm and oom_score == e.oom_score and not e.mm_tid:
            return "same"
        stat = procfs.read_stat(pid, proc)
        if stat.starttime != e.starttime:
            return "reused"
        # As policy.observe: a leader in state Z with live threads is no zombie.
        if (stat.state in ("Z", "X") and stat.num_threads <= 1) or reap.refusal(stat) is not None:
            return "gone"
        status = procfs.read_status(pid, proc)
        if policy._never(stat, status):
            return "gone"
        adj = procfs.read_int(f"{proc}/{pid}/oom_score_adj", pid)
        old = e.candidate
        name = status.name or stat.comm
        facts: dict[str, object] = {}
        if name != old.name:
            # An exec (or a prctl(PR_SET_NAME)): what rules match on may all have changed.
            facts = {"cmdline": procfs.read_cmdline(pid, proc),
                     "cgroup": procfs.read_cgroup(pid, proc).unified,
                     "exe": policy._read_exe(pid, proc, status.mm_tid)}
        e.candidate = dataclasses.replace(old, name=name, uid=status.uid, rss=status.vm_rss,
                                          swap=status.vm_swap, oom_score=oom_score,
                                          oom_score_adj=adj, ppid=stat.ppid, pgrp=stat.pgrp,
                                          session=stat.session, **facts)  # type: ignore[arg-type]
        e.ppid, e.pgrp, e.session = stat.ppid, stat.pgrp, stat.session
        e.rss_anon, e.rss_shared = status.rss_anon, status.rss_file + status.rss_shmem
        e.statm, e.oom_score, e.mm_tid = statm, oom_score, status.mm_tid
        return "changed"


YIELD_EVERY = 256  # entries between two chances for the ranking to park (update)
MAX_PROBE = 2048  # PIDs probed one by one at most; more: listing /proc is cheaper


def _last_pid(proc: str) -> int | None:
    try:
        return procfs.read_last_pid(proc)
    except (OSError, procfs.ParseError):
        return None  # a fixture tree without loadavg: list /proc


class IncrementalRanking:
    """`policy.rank` over a table, judging again only the entries whose candidate changed
    since the last update.  Equal to `policy.rank(table.candidates(), ...)`: each
    entry's Ranked depends on its own candidate, the rules and the preferences only, and
    the order is `policy.rank_key`."""

    def __init__(self, rules: Sequence[policy.Rule], *, sort_by: policy.SortBy,
                 min_rss: int, cgroup_preferences: Mapping[str, str] | None = None,
                 pods: bool = True) -> None:
        self.rules = list(rules)
        self.pods = pods  # Kubernetes QoS tiers (policy.rank)
        self.sort_by = sort_by
        self.min_rss = min_rss
        self.preferences: dict[str, str] = dict(cgroup_preferences or {})
        self._judged: dict[int, policy.Ranked] = {}
        self._ranked: list[policy.Ranked] = []  # the last update's result, in rank_key order
        self.judged_last = 0  # entries judged by the last update (for tests and the log)

    def judge(self, candidates: Sequence[policy.Candidate]) -> list[policy.Ranked]:
        """`candidates` ranked with this ranking's rules (pure: nothing kept)."""
        return policy.rank(candidates, self.rules, sort_by=self.sort_by, min_rss=self.min_rss,
                           cgroup_preferences=self.preferences, pods=self.pods)

    def set_preferences(self, preferences: Mapping[str, str]) -> None:
        if preferences != self.preferences:
            self.preferences = dict(preferences)
            self._judged.clear()
            self._ranked = []

    def update(self, table: ProcTable, *, between: Callable[[], None] | None = None
               ) -> list[policy.Ranked]:
        """The ranking of the table now.  A few changes are put in their place by
        bisection (the order is total: rank_key ends with the pid); many, or new rules
        or preferences, sort everything again.  `between` is called every YIELD_EVERY
        entries: the daemon's scan parks there while its loop decides, also in this
        part, which runs in Python without a system call to hand the GIL over at."""
        judged = self._judged
        stale: list[policy.Candidate] = []
        for i, (pid, e) in enumerate(table.entries.items()):
            if between is not None and not i % YIELD_EVERY:
                between()
            r = judged.get(pid)
            if r is None or r.candidate is not e.candidate:
                stale.append(e.candidate)
        gone = [pid for pid in judged if pid not in table.entries] \
            if len(judged) + len(stale) > len(table.entries) else []
        fresh = self.judge(stale)
        self.judged_last = len(stale)
        out = self._ranked
        if not out or len(stale) + len(gone) > len(out) // 8:
            for pid in gone:
                del judged[pid]
            for r in fresh:
                judged[r.candidate.pid] = r
            out = sorted(judged.values(), key=policy.rank_key)
        else:
            out = list(out)  # a ranking once returned is never changed in place
            for pid in [*gone, *(c.pid for c in stale if c.pid in judged)]:
                old = judged.pop(pid)
                at = bisect.bisect_left(out, policy.rank_key(old), key=policy.rank_key)
                assert out[at] is old
                del out[at]
            for r in fresh:
                judged[r.candidate.pid] = r
                bisect.insort(out, r, key=policy.rank_key)
        self._ranked = out
        return out
