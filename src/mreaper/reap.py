"""Kill and reap: the pinned victim handle, the kill sequence, the kill report, the reaper pool.

The sequence, in this order and no other (design.md, research/mrelease-facts.md):
1. pin the victim with a pidfd when it is chosen, and check pid + start time, so a
   recycled PID is never signalled;
2. optionally SIGTERM through the pidfd and wait up to a deadline (a time, never a
   memory level), cut short by an escalation;
3. SIGKILL through the pidfd;
4. process_mrelease at once, and only after our SIGKILL: on a live process the
   kernel answers EINVAL (earlyoom calls it after SIGTERM and logs EINVAL forever);
5. wait for the exit on the pidfd (poll, no sleep loop), bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import json
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from mreaper.linux import cgroup, procfs
from mreaper.linux.syscalls import LinuxSyscalls, Syscalls

# include/uapi/linux/oom.h: OOM_SCORE_ADJ_MIN disables OOM killing of the task.
OOM_SCORE_ADJ_MIN = -1000

# --- the victim handle ---------------------------------------------------------------


class VictimError(Exception):
    """The process cannot be taken as a victim; nothing was signalled."""


class VictimGone(VictimError):
    """The process no longer exists."""


class VictimRecycled(VictimError):
    """The PID now belongs to another process than the one chosen."""


class VictimRefused(VictimError):
    """The process must never be killed by us (pid 1, kernel thread, ourselves...)."""


class VictimForbidden(VictimError):
    """We lack the permission to signal it."""


@dataclass(frozen=True, slots=True)
class Holdings:
    """What the victim held just before the kill, from /proc/<pid>/status, in bytes."""

    vm_rss: int
    rss_anon: int
    rss_file: int
    rss_shmem: int
    vm_swap: int
    # What a kill frees of its own (policy.Candidate.private), when the ranking read it:
    # a forked child's RssAnon also counts pages it shares with its parent.
    private: int | None = None

    @property
    def expected(self) -> int:
        """Bytes the kill should give back: the private memory when known, else the
        anonymous RSS."""
        return self.rss_anon if self.private is None else min(self.private, self.rss_anon)


def refusal(stat: procfs.Stat, tgid: int | None = None) -> str | None:
    """Why `stat`'s process must never be a victim, or None.  Pure: the invariant
    lives in one place, used by the engine, `mreaper kill` and the policy."""
    if stat.pid == 1:
        return "it is PID 1 (init): killing it panics the kernel"
    if stat.is_kernel_thread:  # PF_KTHREAD, not "pid 2": in a PID namespace pid 2 is a process
        return "it is a kernel thread"
    if stat.pid == os.getpid():
        return "it is mreaper itself"
    if stat.pid == os.getppid():
        return "it is mreaper's parent"
    if tgid is not None and tgid != stat.pid:
        return f"it is a thread of process {tgid}, not a process"
    return None


class Victim:
    """A process pinned by a pidfd, identity-checked, with what it holds.

    Open it when the victim is chosen, before any signal: from then on every signal
    goes through the pidfd, which keeps referring to this very process even if its
    PID number is reused after it dies.
    """

    def __init__(self, *, pid: int, pidfd: int, stat: procfs.Stat, status: procfs.Status,
                 cmdline: tuple[str, ...], cgroups: procfs.CgroupMembership,
                 charge_file: str | None, oom_score: tuple[int, int] = (0, 0)) -> None:
        self.pid = pid
        # As read right after pinning: the policy ranks the pinned process again from
        # these, without reading /proc a second time on the kill path.
        self.stat = stat
        self.status = status
        self.oom_score, self.oom_score_adj = oom_score
        self.pidfd = pidfd
        self.starttime = stat.starttime
        self.name = status.name or stat.comm
        self.uid = status.uid
        self.cmdline = cmdline
        self.cgroups = cgroups
        self.charge_file = charge_file
        self.holdings = Holdings(status.vm_rss, status.rss_anon, status.rss_file,
                                 status.rss_shmem, status.vm_swap)
        self._closed = False

    @classmethod
    def open(cls, pid: int, *, starttime: int | None = None, proc: str = procfs.PROC,
             syscalls: Syscalls | None = None, mounts: cgroup.Mounts | None = None) -> Victim:
        """Pin `pid`.  `starttime` is the identity seen at selection time: if the PID now
        belongs to another process, VictimRecycled is raised and nothing is signalled."""
        sc = syscalls or LinuxSyscalls()
        try:
            before = procfs.read_stat(pid, proc)
        except procfs.ProcessGone:
            raise VictimGone(f"no process with PID {pid}") from None
        if starttime is not None and before.starttime != starttime:
            raise VictimRecycled(f"PID {pid} was reused: start time {before.starttime}, "
                                 f"chosen process had {starttime}")
        reason = refusal(before)
        if reason:
            raise VictimRefused(f"refusing PID {pid} ({before.comm}): {reason}")
        try:
            # A thread id has a /proc/<tid> too: refuse it before pinning anything.
            reason = refusal(before, procfs.read_status(pid, proc).tgid)
        except procfs.ProcessGone:
            raise VictimGone(f"no process with PID {pid}") from None
        if reason:
            raise VictimRefused(f"refusing PID {pid} ({before.comm}): {reason}")
        try:
            pidfd = sc.pidfd_open(pid, 0)
        except ProcessLookupError:
            raise VictimGone(f"no process with PID {pid}") from None
        except OSError as e:
            # A non-leader thread id without PIDFD_THREAD: EINVAL before Linux 6.9,
            # ENOENT since; only reachable if the thread appeared as a leader above.
            if e.errno in (errno.EINVAL, errno.ENOENT):
                raise VictimRefused(f"refusing PID {pid}: it is a thread, not a process") from None
            raise
        try:
            # Identity after pinning: the process with this start time was alive when
            # chosen and is alive now, so it was alive in between: the pidfd is its.
            after = procfs.read_stat(pid, proc)
            if after.starttime != before.starttime:
                raise VictimRecycled(f"PID {pid} was reused while it was being pinned")
            status = procfs.read_status(pid, proc)
            reason = refusal(after, status.tgid)
            if reason:
                raise VictimRefused(f"refusing PID {pid} ({status.name}): {reason}")
            score, adj = procfs.read_oom_score(pid, proc)
            if adj <= OOM_SCORE_ADJ_MIN:
                raise VictimRefused(f"refusing PID {pid} ({status.name}): its oom_score_adj is "
                                    f"{adj}, the kernel's mark for a process never to kill")
            try:
                sc.pidfd_send_signal(pidfd, 0)  # permission check; sends nothing
            except PermissionError:
                raise VictimForbidden(f"permission denied to signal PID {pid} ({status.name}, "
                                      f"uid {status.uid}): run as root or as its owner") from None
            except ProcessLookupError:
                raise VictimGone(f"PID {pid} exited") from None
            cmdline = procfs.read_cmdline(pid, proc)
            groups = procfs.read_cgroup(pid, proc)
        except procfs.ProcessGone:
            os.close(pidfd)
            raise VictimGone(f"PID {pid} exited while being pinned") from None
        except BaseException:
            os.close(pidfd)
            raise
        if mounts is None:
            with contextlib.suppress(OSError):
                mounts = cgroup.find_mounts()
        charge = cgroup.memory_charge_file(groups, mounts) if mounts else None
        return cls(pid=pid, pidfd=pidfd, stat=after, status=status, cmdline=cmdline,
                   cgroups=groups, charge_file=charge, oom_score=(score, adj))

    def recheck(self, proc: str = procfs.PROC) -> str | None:
        """Look at the pinned process again, just before a signal: a process may become
        untouchable after it was chosen (exec into another name, a rename through
        prctl(PR_SET_NAME) or /proc/self/comm, oom_score_adj -1000 written during a
        SIGTERM grace or while a pre-kill hook runs).  Refreshes what the policy judges
        (stat, status, name, cmdline, oom_score) and returns why it must now be spared
        by every rule that lives here (reap.refusal, oom_score_adj -1000), or None.
        Gone or recycled: None, as the pidfd's own signal then fails with ESRCH."""
        try:
            stat = procfs.read_stat(self.pid, proc)
            if stat.starttime != self.starttime:
                return None  # exited: /proc/<pid> names another process now
            status = procfs.read_status(self.pid, proc)
            score, adj = procfs.read_oom_score(self.pid, proc)
            cmdline = procfs.read_cmdline(self.pid, proc)
        except (procfs.ProcessGone, procfs.ParseError):
            return None
        self.stat, self.status, self.cmdline = stat, status, cmdline
        self.name = status.name or stat.comm
        self.uid = status.uid
        self.oom_score, self.oom_score_adj = score, adj
        reason = refusal(stat, status.tgid)
        if reason:
            return reason
        if adj <= OOM_SCORE_ADJ_MIN:
            return f"its oom_score_adj is now {adj}, the kernel's mark for a process never to kill"
        return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.pidfd)

    def __enter__(self) -> Victim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Victim(pid={self.pid}, name={self.name!r}, rss={self.holdings.vm_rss})"


# --- escalation: cut a SIGTERM grace period short ------------------------------------


class Escalation:
    """Set from any thread to end a SIGTERM grace period at once (memory fell to the
    kill level meanwhile).  An eventfd, so the engine can poll it next to the pidfd."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.reason = ""
        self.stopping = False

    def set(self, reason: str = "") -> None:
        if reason and not self.stopping:
            self.reason = reason
        os.eventfd_write(self._fd, 1)

    def stop(self, reason: str) -> None:
        """The caller is stopping (the daemon got SIGTERM, `mreaper kill` got Ctrl-C): a
        victim in its SIGTERM grace was already judged to die, so it is SIGKILLed and
        reaped now rather than left SIGTERMed and alive; its exit is awaited only
        briefly (STOP_EXIT_WAIT), so the caller stops within about a second."""
        self.reason = reason
        self.stopping = True
        os.eventfd_write(self._fd, 1)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fd)

    def is_set(self) -> bool:
        r, _, _ = select.select([self._fd], [], [], 0)
        return bool(r)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        os.close(self._fd)


# --- the kill report -------------------------------------------------------------------


class Mrelease(enum.Enum):
    """What process_mrelease did, from the errno it gave (see the seed patch)."""

    REAPED = "reaped"                  # 0: we freed the address space ourselves
    EXITED_FIRST = "exited-first"      # ESRCH: the victim passed exit_mm; its exit freed it
    SHARED_MM = "shared-mm"            # EINVAL after SIGKILL: mm shared with a live process
    #                                    (CLONE_VM) or a core dump runs; memory stays until then
    RETRIES_EXHAUSTED = "retries-exhausted"  # EAGAIN/EINTR every time
    UNSUPPORTED = "unsupported"        # ENOSYS: old kernel or seccomp; the exit path frees
    FAILED = "failed"                  # anything else (EBADF...): a bug of ours, logged
    NOT_CALLED = "not-called"          # exited on SIGTERM, dry run, or disabled


@dataclass(frozen=True, slots=True)
class SignalSent:
    name: str
    at_s: float  # seconds since the kill sequence began


@dataclass(frozen=True)
class KillReport:
    """Everything needed to judge one kill afterwards."""

    pid: int
    starttime: int
    name: str
    cmdline: tuple[str, ...]
    uid: int
    cgroup: str
    memcg: str
    holdings: Holdings
    reason: str
    wall_time: float                 # time.time() when the sequence began
    signals: tuple[SignalSent, ...]
    mrelease: Mrelease
    mrelease_errno: str              # "0", "ESRCH", ... or "" when not called
    mrelease_attempts: int
    mrelease_s: float | None         # duration of the call(s)
    kill_to_free_s: float | None     # SIGKILL -> address space released (None: not seen)
    kill_to_exit_s: float | None     # SIGKILL -> pidfd readable (process exited)
    exited: bool
    freed_bytes: int | None          # as measured, never assumed
    freed_source: str                # "memcg <file>" or "MemAvailable"
    demoted: bool = False
    notes: tuple[str, ...] = field(default=())
    # Not killed after all: why it became untouchable between its choice and the
    # signal (the re-check before every signal).  "" for a kill.
    spared: str = ""

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["mrelease"] = self.mrelease.value
        d["cmdline"] = list(self.cmdline)
        d["signals"] = [asdict(s) for s in self.signals]
        d["notes"] = list(self.notes)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def human(self) -> str:
        h = self.holdings
        sigs = "+".join(s.name for s in self.signals) or "no signal"
        if self.spared:
            return (f"spared {self.pid} {self.name!r} (uid {self.uid}; rss "
                    f"{fmt_bytes(h.vm_rss)}) after {sigs}: {self.spared}"
                    + (f" [{self.reason}]" if self.reason else ""))
        private = "" if h.private is None else f"private {fmt_bytes(h.private)}; "
        line = (f"killed {self.pid} {self.name!r} (uid {self.uid}; {private}rss "
                f"{fmt_bytes(h.vm_rss)}: anon {fmt_bytes(h.rss_anon)}, file "
                f"{fmt_bytes(h.rss_file)}, shmem {fmt_bytes(h.rss_shmem)}; swap "
                f"{fmt_bytes(h.vm_swap)}) with {sigs}")
        if self.reason:
            line += f" [{self.reason}]"
        if self.mrelease is not Mrelease.NOT_CALLED:
            line += (f"; process_mrelease {self.mrelease.value} ({self.mrelease_errno})"
                     f" in {fmt_ms(self.mrelease_s)}")
        after = self.signals[-1].name if self.signals else "the kill"
        line += (f"; memory back {fmt_ms(self.kill_to_free_s)}, exit {fmt_ms(self.kill_to_exit_s)}"
                 f" after {after}")
        if self.freed_bytes is not None:
            line += f"; freed {fmt_bytes(self.freed_bytes)} ({self.freed_source})"
        for note in self.notes:
            line += f"; {note}"
        return line


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_ms(s: float | None) -> str:
    return "?" if s is None else f"{s * 1000:.1f} ms"


# --- the kill sequence ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KillOptions:
    term_timeout: float = 0.0     # > 0: SIGTERM first, SIGKILL when this many seconds pass
    exit_timeout: float = 10.0    # how long to wait for the exit after SIGKILL
    mrelease: bool = True         # False: plain SIGKILL (the baseline, or ENOSYS kernels)
    retries: int = 8              # process_mrelease attempts on EAGAIN/EINTR
    demote: bool = False          # SCHED_IDLE + nice 19 on the victim just before SIGKILL
    killed_by: str = ""           # set when we already SIGKILLed it another way ("cgroup.kill"):
    #                               no signal is sent, process_mrelease follows at once

    def __post_init__(self) -> None:
        if not 0 <= self.term_timeout <= 3600:
            raise ValueError(f"term_timeout {self.term_timeout!r}: must be 0..3600 seconds")
        if not 0 < self.exit_timeout <= 3600:
            raise ValueError(f"exit_timeout {self.exit_timeout!r}: must be > 0 and <= 3600 s")
        if not 1 <= self.retries <= 1000:
            raise ValueError(f"retries {self.retries!r}: must be 1..1000")


_MRELEASE_BY_ERRNO = {
    errno.ESRCH: Mrelease.EXITED_FIRST,
    errno.EINVAL: Mrelease.SHARED_MM,
    errno.ENOSYS: Mrelease.UNSUPPORTED,
}


def _wait_readable(fds: list[int], timeout_s: float) -> int | None:
    """Poll `fds` for input up to `timeout_s`; return the first readable fd or None."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            events = poller.poll(max(1, int(remaining * 1000 + 0.999)))
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        if events:
            return events[0][0]


def _demote(victim: Victim, proc: str = procfs.PROC) -> bool:
    """SCHED_IDLE and nice 19 for every thread of the victim (scheduling attributes are
    per thread).  Thread ids come from /proc/<pid>/task; the pidfd is checked alive
    first, so the ids are the victim's (they cannot be reused while it lives)."""
    try:
        tids = [int(t) for t in os.listdir(f"{proc}/{victim.pid}/task")]
    except OSError:
        return False
    if select.select([victim.pidfd], [], [], 0)[0]:  # exited meanwhile
        return False
    done = False
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, 19)
            done = True
        except OSError:
            continue
    return done


@dataclass(frozen=True, slots=True)
class Sent:
    """A SIGKILL the caller already sent with send_sigkill(), and what stood before it."""
    at: float                    # monotonic time of the pidfd_send_signal
    delivered: bool              # False: the victim had exited already (ESRCH)
    charge_before: int | None    # the victim's memcg charge just before
    avail_before: int | None     # MemAvailable just before
    demoted: bool


def send_sigkill(victim: Victim, options: KillOptions = KillOptions(), *,
                 syscalls: Syscalls | None = None,
                 meminfo: Callable[[], procfs.MemInfo] = procfs.read_meminfo) -> Sent:
    """SIGKILL a pinned victim now, from the caller's thread; kill_and_reap(sent=...)
    then reaps it and measures, in a reaper thread.

    The daemon decides in its loop thread; handing the signal to a reaper thread cost
    1-2 ms on the host (the worker must wake and take the GIL) and tens of ms in the
    emulated lab VM, while the leak kept growing.  The figures the report compares
    with are read first, as kill_and_reap does before its own signal."""
    sc = syscalls or LinuxSyscalls()
    charge_before = cgroup.read_charge(victim.charge_file) if victim.charge_file else None
    avail_before = _mem_available(meminfo) if charge_before is None else None
    demoted = _demote(victim) if options.demote else False
    try:
        sc.pidfd_send_signal(victim.pidfd, signal.SIGKILL)
        delivered = True
    except ProcessLookupError:
        delivered = False
    return Sent(time.monotonic(), delivered, charge_before, avail_before, demoted)


def kill_and_reap(victim: Victim, options: KillOptions = KillOptions(), *, reason: str = "",
                  syscalls: Syscalls | None = None, escalation: Escalation | None = None,
                  meminfo: Callable[[], procfs.MemInfo] = procfs.read_meminfo,
                  on_released: Callable[[], None] | None = None,
                  sent: Sent | None = None,
                  recheck: Callable[[Victim], str | None] | None = None) -> KillReport:
    """Run the kill sequence on a pinned victim and measure what came back.

    `on_released` is called as soon as the memory is known to be back (process_mrelease
    reaped it), before the wait for the exit: a victim stuck in D state may take long
    to exit, and the caller need not wait for that to act again.  `sent`: the caller
    already sent SIGKILL with send_sigkill(); the sequence goes on from there.

    Immediately before each signal it sends, the victim is looked at again
    (Victim.recheck, then `recheck`, the caller's rules): one that became untouchable
    since it was chosen is spared, and the report says why (`spared`)."""
    sc = syscalls or LinuxSyscalls()
    notes: list[str] = []
    signals: list[SignalSent] = []
    exit_at: float | None = None
    if sent is not None:
        if options.term_timeout > 0 or options.killed_by:
            raise ValueError("kill_and_reap: `sent` is a SIGKILL already sent; it excludes "
                             "a SIGTERM stage (term_timeout) and killed_by")
        charge_before, avail_before = sent.charge_before, sent.avail_before
        t0 = sent.at
        wall = time.time() - (time.monotonic() - sent.at)
    else:
        charge_before = cgroup.read_charge(victim.charge_file) if victim.charge_file else None
        avail_before = _mem_available(meminfo)
        wall = time.time()
        t0 = time.monotonic()

    def protected_now() -> str | None:
        why = victim.recheck()
        if why is None and recheck is not None:
            try:
                why = recheck(victim)
            except Exception as e:  # a victim we cannot judge is not signalled
                logging.getLogger("mreaper").exception("re-check of %d failed", victim.pid)
                why = f"it could not be judged again ({e})"
        return why

    def spare(why: str) -> KillReport:
        when = ("during the SIGTERM grace" if signals else
                "after it was chosen, before any signal")
        return KillReport(
            pid=victim.pid, starttime=victim.starttime, name=victim.name,
            cmdline=victim.cmdline, uid=victim.uid, cgroup=victim.cgroups.unified,
            memcg=victim.cgroups.memory_v1, holdings=victim.holdings, reason=reason,
            wall_time=wall, signals=tuple(signals), mrelease=Mrelease.NOT_CALLED,
            mrelease_errno="", mrelease_attempts=0, mrelease_s=None, kill_to_free_s=None,
            kill_to_exit_s=None, exited=False, freed_bytes=None, freed_source="unmeasured",
            notes=tuple(notes), spared=f"spared: became protected {when}: {why}")

    def send(sig: signal.Signals) -> bool:
        try:
            sc.pidfd_send_signal(victim.pidfd, sig)
        except ProcessLookupError:
            notes.append(f"{sig.name}: already exited")
            return False
        signals.append(SignalSent(sig.name, time.monotonic() - t0))
        return True

    if options.term_timeout > 0 and not options.killed_by:
        if (why := protected_now()) is not None:
            return spare(why)
        if send(signal.SIGTERM):
            fds = [victim.pidfd] + ([escalation.fileno()] if escalation else [])
            woke = _wait_readable(fds, options.term_timeout)
            if woke == victim.pidfd:
                exit_at = time.monotonic()
                notes.append("exited on SIGTERM")
            elif woke is not None:
                assert escalation is not None
                notes.append("SIGTERM grace period cut short: "
                             + (escalation.reason or "escalated"))
            else:
                notes.append(f"ignored SIGTERM for {options.term_timeout:g} s")

    kill_at: float | None = None
    outcome, err_name, attempts, mrelease_s, free_at = Mrelease.NOT_CALLED, "", 0, None, None
    demoted = False
    if sent is not None:
        demoted = sent.demoted
        if sent.delivered:
            signals.append(SignalSent("SIGKILL", 0.0))
            kill_at = t0
        else:
            notes.append("SIGKILL: already exited")
            exit_at = t0
    elif options.killed_by:
        signals.append(SignalSent(options.killed_by, 0.0))
        kill_at = t0
    elif exit_at is None:
        # The straight kill from the daemon's loop (`sent`) is judged by its pinning in
        # the same thread just before, with nothing waited for in between; here a grace
        # or a pre-kill hook may have run since.
        if (why := protected_now()) is not None:
            return spare(why)
        if options.demote:
            demoted = _demote(victim)
        if send(signal.SIGKILL):
            kill_at = time.monotonic()
        else:
            exit_at = time.monotonic()
    if kill_at is not None and options.mrelease:  # right after our SIGKILL, never before
        outcome, err_name, attempts, mrelease_s, free_at = _mrelease(sc, victim.pidfd,
                                                                     options.retries)
        free_at = _confirm(free_at, victim, charge_before)
        if free_at is not None and on_released is not None:
            on_released()
    if exit_at is None:
        exit_at = _wait_exit(victim, options, kill_at or t0, escalation, notes)

    if outcome is Mrelease.SHARED_MM:
        notes.append("address space shared with a live process (CLONE_VM) or a core dump "
                     "in progress: freed only when that ends")
    elif free_at is None and exit_at is not None:
        # exit_mm() and its mmput() run before the exit is signalled on the pidfd, so
        # the exit is when the memory came back, unless a live process still shares
        # the mm: believe it only if the charge agrees.
        if _released(victim, charge_before) is False:
            notes.append("exited, but its memory was not seen back (still shared with a "
                         "live process?)")
        else:
            free_at = exit_at
    ref = kill_at if kill_at is not None else t0

    freed, source = _measure_freed(victim, charge_before, avail_before, meminfo)
    return KillReport(
        pid=victim.pid, starttime=victim.starttime, name=victim.name, cmdline=victim.cmdline,
        uid=victim.uid, cgroup=victim.cgroups.unified, memcg=victim.cgroups.memory_v1,
        holdings=victim.holdings, reason=reason, wall_time=wall, signals=tuple(signals),
        mrelease=outcome, mrelease_errno=err_name, mrelease_attempts=attempts,
        mrelease_s=mrelease_s,
        kill_to_free_s=None if free_at is None else max(free_at - ref, 0.0),
        kill_to_exit_s=None if exit_at is None else max(exit_at - ref, 0.0),
        exited=exit_at is not None, freed_bytes=freed, freed_source=source,
        demoted=demoted, notes=tuple(notes),
    )


STOP_EXIT_WAIT = 1.0  # seconds the exit is awaited after SIGKILL once the caller stops


def _wait_exit(victim: Victim, options: KillOptions, since: float,
               escalation: Escalation | None, notes: list[str]) -> float | None:
    """Wait for the victim's exit after SIGKILL, bounded by exit_timeout, or by
    STOP_EXIT_WAIT once the caller stops (a victim in D state must not hold a daemon
    past systemd's TimeoutStopSec).  The monotonic time of the exit, or None."""
    deadline = since + options.exit_timeout
    fds = [victim.pidfd] + ([escalation.fileno()] if escalation is not None else [])
    while True:
        if escalation is not None and escalation.stopping:
            fds = [victim.pidfd]
            deadline = min(deadline, time.monotonic() + STOP_EXIT_WAIT)
        woke = _wait_readable(fds, max(deadline - time.monotonic(), 0.001))
        if woke == victim.pidfd:
            return time.monotonic()
        if woke is None:
            break
        assert escalation is not None
        escalation.drain()  # an escalation means nothing after SIGKILL; a stop does
    if escalation is not None and escalation.stopping:
        notes.append(f"not exited yet when mreaper stopped ({escalation.reason})")
    else:
        notes.append(f"still not exited {options.exit_timeout:g} s after SIGKILL")
    return None


def _mrelease(sc: Syscalls, pidfd: int,
              retries: int) -> tuple[Mrelease, str, int, float, float | None]:
    """Call process_mrelease until it gives a final answer.  Returns (outcome, errno
    name, attempts, seconds spent, monotonic time the memory was known released)."""
    start = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            sc.process_mrelease(pidfd, 0)
        except OSError as e:
            num = e.errno or 0
            name = errno.errorcode.get(num, str(num))
            now = time.monotonic()
            if num in (errno.EAGAIN, errno.EINTR):
                if attempts < retries:
                    os.sched_yield()
                    continue
                return Mrelease.RETRIES_EXHAUSTED, name, attempts, now - start, None
            # ESRCH: no thread has an mm any more.  That does not mean the pages are
            # free: exit_mm() clears task->mm before its mmput() frees them, and a live
            # CLONE_VM sharer keeps them.  The exit (or the charge) tells when.
            return _MRELEASE_BY_ERRNO.get(num, Mrelease.FAILED), name, attempts, now - start, \
                None
        now = time.monotonic()
        return Mrelease.REAPED, "0", attempts, now - start, now


# Below this much anonymous memory a victim's release is lost in the noise of its
# memory cgroup's other charges: the kernel's answer is taken as it is.
_CONFIRM_MIN = 4 << 20


def _released(victim: Victim, charge_before: int | None) -> bool | None:
    """Did the victim's memory cgroup charge fall by at least half of what its kill
    should free (its private memory when known, else its anonymous RSS)?  None when
    that cannot be told (no memcg, or a small victim)."""
    if not victim.charge_file or charge_before is None:
        return None
    expected = victim.holdings.expected
    if expected < _CONFIRM_MIN:
        return None
    now = cgroup.read_charge(victim.charge_file)
    return None if now is None else charge_before - now >= expected // 2


def _confirm(free_at: float | None, victim: Victim, charge_before: int | None) -> float | None:
    """process_mrelease answers 0 also when the victim's own exit_mmap() already marked
    the mm MMF_OOM_SKIP, before its pages are all freed: keep the call's time as the
    moment the memory came back only if the charge shows it."""
    if free_at is None or _released(victim, charge_before) is not False:
        return free_at
    return None


def _mem_available(meminfo: Callable[[], procfs.MemInfo]) -> int | None:
    try:
        return meminfo().mem_available
    except (OSError, procfs.ParseError):
        return None


def _measure_freed(victim: Victim, charge_before: int | None, avail_before: int | None,
                   meminfo: Callable[[], procfs.MemInfo]) -> tuple[int | None, str]:
    if victim.charge_file and charge_before is not None:
        after = cgroup.read_charge(victim.charge_file)
        if after is not None:
            return charge_before - after, f"memcg {victim.charge_file}"
    after_avail = _mem_available(meminfo)
    if avail_before is not None and after_avail is not None:
        return after_avail - avail_before, "MemAvailable"
    return None, "unmeasured"


# --- killing a cgroup whole ------------------------------------------------------------


@dataclass(frozen=True)
class GroupKillReport:
    """A cgroup killed whole with cgroup.kill, and each of its processes reaped."""

    cgroup: str                       # the cgroup directory
    reason: str
    wall_time: float
    members: tuple[KillReport, ...]
    skipped: tuple[str, ...]          # processes we could not pin (gone, refused)
    freed_bytes: int | None
    freed_source: str
    kill_to_free_s: float | None      # until the last member's memory was back
    notes: tuple[str, ...] = ()
    spared: str = ""                  # not killed: a member became protected (why)
    family: str = ""                  # a family killed through pidfds (cgroup is "")

    def to_dict(self) -> dict[str, object]:
        return {"cgroup": self.cgroup, "family": self.family, "reason": self.reason,
                "wall_time": self.wall_time,
                "members": [m.to_dict() for m in self.members], "skipped": list(self.skipped),
                "freed_bytes": self.freed_bytes, "freed_source": self.freed_source,
                "kill_to_free_s": self.kill_to_free_s, "notes": list(self.notes),
                "spared": self.spared}

    def human(self) -> str:
        if self.spared:
            return f"spared cgroup {self.cgroup}: {self.spared} [{self.reason}]"
        outcomes = ", ".join(f"{m.pid} {m.name!r} {m.mrelease.value}" for m in self.members)
        unit, via = ((f"family {self.family}", "SIGKILL through pidfds") if self.family
                     else (f"cgroup {self.cgroup}", "cgroup.kill"))
        line = (f"killed {unit} ({len(self.members)} processes: {outcomes}) with "
                f"{via} [{self.reason}]; memory back {fmt_ms(self.kill_to_free_s)} "
                f"after the kill")
        if self.freed_bytes is not None:
            line += f"; freed {fmt_bytes(self.freed_bytes)} ({self.freed_source})"
        if self.skipped:
            line += f"; not pinned: {'; '.join(self.skipped)}"
        for note in self.notes:
            line += f"; {note}"
        return line


def pin_cgroup(cgroup_dir: str, *, proc: str = procfs.PROC,
               syscalls: Syscalls | None = None) -> tuple[list[Victim], list[str]]:
    """Pin every process of a cgroup subtree before the kill (pidfds from cgroup.procs),
    so each can be reaped afterwards.  Returns the victims and why others were skipped.
    A process we must never kill (pid 1, ourselves...) makes the whole group refused."""
    victims: list[Victim] = []
    skipped: list[str] = []
    try:
        for pid in cgroup.read_procs(cgroup_dir):
            try:
                victims.append(Victim.open(pid, proc=proc, syscalls=syscalls))
            except VictimGone as e:
                skipped.append(str(e))
    except BaseException:
        for v in victims:
            v.close()
        raise
    return victims, skipped


def kill_group(cgroup_dir: str, victims: list[Victim], options: KillOptions = KillOptions(), *,
               reason: str = "", syscalls: Syscalls | None = None,
               skipped: tuple[str, ...] = (),
               recheck: Callable[[Victim], str | None] | None = None) -> GroupKillReport:
    """cgroup.kill, then process_mrelease on each pinned member, then wait for the exits.

    The members are reaped one after another from this thread: each call frees at
    ~10 GiB/s, and doing it here keeps a group kill from starving the pool.

    cgroup.kill spares no one: if a member became untouchable since the group was
    chosen (Victim.recheck, then the caller's `recheck`), the whole group is spared."""
    for v in victims:
        why = v.recheck()
        if why is None and recheck is not None:
            why = recheck(v)
        if why is not None:
            return GroupKillReport(
                cgroup=cgroup_dir, reason=reason, wall_time=time.time(), members=(),
                skipped=skipped, freed_bytes=None, freed_source="unmeasured",
                kill_to_free_s=None,
                spared=f"spared: member {v.pid} {v.name!r} became protected after the group "
                       f"was chosen: {why}")
    # What the group holds: its own memory.current (v2 with the memory controller), or
    # else the distinct memory cgroups its members are charged to (v1 on a hybrid host),
    # each read once before the kill and once after.
    group_file = os.path.join(cgroup_dir, "memory.current")
    files = [group_file] if os.path.exists(group_file) else sorted(
        {v.charge_file for v in victims if v.charge_file})
    before = {f: cgroup.read_charge(f) for f in files}
    wall = time.time()
    notes: list[str] = []
    try:
        cgroup.kill(cgroup_dir)
        via = "cgroup.kill"
    except OSError as e:
        # No cgroup.kill (Linux < 5.14): SIGKILL each pinned member through its pidfd.
        notes.append(f"cgroup.kill unavailable ({e.strerror}): SIGKILL per process")
        via = ""
    opts = dataclasses.replace(options, term_timeout=0.0, killed_by=via)
    # One thread per member (bounded): each reaps its member and waits for its exit,
    # so a member stuck in D state does not hold back the reaping of the others.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(victims))),
                            thread_name_prefix="mreaper-group") as members_pool:
        members = tuple(members_pool.map(
            lambda v: kill_and_reap(v, opts, reason=reason, syscalls=syscalls), victims))
    after = {f: cgroup.read_charge(f) for f in files}
    deltas = [b - a for f in files if (b := before[f]) is not None and (a := after[f]) is not None]
    freed: int | None = sum(deltas) if files and len(deltas) == len(files) else None
    source = "memcg " + ", ".join(files) if freed is not None else "unmeasured"
    # Each member's times count from when its reap began; shift them to the kill.
    backs = [None if m.kill_to_free_s is None else m.wall_time - wall + m.kill_to_free_s
             for m in members]
    last = None if not backs or None in backs else max(b for b in backs if b is not None)
    return GroupKillReport(cgroup=cgroup_dir, reason=reason, wall_time=wall, members=members,
                           skipped=skipped, freed_bytes=freed, freed_source=source,
                           kill_to_free_s=last, notes=tuple(notes))


def kill_family(label: str, victims: list[Victim], sents: list[Sent],
                options: KillOptions = KillOptions(), *, reason: str = "",
                syscalls: Syscalls | None = None,
                skipped: tuple[str, ...] = ()) -> GroupKillReport:
    """Reap a family the caller already SIGKILLed member by member through their pidfds
    (send_sigkill, parents first), each member in its own thread, and report them as one.
    What came back is the sum of the members' own charge drops, each measured against
    its memory cgroup (members of one memcg share a charge file: measured once)."""
    wall = time.time() - (time.monotonic() - min((s.at for s in sents), default=time.monotonic()))
    opts = dataclasses.replace(options, term_timeout=0.0, killed_by="")
    files = sorted({v.charge_file for v in victims if v.charge_file})
    before = {f: next((s.charge_before for v, s in zip(victims, sents, strict=True)
                       if v.charge_file == f), None) for f in files}
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(victims))),
                            thread_name_prefix="mreaper-family") as members_pool:
        members = tuple(members_pool.map(
            lambda vs: kill_and_reap(vs[0], opts, reason=reason, syscalls=syscalls, sent=vs[1]),
            list(zip(victims, sents, strict=True))))
    after = {f: cgroup.read_charge(f) for f in files}
    deltas = [b - a for f in files if (b := before[f]) is not None and (a := after[f]) is not None]
    freed: int | None = sum(deltas) if files and len(deltas) == len(files) else None
    source = "memcg " + ", ".join(files) if freed is not None else "unmeasured"
    t0 = min((s.at for s in sents), default=0.0)
    backs = [None if m.kill_to_free_s is None else s.at - t0 + m.kill_to_free_s
             for m, s in zip(members, sents, strict=True)]
    last = None if not backs or None in backs else max(b for b in backs if b is not None)
    return GroupKillReport(cgroup="", reason=reason, wall_time=wall, members=members,
                           skipped=skipped, freed_bytes=freed, freed_source=source,
                           kill_to_free_s=last, family=label)


# --- the reaper pool ---------------------------------------------------------------------


class ReaperPool:
    """A few threads that kill and reap, so the caller never blocks in a syscall and
    several victims are reaped on several CPUs at once (lmkd's design)."""

    def __init__(self, workers: int = 2, *, syscalls: Syscalls | None = None,
                 before_kill: Callable[[Victim, str], None] | None = None) -> None:
        """`before_kill(victim, reason)` runs in the worker after the victim is pinned
        and before any signal (pre-kill hooks); it must bound its own time, and an
        exception from it is logged and does not stop the kill."""
        if not 1 <= workers <= 64:
            raise ValueError(f"reaper workers {workers!r}: must be 1..64")
        self.workers = workers
        self._syscalls = syscalls or LinuxSyscalls()
        self._before_kill = before_kill
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mreaper-reaper")
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, victim: Victim, options: KillOptions = KillOptions(), *, reason: str = "",
               escalation: Escalation | None = None,
               on_released: Callable[[], None] | None = None,
               sent: Sent | None = None,
               recheck: Callable[[Victim], str | None] | None = None) -> Future[KillReport]:
        """Hand over a pinned victim; the pool owns its pidfd from now on and closes it.
        `sent`: SIGKILL was already sent (send_sigkill); no pre-kill step runs then.
        `recheck`: the caller's rules, asked again before each signal (kill_and_reap)."""
        with self._lock:
            if self._closed:
                victim.close()
                raise RuntimeError("reaper pool is shut down")
            return self._pool.submit(self._run, victim, options, reason=reason,
                                     escalation=escalation, on_released=on_released, sent=sent,
                                     recheck=recheck)

    def submit_group(self, cgroup_dir: str, victims: list[Victim],
                     options: KillOptions = KillOptions(), *, reason: str = "",
                     skipped: tuple[str, ...] = (),
                     recheck: Callable[[Victim], str | None] | None = None
                     ) -> Future[GroupKillReport]:
        """Kill a cgroup whole and reap its pinned members; the pool closes their pidfds."""
        with self._lock:
            if self._closed:
                for v in victims:
                    v.close()
                raise RuntimeError("reaper pool is shut down")
            return self._pool.submit(self._run_group, cgroup_dir, victims, options,
                                     reason=reason, skipped=skipped, recheck=recheck)

    def submit_family(self, label: str, victims: list[Victim], sents: list[Sent],
                      options: KillOptions = KillOptions(), *, reason: str = "",
                      skipped: tuple[str, ...] = ()) -> Future[GroupKillReport]:
        """Reap a family already SIGKILLed (kill_family); the pool closes the pidfds."""
        with self._lock:
            if self._closed:
                for v in victims:
                    v.close()
                raise RuntimeError("reaper pool is shut down")
            return self._pool.submit(self._run_family, label, victims, sents, options,
                                     reason=reason, skipped=skipped)

    def _run_family(self, label: str, victims: list[Victim], sents: list[Sent],
                    options: KillOptions, *, reason: str,
                    skipped: tuple[str, ...]) -> GroupKillReport:
        try:
            return kill_family(label, victims, sents, options, reason=reason,
                               syscalls=self._syscalls, skipped=skipped)
        finally:
            for v in victims:
                v.close()

    def _run_group(self, cgroup_dir: str, victims: list[Victim], options: KillOptions, *,
                   reason: str, skipped: tuple[str, ...],
                   recheck: Callable[[Victim], str | None] | None) -> GroupKillReport:
        try:
            return kill_group(cgroup_dir, victims, options, reason=reason,
                              syscalls=self._syscalls, skipped=skipped, recheck=recheck)
        finally:
            for v in victims:
                v.close()

    def _run(self, victim: Victim, options: KillOptions, *, reason: str,
             escalation: Escalation | None, on_released: Callable[[], None] | None,
             sent: Sent | None, recheck: Callable[[Victim], str | None] | None) -> KillReport:
        try:
            if self._before_kill is not None and sent is None:
                try:
                    self._before_kill(victim, reason)
                except Exception:
                    logging.getLogger("mreaper").exception("before-kill step failed; killing "
                                                           "anyway")
            return kill_and_reap(victim, options, reason=reason, syscalls=self._syscalls,
                                 escalation=escalation, on_released=on_released, sent=sent,
                                 recheck=recheck)
        finally:
            victim.close()

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=wait)

    def __enter__(self) -> ReaperPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
