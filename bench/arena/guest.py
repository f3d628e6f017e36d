"""The arena's guest driver: runs INSIDE the lab VM, one contender, one or more workloads.

    /work/main/.venv/bin/python bench/arena/guest.py --contender NAME \
        --workloads fast_leak,slow_leak,many,cgroup_leak [--mreaper-src DIR]

For each workload, in order, in the same VM (the VM is the unit of isolation per
contender; every workload gets a freshly started contender, dropped caches and its own
cgroups):

1. drop the page cache, start the contender with its arena configuration
   (``contenders.py``) and wait until it says it is watching;
2. set up the workload's idle processes (``many``, ``cgroup_leak``), each in a cgroup
   of its own under ``/sys/fs/cgroup/arena`` (or a scope in ``arena.slice`` under
   systemd), then start kernel tracing of every SIGKILL/SIGTERM generated
   (``signal:signal_generate``, trace clock ``mono``, i.e. ``time.monotonic()``) and of
   the kernel OOM killer's victims (``oom:mark_victim``);
3. t0: start the active process (the leak, or the push), and sample every 20 ms:
   MemAvailable, ``/proc/pressure/memory`` full total, the workload cgroups'
   memory.current and the anonymous RSS (statm resident - shared) of every workload
   process; deaths come from pidfds (exact, not sampled);
4. end 3 s after the last death once the expected victim is dead (``many``: once any
   process died; the push is then told to stop growing and holds what it has), or at a
   60 s timeout;
5. print ONE JSON line: the contender's configuration and log, what died (when, by
   which signal, from whom: the contender, or the kernel's OOM killer), kernel OOM kills
   (``/proc/vmstat`` oom_kill delta, mark_victim events, kernel log), the lowest
   MemAvailable, the stall (delta of ``full total``), and the times: level crossed, kill
   signal, victim dead, memory back (MemAvailable up by >= half the victim's anonymous
   RSS at the kill; ``cgroup_leak``: the arena's memory.current down by as much).

Every process that exists when the driver starts, and the driver itself, get
oom_score_adj -1000 (nobody may kill the VM's init chain or the driver); every workload
process sets its own back to 0.  It refuses to run outside the lab VM (MREAPER_LAB=1).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import contenders as cf  # noqa: E402

HOG = HERE / "hog.py"
POOL = HERE / "pool.py"
PY = sys.executable
MiB = 1 << 20
CG = "/sys/fs/cgroup"
TICK = 0.02
AFTERMATH_S = 3.0
RUN_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 120.0
WORKLOADS = ("fast_leak", "slow_leak", "many", "cgroup_leak", "storm", "respawn_pool", "build")
#: many small allocators (pool.py), each beside one idle bystander bigger than any of them:
#: (mode, workers at a time, step MiB, MiB each, seconds between steps)
POOLS = {"storm": ("storm", 120, 1, 8, 0.1), "respawn_pool": ("respawn", 80, 1, 10, 0.1),
         "build": ("build", 100, 1, 12, 0.1)}
POOL_BYSTANDER_MIB = 200
#: many: the idle processes and the push
MID_MIB, BIG_MIB, MANY_SPARE_MIB, HOG_OVERHEAD_MIB = 48, 320, 96, 4
#: many: how far past the level the push goes if nobody stops it (MemAvailable 0 is not
#: an OOM yet: the kernel's reserve is still free; this much more is)
PUSH_PAST_MIB = 176
BYSTANDER_MIB = 300

Json = dict[str, Any]


def log(msg: str) -> None:
    print(f"[{time.monotonic():9.3f}] {msg}", file=sys.stderr, flush=True)


def write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def sh(*argv: str, timeout: float = 60) -> tuple[int, str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    return p.returncode, p.stdout + p.stderr


def meminfo() -> dict[str, int]:
    out = {}
    for line in read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out


def vmstat(key: str) -> int:
    for line in read("/proc/vmstat").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


class Pread:
    """A file kept open and re-read from offset 0 (proc and cgroup files allow it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = os.open(path, os.O_RDONLY)

    def read(self) -> bytes | None:
        if self.fd is None:
            return None
        try:
            return os.pread(self.fd, 16384, 0)
        except OSError:
            self.close()
            return None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def mem_available(buf: bytes) -> int:
    i = buf.index(b"MemAvailable:")
    return int(buf[i + 13:buf.index(b"kB", i)]) * 1024


def full_total(buf: bytes | None, kind: bytes = b"full") -> int | None:
    """The ``total=`` (microseconds) of the full (or some) line of a pressure file."""
    if not buf:
        return None
    i = buf.find(kind + b" ")
    j = buf.find(b"total=", i)
    return int(buf[j + 6:buf.index(b"\n", j)]) if i >= 0 and j >= 0 else None


# --- kernel log and tracing ------------------------------------------------------------


def read_kmsg() -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                rec = os.read(fd, 16384)
            except BlockingIOError:
                break
            except BrokenPipeError:
                continue
            head, _, text = rec.decode(errors="replace").partition(";")
            out.append((int(head.split(",")[1]), text.split("\n", 1)[0]))
    finally:
        os.close(fd)
    return out


TRACE_LINE = re.compile(
    r"^\s*(?P<comm>.*)-(?P<tid>\d+)\s+\[\d+\]\s+(?:\S+\s+)?(?P<ts>\d+\.\d+): "
    r"(?P<event>\w+): (?P<rest>.*)$")
SIGNAL_REST = re.compile(
    r"sig=(?P<sig>\d+) errno=-?\d+ code=-?\d+ comm=(?P<comm>.*) pid=(?P<pid>\d+) "
    r"grp=\d+ res=(?P<res>\d+)")


class Trace:
    """ftrace of signal_generate (SIGKILL, SIGTERM) and oom:mark_victim, mono clock."""

    def __init__(self) -> None:
        for root in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
            if os.path.exists(f"{root}/trace"):
                self.root = root
                break
        else:
            self.root = "/sys/kernel/tracing"
            rc, out = sh("/bin/mount", "-t", "tracefs", "tracefs", self.root)
            if rc != 0:
                raise RuntimeError(f"cannot mount tracefs: {out}")

    def _w(self, rel: str, value: str) -> None:
        write(f"{self.root}/{rel}", value)

    def start(self) -> None:
        self._w("tracing_on", "0")
        self._w("trace_clock", "mono")
        self._w("buffer_size_kb", "1024")
        self._w("trace", "")
        self._w("events/signal/signal_generate/filter", "sig == 9 || sig == 15")
        self._w("events/signal/signal_generate/enable", "1")
        with contextlib.suppress(OSError):
            self._w("events/oom/mark_victim/enable", "1")
        self._w("tracing_on", "1")

    def stop(self) -> list[Json]:
        self._w("tracing_on", "0")
        text = read(f"{self.root}/trace")
        self._w("events/signal/signal_generate/enable", "0")
        with contextlib.suppress(OSError):
            self._w("events/oom/mark_victim/enable", "0")
        events: list[Json] = []
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            m = TRACE_LINE.match(line)
            if m is None:
                continue
            ev: Json = {"t": float(m["ts"]), "by_comm": m["comm"].strip(),
                        "by_tid": int(m["tid"]), "event": m["event"]}
            if m["event"] == "signal_generate":
                s = SIGNAL_REST.search(m["rest"])
                if s is None:
                    continue
                ev.update(sig=int(s["sig"]), comm=s["comm"], pid=int(s["pid"]),
                          res=int(s["res"]))
            elif m["event"] == "mark_victim":
                p = re.search(r"pid=(\d+)", m["rest"])
                if p is None:
                    continue
                ev["pid"] = int(p.group(1))
            events.append(ev)
        return events


# --- workload processes --------------------------------------------------------------


@dataclass
class HogProc:
    """One workload process: its Popen, pidfd, cgroup and sampled anonymous RSS."""

    name: str
    role: str            # "idle", "leak", "push", "bystander"
    proc: subprocess.Popen[str]
    cgroup: str
    pidfd: int = -1
    statm: Pread | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)
    died_at: float | None = None
    returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def sample_rss(self) -> None:
        if self.statm is None or self.died_at is not None:
            return
        buf = self.statm.read()
        now = time.monotonic()
        if not buf:
            return
        fields = buf.split()
        anon = (int(fields[1]) - int(fields[2])) * 4096
        if not self.rss or self.rss[-1][1] != anon:
            self.rss.append((now, anon))

    def rss_at(self, t: float) -> int:
        """The largest anonymous RSS sampled up to t (a leak's last, an idle process's
        only size; a sample taken while the kill was already freeing it cannot win)."""
        return max((v for ts, v in self.rss if ts <= t),
                   default=max((v for _, v in self.rss), default=0))


class Launcher:
    """Starts workload processes, each in its own cgroup (plain VM) or scope (systemd)."""

    def __init__(self, systemd: bool, tag: str) -> None:
        self.systemd = systemd
        self.tag = tag
        self.parent = f"{CG}/arena.slice" if systemd else f"{CG}/arena"
        self.hogs: list[HogProc] = []
        if not systemd:
            os.makedirs(self.parent, exist_ok=True)
            write(f"{self.parent}/cgroup.subtree_control", "+memory")

    def start(self, name: str, role: str, size_mib: int, *, step_mib: int = 0,
              interval: float = 0.0, limit_mib: int | None = None,
              pool: tuple[str, int, int, int, float] | None = None) -> HogProc:
        hog_argv = [PY, "-S", str(HOG), name, str(size_mib)]
        if step_mib:
            hog_argv += [str(step_mib), str(interval)]
        if pool is not None:
            hog_argv = [PY, "-S", str(POOL), name, *(str(x) for x in pool)]
        leaf = name.removeprefix("arena-")
        if self.systemd:
            argv = ["systemd-run", "--scope", "--quiet", "--collect", "--slice=arena.slice",
                    f"--unit=arena-{leaf}-{self.tag}", "-p", "MemoryAccounting=yes"]
            if limit_mib is not None:
                argv += ["-p", f"MemoryMax={limit_mib}M", "-p", "MemorySwapMax=0"]
            argv += hog_argv
            cgroup = ""
        else:
            cgroup = f"{self.parent}/{leaf}"
            os.makedirs(cgroup, exist_ok=True)
            if limit_mib is not None:
                write(f"{cgroup}/memory.max", str(limit_mib * MiB))
                write(f"{cgroup}/memory.swap.max", "0")
            argv = [*hog_argv, "--cgroup", cgroup]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, close_fds=True)
        hog = HogProc(name, role, proc, cgroup)
        self.hogs.append(hog)
        return hog

    def ready(self, hogs: list[HogProc], timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        for hog in hogs:
            assert hog.proc.stdout is not None
            left = max(0.0, deadline - time.monotonic())
            r, _, _ = select.select([hog.proc.stdout], [], [], left)
            line = hog.proc.stdout.readline() if r else ""
            if line.strip() != "ready":
                raise RuntimeError(f"{hog.name} did not start ({line!r}, rc {hog.proc.poll()})")
            hog.pidfd = os.pidfd_open(hog.pid)
            hog.statm = Pread(f"/proc/{hog.pid}/statm")
            if self.systemd:
                rel = read(f"/proc/{hog.pid}/cgroup").strip().split("::", 1)[1]
                hog.cgroup = CG + rel

    def cleanup(self) -> None:
        for hog in self.hogs:
            if hog.proc.poll() is None:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(hog.pidfd, signal.SIGKILL) if hog.pidfd >= 0 \
                        else hog.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                hog.proc.wait(timeout=30)
            if hog.pidfd >= 0:
                os.close(hog.pidfd)
                hog.pidfd = -1
            if hog.statm is not None:
                hog.statm.close()
            for stream in (hog.proc.stdin, hog.proc.stdout):
                with contextlib.suppress(OSError):
                    if stream is not None:
                        stream.close()
        if not self.systemd:
            for hog in self.hogs:
                deadline = time.monotonic() + 10
                while hog.cgroup and os.path.isdir(hog.cgroup):
                    try:
                        os.rmdir(hog.cgroup)
                    except OSError:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.05)
        self.hogs = []


# --- contenders ----------------------------------------------------------------------


class Contender:
    """A contender daemon as a child of the driver (or systemd-oomd under systemd)."""

    def __init__(self, name: str, workload: str, mreaper_src: str) -> None:
        self.name = name
        self.workload = workload
        self.mreaper_src = mreaper_src
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[tuple[float, str]] = []
        self.config = ""
        self.argv: list[str] = []
        self.t_start = 0.0
        self._cond = threading.Condition()

    # the process and its log
    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argv = argv
        # oom_score_adj back to 0 (the driver is at -1000): what their units give them
        wrapped = ["/bin/sh", "-c", 'echo 0 > /proc/self/oom_score_adj && exec "$@"', "sh",
                   *argv]
        self.proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> bool:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = 0
        with self._cond:
            while True:
                while i < len(self.lines):
                    if rx.search(self.lines[i][1]):
                        return True
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    return False
                self._cond.wait(min(left, 0.5))

    def start(self) -> None:
        self.t_start = time.monotonic()
        getattr(self, "_start_" + self.name.replace("-", "_"))()
        self.ready_s = time.monotonic() - self.t_start

    def _write(self, path: str, text: str) -> str:
        with open(path, "w") as f:
            f.write(text)
        return path

    def _start_kernel(self) -> None:
        self.config = "none"

    def _start_mreaper(self) -> None:
        self.config = cf.mreaper_config(self.workload)
        path = self._write("/run/arena-mreaper.toml", self.config)
        env = dict(os.environ, PYTHONPATH=self.mreaper_src, PYTHONUNBUFFERED="1")
        self._spawn([PY, "-m", "mreaper.cli", "run", "--config", path], env)
        if not self.wait_for(r"\brunning\b", READY_TIMEOUT_S):
            raise RuntimeError("mreaper did not start: " + self.log_tail(20))

    def _start_earlyoom(self) -> None:
        argv = cf.earlyoom_argv()
        self.config = " ".join(argv)
        self._spawn(argv)
        if not self.wait_for(r"SIGKILL when|mem avail", 30):
            raise RuntimeError("earlyoom did not start: " + self.log_tail(20))

    def _start_nohang(self) -> None:
        self.config = cf.nohang_config(read(cf.NOHANG_DEFAULT_CONF))
        path = self._write("/run/arena-nohang.conf", self.config)
        self._spawn(["/usr/sbin/nohang", "--monitor", "--config", path],
                    dict(os.environ, PYTHONUNBUFFERED="1"))
        if not self.wait_for(r"Monitoring has started", READY_TIMEOUT_S):
            raise RuntimeError("nohang did not start: " + self.log_tail(20))

    def _start_oomd(self) -> None:
        threshold = cf.oomd_machine_threshold(meminfo()["MemTotal"], read("/proc/zoneinfo"))
        self.config = cf.oomd_config(self.workload, threshold)
        path = self._write("/run/arena-oomd.json", self.config)
        self._spawn(cf.oomd_argv(path))
        # oomd logs nothing when it starts well; give it two of its 1 s intervals
        time.sleep(2.5)
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError("oomd exited: " + self.log_tail(20))

    def _start_systemd_oomd(self) -> None:
        self.config = ("arena.slice:\n" + cf.SYSTEMD_SLICE + "oomd.conf.d/arena.conf:\n"
                       + cf.SYSTEMD_OOMD_CONF)
        rc, out = sh("systemctl", "start", "systemd-oomd.socket", "systemd-oomd.service",
                     "arena.slice", timeout=120)
        if rc != 0:
            raise RuntimeError(f"systemctl start systemd-oomd: {out}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rc, out = sh("oomctl", "dump")
            if rc == 0 and "/arena.slice" in out:
                self.lines.append((time.monotonic(), "oomctl dump: " + " | ".join(
                    ln.strip() for ln in out.splitlines() if ln.strip())[:1500]))
                return
            time.sleep(0.5)
        raise RuntimeError(f"systemd-oomd does not monitor arena.slice: {out}")

    def stop(self) -> None:
        if self.name == "systemd-oomd":
            _, out = sh("journalctl", "-u", "systemd-oomd.service", "-o", "short-monotonic",
                        "--no-pager", "--since", "-10min")
            self.lines += [(0.0, ln) for ln in out.splitlines()[-80:]]
            sh("systemctl", "stop", "systemd-oomd.service", "systemd-oomd.socket", timeout=120)
            return
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 60) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines[-n:])

    def log_since(self, t: float) -> list[str]:
        """Every line, stamped with its arrival relative to t (journal lines: unstamped)."""
        with self._cond:
            return [f"{ts - t:+8.3f} {line}" if ts else line for ts, line in self.lines]


# --- one workload ----------------------------------------------------------------------


@dataclass
class Plan:
    """What a workload starts and what should happen."""

    idle: list[tuple[str, str, int, int | None]]     # (name, role, MiB, limit MiB)
    active: tuple[str, str, int, int, float, int | None]  # name, role, MiB, step, interval, limit
    expected: str                                      # name of the expected victim
    scope: str | None = None                           # "limited": judged on the cgroup
    pool: tuple[str, int, int, int, float] | None = None  # pool.py: mode, workers, step...


def plan_for(workload: str, level: int) -> Plan:
    if workload == "fast_leak":
        return Plan([], ("arena-leak", "leak", 4096, 64, 0.02, None), "arena-leak")
    if workload == "slow_leak":
        return Plan([], ("arena-leak", "leak", 4096, 8, 0.05, None), "arena-leak")
    if workload == "cgroup_leak":
        return Plan([("arena-bystander", "bystander", BYSTANDER_MIB, None)],
                    ("arena-limited", "leak", 1024, 8, 0.05, cf.LIMIT_MIB), "arena-limited",
                    scope="limited")
    if workload in POOLS:
        return Plan([("arena-idle", "bystander", POOL_BYSTANDER_MIB, None)],
                    ("arena-pool", "pool", 0, 0, 0.0, None), "arena-pool",
                    pool=POOLS[workload])
    if workload == "many":
        avail = meminfo()["MemAvailable"] // MiB
        fill = avail - level // MiB - MANY_SPARE_MIB
        # a first estimate (each process costs a few MiB more than it maps); top_up()
        # adds the rest once they run
        n_mid = max(3, (fill - BIG_MIB - 3 * MID_MIB) // (MID_MIB + 3 * HOG_OVERHEAD_MIB))
        idle: list[tuple[str, str, int, int | None]] = [
            (f"arena-mid-{i}", "idle", MID_MIB, None) for i in range(n_mid)]
        idle.insert(n_mid // 2, ("arena-big", "idle", BIG_MIB, None))
        return Plan(idle, ("arena-push", "push", 0, 8, 0.05, None), "arena-big")
    raise ValueError(workload)


def top_up(launcher: Launcher, level: int) -> None:
    """many: more mid-size processes (smaller ones last) until MemAvailable is within a few
    MiB of level + MANY_SPARE_MIB, whatever the contender and the processes cost."""
    target = level + MANY_SPARE_MIB * MiB
    for i in range(24):
        excess = (meminfo()["MemAvailable"] - target) // MiB
        if excess < 16:
            return
        size = min(MID_MIB, excess - HOG_OVERHEAD_MIB * 2)
        if size < 8:
            return
        hog = launcher.start(f"arena-mid-x{i}", "idle", size)
        launcher.ready([hog])
        time.sleep(0.3)


def run_workload(workload: str, contender_name: str, *, mreaper_src: str, tag: str,
                 systemd: bool, trace: Trace) -> Json:
    res: Json = {"workload": workload, "contender": contender_name}
    mem = meminfo()
    level = int(mem["MemTotal"] * cf.LEVEL_PERCENT / 100)
    res.update(mem_total=mem["MemTotal"], level=level)
    sh("/bin/sync")
    write("/proc/sys/vm/drop_caches", "3")
    time.sleep(0.5)
    launcher = Launcher(systemd, tag)
    contender = Contender(contender_name, workload, mreaper_src)
    t_prep = time.monotonic()
    try:
        contender.start()
        res["contender_ready_s"] = round(time.monotonic() - t_prep, 2)
        res["config"] = contender.config
        res["argv"] = contender.argv
        plan = plan_for(workload, level)
        trace.start()  # from here on, every SIGKILL/SIGTERM is recorded
        res["_t_trace"] = time.monotonic()
        idle = [launcher.start(name, role, mib, limit_mib=lim) for name, role, mib, lim in
                plan.idle]
        launcher.ready(idle)
        if workload == "many":
            top_up(launcher, level)
        time.sleep(1.0)
        res["mem_available_before"] = meminfo()["MemAvailable"]
        name, role, size, step, interval, lim = plan.active
        if role == "push":  # to PUSH_PAST_MIB under the level if nobody acts
            avail = res["mem_available_before"] // MiB
            size = min(avail - level // MiB + PUSH_PAST_MIB, BIG_MIB - 32)
        res["active"] = {"name": name, "size_mib": size, "step_mib": step,
                         "interval_s": interval, "limit_mib": lim}
        if plan.pool is not None:
            mode, workers, pstep, top, pinterval = plan.pool
            res["active"].update(mode=mode, workers=workers, step_mib=pstep, size_mib=top,
                                 interval_s=pinterval)
        active = launcher.start(name, role, size, step_mib=step, interval=interval, limit_mib=lim,
                                pool=plan.pool)
        launcher.ready([active])
        hogs = launcher.hogs
        res["processes"] = {h.name: {"pid": h.pid, "role": h.role, "cgroup": h.cgroup}
                            for h in hogs}
        parent = launcher.parent
        leaf = active.cgroup if plan.scope else None
        res.update(sample_run(res, hogs, active, plan, level=level, parent=parent, leaf=leaf,
                              trace=trace))
    except Exception:
        res["error"] = traceback.format_exc()
    finally:
        with contextlib.suppress(Exception):
            trace.stop()
        launcher.cleanup()
        contender.stop()
        lines = contender.log_since(res.get("_t0", t_prep))
        res["contender_log"] = lines if len(lines) <= 160 else (
            [*lines[:40], f"... {len(lines) - 160} lines ...", *lines[-120:]])
        res.pop("_t0", None)
        res.pop("_t_trace", None)
    return res


def sample_run(res: Json, hogs: list[HogProc], active: HogProc, plan: Plan, *, level: int,
               parent: str, leaf: str | None, trace: Trace) -> Json:
    meminfo_f = Pread("/proc/meminfo")
    psi_f = Pread("/proc/pressure/memory")
    parent_cur = Pread(f"{parent}/memory.current")
    parent_psi = Pread(f"{parent}/memory.pressure")
    leaf_cur = Pread(f"{leaf}/memory.current") if leaf else None
    limit = cf.LIMIT_MIB * MiB
    poller = select.poll()
    by_fd = {h.pidfd: h for h in hogs}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    records = read_kmsg()
    kmark = records[-1][0] if records else -1
    oom0 = vmstat("oom_kill")
    samples: list[tuple[float, int, int | None, int | None, int | None]] = []

    def sample() -> None:
        # each value is stamped after it was read: under memory pressure this very
        # process can stall between two reads
        buf = meminfo_f.read()
        assert buf is not None
        now = time.monotonic()
        psi_now = full_total(psi_f.read())
        cur = parent_cur.read()
        lc = leaf_cur.read() if leaf_cur is not None else None
        samples.append((now, mem_available(buf), psi_now,
                        int(cur) if cur else None, int(lc) if lc else None))
        for h in hogs:
            h.sample_rss()

    buf0 = psi_f.read()
    psi0, some0 = full_total(buf0), full_total(buf0, b"some")
    cg_psi0 = full_total(parent_psi.read())
    sample()
    t0 = time.monotonic()
    res["_t0"] = t0
    active.send("go")
    expected = next(h for h in hogs if h.name == plan.expected)
    deadline = t0 + RUN_TIMEOUT_S
    last_death: float | None = None
    stopped_push = False
    while True:
        now = time.monotonic()
        if now >= deadline:
            res["timed_out"] = True
            break
        if last_death is not None and now - last_death >= AFTERMATH_S and (
                expected.died_at is not None or plan.expected == "arena-big"):
            break
        wait_ms = max(0, int((samples[-1][0] + TICK - now) * 1000))
        for fd, _ in poller.poll(wait_ms):
            h = by_fd[fd]
            if h.died_at is None:
                h.died_at = time.monotonic()
                poller.unregister(fd)
                h.returncode = h.proc.wait()
                last_death = h.died_at
                if active.role == "push" and not stopped_push:
                    active.send("stop")  # the spike is over: the push holds what it has
                    stopped_push = True
        if time.monotonic() - samples[-1][0] >= TICK * 0.9:
            sample()
    sample()
    t_end = time.monotonic()
    events = trace.stop()
    buf1 = psi_f.read()
    psi1, some1 = full_total(buf1), full_total(buf1, b"some")
    cg_psi1 = full_total(parent_psi.read())
    for f in (meminfo_f, psi_f, parent_cur, parent_psi, leaf_cur):
        if f is not None:
            f.close()
    kmsg = [text for seq, text in read_kmsg() if seq > kmark]
    return analyse(hogs, plan, level=level, limit=limit, samples=samples, events=events,
                   t0=t0, t_end=t_end, psi=(psi0, psi1), some=(some0, some1),
                   cg_psi=(cg_psi0, cg_psi1),
                   oom_delta=vmstat("oom_kill") - oom0, kmsg=kmsg)


def analyse(hogs: list[HogProc], plan: Plan, *, level: int, limit: int,
            samples: list[tuple[float, int, int | None, int | None, int | None]],
            events: list[Json], t0: float, t_end: float, psi: tuple[int | None, int | None],
            some: tuple[int | None, int | None],
            cg_psi: tuple[int | None, int | None], oom_delta: int, kmsg: list[str]) -> Json:
    by_pid = {h.pid: h for h in hogs}
    victims_of_oom = {e["pid"] for e in events if e["event"] == "mark_victim"}
    signals = [e for e in events if e["event"] == "signal_generate" and e["res"] in (0, 2)
               and e["t"] <= t_end]
    kills: list[Json] = []
    seen: set[int] = set()
    for e in sorted(signals, key=lambda e: e["t"]):
        if e["pid"] in seen:
            continue
        seen.add(e["pid"])
        hog = by_pid.get(e["pid"])
        # many small allocators: the pool and any of its workers (arena-w<i>) are the
        # expected victims; the bystander is not
        # (a worker killed right after its fork still has the parent's comm)
        worker = plan.pool is not None and hog is None and (
            e["comm"].startswith("arena-w") or e["comm"] == "arena-pool")
        kills.append({
            "pid": e["pid"], "comm": e["comm"], "t": round(e["t"] - t0, 4), "sig": e["sig"],
            "by": "kernel-oom" if e["pid"] in victims_of_oom else "contender",
            "by_comm": e["by_comm"], "workload_process": hog.name if hog else (
                "arena-pool" if worker else None),
            "expected": bool(hog and hog.name == plan.expected) or worker,
        })
    died = {h.name: {"t": round(h.died_at - t0, 4), "returncode": h.returncode,
                     "peak_rss_anon_mib": round(max((v for _, v in h.rss), default=0) / MiB, 1)}
            for h in hogs if h.died_at is not None}
    wrong = [k for k in kills if not k["expected"]]
    out: Json = {"kills": kills, "died": died, "wrong_victims": len(wrong),
                 "bystanders_killed": sorted(h.name for h in hogs
                                             if h.role == "bystander" and h.died_at is not None),
                 "contender_kills": sum(1 for k in kills if k["by"] == "contender"),
                 "kernel_oom_kills": oom_delta,
                 "kernel_oom_victims": sorted(victims_of_oom),
                 "kmsg": [line for line in kmsg if re.search(
                     r"Out of memory|Killed process|oom-kill|invoked oom-killer", line)][:20],
                 "duration_s": round(t_end - t0, 3)}
    # the time series, relative to t0
    scoped = plan.scope is not None
    ts = [s[0] - t0 for s in samples]
    avail = [s[1] for s in samples]
    parent_cur = [s[3] for s in samples]
    headroom = [None if s[4] is None else limit - s[4] for s in samples]
    out["samples"] = {"t_ms": [round(t * 1000) for t in ts],
                      "avail_kib": [a // 1024 for a in avail],
                      "full_total_ms": [None if s[2] is None else round(s[2] / 1000)
                                        for s in samples]}
    if scoped:
        out["samples"]["headroom_kib"] = [None if h is None else h // 1024 for h in headroom]
        out["samples"]["arena_current_kib"] = [None if c is None else c // 1024
                                               for c in parent_cur]
    out["min_mem_available"] = min(avail)
    if scoped:
        out["min_headroom"] = min((h for h in headroom if h is not None), default=None)
    # threshold crossing
    crossed = None
    for t, a, h in zip(ts, avail, headroom, strict=True):
        hit = (h is not None and h <= limit * cf.LEVEL_PERCENT / 100) if scoped else a <= level
        if hit:
            crossed = t
            break
    out["t_level"] = None if crossed is None else round(crossed, 4)
    # the first kill (of a workload process) and memory back
    first = next((k for k in kills if k["workload_process"]), None)
    t_kill = first["t"] if first else None
    victim = by_pid.get(first["pid"]) if first else None
    if victim is None and first is not None and first["workload_process"] == "arena-pool":
        victim = next((h for h in hogs if h.name == "arena-pool"), None)
    if victim is None:  # died without a traced signal: take its death
        dead = [h for h in hogs if h.died_at is not None]
        if dead:
            victim = min(dead, key=lambda h: h.died_at or 0.0)
            t_kill = (victim.died_at or t0) - t0
    out["t_kill"] = None if t_kill is None else round(t_kill, 4)
    out["victim"] = victim.name if victim else None
    out["victim_expected"] = victim is not None and victim.name == plan.expected
    t_back = None
    if victim is not None and t_kill is not None:
        rss = victim.rss_at(t0 + t_kill)
        out["victim_rss_anon_mib"] = round(rss / MiB, 1)
        out["t_victim_dead"] = (None if victim.died_at is None
                                else round(victim.died_at - t0, 4))
        series = parent_cur if scoped else avail
        base_i = max((i for i, t in enumerate(ts) if t <= t_kill), default=0)
        base = series[base_i]
        if base is not None:
            for t, v in zip(ts[base_i + 1:], series[base_i + 1:], strict=True):
                if v is None:
                    continue
                freed = (base - v) if scoped else (v - base)
                if freed >= rss / 2:
                    t_back = t
                    break
    out["t_back"] = None if t_back is None else round(t_back, 4)

    def span(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 4)

    out["level_to_kill_s"] = span(crossed, t_kill)
    out["kill_to_back_s"] = span(t_kill, t_back)
    out["level_to_back_s"] = span(crossed, t_back)
    out["killed_before_level"] = t_kill is not None and (crossed is None or t_kill < crossed)
    out["stall_ms"] = None if None in psi else round((psi[1] - psi[0]) / 1000, 1)  # type: ignore[operator]
    out["some_stall_ms"] = (None if None in some
                            else round((some[1] - some[0]) / 1000, 1))  # type: ignore[operator]
    out["arena_stall_ms"] = (None if None in cg_psi
                             else round((cg_psi[1] - cg_psi[0]) / 1000, 1))  # type: ignore[operator]
    rates = hogs[-1].rss  # the active process: from its first sample to its largest
    if len(rates) >= 2:
        top = max(rates, key=lambda tv: tv[1])
        if top[0] > rates[0][0]:
            out["active_growth_mib_s"] = round((top[1] - rates[0][1]) / MiB
                                               / (top[0] - rates[0][0]), 1)
    return out


# --- the VM -------------------------------------------------------------------------------


def protect_the_vm() -> None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                write(f"/proc/{entry}/oom_score_adj", "-1000")


def setup_systemd() -> None:
    os.makedirs("/run/systemd/system", exist_ok=True)
    write("/run/systemd/system/arena.slice", cf.SYSTEMD_SLICE)
    os.makedirs("/etc/systemd/oomd.conf.d", exist_ok=True)
    write("/etc/systemd/oomd.conf.d/arena.conf", cf.SYSTEMD_OOMD_CONF)
    # journald for systemd-oomd's log, D-Bus for oomctl (it asks systemd-oomd over D-Bus)
    for argv in (("systemctl", "daemon-reload"),
                 ("systemctl", "start", "systemd-journald", "dbus.socket", "dbus.service")):
        rc, out = sh(*argv, timeout=120)
        if rc != 0:
            log(f"{' '.join(argv)}: {out}")


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--contender", required=True, choices=cf.CONTENDERS)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--mreaper-src", default=str(REPO / "src"))
    p.add_argument("--tag", default="0")
    args = p.parse_args(argv)
    if os.environ.get("MREAPER_LAB") != "1":
        print("guest.py: refusing to run outside the lab VM (MREAPER_LAB=1 unset): it fills "
              "the machine's memory on purpose", file=sys.stderr)
        return 2
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    protect_the_vm()
    systemd = args.contender == "systemd-oomd"
    if systemd:
        setup_systemd()
    trace = Trace()
    for i, workload in enumerate(workloads):
        log(f"{args.contender}: {workload}")
        res = run_workload(workload, args.contender, mreaper_src=args.mreaper_src,
                           tag=f"{args.tag}-{i}", systemd=systemd, trace=trace)
        res["kernel"] = os.uname().release
        log(f"{args.contender}: {workload} done: victim {res.get('victim')} "
            f"kills {[(k['comm'], k['by']) for k in res.get('kills', [])]}"
            + (f" ERROR {res['error']}" if "error" in res else ""))
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
