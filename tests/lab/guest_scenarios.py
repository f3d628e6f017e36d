"""Integration scenarios for mreaper, run INSIDE the lab VM (tests/lab/test_integration.py).

Usage (in the VM, as root, by the project's interpreter):
    /work/main/.venv/bin/python tests/lab/guest_scenarios.py SCENARIO...

Each scenario starts `mreaper run` with its own configuration, makes real memory
pressure (leaks, many hogs, a tmpfs push, a cgroup at its memory.max, a victim stuck
in D state on a FUSE read, a daemon squeezed by its own memory.high), and prints ONE
JSON line with everything the host-side assertions need: the daemon's log, the kill
lines parsed, what died and how, the lowest MemAvailable seen, the kernel log lines
of the scenario and the kernel's OOM-kill counter.  A final line carries the whole
kernel log.  Nothing is asserted here: the host judges.

The driver, and every process the VM has when it starts (its init chain), run at
oom_score_adj -1000: neither mreaper nor the kernel may kill them; every hog the driver
starts is set back to 0.  It refuses to run outside the lab VM (MREAPER_LAB=1): it
fills the machine's memory on purpose.

`guest_scenarios.py --fuse-server MOUNTPOINT` is the tiny FUSE server of the
stuck-victim scenario (raw /dev/fuse protocol: no libfuse bindings needed).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import json
import os
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from mreaper.hogs import Hog, MemoryCgroup  # noqa: E402

MiB = 1 << 20
PY = sys.executable
CGROUP = "/sys/fs/cgroup"
PUSH_DIR = "/run/mreaper-lab-push"  # a tmpfs of our own: /dev/shm is capped at half the RAM

#: Bounds for everything that waits, generous for TCG (~10x slower than the host).
DAEMON_START_S = 90.0
LEAK_DEATH_S = 150.0
REPORT_S = 45.0
AFTERMATH_S = 4.0   # watched after a kill for any further kill

Result = dict[str, Any]


# --- small facts ------------------------------------------------------------------------


def log(msg: str) -> None:
    """Progress on stderr (the host shows it when something fails)."""
    print(f"[{time.monotonic():9.2f}] {msg}", file=sys.stderr, flush=True)


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields:
                out[key] = int(fields[0]) * (1024 if len(fields) > 1 else 1)
    return out


def vmstat(key: str) -> int:
    """One counter of /proc/vmstat (e.g. oom_kill)."""
    with open("/proc/vmstat") as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


def proc_state(pid: int) -> str | None:
    """The one-letter state of /proc/<pid>/stat, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def proc_status(pid: int, key: str) -> int | None:
    """A kB field of /proc/<pid>/status in bytes (VmRSS, RssAnon...), None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return 0


def oom_score(pid: int) -> int | None:
    """The kernel's /proc/<pid>/oom_score, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/oom_score") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def set_oom_score_adj(pid: int | str, value: int) -> None:
    """Write /proc/<pid>/oom_score_adj ("self" for this process)."""
    with open(f"/proc/{pid}/oom_score_adj", "w") as f:
        f.write(str(value))


def cg_read(path: str, name: str) -> str:
    """The text of one file of a cgroup."""
    with open(os.path.join(path, name)) as f:
        return f.read()


def cg_write(path: str, name: str, value: str) -> None:
    """Write one file of a cgroup."""
    with open(os.path.join(path, name), "w") as f:
        f.write(value)


def cg_events(path: str) -> dict[str, int]:
    """memory.events of a cgroup as a dict."""
    out = {}
    for line in cg_read(path, "memory.events").splitlines():
        key, value = line.split()
        out[key] = int(value)
    return out


def make_cgroup(name: str, files: dict[str, str] | None = None) -> MemoryCgroup:
    """A fixed-name cgroup under the root (the memory controller is on in the VM),
    with `files` written in order (e.g. {"memory.max": "268435456"})."""
    path = os.path.join(CGROUP, name)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
    for key, value in (files or {}).items():
        cg_write(path, key, value)
    return MemoryCgroup(path, 2)


# --- the kernel log -----------------------------------------------------------------------


def read_kmsg() -> list[tuple[int, str]]:
    """Every record still in the kernel's ring buffer: (sequence number, text)."""
    out: list[tuple[int, str]] = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                rec = os.read(fd, 16384)
            except BlockingIOError:
                break
            except BrokenPipeError:  # EPIPE: records were overwritten meanwhile
                continue
            head, _, text = rec.decode(errors="replace").partition(";")
            out.append((int(head.split(",")[1]), text.split("\n", 1)[0]))
    finally:
        os.close(fd)
    return out


def kmsg_mark() -> int:
    """The sequence number of the newest kernel log record (-1: none)."""
    records = read_kmsg()
    return records[-1][0] if records else -1


def kmsg_since(mark: int) -> list[str]:
    """The kernel log lines recorded after `mark`."""
    return [text for seq, text in read_kmsg() if seq > mark]


# --- sampling MemAvailable and the hogs' RSS -------------------------------------------


class Sampler:
    """A thread that reads MemAvailable (and the RSS of watched PIDs) every 20 ms and
    keeps the lowest / highest values seen, with when."""

    def __init__(self, interval: float = 0.02) -> None:
        """Start sampling at once."""
        self.interval = interval
        self.t0 = time.monotonic()
        self.min_available: int | None = None
        self.min_at: float | None = None
        self.samples = 0
        self.peak_rss: dict[int, int] = {}
        self._watch: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        """Track the peak RSS of `pid` too."""
        self._watch.add(pid)

    def _run(self) -> None:
        """The sampling loop."""
        while not self._stop.wait(self.interval):
            try:
                avail = meminfo()["MemAvailable"]
            except (OSError, KeyError):
                continue
            self.samples += 1
            if self.min_available is None or avail < self.min_available:
                self.min_available, self.min_at = avail, time.monotonic() - self.t0
            for pid in list(self._watch):
                rss = proc_status(pid, "VmRSS")
                if rss is not None and rss > self.peak_rss.get(pid, 0):
                    self.peak_rss[pid] = rss

    def stop(self) -> dict[str, Any]:
        """Stop; the lowest MemAvailable (and when), the peak RSS of each watched PID."""
        self._stop.set()
        self._thread.join(timeout=5)
        return {"min_mem_available": self.min_available, "min_at_s": self.min_at,
                "samples": self.samples,
                "peak_rss": {str(k): v for k, v in self.peak_rss.items()}}


# --- the daemon under test ------------------------------------------------------------------

_SIZE = re.compile(r"(-?[\d.]+) (B|KiB|MiB|GiB)")
_UNIT = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
KILLING = re.compile(
    r"(?:\[(?P<scope>[^\]]+)\] )?killing (?P<pid>\d+) '(?P<name>[^']*)' \(rss (?P<rss>[^)]*)\) "
    r"\[(?P<why>.*)\]; decided in (?P<decided_ms>[\d.]+) ms from a (?P<age_ms>\d+) ms old ranking")
KILLED = re.compile(
    r"(?:\[(?P<scope>[^\]]+)\] )?killed (?P<pid>\d+) '(?P<name>[^']*)' \(uid \d+; rss "
    r"(?P<rss>[-\d.]+ \w+): .*?\) with (?P<signals>no signal|\S+)(?: \[(?P<why>.*?)\])?"
    r"(?:; process_mrelease (?P<mrelease>\S+) \((?P<errno>\w+)\) in (?P<mrelease_ms>[\d.]+|\?)"
    r"(?: ms)?)?; memory back (?P<back>[\d.]+ ms|\?), exit (?P<exit>[\d.]+ ms|\?) after "
    r"(?P<after>the kill|[\w.]+)"
    r"(?:; freed (?P<freed>-?[\d.]+ \w+) \((?P<freed_source>[^)]*)\))?(?P<notes>.*)$")


def parse_size(text: str | None) -> int | None:
    """Bytes from mreaper's fmt_bytes ("781.2 MiB"), or None."""
    m = _SIZE.fullmatch(text.strip()) if text else None
    return int(float(m.group(1)) * _UNIT[m.group(2)]) if m else None


def parse_ms(text: str | None) -> float | None:
    """Milliseconds from "30.5 ms", None for "?"."""
    return float(text.split()[0]) if text and text != "?" else None


def parse_killing(line: str) -> dict[str, Any] | None:
    """The daemon's decision line ("killing PID 'name' ... decided in X ms"), parsed."""
    m = KILLING.search(line)
    if m is None:
        return None
    return {"scope": m["scope"] or "machine", "pid": int(m["pid"]), "name": m["name"],
            "rss": parse_size(m["rss"]), "why": m["why"],
            "decided_ms": float(m["decided_ms"]), "ranking_age_ms": int(m["age_ms"])}


def parse_killed(line: str) -> dict[str, Any] | None:
    """The daemon's kill report line ("killed PID 'name' ..."), parsed."""
    m = KILLED.search(line)
    if m is None:
        return None
    return {"scope": m["scope"] or "machine", "pid": int(m["pid"]), "name": m["name"],
            "rss": parse_size(m["rss"]), "signals": m["signals"].split("+"),
            "why": m["why"], "mrelease": m["mrelease"], "mrelease_errno": m["errno"],
            "mrelease_ms": parse_ms(m["mrelease_ms"]), "kill_to_free_ms": parse_ms(m["back"]),
            "kill_to_exit_ms": parse_ms(m["exit"]), "freed": parse_size(m["freed"]),
            "freed_source": m["freed_source"], "notes": m["notes"].lstrip("; ")}


class Daemon:
    """`mreaper run --config FILE` as a child of the driver; its log collected with the
    driver's monotonic time of arrival.  `cgroup`: start it in that cgroup (the driver
    steps in for the fork and back out, so the daemon's every page is charged there)."""

    def __init__(self, name: str, config: str, cgroup: str | None = None) -> None:
        """Write the configuration, start the daemon, wait until it runs."""
        self.config_path = f"/tmp/mreaper-lab-{name}.toml"
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(config)
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
        argv = [PY, "-m", "mreaper.cli", "run", "--config", self.config_path]
        if cgroup is not None:
            cg_write(cgroup, "cgroup.procs", str(os.getpid()))
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True, env=env)
        finally:
            if cgroup is not None:
                cg_write(CGROUP, "cgroup.procs", str(os.getpid()))
        threading.Thread(target=self._pump, daemon=True).start()
        self.started = self.wait_for(r"mreaper: running", DAEMON_START_S)
        self.start_s = time.monotonic() - self.t0

    def _pump(self) -> None:
        """Collect the log lines with their time of arrival."""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            log(f"  daemon| {line.rstrip()}")  # on the driver's stderr too, should the VM die
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str] | None:
        """The first log line from index `start` on that matches, waiting up to `timeout`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    if m := rx.search(self.lines[i][1]):
                        return m
                    i += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    return None
                self._cond.wait(min(remaining, 0.5))

    def when(self, pattern: str) -> float | None:
        """Driver time at which the first line matching `pattern` arrived."""
        rx = re.compile(pattern)
        with self._cond:
            return next((t for t, line in self.lines if rx.search(line)), None)

    def has(self, pattern: str) -> bool:
        """Whether some log line so far matches."""
        return self.when(pattern) is not None

    def stop(self) -> int:
        """SIGTERM, bounded wait (SIGKILL after 30 s); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def summary(self) -> dict[str, Any]:
        """The log, the start-up time, the exit status and the parsed kill lines."""
        with self._cond:
            lines = list(self.lines)
        text = [line for _, line in lines]
        return {
            "daemon_log": [f"{t - self.t0:8.3f} {line}" for t, line in lines],
            "daemon_start_s": self.start_s,
            "daemon_rc": self.proc.returncode,
            "killing": [k for line in text if (k := parse_killing(line))],
            "killed": [k for line in text if (k := parse_killed(line))],
            "killed_unparsed": [line for line in text
                                if re.search(r"\bkilled \d+ '", line) and not parse_killed(line)],
        }


# --- hogs -----------------------------------------------------------------------------------


def hog(size: int, memcg: MemoryCgroup | None = None, **kw: Any) -> Hog:
    """A hogs.Hog whose oom_score_adj is put back to 0 (the driver's -1000 is inherited)."""
    h = Hog(size, memcg, ready_timeout=90.0, **kw)
    set_oom_score_adj(h.pid, 0)
    return h


def wait_exit(h: Hog | subprocess.Popen[Any], timeout: float) -> tuple[int | None, float | None]:
    """(returncode, monotonic time seen) or (None, None) when still alive at the deadline."""
    proc = h.proc if isinstance(h, Hog) else h
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, None
    return rc, time.monotonic()


class Scenario:
    """What every scenario records: kernel log mark, OOM-kill counter, MemAvailable,
    the daemon; `finish` turns them into the JSON result, also after an error."""

    def __init__(self, name: str, stack: contextlib.ExitStack) -> None:
        """Mark the kernel log and the OOM-kill counter; note MemTotal, MemAvailable."""
        self.name = name
        self.stack = stack
        self.t0 = time.monotonic()
        self.kmark = kmsg_mark()
        self.oom_kill0 = vmstat("oom_kill")
        self.result: Result = {"scenario": name}
        self.daemon: Daemon | None = None
        self.sampler: Sampler | None = None
        mem = meminfo()
        self.result["mem_total"] = mem["MemTotal"]
        self.result["mem_available_at_start"] = mem["MemAvailable"]

    def start_daemon(self, config: str, cgroup: str | None = None) -> Daemon:
        """Start the daemon; it is stopped when the scenario's stack unwinds (before
        whatever was entered earlier, e.g. its own cgroup)."""
        self.daemon = Daemon(self.name, config, cgroup)
        self.stack.callback(self.daemon.stop)
        self.result["daemon_started"] = self.daemon.started is not None
        if self.daemon.started is None:
            raise RuntimeError("the daemon did not start")
        return self.daemon

    def start_sampler(self) -> Sampler:
        """Sample MemAvailable from now on (its figures go in the result)."""
        self.sampler = Sampler()
        return self.sampler

    def set_levels(self, percents: dict[str, float | None]) -> None:
        """Record the memory levels the daemon runs with, in bytes."""
        total = self.result["mem_total"]
        self.result["levels"] = {k: None if v is None else int(total * v / 100)
                                 for k, v in percents.items()}

    def finish(self) -> Result:
        """Stop the sampler and the daemon; the result with the kernel log lines."""
        if self.sampler is not None:
            self.result.update(self.sampler.stop())
        if self.daemon is not None:
            self.daemon.stop()
            self.result.update(self.daemon.summary())
        self.result["oom_kill_delta"] = vmstat("oom_kill") - self.oom_kill0
        self.result["kmsg"] = kmsg_since(self.kmark)
        self.result["duration_s"] = time.monotonic() - self.t0
        return self.result


KILL_PERCENT = 2.5  # mreaper's default memory kill level
DEFAULT_LEVELS: dict[str, float | None] = {"warn": 10.0, "term": 5.0, "kill": KILL_PERCENT}
DEFAULTS_CONFIG = "# mreaper's built-in defaults (PSI included)\n"


# --- a, b, f: a leak against the daemon on its defaults -----------------------------------


def _leak(sc: Scenario, *, step: int, interval: float) -> None:
    """Leak in a cgroup of its own (no limit: the pressure is the machine's) until the
    daemon kills it.  The leak ignores SIGTERM, so the default term level's SIGTERM is
    not enough and mreaper must escalate to SIGKILL."""
    assert sc.daemon is not None
    cg = sc.stack.enter_context(MemoryCgroup.create(prefix="lab-leak"))
    sampler = sc.start_sampler()
    t_start = time.monotonic()
    leak = sc.stack.enter_context(hog(4096 * MiB, cg, name="mr-leak", step=step,
                                      interval=interval, ignore_sigterm=True))
    sampler.watch(leak.pid)
    info: Result = {"pid": leak.pid, "step": step, "interval": interval}
    sc.result["leak"] = info
    rc, t_exit = wait_exit(leak, LEAK_DEATH_S)
    info.update({"rc": rc, "alive_s": None if t_exit is None else t_exit - t_start,
                 "charge_after": cg.usage() if rc is not None else None})
    if sc.daemon.wait_for(rf"killed {leak.pid} '", REPORT_S) is not None:
        time.sleep(AFTERMATH_S)  # a second kill, if the daemon over-reacts, shows here
    t_kill = sc.daemon.when(rf"killing {leak.pid} ")
    t_warn = sc.daemon.when(r"pressure: ")
    info["killing_line_to_exit_s"] = (t_exit - t_kill) if t_exit and t_kill else None
    info["pressure_line_to_exit_s"] = (t_exit - t_warn) if t_exit and t_warn else None


def scenario_fast_leak(sc: Scenario) -> None:
    """a) 64 MiB steps every 20 ms, the daemon on its built-in defaults (PSI included)."""
    sc.set_levels(DEFAULT_LEVELS)
    sc.start_daemon(DEFAULTS_CONFIG)
    _leak(sc, step=64 * MiB, interval=0.02)


def scenario_slow_leak(sc: Scenario) -> None:
    """b) 8 MiB steps every 50 ms, the daemon on its built-in defaults."""
    sc.set_levels(DEFAULT_LEVELS)
    sc.start_daemon(DEFAULTS_CONFIG)
    _leak(sc, step=8 * MiB, interval=0.05)


OWN_HIGH_UNDER = 512 << 10
OWN_IDLE_S = 6.0


def scenario_own_pressure(sc: Scenario) -> None:
    """f) The daemon's own cgroup at a memory.high just under its mlocked memory while
    a leak runs elsewhere: mlockall keeps it resident (the kernel throttles it instead
    of reclaiming), it must still kill the leak, and only the leak: an idle bystander
    (mr-bystander, 16 MiB) is there all along, first in line should the daemon kill
    for a pressure that is only its own."""
    sc.set_levels(DEFAULT_LEVELS)
    # The daemon's code is read here first, so its page cache is charged to the root
    # cgroup: the daemon's own cgroup holds its anonymous, mlocked memory only.
    importlib.import_module("mreaper.cli")
    importlib.import_module("mreaper.daemon")
    bystander = sc.stack.enter_context(hog(16 * MiB, name="mr-bystander"))
    cg = make_cgroup("lab-daemon", {"memory.swap.max": "0"})
    sc.stack.callback(cg.remove)
    daemon = sc.start_daemon(DEFAULTS_CONFIG, cgroup=cg.path)
    rss = proc_status(daemon.proc.pid, "VmRSS") or 0
    current = cg.usage()
    # Its RSS counts the interpreter's file pages, mostly charged to the root cgroup:
    # its own charge is well below its RSS, and RSS + 8 MiB would never be reached.
    # Its charge may also hold a few MiB that reclaim can take (page cache, slab).
    # What squeezes it for sure is a limit just under what it holds mlocked (memory.stat
    # "unevictable"): reclaim cannot get it there, so every page it touches while it
    # acts (the /proc scans, the kill) is over memory.high and the kernel throttles it.
    high = _memory_stat(cg.path)["unevictable"] - OWN_HIGH_UNDER
    # Counted before the write: the daemon is busiest right after it starts, and its
    # first throttles can come before a read after the write (CI saw high=17 there and
    # none later, its allocator then serving from pages it already held).
    events_unsqueezed = cg_events(cg.path)
    cg_write(cg.path, "memory.high", str(high))
    own: Result = {"daemon_pid": daemon.proc.pid, "rss_before": rss,
                   "locked": proc_status(daemon.proc.pid, "VmLck"),
                   "current_before": current, "high": high, "events_unsqueezed": events_unsqueezed,
                   "events_before": cg_events(cg.path),
                   "stat_before": _memory_stat(cg.path), "bystander_pid": bystander.pid}
    sc.result["own"] = own
    mark = len(daemon.lines)
    time.sleep(OWN_IDLE_S)  # squeezed, with no leak yet
    own.update({"idle": [line for _, line in daemon.lines[mark:]],
                "current_after_idle": cg.usage(), "events_after_idle": cg_events(cg.path),
                "mem_available_after_idle": meminfo()["MemAvailable"],
                # Whose stall it is: the daemon's cgroup's against the machine's.
                "pressure_after_idle": cg_read(cg.path, "memory.pressure"),
                "machine_pressure_after_idle": cg_read("/proc/pressure", "memory")})
    _leak(sc, step=8 * MiB, interval=0.05)
    own.update({"events_after": cg_events(cg.path), "current_end": cg.usage(),
                "peak": int(cg_read(cg.path, "memory.peak")), "stat_after": _memory_stat(cg.path),
                "rss_end": proc_status(daemon.proc.pid, "VmRSS"),
                "daemon_alive": daemon.proc.poll() is None,
                "bystander_rc": bystander.proc.poll()})


def _memory_stat(path: str) -> dict[str, int]:
    """The memory.stat figures that tell a squeeze: anon, file, unevictable..."""
    keys = ("anon", "file", "unevictable", "kernel", "pgscan", "pgsteal")
    out = {}
    for line in cg_read(path, "memory.stat").splitlines():
        key, value = line.split()
        if key in keys:
            out[key] = int(value)
    return out


# --- c: many mid-size processes, the policy's first choice dies, and only it ----------------

MID_SIZES = (60, 60, 60, 60, 60, 60, 60, 100)   # MiB; mr-mid-7 (100 MiB) ranks first
KEEP_SIZE = 150                                 # MiB, protected by a [[rule]]
PUSH_CHUNK = 4 * MiB

RANKING_CONFIG = """\
[memory]
term = "off"          # the push crosses the kill level itself: SIGKILL at once

[[rule]]
action = "protect"
name = "^mr-keep$"
"""


def _explain(config_path: str) -> tuple[str, int | None]:
    """`mreaper explain` output and the PID it ranks first."""
    out = subprocess.run([PY, "-m", "mreaper.cli", "explain", "--config", config_path],
                         capture_output=True, text=True, timeout=120, check=False,
                         env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    first = None
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) > 1 and fields[0] == "1" and fields[1].isdigit():
            first = int(fields[1])
            break
    return out.stdout + out.stderr, first


def _push(sc: Scenario, limit: int, stop_pattern: str, key: str = "push") -> Result:
    """Write tmpfs memory (owned by no process: never a candidate) in 4 MiB chunks until
    the daemon logs `stop_pattern` or `limit` bytes are written.  Records when
    MemAvailable was first seen at or below the default kill level (2.5 %)."""
    assert sc.daemon is not None
    path = os.path.join(PUSH_DIR, f"{key}-{sc.name}")
    sc.stack.callback(lambda: Path(path).unlink(missing_ok=True))
    chunk = b"\x01" * PUSH_CHUNK
    kill_level = int(meminfo()["MemTotal"] * KILL_PERCENT / 100)
    info: Result = {"limit": limit, "written": 0, "crossed_at": None}
    mark = len(sc.daemon.lines)
    t0 = time.monotonic()
    with open(path, "wb") as f:
        while info["written"] < limit:
            f.write(chunk)
            f.flush()
            info["written"] += len(chunk)
            if info["crossed_at"] is None and meminfo()["MemAvailable"] <= kill_level:
                info["crossed_at"] = time.monotonic()
                info["crossed_seen_by"] = "driver"
            if sc.daemon.wait_for(stop_pattern, 0, start=mark) is not None:
                if info["crossed_at"] is None:
                    # The daemon saw the level and acted between two of our looks: its
                    # own reading certifies the crossing, no later than its line.
                    info["crossed_at"] = sc.daemon.when(stop_pattern)
                    info["crossed_seen_by"] = "daemon"
                break
    info["seconds"] = time.monotonic() - t0
    sc.result[key] = info
    return info


def _push_limit(below: int = 48 * MiB) -> int:
    """What brings MemAvailable `below` under the default kill level (2.5 %) from now."""
    mem = meminfo()
    return mem["MemAvailable"] - int(mem["MemTotal"] * KILL_PERCENT / 100) + below


def scenario_ranking(sc: Scenario) -> None:
    """c) 8 mid-size hogs and a protected bigger one, then a small push past the kill
    level: exactly the policy's first choice dies, the protected one survives."""
    sc.set_levels({"warn": 10.0, "term": None, "kill": KILL_PERCENT})
    daemon = sc.start_daemon(RANKING_CONFIG)
    hogs: dict[str, Hog] = {}
    sizes = {f"mr-mid-{i}": size for i, size in enumerate(MID_SIZES)} | {"mr-keep": KEEP_SIZE}
    for name, size in sizes.items():
        hogs[name] = sc.stack.enter_context(hog(size * MiB, name=name))
    time.sleep(1.0)
    explain, first = _explain(daemon.config_path)
    scores = {name: oom_score(h.pid) for name, h in hogs.items()}
    eligible = {n: s for n, s in scores.items() if n != "mr-keep" and s is not None}
    by_score = max(eligible, key=lambda n: eligible[n])
    sc.result.update({
        "hogs": {n: {"pid": h.pid, "size": sizes[n] * MiB} for n, h in hogs.items()},
        "oom_scores": scores, "first_by_oom_score": hogs[by_score].pid,
        "explain": explain, "first_by_explain": first,
        "mem_available_before_push": meminfo()["MemAvailable"],
    })
    sampler = sc.start_sampler()
    for h in hogs.values():
        sampler.watch(h.pid)
    _push(sc, _push_limit(), r"killing \d+ ")
    sc.result["report_seen"] = daemon.wait_for(r"killed \d+ '", REPORT_S) is not None
    time.sleep(AFTERMATH_S + 2)
    sc.result["dead"] = {n: h.proc.returncode for n, h in hogs.items()
                         if h.proc.poll() is not None}
    sc.result["mem_available_after"] = meminfo()["MemAvailable"]


# --- d: a leak in a cgroup at its memory.max, watched by a [[scope]] ---------------------------

SCOPE_MAX = 256 * MiB
SCOPE_CONFIG = """\
[[scope]]
name = "lab"
cgroup = "lab-scope"
headroom = { warn = "20%", kill = "10%" }
psi = { warn = "some 300000 2000000", kill = "full 600000 2000000" }
"""


def scenario_scope_leak(sc: Scenario) -> None:
    """d) A leak in /sys/fs/cgroup/lab-scope (memory.max 256M, no swap) is killed by the
    scope before the memcg OOM killer fires; a bigger hog in another cgroup is untouched."""
    sc.set_levels(DEFAULT_LEVELS)
    scope = make_cgroup("lab-scope", {"memory.max": str(SCOPE_MAX), "memory.swap.max": "0"})
    sc.stack.callback(scope.remove)
    other = make_cgroup("lab-other")
    sc.stack.callback(other.remove)
    daemon = sc.start_daemon(SCOPE_CONFIG)
    sc.result["scope_line"] = m.group(0) if (m := daemon.wait_for(r"scope lab: .*", 5)) else None
    big = sc.stack.enter_context(hog(400 * MiB, other, name="mr-big"))
    sampler = sc.start_sampler()
    t_start = time.monotonic()
    leak = sc.stack.enter_context(hog(1024 * MiB, scope, name="mr-scoped-leak", step=8 * MiB,
                                      interval=0.05, ignore_sigterm=True))
    sampler.watch(leak.pid)
    sampler.watch(big.pid)
    rc, t_exit = wait_exit(leak, LEAK_DEATH_S)
    daemon.wait_for(rf"killed {leak.pid} '", REPORT_S)
    time.sleep(AFTERMATH_S)
    sc.result.update({
        "leak": {"pid": leak.pid, "rc": rc,
                 "alive_s": None if t_exit is None else t_exit - t_start},
        "big": {"pid": big.pid, "alive": big.proc.poll() is None,
                "rss": proc_status(big.pid, "VmRSS")},
        "scope_events": cg_events(scope.path), "other_events": cg_events(other.path),
        "scope_peak": int(cg_read(scope.path, "memory.peak")),
        "scope_max": SCOPE_MAX, "scope_current_after": scope.usage(),
    })


# --- e: a victim stuck in D state on a FUSE read --------------------------------------------

STUCK_CONFIG = """\
[memory]
term = "off"

[[rule]]
action = "prefer"
name = "^mr-stuck$"

[[rule]]
action = "protect"
name = "^mr-fuse$"
"""

# The stuck victim: joins its cgroup, fills `size` bytes, opens the FUSE file, says
# "ready" and reads it: the server never answers, so the read waits in the kernel.
STUCK = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
procs, size, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(procs, "w") as f:
    f.write(str(os.getpid()))
with open("/proc/self/comm", "w") as f:
    f.write("mr-stuck")
with open("/proc/self/oom_score_adj", "w") as f:
    f.write("0")
signal.signal(signal.SIGUSR1, lambda *_: None)
block = bytearray(b"\x01") * size
fd = os.open(path, os.O_RDONLY)
print("ready", flush=True)
os.read(fd, 4096)
print("read returned", flush=True)
"""
STUCK_SIZE = 320 * MiB
NEXT_WAIT_S = 8.0  # > the daemon's 5 s exit wait + 1 s settle: a late kill shows, timed
NO_RULE_STUCK_CONFIG = """\
[memory]
term = "off"

[[rule]]
action = "protect"
name = "^mr-fuse$"
"""
FUSE_MNT = "/tmp/lab-fuse"


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of a child's stdout, "" if none came within `timeout`."""
    assert proc.stdout is not None
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if r else ""


def _wait_state(pid: int, want: str, timeout: float) -> str | None:
    """Poll /proc/<pid>/stat until its state is `want`; the last state seen."""
    deadline = time.monotonic() + timeout
    state = proc_state(pid)
    while state != want and time.monotonic() < deadline:
        time.sleep(0.01)
        state = proc_state(pid)
    return state


def _release(server: subprocess.Popen[str]) -> None:
    """Have the FUSE server answer every pending read."""
    with contextlib.suppress(OSError, ValueError):
        assert server.stdin is not None
        server.stdin.write("release\n")
        server.stdin.flush()


class StuckVictim:
    """A FUSE server and a victim of `size` bytes in cgroup lab-stuck whose read of the
    server's file is never answered.  After a SIGUSR1 (handled) it waits in the
    killable part of the FUSE request wait (D); after SIGKILL, in the uninterruptible
    part (D) until the server answers: `release()`."""

    def __init__(self, sc: Scenario, size: int) -> None:
        """Mount the FUSE server, start the victim, get it into the D state."""
        self.info: Result = {}
        sc.result["stuck"] = self.info
        os.makedirs(FUSE_MNT, exist_ok=True)
        self.server = subprocess.Popen([PY, __file__, "--fuse-server", FUSE_MNT],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
        sc.stack.callback(_stop_server, self.server)
        self.info["server"] = _readline(self.server, 60)
        self.cg = make_cgroup("lab-stuck")
        sc.stack.callback(self.cg.remove)
        self.proc = subprocess.Popen([PY, "-c", STUCK, self.cg.procs_file, str(size),
                                      os.path.join(FUSE_MNT, "stuck")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        sc.stack.callback(_reap, self.proc)
        sc.stack.callback(self.release)  # unwinds first: the victim can exit, then is reaped
        self.pid = self.proc.pid
        self.info["victim_pid"] = self.pid
        self.info["victim_ready"] = _readline(self.proc, 90)
        self.info["server_saw"] = _readline(self.server, 30)        # "read <unique>"
        self.info["state_reading"] = _wait_state(self.pid, "S", 5)
        os.kill(self.pid, signal.SIGUSR1)  # interrupted: now in the killable wait (D)
        self.info["server_saw_interrupt"] = _readline(self.server, 30)
        self.info["state_before_kill"] = _wait_state(self.pid, "D", 5)
        self.info["charge_before"] = self.cg.usage()

    def wait_charge_back(self, since: float, timeout: float = 20) -> None:
        """Poll the victim's cgroup charge and state until the charge is under a tenth."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            charge, state = self.cg.usage(), proc_state(self.pid)
            if charge < self.info["charge_before"] // 10:
                self.info.update({"charge_back_after_killing_line_s": time.monotonic() - since,
                                  "state_when_charge_back": state, "charge_when_back": charge})
                return
            time.sleep(0.01)

    def release(self) -> None:
        """Have the server answer the read: the victim can go on (or exit)."""
        _release(self.server)

    def finish(self, daemon: Daemon) -> None:
        """Wait for the daemon's report on it (still stuck then), then let it go."""
        report = daemon.wait_for(rf"killed {self.pid} '", REPORT_S)
        self.info.update({"report_seen": report is not None,
                          "state_at_report": proc_state(self.pid),
                          "alive_at_report": self.proc.poll() is None,
                          "charge_at_report": self.cg.usage()})
        self.release()  # the read completes: the killed victim can exit now
        self.info["rc_after_release"], _ = wait_exit(self.proc, 30)
        self.info["server_after"] = _readline(self.server, 5)


def _stuck_then_next(sc: Scenario, config: str, stuck_size: int, next_size: int) -> None:
    """The stuck victim is killed first (memory pushed to the kill level); once its
    memory is back, memory is pushed down to the kill level again while it is still
    stuck, with `mr-next` (smaller than the stuck one) the obvious next victim."""
    sc.set_levels({"warn": 10.0, "term": None, "kill": KILL_PERCENT})
    stuck = StuckVictim(sc, stuck_size)
    nxt = sc.stack.enter_context(hog(next_size, name="mr-next"))
    daemon = sc.start_daemon(config)
    sampler = sc.start_sampler()
    sampler.watch(stuck.pid)
    sampler.watch(nxt.pid)
    info: Result = {"pid": nxt.pid}
    sc.result["next"] = info
    _push(sc, _push_limit(), rf"killing {stuck.pid} ")
    t_killing = daemon.when(rf"killing {stuck.pid} ")
    stuck.info["killing_seen"] = t_killing is not None
    if t_killing is None:
        return
    stuck.wait_charge_back(t_killing)
    # Its memory is back but it cannot exit: eat that memory again, down to 16 MiB
    # under the kill level.
    push = _push(sc, _push_limit(16 * MiB), rf"killing {nxt.pid} ", key="push2")
    daemon.wait_for(rf"killing {nxt.pid} ", NEXT_WAIT_S)
    t_next = daemon.when(rf"killing {nxt.pid} ")
    crossed = push["crossed_at"]
    info.update({
        "killed_while_stuck": t_next is not None,
        "crossed_after_first_killing_s": None if crossed is None else crossed - t_killing,
        "killing_after_crossed_s": None if t_next is None or crossed is None
        else t_next - crossed,
        "killing_after_first_killing_s": None if t_next is None else t_next - t_killing,
    })
    stuck.finish(daemon)  # releases the stuck victim: from here on it can exit
    daemon.wait_for(rf"killing {nxt.pid} ", REPORT_S)
    info["rc"], _ = wait_exit(nxt, 15)
    time.sleep(AFTERMATH_S)


def scenario_stuck_victim(sc: Scenario) -> None:
    """e) The preferred victim is stuck in D state on a FUSE read the server never
    answers (killable before SIGKILL, uninterruptible after it).  mreaper kills it; its
    memory comes back (memcg charge) by process_mrelease while it is still stuck.  Then
    memory falls to the kill level again: the next kill must go to another process,
    not to the stuck one again (its memory is gone, killing it again frees nothing)."""
    _stuck_then_next(sc, STUCK_CONFIG, STUCK_SIZE, 120 * MiB)


def scenario_stuck_then_next(sc: Scenario) -> None:
    """e2) No rule this time: the stuck victim (128 MiB) is first by oom_score, then
    mr-next (64 MiB); both small, so that memory is back at the kill level soon.  While
    the stuck victim's kill waits for an exit that cannot come (its memory is already
    back), memory falls to the kill level again: the daemon must kill mr-next at once,
    not after the stuck victim's exit timeout."""
    _stuck_then_next(sc, NO_RULE_STUCK_CONFIG, 128 * MiB, 64 * MiB)


def _reap(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a child if it still runs, and wait for it (bounded)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)


def _stop_server(server: subprocess.Popen[str]) -> None:
    """Answer whatever is pending, unmount, end the server."""
    _release(server)
    with contextlib.suppress(OSError):
        assert server.stdin is not None
        server.stdin.close()
    ctypes.CDLL(None, use_errno=True).umount2(FUSE_MNT.encode(), 2)  # MNT_DETACH
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=10)
    _reap(server)


# --- the FUSE server (raw /dev/fuse protocol, include/uapi/linux/fuse.h) ---------------------

FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_OPEN, FUSE_READ = 1, 2, 3, 14, 15
FUSE_RELEASE, FUSE_FLUSH, FUSE_INIT, FUSE_INTERRUPT, FUSE_BATCH_FORGET = 18, 25, 26, 36, 42
FOPEN_DIRECT_IO = 1  # reads go to the server every time, synchronously (no page cache)
IN_HEADER = struct.Struct("<IIQQIIII")     # len opcode unique nodeid uid gid pid padding
OUT_HEADER = struct.Struct("<IiQ")         # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks a/m/ctime, nsecs, mode nlink...
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
FILE_NODE = 2


def _attr(node: int) -> bytes:
    """struct fuse_attr of the root directory (node 1) or of the file."""
    if node == 1:
        return ATTR.pack(1, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 4096, 0)
    return ATTR.pack(node, 1 << 20, 2048, 0, 0, 0, 0, 0, 0, stat.S_IFREG | 0o444, 1, 0, 0, 0,
                     4096, 0)


def fuse_server(mnt: str, out: TextIO = sys.stdout) -> int:
    """Serve one read-only file, `stuck`, whose reads are never answered until a line
    "release" arrives on stdin.  Prints "mounted", "read <unique>", "interrupt <unique>"."""
    with open("/proc/self/comm", "w") as f:
        f.write("mr-fuse")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(b"mr-fuse", mnt.encode(), b"fuse", 0, opts) != 0:
        err = ctypes.get_errno()
        print(f"mount failed: {os.strerror(err)}", file=out, flush=True)
        return 1
    print("mounted", file=out, flush=True)
    pending: list[tuple[int, int]] = []  # (unique, size) of unanswered reads

    def reply(unique: int, body: bytes = b"", error: int = 0) -> None:
        with contextlib.suppress(OSError):  # ENOENT: the request was aborted meanwhile
            os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique) + body)

    # One handler per opcode, called with (unique, nodeid, body after the header).
    handlers: dict[int, Callable[[int, int, bytes], None]] = {}

    def init(unique: int, node: int, body: bytes) -> None:
        _, _, readahead, _ = struct.unpack_from("<IIII", body)
        reply(unique, INIT_OUT.pack(7, 31, readahead, 0, 16, 12, 128 * 1024, 1, 32, 0, 0))

    def lookup(unique: int, node: int, body: bytes) -> None:
        if node == 1 and body.rstrip(b"\0") == b"stuck":
            reply(unique, struct.pack("<QQQQII", FILE_NODE, 0, 60, 60, 0, 0) + _attr(FILE_NODE))
        else:
            reply(unique, error=errno.ENOENT)

    def getattr_(unique: int, node: int, body: bytes) -> None:
        reply(unique, struct.pack("<QII", 60, 0, 0) + _attr(node))

    def open_(unique: int, node: int, body: bytes) -> None:
        reply(unique, struct.pack("<QII", 1, FOPEN_DIRECT_IO, 0))

    def read(unique: int, node: int, body: bytes) -> None:
        _, _, size = struct.unpack_from("<QQI", body)
        pending.append((unique, size))
        print(f"read {unique}", file=out, flush=True)

    def interrupt(unique: int, node: int, body: bytes) -> None:
        print(f"interrupt {struct.unpack_from('<Q', body)[0]}", file=out, flush=True)

    def empty(unique: int, node: int, body: bytes) -> None:
        reply(unique)

    def silent(unique: int, node: int, body: bytes) -> None:
        pass

    handlers.update({FUSE_INIT: init, FUSE_LOOKUP: lookup, FUSE_GETATTR: getattr_,
                     FUSE_OPEN: open_, FUSE_READ: read, FUSE_INTERRUPT: interrupt,
                     FUSE_RELEASE: empty, FUSE_FLUSH: empty, FUSE_FORGET: silent,
                     FUSE_BATCH_FORGET: silent})
    stdin_open = True
    while True:
        watch = [fd] + ([sys.stdin.fileno()] if stdin_open else [])
        ready, _, _ = select.select(watch, [], [])
        if sys.stdin.fileno() in ready:
            line = sys.stdin.readline()
            if not line:
                stdin_open = False
            for unique, size in pending:
                reply(unique, b"x" * min(size, 4096))
                print(f"answered {unique}", file=out, flush=True)
            pending.clear()
        if fd in ready:
            try:
                req = os.read(fd, 1 << 20)
            except OSError as e:
                if e.errno == errno.ENOENT:  # interrupted before we read it
                    continue
                return 0  # ENODEV: unmounted
            _, opcode, unique, node, *_ = IN_HEADER.unpack_from(req)
            handler = handlers.get(opcode)
            if handler is None:
                reply(unique, error=errno.ENOSYS)
            else:
                handler(unique, node, req[IN_HEADER.size:])


# --- main -----------------------------------------------------------------------------------

def protect_the_vm() -> None:
    """oom_score_adj -1000 for every process there is now: the VM's init chain (whose
    job shell ends the run if killed), this driver (inherited by its children, which
    set their own back to 0).  mreaper and the kernel may only kill what the scenarios
    start, as in the host's end-to-end tests."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):  # kernel threads refuse; gone meanwhile
                set_oom_score_adj(entry, -1000)


SCENARIOS: dict[str, Callable[[Scenario], None]] = {
    "fast_leak": scenario_fast_leak,
    "slow_leak": scenario_slow_leak,
    "ranking": scenario_ranking,
    "scope_leak": scenario_scope_leak,
    "stuck_victim": scenario_stuck_victim,
    "stuck_then_next": scenario_stuck_then_next,
    "own_pressure": scenario_own_pressure,
}


def run_scenario(name: str) -> Result:
    """One scenario, its clean-up, and its result (with the traceback if it broke)."""
    sc: Scenario | None = None
    error = None
    try:
        with contextlib.ExitStack() as stack:
            sc = Scenario(name, stack)
            SCENARIOS[name](sc)
    except Exception:
        error = traceback.format_exc()
    result = sc.finish() if sc is not None else {"scenario": name}
    if error is not None:
        result["error"] = error
    return result


def main(argv: list[str]) -> int:
    """Run the named scenarios, one JSON line each, then the whole kernel log."""
    if argv[:1] == ["--fuse-server"]:
        return fuse_server(argv[1])
    if os.environ.get("MREAPER_LAB") != "1":
        print("guest_scenarios.py: refusing to run outside the lab VM (MREAPER_LAB=1 unset): "
              "it fills the machine's memory on purpose", file=sys.stderr)
        return 2
    unknown = [a for a in argv if a not in SCENARIOS]
    if unknown or not argv:
        print(f"usage: guest_scenarios.py SCENARIO...; known: {', '.join(SCENARIOS)}",
              file=sys.stderr)
        return 2
    protect_the_vm()
    os.makedirs(PUSH_DIR, exist_ok=True)
    if ctypes.CDLL(None, use_errno=True).mount(b"tmpfs", PUSH_DIR.encode(), b"tmpfs", 0,
                                               b"size=4g,mode=0700") != 0:
        print(f"cannot mount a tmpfs on {PUSH_DIR}: {os.strerror(ctypes.get_errno())}",
              file=sys.stderr)
        return 1
    for name in argv:
        log(f"scenario {name}")
        result = run_scenario(name)
        log(f"scenario {name} done in {result.get('duration_s', 0):.1f} s"
            + (f": ERROR {result['error']}" if "error" in result else ""))
        print(json.dumps(result), flush=True)
    print(json.dumps({"scenario": "_kernel_log", "kmsg": [t for _, t in read_kmsg()]}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
