"""What an unprivileged user can do to hide from, or stall, the killer: real processes.

Invisible victims: a process whose main thread called pthread_exit while another
thread holds the memory.  The kernel keeps the leader as a zombie (State: Z, no Vm*
lines, empty cmdline, no exe link) until the last thread exits, so a scan that judges
by the leader's own files never sees the memory.  Every helper here lives in a memory
cgroup whose limit bounds it.

Hostile names: a process's user chooses its argv (`exec -a`), and rule patterns are
searched in it; the search must end whatever the text.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import helpers
from daemon_harness import DaemonProcess
from mreaper import policy
from mreaper.hogs import MemoryCgroup, MiB
from mreaper.linux import procfs
from mreaper.reap import KillOptions, Mrelease, Victim, kill_and_reap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: memory cgroups")

# Joins the given cgroup.procs, starts a thread that allocates and touches TOTAL MiB of
# private anonymous memory, STEP MiB every INTERVAL ms (printing "ready" after the
# first step), then the main thread calls pthread_exit: the leader becomes a zombie
# while the thread runs on and holds all the memory.
LEADER_EXITS_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static size_t total, step;
static long interval_ms;

static void *holder(void *arg) {
    (void)arg;
    for (size_t done = 0; done < total; done += step) {
        char *mem = mmap(NULL, step, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) {
            perror("mmap");
            exit(1);
        }
        memset(mem, 1, step);
        if (done == 0) {
            printf("ready\n");
            fflush(stdout);
        }
        struct timespec ts = {interval_ms / 1000, (interval_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    printf("full\n");
    fflush(stdout);
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s CGROUP_PROCS TOTAL_MIB STEP_MIB INTERVAL_MS\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "w");
    if (!f || fprintf(f, "%d", (int)getpid()) < 0 || fclose(f) != 0) {
        perror("joining the memory cgroup");
        return 1;
    }
    total = strtoull(argv[2], NULL, 10) << 20;
    step = strtoull(argv[3], NULL, 10) << 20;
    interval_ms = strtol(argv[4], NULL, 10);
    pthread_t t;
    if (pthread_create(&t, NULL, holder, NULL) != 0) {
        perror("pthread_create");
        return 1;
    }
    pthread_exit(NULL);
}
"""


@pytest.fixture(scope="module")
def leader_exits_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The helper, compiled once, named mr-ghost (its comm, which the rules see)."""
    return str(helpers.compile_c(LEADER_EXITS_C,
                                 tmp_path_factory.mktemp("cbin") / "mr-ghost"))


Ghost = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def ghost(leader_exits_bin: str) -> Iterator[Ghost]:
    """Start the helper in a memory cgroup; wait until its leader is a zombie and its
    thread holds the first step of memory.  SIGKILLed and waited at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(cg: MemoryCgroup, total_mib: int, step_mib: int | None = None,
              interval_ms: int = 0) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([leader_exits_bin, cg.procs_file, str(total_mib),
                              str(step_mib or total_mib), str(interval_ms)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        started.append(p)
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 10
        while procfs.read_stat(p.pid).state != "Z":  # the leader is past pthread_exit
            assert time.monotonic() < deadline, "the main thread did not exit"
            time.sleep(0.005)
        return p

    yield start
    for p in started:
        p.kill()
        p.wait()


def _premise(p: subprocess.Popen[bytes]) -> None:
    """What makes the process invisible to a leader-only reading: asserted, not assumed."""
    raw = Path(f"/proc/{p.pid}/status").read_bytes()
    assert b"State:\tZ" in raw and b"VmRSS" not in raw
    assert b"\nThreads:\t2\n" in raw
    assert Path(f"/proc/{p.pid}/cmdline").read_bytes() == b""


def test_a_process_whose_leader_exited_is_ranked_by_its_threads_memory(
        ghost: Ghost, memcg_factory: Callable[[int], MemoryCgroup],
        leader_exits_bin: str) -> None:
    cg = memcg_factory(512 * MiB)
    p = ghost(cg, 300)
    _premise(p)
    candidates, _ = policy.scan()
    found = {c.pid: c for c in candidates}
    assert p.pid in found, "a process whose main thread exited must be a candidate"
    c = found[p.pid]
    assert c.rss >= 300 * MiB  # the thread's memory, the group's mm
    assert c.name == "mr-ghost"
    assert c.cmdline == (leader_exits_bin, cg.procs_file, "300", "300", "0")
    assert c.exe == leader_exits_bin
    # the kernel's oom_score already walks the threads (find_lock_task_mm)
    assert c.oom_score == int(Path(f"/proc/{p.pid}/oom_score").read_text()) > 0
    chosen = policy.choose(policy.rank(candidates, [policy.Rule(
        action=policy.Action.PREFER, name="^mr-ghost$", adjust=100_000)]))
    assert chosen is not None and chosen.candidate.pid == p.pid
    # and what an admin sees
    out = subprocess.run([sys.executable, "-m", "mreaper.cli", "explain", "--all"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    row = next((line for line in out.splitlines() if line.split()[1:2] == [str(p.pid)]), None)
    assert row is not None, f"PID {p.pid} missing from explain --all:\n{out}"
    assert "mr-ghost" in row


def test_a_real_zombie_is_still_not_a_candidate(spawn: Callable[..., subprocess.Popen[bytes]]
                                                ) -> None:
    """The other side: a process that really exited (not waited for yet) has no live
    thread and nothing to free; it must stay out."""
    z = spawn(["sh", "-c", "exit 0"])
    deadline = time.monotonic() + 10
    while procfs.read_stat(z.pid).state != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert b"\nThreads:\t1\n" in Path(f"/proc/{z.pid}/status").read_bytes()
    assert not procfs.read_status(z.pid).has_mm
    assert procfs.read_cmdline(z.pid) == ()
    assert policy.snapshot(z.pid) is None
    assert z.pid not in {c.pid for c in policy.scan()[0]}


def test_a_process_whose_leader_exited_is_killed_and_reaped(
        ghost: Ghost, memcg_factory: Callable[[int], MemoryCgroup]) -> None:
    cg = memcg_factory(768 * MiB)
    p = ghost(cg, 512)
    _premise(p)
    before = cg.usage()
    assert before >= 512 * MiB
    with Victim.open(p.pid) as v:
        # what the pinned victim holds: the thread group's memory, not the leader's zero
        assert v.holdings.vm_rss >= 512 * MiB
        assert v.cmdline[1:] == (cg.procs_file, "512", "512", "0")
        assert policy.candidate_of(v) is not None  # re-ranked before the signal, kept
        report = kill_and_reap(v, KillOptions(exit_timeout=30))
    assert p.wait(timeout=30) == -signal.SIGKILL
    # ESRCH: the victim's own exit already dropped the mm (fine); never EINVAL here
    assert report.mrelease in (Mrelease.REAPED, Mrelease.EXITED_FIRST), report
    assert cg.usage() < 32 * MiB  # the memory really came back


def test_daemon_kills_a_leak_whose_leader_exited(
        ghost: Ghost, memcg_factory: Callable[[int], MemoryCgroup]) -> None:
    """The daemon at its kill level, the only unprotected process a growing leak whose
    main thread has exited: before, it logged "no process may be killed"."""
    cg = memcg_factory(2048 * MiB)
    avail = procfs.read_meminfo().mem_available
    kill = avail - 400 * MiB
    # every process but this test's mr-* is protected (see test_daemon._levels)
    daemon = DaemonProcess("--memory-warn", f"{(avail - 200 * MiB) // MiB}M",
                           "--memory-term", "off", "--memory-kill", f"{kill // MiB}M",
                           "--psi-warn", "off", "--psi-kill", "off", "--protect", "^(?!mr-)")
    try:
        p = ghost(cg, 1500, 32, 50)
        _premise(p)
        assert p.wait(timeout=60) == -signal.SIGKILL
        m = daemon.wait_for(rf"killed {p.pid} 'mr-ghost'.*process_mrelease (\S+)")
        assert m.group(1) in ("reaped", "exited-first")
        assert cg.usage() < 50 * MiB
        assert not any("no process may be killed" in line for line in daemon.lines)
    finally:
        assert daemon.stop() == 0


# --- regular expressions against names a user chose ------------------------------------

SLEEP = shutil.which("sleep") or "/bin/sleep"


def test_the_evil_rule_is_refused_by_config_and_run(tmp_path: Path) -> None:
    """`cmdline = "(a+)+$"` freezes a backtracking engine on `exec -a aaaa...ab`: refused
    at load, naming the file, the key and the value, and `run` does not start."""
    path = tmp_path / "evil.toml"
    path.write_text("[[rule]]\naction = \"protect\"\ncmdline = \"(a+)+$\"\n")
    path.chmod(0o644)
    for command in (["config"], ["run", "--dry-run"]):
        r = subprocess.run([sys.executable, "-m", "mreaper.cli", *command, "--config",
                            str(path)], capture_output=True, text=True, timeout=60, check=False,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 2, r
        assert f"{path}: rule[1].cmdline = '(a+)+$': a repeat of variable count inside " \
               "a repeat (+)" in r.stderr, r.stderr


def test_ranking_real_processes_with_hostile_names_completes(
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """Four real processes whose argv[0] (as `exec -a` sets it) is 128 KiB of "foofoo..."
    and a rule that is fine on honest text but quadratic on that with a backtracking
    engine: with `re`, about a minute per process.  The scan and ranking run in a child
    with a generous time-out (a hang there cannot freeze this process): they complete,
    and the hostile processes get no shelter from the protect rule."""
    hostile = "foo" * 43690  # one argument stays under MAX_ARG_STRLEN (128 KiB)
    procs = [spawn([hostile, "1000"], executable=SLEEP) for _ in range(4)]
    deadline = time.monotonic() + 10
    for p in procs:
        while not Path(f"/proc/{p.pid}/cmdline").read_bytes().startswith(
                hostile.encode() + b"\0"):
            assert time.monotonic() < deadline, "the hostile argv[0] never showed"
            time.sleep(0.005)
    code = textwrap.dedent(f"""
        import json, re, time
        from mreaper import policy
        t = time.monotonic()
        candidates, _ = policy.scan()
        rules = [policy.Rule(policy.Action.PROTECT, cmdline=re.compile("(foo)+$"),
                             label="keep")]
        ranked = policy.rank(candidates, rules)
        pids = {[p.pid for p in procs]!r}
        print(json.dumps({{"elapsed": time.monotonic() - t,
                           "hostile": [[r.candidate.pid, r.excluded, list(r.touched_by)]
                                       for r in ranked if r.candidate.pid in pids]}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                       timeout=90)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert sorted(pid for pid, _, _ in out["hostile"]) == sorted(p.pid for p in procs)
    for _pid, excluded, touched in out["hostile"]:
        assert excluded is None
        assert touched == ["keep: gave up matching this process's text, not applied"]
    print(f"scan + rank with 4 hostile processes: {out['elapsed']:.2f} s")


def test_a_huge_cmdline_is_read_only_up_to_its_bound(
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """A user can give a process MiBs of argv (16 arguments of 100 kB here, 1.6 MB);
    a scan of a thousand such must not hold GiBs: the cmdline is read up to
    procfs.CMDLINE_MAX bytes, the last argument read cut short."""
    arg = "x" * 100_000
    p = spawn([SLEEP, "1000", *([arg] * 16)])
    deadline = time.monotonic() + 10
    while len(Path(f"/proc/{p.pid}/cmdline").read_bytes()) < 16 * 100_000:
        assert time.monotonic() < deadline, "the big argv never showed"
        time.sleep(0.005)
    cmdline = procfs.read_cmdline(p.pid)
    assert cmdline[:2] == (SLEEP, "1000")
    assert sum(len(a) + 1 for a in cmdline) <= (64 << 10) + 1  # CMDLINE_MAX, 64 KiB
    assert len(cmdline) == 3 and 0 < len(cmdline[2]) < len(arg) and set(cmdline[2]) == {"x"}
    c = policy.snapshot(p.pid)
    assert c is not None and c.cmdline == cmdline
