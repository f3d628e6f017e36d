"""Detection latency: MemAvailable crossing the kill level -> the hog's exit, mreaper vs earlyoom.

What it measures.  A hog in its own bounded memory cgroup grows at a fixed rate (1 GiB/s
in 64 MiB steps, 200 MiB/s in 16 MiB steps) past an absolute kill level set 1 GiB under
the machine's MemAvailable.  One thread of this script does everything, so no GIL
hand-over blurs the clock: it sleeps in poll() for at most 1 ms on the hog's pidfd, the
hog's report pipe and the daemon's log pipe, and after every wake-up reads
/proc/meminfo.  Per run it records, on CLOCK_MONOTONIC:

* crossing: the first MemAvailable sample at or below the level;
* kill logged: arrival of the daemon's line printed just before it signals
  (mreaper "killing <pid> ...", earlyoom "sending SIGKILL to process <pid>");
* exit: the hog's pidfd becoming readable (the hog cannot see SIGKILL itself).

crossing -> exit is the headline figure; crossing -> kill logged isolates detection and
decision from the victim's own exit.  Each run also checks the victim: returncode -9 and
the daemon's kill line naming the hog's PID (a kill by anyone else invalidates the run).

Fairness: both daemons act on MemAvailable alone at the same level and go straight to
SIGKILL (mreaper: warn = term = kill level, PSI off, --term-timeout 0; earlyoom 1.7: -M
with equal SIGTERM/SIGKILL sizes, -s 100,100 = ignore swap, which on this swapless
machine is what its default swap check does too), both prefer the hog by name (+300,
so a bigger process of another user of the machine is never chosen), both run at raised
priority (mreaper's default nice -10; earlyoom -p: nice -20).  Contenders alternate
order every run, rates are interleaved.  The hog is started (and ranked) before the
daemon: see bench/README.md for why that matters for mreaper.

Needs root, the memory cgroup controller, earlyoom (apt-get install earlyoom).
Usage: .venv/bin/python bench/daemon_latency.py [--runs 10] [--quick]; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import itertools
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mreaper.hogs import GiB, MemoryCgroup, MiB

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
MREAPER = REPO / ".venv" / "bin" / "mreaper"
HOG_COMM = "mrbench-hog"
PREFER = f"^{HOG_COMM}$"
LEVEL_BELOW = 1 * GiB          # kill level = MemAvailable before the run - this
HOG_INITIAL = 256 * MiB        # allocated before the daemon starts: the hog is ranked first
HOG_MAX = 1792 * MiB           # the hog stops growing here (nobody killed it: a miss)
CGROUP_LIMIT = 2 * GiB         # and its memory cgroup stops it for good here
HOG_OOM_SCORE_ADJ = 0
WINDOW_GROWTH = 256 * MiB      # judge the crossing over the time the hog takes to grow this
INTERFERENCE = 96 * MiB        # ... and repeat the run if others moved MemAvailable more
QUIET_SPREAD = 64 * MiB        # the baseline is taken in a 200 ms window moving less
QUIET_WAIT_S = 30.0            # ... waiting up to this long for one
SETTLE_S = 1.0                 # daemon ready -> hog starts growing
TAIL_S = 0.3                   # keep sampling after the exit (for the timeline)
REPORT_WAIT_S = 2.0            # wait this long after the exit for mreaper's kill report
RATES = {"1GiB/s": (1 * GiB, 64 * MiB), "200MiB/s": (200 * MiB, 16 * MiB)}
CONTENDERS = ("mreaper", "earlyoom")


# --- the hog ----------------------------------------------------------------------------

# Joins its memory cgroup, names itself (comm "mrbench-hog", which both daemons are told
# to prefer), sets its oom_score_adj (0: the bench may not be able to lower its own, and a
# hog at 1000 would become the victim of other people's daemon tests), maps HOG_INITIAL
# of private anonymous memory populated up front, says "ready", and on "go" adds `step`
# bytes every step/rate seconds, reporting
# "<monotonic time> <total bytes>" after each step.
_HOG = r"""
import mmap, os, sys, time
procs, initial, step, period, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    float(sys.argv[4]), int(sys.argv[5])
with open(procs, "w") as f:
    f.write(str(os.getpid()))
with open("/proc/self/comm", "w") as f:
    f.write(sys.argv[6])
with open("/proc/self/oom_score_adj", "w") as f:
    f.write(sys.argv[7])
FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
blocks = [mmap.mmap(-1, initial, flags=FLAGS)]
total = initial
out = sys.stdout
out.write("ready\n")
out.flush()
if sys.stdin.readline() != "go\n":
    sys.exit(0)
t0 = time.monotonic()
i = 0
while total + step <= limit:
    i += 1
    blocks.append(mmap.mmap(-1, step, flags=FLAGS))
    total += step
    out.write(f"{time.monotonic():.6f} {total}\n")
    out.flush()
    delay = t0 + i * period - time.monotonic()
    if delay > 0:
        time.sleep(delay)
out.write("full\n")
out.flush()
while True:
    time.sleep(3600)
"""


class LineReader:
    """Non-blocking line reader on a pipe; each line stamped with the monotonic time
    at which the poll loop saw it arrive."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._buf = b""
        self.lines: list[tuple[float, str]] = []
        self.eof = False

    def pump(self, now: float) -> list[str]:
        new: list[str] = []
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self._buf += chunk
        *complete, self._buf = self._buf.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append((now, line))
            new.append(line)
        return new

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> str | None:
        """Block up to `timeout` s for a line matching `pattern` (lines kept)."""
        deadline = time.monotonic() + timeout
        for _, line in self.lines:
            if pattern.search(line):
                return line
        while not self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            select.select([self.fd], [], [], remaining)
            for line in self.pump(time.monotonic()):
                if pattern.search(line):
                    return line
        return None

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


class GrowingHog:
    """The hog process, started in `cg`, holding HOG_INITIAL, waiting for go()."""

    def __init__(self, cg: MemoryCgroup, rate: int, step: int,
                 initial: int = HOG_INITIAL, limit: int = HOG_MAX) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOG, cg.procs_file, str(initial), str(step),
             str(step / rate), str(limit), HOG_COMM, str(HOG_OOM_SCORE_ADJ)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.out = LineReader(self.proc.stdout.fileno())
        self.pidfd = os.pidfd_open(self.proc.pid)
        if self.out.wait_for(re.compile(r"^ready$"), 30.0) is None:
            self.kill()
            raise RuntimeError(f"hog did not start: {self.out.text()!r}")
        self.reports: list[tuple[float, int]] = []  # (monotonic, total bytes) per step

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def pump(self, now: float) -> None:
        for line in self.out.pump(now):
            parts = line.split()
            if len(parts) == 2:
                self.reports.append((float(parts[0]), int(parts[1])))

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


# --- the daemons ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """How to run and read one contender."""

    name: str
    argv: tuple[str, ...]
    ready: str        # regex: the daemon is watching
    kill_line: str    # regex with the victim PID as group 1: printed just before SIGKILL
    env: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class MreaperUnderTest:
    """Which mreaper runs: by default the source of one commit exported to a temporary
    directory, so that colleagues editing src/ during a run cannot change (or break) the
    daemon under test; or the working tree's installed entry point."""

    prefix: tuple[str, ...] = (str(MREAPER),)
    pythonpath: str = ""
    description: str = "working tree"

    @classmethod
    def at_commit(cls, ref: str) -> MreaperUnderTest:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", ref], check=True,
                                capture_output=True, text=True).stdout.strip()
        dest = Path(tempfile.gettempdir()) / f"mrbench-mreaper-{commit[:12]}"
        if not (dest / "mreaper" / "cli.py").exists():
            blob = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit,
                                   "src/mreaper"], check=True, capture_output=True).stdout
            tmp = Path(tempfile.mkdtemp(prefix="mrbench-export-"))
            with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                tar.extractall(tmp, filter="data")
            shutil.rmtree(dest, ignore_errors=True)
            (tmp / "src").rename(dest)
            shutil.rmtree(tmp, ignore_errors=True)
        return cls((sys.executable, "-m", "mreaper.cli"), str(dest),
                   f"commit {commit[:12]} (exported to {dest})")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        return env

    def shown(self) -> str:
        """How to type it: `mreaper` at that commit."""
        return "mreaper"


_UNDER_TEST = [MreaperUnderTest()]


def mreaper_under_test() -> MreaperUnderTest:
    return _UNDER_TEST[0]


def empty_config() -> str:
    """An empty TOML file (= the built-in defaults), root-owned and not writable by
    others, as mreaper requires of a configuration file when it runs as root."""
    path = Path(tempfile.gettempdir()) / "mrbench-empty.toml"
    if not path.exists() or path.stat().st_size or path.stat().st_mode & 0o022:
        tmp = Path(tempfile.mkdtemp(prefix="mrbench-")) / "empty.toml"
        tmp.write_text("")
        tmp.chmod(0o644)
        tmp.replace(path)
        tmp.parent.rmdir()
    return str(path)


def mreaper_spec(level_kib: int, extra: Sequence[str] = ()) -> Spec:
    lvl = f"{level_kib}K"
    m = mreaper_under_test()
    argv = (*m.prefix, "run", "--config", empty_config(),
            "--memory-warn", lvl, "--memory-term", lvl, "--memory-kill", lvl,
            "--psi-warn", "off", "--psi-term", "off", "--psi-kill", "off",
            "--term-timeout", "0", "--prefer", PREFER, *extra)
    return Spec("mreaper", argv, r"mreaper: running", r"killing (\d+) ", m.env())


def earlyoom_spec(level_kib: int, extra: Sequence[str] = ()) -> Spec:
    lvl = f"{level_kib},{level_kib}"
    argv = ("earlyoom", "-M", lvl, "-s", "100,100", "-r", "0", "-p", "--prefer", PREFER, *extra)
    return Spec("earlyoom", argv, r"SIGKILL when mem", r"sending SIGKILL to process (\d+)",
                {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"})


SPECS = {"mreaper": mreaper_spec, "earlyoom": earlyoom_spec}


def command_template(contender: str, extra: Sequence[str] = ()) -> list[str]:
    """The command line with the level shown as <LEVEL_KIB>."""
    placeholders = {"0K": "<LEVEL_KIB>K", "0,0": "<LEVEL_KIB>,<LEVEL_KIB>"}
    placeholders[empty_config()] = "<empty file>"
    argv = [placeholders.get(a, a) for a in SPECS[contender](0, extra).argv]
    m = mreaper_under_test()
    if contender == "mreaper":
        argv = [m.shown(), *argv[len(m.prefix):]]
    return argv


class Daemon:
    """A contender process with its merged stdout+stderr read line by line."""

    def __init__(self, spec: Spec, ready_timeout: float = 20.0) -> None:
        self.spec = spec
        self.proc = subprocess.Popen(list(spec.argv), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     close_fds=True, env=spec.env or None)
        assert self.proc.stdout is not None
        self.out = LineReader(self.proc.stdout.fileno())
        self.started = time.monotonic()
        if self.out.wait_for(re.compile(spec.ready), ready_timeout) is None:
            self.stop()
            raise RuntimeError(f"{spec.name} did not get ready: {self.out.text()!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill_lines(self) -> list[tuple[float, int]]:
        pat = re.compile(self.spec.kill_line)
        out = []
        for t, line in self.out.lines:
            m = pat.search(line)
            if m:
                out.append((t, int(m.group(1))))
        return out

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 5 s; never leaves the daemon running."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError, ValueError):
            self.out.pump(time.monotonic())
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


# --- measuring ----------------------------------------------------------------------------


_TRACE_LINE = re.compile(r"^\s*(?P<comm>.*)-(?P<tid>\d+)\s+\(\s*(?P<tgid>\d+|-+)\)\s+\[\d+\]\s+"
                         r"\S+\s+(?P<ts>[\d.]+): signal_generate: sig=9 errno=\d+ code=\S+ "
                         r"comm=.* pid=(?P<pid>\d+) grp=\d+ res=(?P<res>\d+)")


_WRITE_LINE = re.compile(r"^\s*.*-(?P<tid>\d+)\s+\(\s*(?:\d+|-+)\)\s+\[\d+\]\s+\S+\s+"
                         r"(?P<ts>[\d.]+): sys_write\(fd: 2, buf: \w+, count: (?P<count>\w+)\)",
                         re.MULTILINE)


@dataclass(frozen=True)
class SignalSeen:
    """One SIGKILL generation seen by the kernel tracepoint signal:signal_generate."""

    at: float          # CLOCK_MONOTONIC seconds (trace clock "mono")
    sender_tid: int
    sender_tgid: int | None
    sender_comm: str
    result: int        # 0 delivered, 1 ignored, 2 already pending, ...


class SignalTrace:
    """The kernel's own timestamp of every SIGKILL sent to the hog, from a private ftrace
    instance (tracefs is mounted in a temporary directory if it is not mounted; the
    instance and the mount are removed on close).  Unavailable: `error` says why."""

    def __init__(self) -> None:
        self.error = ""
        self.root = ""
        self._mounted = ""
        self.instance = ""
        self.write_error = ""
        try:
            self.root = self._find_or_mount()
            self.instance = os.path.join(self.root, "instances", f"mrbench-{os.getpid()}")
            os.mkdir(self.instance)
            self._write("trace_clock", "mono")
            self._write("options/record-tgid", "1")
            self._write("buffer_size_kb", "2048")
            self._write("events/signal/signal_generate/filter", "sig == 9")
            self._write("events/signal/signal_generate/enable", "1")
        except OSError as e:
            self.error = f"kernel signal tracing unavailable: {e}"
            self.close()

    def _find_or_mount(self) -> str:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "tracefs":
                    return parts[1]
        where = tempfile.mkdtemp(prefix="mrbench-tracefs-")
        subprocess.run(["mount", "-t", "tracefs", "nodev", where], check=True,
                       capture_output=True)
        self._mounted = where
        return where

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.instance, name), "w") as f:
            f.write(value)

    @property
    def ok(self) -> bool:
        return not self.error

    def arm(self, pid: int) -> None:
        """Record only SIGKILLs to `pid` from now on (and forget older ones)."""
        if self.ok:
            self._write("events/signal/signal_generate/filter", f"sig == 9 && pid == {pid}")
            self._write("trace", "")

    def watch_writes(self, pid: int) -> None:
        """Also record the write(2)s of `pid`'s main thread to its stderr (fd 2): the
        kernel's timestamp of each log line (the tracepoint shows no text, only the byte
        count, which identifies the line)."""
        if not self.ok:
            return
        try:
            self._write("events/syscalls/sys_enter_write/filter",
                        f"common_pid == {pid} && fd == 2")
            self._write("events/syscalls/sys_enter_write/enable", "1")
        except OSError as e:
            self.write_error = f"write tracing unavailable: {e}"

    def writes(self, pid: int) -> list[tuple[float, int]]:
        """(timestamp, byte count) of the write(2)s recorded for `pid`."""
        if not self.ok:
            return []
        with open(os.path.join(self.instance, "trace")) as f:
            text = f.read()
        out = []
        for m in _WRITE_LINE.finditer(text):
            if int(m["tid"]) == pid:
                out.append((float(m["ts"]), int(m["count"], 16)))
        return out

    def stop_writes(self) -> None:
        if self.ok:
            with contextlib.suppress(OSError):
                self._write("events/syscalls/sys_enter_write/enable", "0")

    def seen(self, pid: int) -> list[SignalSeen]:
        if not self.ok:
            return []
        with open(os.path.join(self.instance, "trace")) as f:
            text = f.read()
        out = []
        for line in text.splitlines():
            m = _TRACE_LINE.match(line)
            if m and int(m["pid"]) == pid:
                tgid = m["tgid"]
                out.append(SignalSeen(float(m["ts"]), int(m["tid"]),
                                      int(tgid) if tgid.isdigit() else None,
                                      m["comm"].strip(), int(m["res"])))
        return out

    def close(self) -> None:
        if self.instance and os.path.isdir(self.instance):
            with contextlib.suppress(OSError):
                self._write("events/signal/signal_generate/enable", "0")
            self.stop_writes()
            with contextlib.suppress(OSError):
                os.rmdir(self.instance)
        if self._mounted:
            subprocess.run(["umount", self._mounted], check=False, capture_output=True)
            with contextlib.suppress(OSError):
                os.rmdir(self._mounted)
            self._mounted = ""


class MemAvailable:
    """/proc/meminfo MemAvailable in bytes, one pread per look (~20 us)."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/meminfo", os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> int:
        data = os.pread(self.fd, 512, 0)
        i = data.index(b"MemAvailable:")
        return int(data[i + 13:data.index(b"\n", i)].split()[0]) * 1024

    def baseline(self, spread: int = QUIET_SPREAD, wait: float = QUIET_WAIT_S) -> tuple[int, int]:
        """Median MemAvailable over 200 ms, waiting (up to `wait` s) for a window in which
        it moved less than `spread` bytes: another user's allocation in flight would
        otherwise move the level.  Returns (median, spread seen)."""
        deadline = time.monotonic() + wait
        while True:
            values = []
            for _ in range(20):
                values.append(self.read())
                time.sleep(0.01)
            seen = max(values) - min(values)
            if seen < spread or time.monotonic() > deadline:
                return int(statistics.median(values)), seen
            time.sleep(1.0)

    def close(self) -> None:
        os.close(self.fd)


class Charge:
    """A memory cgroup's charge in bytes, one pread per look."""

    def __init__(self, cg: MemoryCgroup) -> None:
        name = "memory.usage_in_bytes" if cg.version == 1 else "memory.current"
        self.fd = os.open(os.path.join(cg.path, name), os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> int:
        return int(os.pread(self.fd, 64, 0))

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Run:
    """One run of one contender at one rate; times are CLOCK_MONOTONIC seconds."""

    contender: str
    rate: str
    index: int
    position: int                     # 0: ran first in its pair, 1: second
    hog_pid: int = 0
    baseline: int = 0                 # MemAvailable before the run (bytes)
    baseline_spread: int = 0          # how much it moved while the baseline was taken
    level: int = 0                    # the kill level (bytes)
    go: float = 0.0
    crossing: float | None = None
    kill_logged: float | None = None
    sigkill: float | None = None      # the kernel's signal_generate timestamp
    sigkill_sender: str = ""          # "comm tid/tgid" of the sender, from the trace
    kill_line_written: float | None = None  # kernel time of the daemon's write(2) of it
    exit: float | None = None
    returncode: int | None = None
    victim_pid_logged: int | None = None
    valid: bool = False
    why_invalid: str = ""
    crossing_to_exit_ms: float | None = None
    crossing_to_kill_logged_ms: float | None = None
    crossing_to_sigkill_ms: float | None = None
    sigkill_to_exit_ms: float | None = None
    event_to_sigkill_ms: float | None = None    # mreaper: its look that saw the level ->
    #                                             SIGKILL = decided in + (write -> SIGKILL)
    kill_line_to_sigkill_ms: float | None = None  # mreaper: "killing" written -> SIGKILL
    hog_charge_at_crossing: int | None = None   # the hog's memcg charge at the crossing
    others_at_crossing: int | None = None       # MemAvailable drop since the baseline not
    #                                             explained by the hog (others' slow drift)
    others_before_crossing: int | None = None   # the same over the last WINDOW_GROWTH of
    #                                             the hog's growth: what validity is judged on
    hog_growth_before_crossing: int | None = None
    hog_size_at_exit: int | None = None         # from the hog's own step reports
    min_available: int | None = None
    sample_gap_ms_median: float | None = None
    sample_gap_ms_max: float | None = None
    samples: int = 0
    mreaper_decided_ms: float | None = None
    mreaper_ranking_age_ms: float | None = None
    mreaper_exit_after_sigkill_ms: float | None = None
    mreaper_mrelease: str | None = None
    loadavg: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    daemon_log: list[str] = field(default_factory=list)
    trace: list[tuple[float, int]] = field(default_factory=list)  # kept for plotted runs


_DECIDED = re.compile(r"decided in ([\d.]+) ms from a (\d+) ms old ranking")
_REPORT = re.compile(r"killed (\d+) .*?(?:process_mrelease (\S+) \(\w+\) in [\d.?]+ ms; )?"
                     r"memory back [\d.?]+ ms, exit ([\d.]+) ms after SIGKILL")


def measure(spec: Spec, rate_name: str, *, index: int, position: int, mem: MemAvailable,
            charge: Charge, level: int, baseline: tuple[int, int], hog: GrowingHog,
            trace: SignalTrace, settle: float = SETTLE_S) -> Run:
    """Start the daemon (the hog already holds HOG_INITIAL), let it settle, let the hog
    grow, watch until the hog exits (or HOG_MAX is reached and nobody acts)."""
    rate, _step = RATES[rate_name]
    run = Run(spec.name, rate_name, index, position, hog_pid=hog.pid, baseline=baseline[0],
              baseline_spread=baseline[1], level=level, loadavg=_loadavg())
    trace.arm(hog.pid)
    daemon = Daemon(spec)
    if spec.name == "mreaper":
        trace.watch_writes(daemon.pid)
    samples: list[tuple[float, int, int]] = []
    try:
        time.sleep(settle)
        poller = select.poll()
        poller.register(hog.pidfd, select.POLLIN)
        poller.register(hog.out.fd, select.POLLIN)
        poller.register(daemon.out.fd, select.POLLIN)
        run.go = time.monotonic()
        if hog.proc.poll() is not None or mem.read() <= level:
            run.why_invalid = ("MemAvailable fell to the level before the hog grew (another "
                               "user's allocation)")
        else:
            with contextlib.suppress(BrokenPipeError):
                hog.go()
        deadline = run.go + (HOG_MAX - HOG_INITIAL) / rate + 3.0
        report_pat = re.compile(r"killed \d+ ")
        while not run.why_invalid:
            events = poller.poll(1)
            now = time.monotonic()
            for fd, _ev in events:
                if fd == hog.pidfd:
                    if run.exit is None:
                        run.exit = now
                    poller.unregister(fd)
                elif fd == hog.out.fd:
                    hog.pump(now)
                    if hog.out.eof:
                        poller.unregister(fd)
                elif fd == daemon.out.fd:
                    daemon.out.pump(now)
                    if daemon.out.eof:
                        poller.unregister(fd)
            t = time.monotonic()
            avail = mem.read()
            samples.append((t, avail, charge.read()))
            if run.crossing is None and avail <= level:
                run.crossing = t
            if run.exit is not None:
                after = t - run.exit
                reported = spec.name != "mreaper" or any(
                    report_pat.search(line) for _, line in daemon.out.lines)
                if after >= TAIL_S and (reported or after >= REPORT_WAIT_S):
                    break
            elif run.crossing is not None:
                if t > run.crossing + 3.0:
                    break
            elif t > deadline:
                break
    finally:
        daemon.stop()
        trace.stop_writes()
    run.samples = len(samples)
    if samples:
        gaps = [(b[0] - a[0]) * 1000 for a, b in itertools.pairwise(samples)]
        if gaps:
            run.sample_gap_ms_median = statistics.median(gaps)
            run.sample_gap_ms_max = max(gaps)
        run.min_available = min(a for _, a, _ in samples)
        run.trace = [(t - run.go, a) for t, a, _ in samples]
        window = WINDOW_GROWTH / rate
        for i, (t, a, c) in enumerate(samples):
            if t == run.crossing:
                run.hog_charge_at_crossing = c
                run.others_at_crossing = (run.baseline - a) - c
                j = i
                while j > 0 and samples[j - 1][0] >= t - window:
                    j -= 1
                _, a0, c0 = samples[j]
                run.hog_growth_before_crossing = c - c0
                run.others_before_crossing = (a0 - a) - (c - c0)
    run.daemon_log = [f"{t - run.go:+.4f} {line}" for t, line in daemon.out.lines]
    kills = daemon.kill_lines()
    if kills:
        run.kill_logged, run.victim_pid_logged = kills[0]
    for _, line in daemon.out.lines:
        m = _DECIDED.search(line)
        if m and run.mreaper_decided_ms is None:
            run.mreaper_decided_ms = float(m.group(1))
            run.mreaper_ranking_age_ms = float(m.group(2))
        r = _REPORT.search(line)
        if r and run.mreaper_exit_after_sigkill_ms is None:
            run.mreaper_mrelease = r.group(2)
            run.mreaper_exit_after_sigkill_ms = float(r.group(3))
    run.hog_size_at_exit = _size_at(hog.reports, run.exit)
    if run.exit is not None:
        hog.proc.wait()
        run.returncode = hog.proc.returncode
    kill_pat = re.compile(spec.kill_line)
    kill_texts = [line for _, line in daemon.out.lines if kill_pat.search(line)]
    if kill_texts and spec.name == "mreaper":
        size = len(kill_texts[0].encode()) + 1
        written = [ts for ts, count in trace.writes(daemon.pid) if count == size]
        if written:
            run.kill_line_written = written[0]
    kills_seen = trace.seen(hog.pid)
    if kills_seen:
        first = kills_seen[0]
        run.sigkill = first.at
        run.sigkill_sender = f"{first.sender_comm} {first.sender_tid}/{first.sender_tgid}"
        if first.sender_tgid is not None and first.sender_tgid != daemon.pid:
            run.why_invalid = (f"the first SIGKILL to the hog came from {run.sigkill_sender}, "
                               f"not from the daemon (pid {daemon.pid})")
    _judge(run)
    return run


def _size_at(reports: list[tuple[float, int]], t: float | None) -> int | None:
    if t is None:
        return None
    size = HOG_INITIAL
    for at, total in reports:
        if at <= t:
            size = total
    return size


def _judge(run: Run) -> None:
    if run.why_invalid:
        return
    if run.crossing is None:
        run.why_invalid = "MemAvailable never reached the level"
    elif run.exit is None:
        run.why_invalid = "the hog was not killed"
    elif run.returncode != -signal.SIGKILL:
        run.why_invalid = f"the hog exited with returncode {run.returncode}, not -9"
    elif run.victim_pid_logged != run.hog_pid:
        run.why_invalid = (f"the daemon's kill line names {run.victim_pid_logged}, not the hog "
                           f"{run.hog_pid} (killed by someone else?)")
    elif run.exit < run.crossing:
        run.why_invalid = "the hog exited before MemAvailable reached the level"
    elif (run.hog_growth_before_crossing is not None
          and run.hog_growth_before_crossing < WINDOW_GROWTH // 2):
        run.why_invalid = (f"the hog grew only {run.hog_growth_before_crossing / MiB:.0f} MiB "
                           "in the window before the crossing: someone else's allocation "
                           "crossed the level")
    elif (run.others_before_crossing is not None
          and abs(run.others_before_crossing) > INTERFERENCE):
        run.why_invalid = (f"{run.others_before_crossing / MiB:+.0f} MiB of the MemAvailable "
                           "drop just before the crossing came from elsewhere (another user)")
    if run.why_invalid:
        return
    assert run.crossing is not None and run.exit is not None
    run.valid = True
    run.crossing_to_exit_ms = (run.exit - run.crossing) * 1000
    if run.kill_logged is not None:
        run.crossing_to_kill_logged_ms = (run.kill_logged - run.crossing) * 1000
    if run.sigkill is not None:
        run.crossing_to_sigkill_ms = (run.sigkill - run.crossing) * 1000
        run.sigkill_to_exit_ms = (run.exit - run.sigkill) * 1000
        if run.kill_line_written is not None:
            run.kill_line_to_sigkill_ms = (run.sigkill - run.kill_line_written) * 1000
            if run.mreaper_decided_ms is not None:
                run.event_to_sigkill_ms = run.mreaper_decided_ms + run.kill_line_to_sigkill_ms


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def one_run(contender: str, rate_name: str, *, index: int, position: int,
            mem: MemAvailable, trace: SignalTrace, settle: float = SETTLE_S,
            spec_extra: Sequence[str] = ()) -> Run:
    """Baseline, level, cgroup, hog, daemon, measure; everything torn down in finally."""
    rate, step = RATES[rate_name]
    baseline = mem.baseline()
    level = (baseline[0] - LEVEL_BELOW) // 1024 * 1024
    spec = SPECS[contender](level // 1024, spec_extra)
    cg = MemoryCgroup.create(limit=CGROUP_LIMIT, prefix="mrbench-latency")
    try:
        hog = GrowingHog(cg, rate, step)
        charge = Charge(cg)
        try:
            return measure(spec, rate_name, index=index, position=position, mem=mem,
                           charge=charge, level=level, baseline=baseline, hog=hog,
                           trace=trace, settle=settle)
        finally:
            charge.close()
            hog.kill()
    finally:
        cg.remove()


# --- the environment and the output ------------------------------------------------------


def lower_own_oom_score_adj(value: int = -500) -> str:
    """Try to make this script an unlikely victim; say what happened.  (Lowering needs
    CAP_SYS_RESOURCE, which root may lack in a container.)"""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as e:
        with open("/proc/self/oom_score_adj") as f:
            now = f.read().strip()
        return (f"could not set oom_score_adj {value} ({e.strerror}); it stays {now}; "
                f"the hog sets its own to 1000 instead")
    return f"oom_score_adj {value}"


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else f"exit {out.returncode}"


def deb_version(package: str) -> str:
    """'earlyoom 1.7-1+b1 (Debian)', or why not."""
    if shutil.which(package) is None:
        return f"{package} missing"
    v = tool_version(["dpkg-query", "-W", "-f", "${Version}", package])
    return f"{package} {v} (Debian)"


def environment() -> dict[str, Any]:
    def meminfo_kib(key: str) -> int:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return -1

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            check=False, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"],
                           check=False, capture_output=True, text=True).stdout.strip()
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(), "kernel": platform.release(),
        "cpus": os.cpu_count(), "cpu_model": model,
        "mem_total_kib": meminfo_kib("MemTotal"), "swap_total_kib": meminfo_kib("SwapTotal"),
        "mem_available_kib_at_start": meminfo_kib("MemAvailable"),
        "python": platform.python_version(),
        "mreaper_under_test": mreaper_under_test().description,
        "repo_head": commit + (" (src/ has uncommitted changes, not measured)" if dirty
                               and mreaper_under_test().pythonpath else
                               " (src/ modified)" if dirty else ""),
        "earlyoom": deb_version("earlyoom"),
        "nohang": deb_version("nohang"),
        "loadavg_at_start": _loadavg(),
    }


def results_dir(quick: bool, override: str | None = None) -> Path:
    if override:
        return Path(override)
    name = f"{dt.date.today().isoformat()}-{socket.gethostname()}"
    return BENCH_DIR / "results" / ("tmp" if quick else "") / name


def write_outputs(outdir: Path, name: str, data: dict[str, Any], markdown: str) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    (outdir / f"{name}.md").write_text(markdown)
    print(f"wrote {outdir / name}.json and .md", file=sys.stderr)


def end_cleanly_on_signals() -> None:
    """SIGTERM and SIGINT (even when started in the background, where SIGINT is ignored)
    end the run through the finally blocks: no daemon, hog, cgroup or trace left."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def add_mreaper_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mreaper-ref", default="HEAD", metavar="REF",
                   help="run mreaper's source at this git commit, exported to a temporary "
                        "directory (default HEAD: edits in progress in src/ are not measured)")
    g.add_argument("--mreaper-worktree", action="store_true",
                   help="run the working tree's .venv/bin/mreaper instead")


def choose_mreaper(args: argparse.Namespace) -> None:
    if not args.mreaper_worktree:
        _UNDER_TEST[0] = MreaperUnderTest.at_commit(args.mreaper_ref)


def preflight(need: Sequence[str]) -> list[str]:
    """What is missing to run, in words (empty: all good)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (memory cgroups, signalling the hog from a daemon)")
    for tool in need:
        if tool == "mreaper":
            if not MREAPER.exists():
                problems.append(f"{MREAPER} missing: run `make` (or pip install -e .) first")
        elif shutil.which(tool) is None:
            problems.append(f"{tool} is not installed: apt-get install {tool}")
    return problems


def stats(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "median": None, "p90": None, "min": None, "max": None}
    s = sorted(values)
    p90 = statistics.quantiles(s, n=10, method="inclusive")[8] if len(s) > 1 else s[0]
    return {"n": len(s), "median": statistics.median(s), "p90": p90, "min": s[0], "max": s[-1]}


def fmt(v: float | int | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# --- the benchmark ------------------------------------------------------------------------


METRICS = (  # (Run attribute, column title)
    ("crossing_to_exit_ms", "crossing -> exit"),
    ("crossing_to_sigkill_ms", "crossing -> SIGKILL"),
    ("sigkill_to_exit_ms", "SIGKILL -> exit"),
    ("crossing_to_kill_logged_ms", "crossing -> kill logged"),
)


def cell_stats(runs: Sequence[Run], attr: str) -> dict[str, float | int | None]:
    return stats([v for r in runs if (v := getattr(r, attr)) is not None])


def summarize(runs: list[Run], rates: Sequence[str], contenders: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rate in rates:
        for c in contenders:
            mine = [r for r in runs if r.rate == rate and r.contender == c]
            ok = [r for r in mine if r.valid]
            cell: dict[str, Any] = {
                "contender": c, "rate": rate, "attempts": len(mine), "valid": len(ok),
                "victim_ok": sum(1 for r in ok if r.returncode == -9
                                 and r.victim_pid_logged == r.hog_pid),
                "sigkill_traced": sum(1 for r in ok if r.sigkill is not None),
            }
            for attr, _ in METRICS:
                cell[attr] = cell_stats(ok, attr)
            cell["hog_size_at_exit_mib"] = stats([(r.hog_size_at_exit or 0) / MiB for r in ok])
            cell["mreaper_decided_ms"] = cell_stats(ok, "mreaper_decided_ms")
            cell["mreaper_ranking_age_ms"] = cell_stats(ok, "mreaper_ranking_age_ms")
            cell["mreaper_event_to_sigkill_ms"] = cell_stats(ok, "event_to_sigkill_ms")
            cell["mreaper_kill_line_to_sigkill_ms"] = cell_stats(ok, "kill_line_to_sigkill_ms")
            cell["mreaper_exit_after_sigkill_ms"] = cell_stats(ok, "mreaper_exit_after_sigkill_ms")
            cell["invalid"] = [r.why_invalid for r in mine if not r.valid]
            out[f"{c} @ {rate}"] = cell
    for rate in rates:
        ratio: dict[str, Any] = {}
        for attr, _ in METRICS[:2]:
            m = out.get(f"mreaper @ {rate}", {}).get(attr, {}).get("median")
            e = out.get(f"earlyoom @ {rate}", {}).get(attr, {}).get("median")
            if m is not None and e:
                ratio[attr] = {"mreaper_over_earlyoom_median": m / e, "at_most_a_third": m <= e / 3}
        if ratio:
            out[f"ratio @ {rate}"] = ratio
    return out


def markdown(env: dict[str, Any], summary: dict[str, Any], *, argv_of: dict[str, list[str]],
             rates: Sequence[str], contenders: Sequence[str], runs_per: int) -> str:
    lines = [
        "# Detection latency: MemAvailable crossing the kill level -> the hog's exit", "",
        f"{env['date']} on `{env['hostname']}`: Linux {env['kernel']}, {env['cpus']} CPUs "
        f"({env['cpu_model']}), MemTotal {env['mem_total_kib'] // 1024} MiB, swap "
        f"{env['swap_total_kib'] // 1024} MiB; mreaper {env['mreaper_under_test']}, "
        f"{env['earlyoom']}; {runs_per} valid runs wanted per cell, contenders alternating, "
        "rates interleaved. Shared machine: other engineers' test suites and VMs ran "
        f"alongside (load average {env['loadavg_at_start']} at the start, "
        f"{env.get('loadavg_at_end', '?')} at the end).", "",
        "Kill level: MemAvailable before the run - 1 GiB (absolute). The hog (own memory "
        "cgroup, limit 2 GiB, comm mrbench-hog, preferred by both daemons) holds 256 MiB "
        "when the daemon starts and grows at the given rate from 1 s after the daemon is "
        "ready. A run is repeated when, over the hog's last 256 MiB of growth before the "
        "crossing, MemAvailable moved more than 96 MiB differently from the hog's memory "
        "cgroup charge (other users of the machine allocating or freeing), or when the "
        "first SIGKILL did not come from the daemon.", "",
        "crossing: first 1 ms MemAvailable sample at or below the level; SIGKILL: the kernel's "
        "signal:signal_generate timestamp (trace clock mono = CLOCK_MONOTONIC); kill logged: "
        "arrival of the daemon's last line before its SIGKILL; exit: the hog's pidfd readable. "
        "Times in ms, median / p90 (min-max for the first column).", "",
        "| contender | rate | valid/attempts | victim = hog, -9 | "
        + " | ".join(title for _, title in METRICS) + " | hog MiB at exit |",
        "|---|---|---|---|" + "---|" * len(METRICS) + "---|",
    ]
    for rate in rates:
        for c in contenders:
            cell = summary[f"{c} @ {rate}"]
            cols = []
            for i, (attr, _) in enumerate(METRICS):
                st = cell[attr]
                text = f"{fmt(st['median'])} / {fmt(st['p90'])}"
                if i == 0:
                    text = (f"**{fmt(st['median'])}** / {fmt(st['p90'])} "
                            f"({fmt(st['min'])}-{fmt(st['max'])})")
                cols.append(text)
            lines.append(f"| {c} | {rate} | {cell['valid']}/{cell['attempts']} | "
                         f"{cell['victim_ok']}/{cell['valid']} | " + " | ".join(cols)
                         + f" | {fmt(cell['hog_size_at_exit_mib']['median'], 0)} |")
    lines += ["", "Target: mreaper's median crossing -> exit at most a third of earlyoom's.", ""]
    for rate in rates:
        ratio = summary.get(f"ratio @ {rate}", {})
        for attr, title in METRICS[:2]:
            r = ratio.get(attr)
            if r:
                verdict = "at most a third" if r["at_most_a_third"] else "MORE than a third"
                lines.append(f"- {rate}, {title}: mreaper / earlyoom = "
                             f"{r['mreaper_over_earlyoom_median']:.2f} ({verdict})")
    lines += ["", "mreaper's own figures: \"decided in\" from its log (the look that saw the "
              "level -> victim pinned, logged just before the hand-over to a reaper thread); "
              "event -> SIGKILL = decided in + (kernel time of the write(2) of that log line -> "
              "kernel time of the SIGKILL), i.e. with the hand-over; the age of the ranking it "
              "chose from; exit after SIGKILL as its kill report measured it.", "",
              "| rate | decided in | event -> SIGKILL | of which hand-over | ranking age | "
              "exit after SIGKILL |", "|---|---|---|---|---|---|"]
    for rate in rates:
        cell = summary.get(f"mreaper @ {rate}")
        if cell:
            d, a, x = (cell["mreaper_decided_ms"], cell["mreaper_ranking_age_ms"],
                       cell["mreaper_exit_after_sigkill_ms"])
            e, h = cell["mreaper_event_to_sigkill_ms"], cell["mreaper_kill_line_to_sigkill_ms"]
            lines.append(f"| {rate} | {fmt(d['median'])} / {fmt(d['p90'])} | "
                         f"{fmt(e['median'])} / {fmt(e['p90'])} | "
                         f"{fmt(h['median'])} / {fmt(h['p90'])} | "
                         f"{fmt(a['median'], 0)} / {fmt(a['p90'], 0)} | "
                         f"{fmt(x['median'])} / {fmt(x['p90'])} |")
    lines += ["", "Commands (LEVEL_KIB = MemAvailable before the run in KiB - 1048576, "
              "recomputed for every run):", ""]
    for c in contenders:
        lines.append(f"- {c}: `{' '.join(argv_of[c])}`")
    invalid = [(k, v["invalid"]) for k, v in summary.items() if v.get("invalid")]
    if invalid:
        lines += ["", "Invalid runs (repeated, not counted):", ""]
        for k, whys in invalid:
            for why in whys:
                lines.append(f"- {k}: {why}")
    lines.append("")
    return "\n".join(lines)


def keep_median_traces(runs: list[Run], contenders: Sequence[str]) -> None:
    """Per contender, keep the trace of the run whose crossing -> SIGKILL (the detection
    the figure is about) is closest to the median of those that have one: a representative
    run, not an outlier.  Drop the rest."""
    for c in contenders:
        mine = [r for r in runs if r.contender == c and r.trace
                and r.crossing_to_sigkill_ms is not None]
        if not mine:
            continue
        median = statistics.median(r.crossing_to_sigkill_ms or 0.0 for r in mine)
        best = min(mine, key=lambda r: abs((r.crossing_to_sigkill_ms or 0.0) - median))
        for r in mine:
            if r is not best:
                r.trace = []


def plot(runs: list[Run], path: Path) -> bool:
    """MemAvailable around the crossing for a median run of each contender at the first
    rate, with crossing, kill logged, SIGKILL and exit marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no PNG", file=sys.stderr)
        return False
    chosen = sorted((r for r in runs if r.trace), key=lambda r: r.contender != "mreaper")
    if not chosen:
        return False
    fig, axes = plt.subplots(1, len(chosen), figsize=(6 * len(chosen), 4), sharey=False,
                             squeeze=False)
    right = max(300.0, *((r.exit - r.crossing) * 1000 + 250 for r in chosen
                         if r.exit is not None and r.crossing is not None))
    for ax, r in zip(axes[0], chosen, strict=True):
        assert r.crossing is not None and r.exit is not None
        c0 = r.crossing - r.go
        xs = [(t - c0) * 1000 for t, _ in r.trace]
        ys = [a / GiB for _, a in r.trace]
        visible = [y for x, y in zip(xs, ys, strict=True) if -400 <= x <= right]
        ax.plot(xs, ys, lw=1, label="MemAvailable (1 ms samples)")
        ax.axhline(r.level / GiB, color="gray", ls="--", lw=1, label="kill level")
        ax.axvline(0, color="orange", lw=1, label="crossing")
        if r.kill_logged is not None:
            ax.axvline((r.kill_logged - r.crossing) * 1000, color="purple", lw=1, ls=":",
                       label="kill logged")
        if r.sigkill is not None:
            ax.axvline((r.sigkill - r.crossing) * 1000, color="black", lw=1, ls="--",
                       label="SIGKILL (kernel trace)")
        ax.axvline((r.exit - r.crossing) * 1000, color="red", lw=1, label="hog exit")
        ax.set_xlim(-400, right)
        ax.set_ylim(min(visible) - 0.05, max(visible) + 0.05)
        ax.set_title(f"{r.contender}, {r.rate}, the run of median detection:\nSIGKILL "
                     f"{r.crossing_to_sigkill_ms or 0:.0f} ms, exit {r.crossing_to_exit_ms:.0f} "
                     "ms after the crossing", fontsize=10)
        ax.set_xlabel("ms from the level crossing")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("GiB")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="valid runs per contender and rate")
    p.add_argument("--rates", default=",".join(RATES), help=f"comma-separated, of {list(RATES)}")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 runs, output under bench/results/tmp/")
    p.add_argument("--out", help="output directory (default bench/results/<date>-<host>/)")
    add_mreaper_args(p)
    args = p.parse_args(argv)
    rates = [r for r in args.rates.split(",") if r]
    contenders = [c for c in args.contenders.split(",") if c]
    if any(r not in RATES for r in rates) or any(c not in SPECS for c in contenders):
        p.error(f"rates from {list(RATES)}, contenders from {list(SPECS)}")
    runs_per = 2 if args.quick else args.runs
    problems = preflight(contenders)
    if problems:
        for problem in problems:
            print(f"daemon_latency: {problem}", file=sys.stderr)
        return 1
    end_cleanly_on_signals()
    oom_note = lower_own_oom_score_adj()
    choose_mreaper(args)
    env = environment()
    env["bench_oom_score_adj"] = oom_note
    mem = MemAvailable()
    trace = SignalTrace()
    if not trace.ok:
        print(f"daemon_latency: {trace.error}; SIGKILL times will be missing", file=sys.stderr)
    env["signal_trace"] = trace.error or "ftrace signal:signal_generate, clock mono"
    runs: list[Run] = []
    try:
        index = 0
        max_attempts = runs_per * 6
        while index < max_attempts:
            needed = False
            for rate in rates:
                order = contenders if index % 2 == 0 else list(reversed(contenders))
                for pos, c in enumerate(order):
                    have = sum(1 for r in runs if r.rate == rate and r.contender == c
                               and r.valid)
                    if have >= runs_per:
                        continue
                    needed = True
                    try:
                        run = one_run(c, rate, index=index, position=pos, mem=mem,
                                      trace=trace)
                    except RuntimeError as e:  # the hog or the daemon did not start
                        run = Run(c, rate, index, pos, why_invalid=str(e)[:500])
                    runs.append(run)
                    print(f"[{index}] {c:8s} {rate:8s} "
                          + (f"crossing->exit {run.crossing_to_exit_ms:6.1f} ms, ->SIGKILL "
                             f"{fmt(run.crossing_to_sigkill_ms)} ms, ->kill logged "
                             f"{fmt(run.crossing_to_kill_logged_ms)} ms, hog "
                             f"{(run.hog_size_at_exit or 0) // MiB} MiB"
                             if run.valid else f"INVALID: {run.why_invalid}"),
                          file=sys.stderr, flush=True)
                    if not (run.valid and rate == rates[0]):
                        run.trace = []  # kept (in memory) for the plot's choice only
                    if not run.valid:
                        run.extra["log_tail"] = run.daemon_log[-15:]
                    time.sleep(0.5)
            if not needed:
                break
            index += 1
    finally:
        mem.close()
        trace.close()
    keep_median_traces(runs, contenders)
    summary = summarize(runs, rates, contenders)
    argv_of = {c: command_template(c) for c in contenders}
    env["loadavg_at_end"] = _loadavg()
    outdir = results_dir(args.quick, args.out)
    data = {"benchmark": "daemon_latency", "environment": env,
            "settings": {"level_below_mem_available": LEVEL_BELOW, "hog_initial": HOG_INITIAL,
                         "hog_max": HOG_MAX, "cgroup_limit": CGROUP_LIMIT, "settle_s": SETTLE_S,
                         "rates": {r: {"bytes_per_s": RATES[r][0], "step": RATES[r][1]}
                                   for r in rates},
                         "runs_per_cell": runs_per, "commands": argv_of},
            "summary": summary,
            "runs": [{k: v for k, v in asdict(r).items() if k != "daemon_log" or not r.valid}
                     for r in runs]}
    outdir.mkdir(parents=True, exist_ok=True)
    md = markdown(env, summary, argv_of=argv_of, rates=rates, contenders=contenders,
                  runs_per=runs_per)
    if plot([r for r in runs if r.trace], outdir / "daemon_latency.png"):
        md += "\n![MemAvailable around the crossing](daemon_latency.png)\n"
    write_outputs(outdir, "daemon_latency", data, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
