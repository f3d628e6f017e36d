"""The daemon: wires detection, policy and the reaper pool into one event-driven loop.

pressure event -> verdict -> victim (from a ranked list kept fresh in the background)
-> one more look at the pressure -> reaper pool -> kill report -> measured recovery
-> act again only if pressure persists.  The loop sleeps in poll() on the PSI trigger
fds, a wake-up eventfd and the signal fd, for an interval that shrinks as memory
approaches a level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from mreaper import config as config_mod
from mreaper import policy
from mreaper.config import Config
from mreaper.detect import FallRate, PsiMonitor, Severity, Verdict, assess, next_interval
from mreaper.linux import procfs
from mreaper.linux.syscalls import lock_memory, probe_support
from mreaper.reap import (
    Escalation,
    KillOptions,
    KillReport,
    ReaperPool,
    Victim,
    VictimError,
    fmt_bytes,
)
from mreaper.report import Episode, LogSink, Sample, Sink

log = logging.getLogger("mreaper")

EPISODE_CALM = 2.0  # seconds without any level held before an episode is over
KEEP_KILLS = 20     # kill reports kept for status
SAMPLE_EVERY = 1.0  # seconds between samples handed to the sinks (gauges)


# --- logging ---------------------------------------------------------------------------


class _JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority (<3> error, <4> warning, <6> info,
    <7> debug), which journald reads from a service's stderr (sd-daemon(3))."""

    def format(self, record: logging.LogRecord) -> str:
        prio = 3 if record.levelno >= logging.ERROR else 4 if record.levelno >= logging.WARNING \
            else 6 if record.levelno >= logging.INFO else 7
        return f"<{prio}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd gave us ($JOURNAL_STREAM dev:ino)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def setup_logging(mode: str, verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    journal = mode == "journal" or (mode == "auto" and stderr_is_journal())
    handler.setFormatter(_JournalFormatter("%(message)s") if journal else
                         logging.Formatter("%(asctime)s mreaper: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("mreaper")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


# --- self-protection ----------------------------------------------------------------------


def protect_self(cfg: Config) -> list[str]:
    """mlockall, our own oom_score_adj, nice and optional realtime priority.  Returns
    what could not be done (the daemon still runs, and says so)."""
    problems = []
    if cfg.mlockall:
        try:
            log.info("memory locked (%s)", lock_memory())
        except OSError as e:
            problems.append(f"mlockall failed: {e.strerror}")
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(cfg.oom_score_adj))
    except OSError as e:
        problems.append(f"cannot set oom_score_adj {cfg.oom_score_adj}: {e.strerror}")
    if cfg.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, cfg.nice)
        except OSError as e:
            problems.append(f"cannot set nice {cfg.nice}: {e.strerror}")
    if cfg.realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError as e:
            problems.append(f"cannot set SCHED_FIFO: {e.strerror}")
    return problems


# --- the candidate list, kept fresh in the background ------------------------------------


class CandidateCache:
    """Scans /proc and ranks in a background thread, so a ranked list is ready the
    moment a level is crossed: event-to-SIGKILL time does not grow with the number of
    processes.  Calm: every scan_interval; at or above warn: ten times as often."""

    def __init__(self, cfg: Config, proc: str = procfs.PROC) -> None:
        self.cfg = cfg
        self.proc = proc
        self._ranked: tuple[float, list[policy.Ranked]] = (0.0, [])
        self._urgent = False
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mreaper-scan", daemon=True)
        self._warned: set[str] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def set_urgent(self, urgent: bool) -> None:
        if urgent and not self._urgent:
            self._urgent = True
            self._wake.set()
        self._urgent = urgent

    def refresh(self) -> list[policy.Ranked]:
        candidates, warnings = policy.scan(self.proc)
        for w in warnings:
            if w not in self._warned:
                self._warned.add(w)
                log.warning("scan: %s", w)
        ranked = policy.rank(candidates, self.cfg.rules, sort_by=self.cfg.sort_by,
                             min_rss=self.cfg.min_rss)
        self._ranked = (time.monotonic(), ranked)
        return ranked

    def peek(self) -> list[policy.Ranked]:
        """The cached ranking as it is (no scan)."""
        return self._ranked[1]

    def get(self, max_age: float) -> tuple[list[policy.Ranked], float]:
        """The cached ranking if younger than max_age, else a fresh one; and its age."""
        at, ranked = self._ranked
        age = time.monotonic() - at
        if age > max_age or not ranked:
            ranked = self.refresh()
            age = 0.0
        return ranked, age

    def _loop(self) -> None:
        while not self._stop:
            try:
                self.refresh()
            except Exception:  # the scan must never kill the daemon
                log.exception("background scan failed")
            interval = self.cfg.scan_interval / (10 if self._urgent else 1)
            self._wake.wait(interval)
            self._wake.clear()


# --- the loop -----------------------------------------------------------------------------


@dataclass
class _InFlight:
    future: Future[KillReport]
    escalation: Escalation
    detected_at: float
    available_at_kill: int


class Daemon:
    """The only object that knows every stage."""

    def __init__(self, cfg: Config, *, config_path: str | None = None,
                 config_required: bool = False,
                 reload: Callable[[], Config] | None = None,
                 meminfo: Callable[[], procfs.MemInfo] = procfs.read_meminfo,
                 sink: Sink | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self._reload = reload
        self.meminfo = meminfo
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signals: list[int] = []
        self._stop = False
        self.kills: list[KillReport] = []
        self._inflight: _InFlight | None = None
        self._settle: tuple[float, int] | None = None  # (deadline, MemAvailable to reach)
        self._dry_run_quiet_until = 0.0
        self._warned = False
        self._episode_since: float | None = None
        self._episode_last = 0.0
        self._episode_peak = Severity.NONE
        self._last_look: tuple[procfs.MemInfo, Verdict] | None = None
        self._cache: CandidateCache | None = None
        self._sampled_at = -SAMPLE_EVERY
        self.sink: Sink = sink if sink is not None else LogSink()

    # -- signals: recorded by the handler, handled in the loop
    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def request_stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def run(self) -> int:
        cfg = self.cfg
        support = probe_support()
        if not support.pidfd:
            log.error("cannot act safely: %s; refusing to start", support.detail)
            return 1
        log.info("kernel: %s", support.detail)
        if not support.mrelease and cfg.mrelease:
            log.warning("process_mrelease unavailable: kills will wait for the victim's own "
                        "exit path")
        for problem in protect_self(cfg):
            log.warning("self-protection: %s", problem)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        psi = PsiMonitor(cfg.psi)
        if psi.fallback:
            log.warning("PSI triggers unavailable (%s): reading the averages instead",
                        psi.fallback)
        pool = ReaperPool(cfg.reapers)
        cache = CandidateCache(cfg)
        self._cache = cache
        cache.start()
        log.info("running%s: %s", " (dry run)" if cfg.dry_run else "", describe(cfg))
        try:
            self._loop(psi, pool, cache)
        finally:
            cache.stop()
            pool.shutdown(wait=True)
            psi.close()
            self.sink.close()
            signal.set_wakeup_fd(-1)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
        log.info("stopped")
        return 0

    def _loop(self, psi: PsiMonitor, pool: ReaperPool, cache: CandidateCache) -> None:
        rate = FallRate()
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for fd in psi.fds:
            poller.register(fd, select.POLLPRI)
        while not self._stop:
            now = time.monotonic()
            mem = self.meminfo()
            rate.update(now, mem.mem_available)
            psi.refresh_averages()
            verdict = assess(self.cfg, mem, psi.active(now))
            self._track_episode(verdict, now, mem)
            self._last_look = (mem, verdict)
            if now - self._sampled_at >= SAMPLE_EVERY:  # gauges: not on every look
                self._sampled_at = now
                self.sink.sample(self._sample(mem, psi))
            cache.set_urgent(verdict.severity >= Severity.WARN)
            self._collect(pool)
            if self._inflight and verdict.severity == Severity.KILL:
                self._inflight.escalation.set()  # cut a SIGTERM grace period short
            if verdict.severity >= Severity.TERM and self._ready(mem):
                self._act(verdict, now, pool, cache, psi)
            timeout = next_interval(self.cfg, mem, rate.rate)
            if self._episode_since is not None:
                timeout = min(timeout, EPISODE_CALM)
            if self._inflight or self._settle:
                timeout = min(timeout, 0.05)
            for fd, revents in poller.poll(timeout * 1000):
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 512)
                else:
                    psi.on_event(fd, revents, time.monotonic())
            self._handle_signals(psi, poller, cache)

    def _track_episode(self, verdict: Verdict, now: float, mem: procfs.MemInfo) -> None:
        """Start, peak and end of a pressure episode.  An episode ends only after
        EPISODE_CALM seconds without any level held, so a reading that hovers at a
        level does not flood the log."""
        if verdict.severity >= Severity.WARN:
            if self._episode_since is None:
                self._episode_since, self._episode_peak = now, verdict.severity
                self._emit_episode("start", verdict, now, mem)
            elif verdict.severity > self._episode_peak:
                self._episode_peak = verdict.severity
                self._emit_episode("peak", verdict, now, mem)
            self._episode_last = now
        elif self._episode_since is not None and now - self._episode_last >= EPISODE_CALM:
            self._emit_episode("end", Verdict(self._episode_peak, "pressure over"),
                               self._episode_last, mem)
            self._episode_since = None

    def _emit_episode(self, phase: str, verdict: Verdict, now: float,
                      mem: procfs.MemInfo) -> None:
        assert self._episode_since is not None
        self.sink.episode(Episode(
            scope="machine", phase=phase, severity=verdict.severity.name.lower(),
            reason=verdict.reason, wall_time=time.time(), duration_s=now - self._episode_since,
            mem_available=mem.mem_available))

    def _ready(self, mem: procfs.MemInfo) -> bool:
        """No kill in flight, and the last kill's recovery has shown (or timed out)."""
        if self._inflight is not None:
            return False
        if time.monotonic() < self._dry_run_quiet_until:
            return False
        if self._settle is not None:
            deadline, target = self._settle
            if mem.mem_available < target and time.monotonic() < deadline:
                return False
            self._settle = None
        return True

    def _collect(self, pool: ReaperPool) -> None:
        inflight = self._inflight
        if inflight is None or not inflight.future.done():
            return
        self._inflight = None
        inflight.escalation.close()
        try:
            report = inflight.future.result()
        except Exception:
            log.exception("kill failed")
            return
        self.kills.append(report)
        del self.kills[:-KEEP_KILLS]
        self.sink.kill(report, "machine")
        # After a kill, MemAvailable lags what came back (per-CPU free lists, see
        # research/mrelease-facts.md): wait until it shows most of what the kill
        # measurably freed, or a short bound, before judging whether to act again.
        freed = max(report.freed_bytes or 0, 0)
        self._settle = (time.monotonic() + min(1.0, self.cfg.recovery_timeout),
                        inflight.available_at_kill + int(freed * 0.75))

    def _act(self, verdict: Verdict, detected_at: float, pool: ReaperPool,
             cache: CandidateCache, psi: PsiMonitor) -> None:
        ranked, age = cache.get(max_age=self.cfg.scan_interval)
        victim = self._pin_first(ranked)
        if victim is None:
            if not self._warned:
                log.error("%s, but no process may be killed (all protected, excluded or "
                          "gone)", verdict.reason)
                self._warned = True
            return
        self._warned = False
        # One more look: the scan may have taken long enough for pressure to clear.
        mem = self.meminfo()
        again = assess(self.cfg, mem, psi.active(time.monotonic()))
        if again.severity < Severity.TERM:
            log.info("pressure cleared before the kill (%s); %d %r spared", verdict.reason,
                     victim.pid, victim.name)
            victim.close()
            return
        decided_ms = (time.monotonic() - detected_at) * 1000
        if self.cfg.dry_run:
            log.warning("dry run: would kill %d %r (rss %s) [%s]; decided in %.1f ms",
                        victim.pid, victim.name, fmt_bytes(victim.holdings.vm_rss),
                        again.reason, decided_ms)
            victim.close()
            self._dry_run_quiet_until = time.monotonic() + self.cfg.recovery_timeout
            return
        options = KillOptions(
            term_timeout=self.cfg.term_timeout if again.severity == Severity.TERM else 0.0,
            exit_timeout=self.cfg.recovery_timeout, mrelease=self.cfg.mrelease,
            demote=self.cfg.demote)
        escalation = Escalation()
        log.info("killing %d %r (rss %s) [%s]; decided in %.1f ms from a %.0f ms old ranking",
                 victim.pid, victim.name, fmt_bytes(victim.holdings.vm_rss), again.reason,
                 decided_ms, age * 1000)
        future = pool.submit(victim, options, reason=again.reason, escalation=escalation)
        future.add_done_callback(lambda _f: self._poke())
        self._inflight = _InFlight(future, escalation, detected_at, mem.mem_available)

    def _sample(self, mem: procfs.MemInfo, psi: PsiMonitor) -> Sample:
        distance: dict[str, int | None] = {}
        for level in config_mod.LEVELS:
            limit = self.cfg.memory[level].bytes_of(mem.mem_total)
            distance[level] = None if limit is None else mem.mem_available - limit
        avgs = psi.averages()
        return Sample(scope="machine", mem_available=mem.mem_available,
                      swap_free=mem.swap_free if mem.swap_total else None,
                      psi_some_avg10=avgs.get("some"), psi_full_avg10=avgs.get("full"),
                      distance=distance)

    def status(self, top: int = 10) -> dict[str, object]:
        """What the daemon decides from, for `mreaper status` (systemd-oomd's `oomctl
        dump` idea): per scope the figures, the levels and the distance to them, the
        top candidates, the last kills.  Safe to call from another thread."""
        look = self._last_look
        scopes: list[dict[str, object]] = []
        if look is not None:
            mem, verdict = look
            scopes.append({
                "scope": "machine", "severity": verdict.severity.name.lower(),
                "reason": verdict.reason, "mem_total": mem.mem_total,
                "mem_available": mem.mem_available, "swap_total": mem.swap_total,
                "swap_free": mem.swap_free,
                "levels": {lvl: self.cfg.memory[lvl].bytes_of(mem.mem_total)
                           for lvl in config_mod.LEVELS},
                "swap_levels": {lvl: self.cfg.swap[lvl].bytes_of(mem.swap_total)
                                for lvl in config_mod.LEVELS},
            })
        candidates: list[dict[str, object]] = []
        if self._cache is not None:
            for r in self._cache.peek()[:top]:
                c = r.candidate
                candidates.append({"pid": c.pid, "name": c.name, "rss": c.rss,
                                   "oom_score": c.oom_score, "score": r.score,
                                   "excluded": r.excluded, "rules": list(r.touched_by)})
        return {"pid": os.getpid(), "dry_run": self.cfg.dry_run, "config": self.cfg.origin,
                "scopes": scopes, "candidates": candidates,
                "kills": [k.to_dict() for k in list(self.kills)[-top:]]}

    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"k")

    @staticmethod
    def _pin_first(ranked: list[policy.Ranked]) -> Victim | None:
        for r in ranked:
            if r.excluded is not None:
                continue
            c = r.candidate
            try:
                return Victim.open(c.pid, starttime=c.starttime)
            except VictimError as e:
                log.debug("skipping %d: %s", c.pid, e)
        return None

    def _handle_signals(self, psi: PsiMonitor, poller: select.poll,
                        cache: CandidateCache) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGHUP:
                self._do_reload(cache)
            else:
                log.info("got %s, stopping", signal.Signals(sig).name)
                self._stop = True

    def _do_reload(self, cache: CandidateCache) -> None:
        if self._reload is None:
            log.warning("SIGHUP: no configuration file to reload")
            return
        try:
            new = self._reload()
        except config_mod.ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        if new.psi != self.cfg.psi or new.reapers != self.cfg.reapers:
            log.warning("reload: psi and reapers changes take effect on restart")
        self.cfg = new
        cache.cfg = new
        log.info("configuration reloaded from %s: %s", new.origin, describe(new))


def describe(cfg: Config) -> str:
    """One line with what the daemon watches."""
    def levels(section: str) -> str:
        lv = getattr(cfg, section)
        return "/".join(lv[x].describe() for x in config_mod.LEVELS)

    psi = "/".join(str(cfg.psi[x]) if cfg.psi[x] else "off" for x in config_mod.LEVELS)
    return (f"when {config_mod.format_when(cfg.when)}; memory warn/term/kill {levels('memory')}; "
            f"swap {levels('swap')}; psi {psi}; {len(cfg.rules)} rules; "
            f"{cfg.reapers} reapers")
