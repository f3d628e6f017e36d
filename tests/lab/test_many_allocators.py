"""Many small allocators, in the lab VM, against mreaper at its built-in defaults (issue 15).

A parent forks WORKERS workers that each grow by 1 MiB every 0.1 s to 8 MiB (together
past what the 1 GiB VM has free), beside an idle bystander of 200 MiB, bigger than any
worker and the biggest single process of the VM.  The workload is bench/arena/pool.py,
run from the repository as the guest sees it (the host's root, read-only): ``storm``
(the workers keep what they grew) and ``respawn`` (the parent forks a new worker for
each one that dies).  mreaper runs with no setting but its event log.  The run ends when
the pool is gone (its parent dead, or every worker), or at a bound.

The kernel must never have to act (``/proc/vmstat`` ``oom_kill`` unchanged), the
bystander must live, and the pool must die: the daemon's event log shows a family kill,
or every worker is gone.  Nothing here is timed; the kills needed are printed, and the
guest's whole report (daemon log with times, MemAvailable trace, kernel OOM lines) is kept
in the test's tmp directory (result.json).

Not held today (hence the strict xfail below, which turns into a failure the day it
holds).  What the runs showed (1 GiB TCG VM, storm: MemAvailable 621 MiB before, to 0
within ~10 s):
* mreaper logged warn (MemAvailable 95 MiB <= 96 MiB) 5.3 s after go, and its next look
  found MemAvailable already 0: its first decision, 1.7 s later, came "from a 6190 ms
  old ranking" taken before the workers had grown, saw no growing family, and SIGKILLed
  the 200 MiB bystander (top score 811);
* then single workers, one decision each 0.1-1.3 s apart (rankings 0.5-6.8 s old, the
  dead bystander re-judged every time: "changed since it was ranked"), while the kernel
  OOM killer killed 18 workers in ~2.4 s;
* the pool was killed whole ("family tree of ... 'arena-pool'") only 1.5-77 s later, once
  a fresh ranking held the family (in one run the pool sat at the term level for 60 s,
  "pressure cleared before the kill" every ~10 s);
* respawn (80 workers to 10 MiB), 3 boots: the bystander died every time, killed by
  the kernel OOM killer (1 OOM kill) while mreaper's first decisions took single workers
  from rankings 5-8 s old, or by mreaper's own first decision (0 OOM kills: top score
  811, "from a 3689 ms old ranking"); the pool was killed whole 3-9 s after go.  One log
  line there reads "pressure cleared before the kill (term: MemAvailable 43 MiB <= 48
  MiB ...)": the level it names held.
* Not the scan's duty cap alone: with SCAN_DUTY raised from 0.05 to 1.0 (one ad-hoc
  boot) rankings were still 2-3.6 s old (a refresh of ~100 growing processes competes
  for 2 TCG CPUs) and the kernel killed 20 workers and the bystander.  That boot also
  showed the family chosen twice and given up: once "pressure cleared before the kill"
  (the message printed the reason of the earlier look; it now prints both), and twice
  because one member had no mm any more (exited, or killed by the kernel): the family was
  given up whole.  Such a member is now skipped and the rest dies
  (real/test_family_kills.py::test_a_member_that_exits_as_it_is_pinned_does_not_save_the_family);
  the stale ranking, the late warn and the bystander's death are not fixed.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from test_pods import out_of_reach  # tests/lab is on sys.path (pytest's rootdir import)

from lab import labvm

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.usefixtures("lab_ready")]

REPO = Path(__file__).resolve().parents[2]
MEM_MIB = 1024
#: (workers, step MiB, max MiB, interval s): 960 MiB if nobody acts, as the arena's storm
POOL = {"storm": (120, 1, 8, 0.1), "respawn": (80, 1, 10, 0.1)}

# Runs in the VM as root (busybox init).  Prints one JSON line with what it saw.
GUEST = textwrap.dedent(r'''
    import json, os, subprocess, sys, threading, time

    repo, mode = sys.argv[1], sys.argv[2]
    workers, step, top, interval = sys.argv[3:7]
    py = sys.executable
    open("/proc/self/oom_score_adj", "w").write("-1000")   # the driver is no candidate
    T0 = time.monotonic()
    res = {"mode": mode, "workers": int(workers)}

    def now():
        return round(time.monotonic() - T0, 2)

    def oom_kills():
        for line in open("/proc/vmstat"):
            k, v = line.split()
            if k == "oom_kill":
                return int(v)

    def avail_mib():
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024

    def adj_zero():   # children must not inherit the driver's -1000
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("0")

    def worker_pids():
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/comm") as f:
                        if f.read().startswith("arena-w"):
                            pids.append(int(d))
                except OSError:
                    pass
        return pids

    res["oom_kill_before"] = oom_kills()
    res["avail_boot_mib"] = avail_mib()
    os.makedirs("/run/mr-lab", exist_ok=True)
    cfg = "/run/mr-lab/mreaper.toml"
    with open(cfg, "w") as f:   # the built-in levels and ranking; only a kill log to read
        f.write('[events]\npath = "/run/mr-lab/events.jsonl"\n')
    env = dict(os.environ, PYTHONPATH=os.path.join(repo, "src"), PYTHONUNBUFFERED="1")
    daemon = subprocess.Popen([py, "-m", "mreaper", "run", "--config", cfg],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env)
    lines, running = [], threading.Event()

    def pump():
        for line in daemon.stderr:
            lines.append(f"{now():7.2f} {line.rstrip()}")
            sys.stderr.write("daemon| " + line)
            if "mreaper: running" in line:
                running.set()
    threading.Thread(target=pump, daemon=True).start()
    res["daemon_started"] = running.wait(120)
    res["t_daemon"] = now()

    bystander = subprocess.Popen(
        [py, "-S", "-c", "import sys, time\n"
         "b = b'\\x01' * (200 << 20)\n"
         "open('/proc/self/comm', 'w').write('bystander')\n"
         "print('ready', flush=True)\n"
         "time.sleep(100000)\n"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, preexec_fn=adj_zero)
    res["bystander_ready"] = bystander.stdout.readline().strip()
    pool = subprocess.Popen(
        [py, "-S", os.path.join(repo, "bench/arena/pool.py"), "arena-pool", mode,
         workers, step, top, interval],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=adj_zero)
    res["pool_ready"] = pool.stdout.readline().strip()
    time.sleep(1)
    res["avail_before_mib"] = avail_mib()
    res["t_go"] = now()
    pool.stdin.write("go\n")
    pool.stdin.flush()

    # until the pool is gone (its parent, or every worker once some were seen), or a bound
    deadline = time.monotonic() + 100
    seen_max, low, end = 0, res["avail_before_mib"], "bound"
    trace = res["trace"] = []   # (s since start, MemAvailable MiB, workers)
    while time.monotonic() < deadline:
        if pool.poll() is not None:
            end = "pool parent dead"
            break
        n = len(worker_pids())
        seen_max = max(seen_max, n)
        a = avail_mib()
        low = min(low, a)
        trace.append((now(), a, n))
        if seen_max >= 10 and n == 0:
            end = "every worker gone"
            break
        time.sleep(0.3)
    res["end"], res["t_end"] = end, now()
    time.sleep(3)   # any kill in flight lands in the log
    res["workers_seen_max"], res["avail_low_mib"] = seen_max, low
    res["workers_left"] = len(worker_pids())
    res["pool_exit"] = pool.poll()
    res["bystander_exit"] = bystander.poll()
    res["oom_kill_after"] = oom_kills()
    res["pids"] = {"pool": pool.pid, "bystander": bystander.pid}
    try:
        with open("/run/mr-lab/events.jsonl") as f:
            res["events"] = [json.loads(l) for l in f if l.strip()]
    except OSError as e:
        res["events"] = str(e)
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
    res["kernel_oom"] = [l for l in dmesg if "Out of memory" in l or "oom-kill" in l]
    for p in (pool, bystander):
        if p.poll() is None:
            p.kill()
    daemon.terminate()
    try:
        daemon.wait(20)
    except subprocess.TimeoutExpired:
        daemon.kill()
    time.sleep(0.5)
    res["daemon_log"] = lines
    print(json.dumps(res), flush=True)
''')


def boot(tmp_path_factory: pytest.TempPathFactory, mode: str) -> dict[str, Any]:
    work = tmp_path_factory.mktemp(f"many-{mode}")
    script = work / "guest.py"
    script.write_text(GUEST)
    python = sys.executable if (REPO / ".venv").exists() else shutil.which("python3")
    assert python is not None
    with out_of_reach():
        res = labvm.run([python, str(script), str(REPO), mode, *map(str, POOL[mode])],
                        mem_mib=MEM_MIB, timeout=400, cwd=str(REPO))
    try:
        r = res.last_json()
    except AssertionError as e:   # the VM or the guest failed: never an expected failure
        pytest.fail(str(e))
    r["vm_total_s"] = round(res.total_s, 1)
    (work / "result.json").write_text(json.dumps(r, indent=1))   # the whole story, to read
    print(f"\n{mode}: the guest's report is in {work / 'result.json'}")
    return r


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return boot(tmp_path_factory, "storm")


@pytest.fixture(scope="module")
def respawn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return boot(tmp_path_factory, "respawn")


def _show(r: dict[str, Any]) -> str:
    return json.dumps(r, indent=1)[-12000:]


def judge(r: dict[str, Any]) -> None:
    kills = [e for e in r["events"] if e["event"] == "kill"] if isinstance(
        r["events"], list) else []
    log = r["daemon_log"]
    # one "killing" line per decision; a family or cgroup killed whole says so once, and
    # each member is then reported (and logged as an event) on its own
    decisions = [x for x in log if "mreaper: killing " in x]
    whole = [x for x in log if "mreaper: killed family " in x or "mreaper: killed cgroup " in x]
    first = float(decisions[0].split()[0]) - r["t_go"] if decisions else None
    print(f"{r['mode']}: {len(decisions)} kill decisions ({len(whole)} families killed whole), "
          f"{len(kills)} processes killed; first decision "
          f"{'none' if first is None else f'{first:.1f} s'} after go; ended by {r['end']!r} "
          f"{r['t_end'] - r['t_go']:.1f} s after go; MemAvailable {r['avail_before_mib']} "
          f"-> low {r['avail_low_mib']} MiB; workers seen at most {r['workers_seen_max']}; "
          f"kernel oom_kill {r['oom_kill_before']} -> {r['oom_kill_after']}; "
          f"bystander exit {r['bystander_exit']}; VM {r['vm_total_s']} s")
    for line in decisions + whole:
        print("  " + line[:400])
    for line in r["kernel_oom"][:6]:
        print("  kernel: " + line[:200])
    # the set-up itself: a failure here is never the expected one (pytest.fail, not assert)
    if not (r["daemon_started"] and r["bystander_ready"] == "ready"
            and r["pool_ready"] == "ready" and r["workers_seen_max"] >= 10):
        pytest.fail("the set-up failed (daemon, bystander, pool, or no storm):\n" + _show(r))
    # the kernel never had to act
    assert r["oom_kill_after"] == r["oom_kill_before"], _show(r)
    assert not r["kernel_oom"], _show(r)
    # the bystander, bigger than any worker, lives
    assert r["bystander_exit"] is None, _show(r)
    assert not any(e.get("pid") == r["pids"]["bystander"] for e in kills), _show(r)
    # the pool died: killed whole as a family, or every worker gone
    assert r["end"] != "bound", _show(r)
    assert whole or r["workers_left"] == 0, _show(r)


#: Measured (10 boots, 2026-12-02): the daemon loses the race at its defaults; see the
#: module's doc.  Strict: the day it holds, XPASS fails and this mark must go.
LOSES = pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="issue 15 not held at defaults: kernel OOM kills 18-23 (storm), 0-1 (respawn), "
           "the bystander killed in every run; the first decisions come from rankings "
           "4-9 s old, taken before the workers grew: the bystander or single workers; "
           "the family only later")


@LOSES
def test_storm_at_defaults_no_kernel_oom_bystander_lives(storm: dict[str, Any]) -> None:
    judge(storm)


@LOSES
def test_respawning_pool_at_defaults_no_kernel_oom_bystander_lives(
        respawn: dict[str, Any]) -> None:
    judge(respawn)
    # a pool that respawns its workers is over only when its parent is dead
    assert respawn["pool_exit"] is not None, _show(respawn)
