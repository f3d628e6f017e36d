"""mreaper against real memory pressure, in the lab VM (1 GiB, 2 vCPUs, no swap).

Each batch boots ONE VM that runs tests/lab/guest_scenarios.py: the in-guest driver
starts `mreaper run` per scenario, makes the pressure and prints one JSON line per
scenario (the daemon's log and kill lines, what died and how, the lowest MemAvailable,
the kernel's OOM-kill counter and the kernel log lines of that scenario), then the
whole kernel log.  The assertions are here, on that JSON and on that kernel log:

  a) fast leak (64 MiB steps / 20 ms) and b) slow leak (8 MiB / 50 ms), daemon on its
     built-in defaults: mreaper SIGKILLs the leak, the kernel OOM killer never fires;
  c) 8 mid-size hogs + a protected bigger one, then a small push past the kill level:
     exactly the policy's first choice dies (as `mreaper explain` and oom_score said);
  d) a leak in a cgroup with memory.max 256M watched by a [[scope]]: killed before the
     memcg OOM killer fires; a bigger hog outside the scope is never touched;
  e) a victim stuck in D state (a FUSE read its server never answers): its memory is
     back (memcg charge) by process_mrelease while it is still stuck; and the next kill,
     while it is still stuck, goes to another process, promptly;
  f) the daemon's own cgroup at a memory.high just under its mlocked memory (so the
     kernel throttles it) with an idle bystander, then a leak elsewhere: it kills
     nothing while memory is plenty, then the leak and only the leak.

Under TCG everything but memory runs ~10x slower than on the host, so waits are long
and bounded; the two VMs take about 3 minutes in all.  A VM that cannot boot fails
these tests (tests/lab/conftest.py skips only where qemu is not installable at all).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lab import labvm

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.usefixtures("lab_ready")]

REPO = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).with_name("guest_scenarios.py")
MiB = 1 << 20
VM_MIB = 1024
VM_TIMEOUT = 420.0  # seconds per batch, boot included (a batch takes ~60-110 s)

#: One VM per batch: the global-pressure scenarios, and the cgroup / stuck-victim ones.
BATCHES: dict[str, tuple[str, ...]] = {
    "machine": ("fast_leak", "slow_leak", "ranking", "own_pressure"),
    "cgroup": ("scope_leak", "stuck_victim", "stuck_then_next"),
}

#: Kernel log lines that mean the kernel's own OOM killer ran (global or memcg).
KERNEL_OOM = re.compile(r"Out of memory|oom-kill:|Killed process|Memory cgroup out of memory"
                        r"|invoked oom-killer")

Scenario = dict[str, Any]


@dataclass
class Batch:
    """One VM run: its result, the scenarios' JSON and the whole kernel log."""

    name: str
    res: labvm.LabResult
    scenarios: dict[str, Scenario] = field(default_factory=dict)
    kernel_log: list[str] | None = None
    saved: Path | None = None

    def diagnostics(self) -> str:
        """Exit status, timings, the driver's stderr and the console, both tails."""
        return (f"batch {self.name}: exit {self.res.returncode}, boot {self.res.boot_s} s, "
                f"total {self.res.total_s:.0f} s; JSON in {self.saved}\n"
                f"--- driver stderr (tail):\n{self.res.stderr.decode(errors='replace')[-4000:]}"
                f"\n--- console (tail):\n{self.res.console_tail(30)}")

    def get(self, name: str) -> Scenario:
        """The scenario's JSON; fails (never skips) when the VM or the driver broke."""
        assert name in self.scenarios, f"no result for {name}\n{self.diagnostics()}"
        sc = self.scenarios[name]
        assert "error" not in sc, f"{name} broke in the VM:\n{sc['error']}\n{_log(sc)}"
        return sc


@contextlib.contextmanager
def _qemu_out_of_reach() -> Iterator[None]:
    """oom_score_adj -1000 while the VM runs (qemu inherits it), restored after.  qemu
    is the biggest process on the host (~1.25 GB) and other tests run mreaper daemons
    and hogs on this host at the same time: none of them, nor the host's OOM killer,
    may take the VM down mid-batch.  Its memory is bounded by -m anyway."""
    path = "/proc/self/oom_score_adj"
    try:
        old = Path(path).read_text().strip()
        Path(path).write_text("-1000")
    except OSError:  # not root: the VM runs unprotected
        yield
        return
    try:
        yield
    finally:
        Path(path).write_text(old)


def _run_batch(name: str, out: Path) -> Batch:
    """Boot the batch's VM, keep its JSON in `out`, parse it."""
    with _qemu_out_of_reach():
        res = labvm.run([sys.executable, str(GUEST), *BATCHES[name]], mem_mib=VM_MIB,
                        timeout=VM_TIMEOUT, modules=["fuse"], cwd=REPO, log=None)
    batch = Batch(name, res, saved=out / f"{name}.jsonl")
    out.joinpath(f"{name}.jsonl").write_bytes(res.stdout)
    for line in res.stdout.decode(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record["scenario"] == "_kernel_log":
            batch.kernel_log = record["kmsg"]
        else:
            batch.scenarios[record["scenario"]] = record
    return batch


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Batch]:
    """Batch 1: fast leak, slow leak, ranking, the daemon under its own memory.high."""
    yield _run_batch("machine", tmp_path_factory.mktemp("lab-integration"))


@pytest.fixture(scope="module")
def cgroup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Batch]:
    """Batch 2: the [[scope]] leak and the stuck victim (twice)."""
    yield _run_batch("cgroup", tmp_path_factory.mktemp("lab-integration"))


# --- helpers ------------------------------------------------------------------------------


def _log(sc: Scenario) -> str:
    """The daemon's log, for assertion messages."""
    return "daemon log:\n" + "\n".join(sc.get("daemon_log", []))


def _mib(n: int | None) -> str:
    """Bytes as MiB, for messages."""
    return "?" if n is None else f"{n / MiB:.1f} MiB"


def _kills_of(sc: Scenario, pid: int) -> tuple[list[Scenario], list[Scenario]]:
    """The daemon's "killing" decisions and "killed" reports about `pid`."""
    return ([k for k in sc["killing"] if k["pid"] == pid],
            [k for k in sc["killed"] if k["pid"] == pid])


def _assert_no_kernel_oom(sc: Scenario) -> None:
    """The kernel's OOM killer did not run during the scenario: its counter
    (/proc/vmstat oom_kill) did not move and the kernel log has no OOM report."""
    oom_lines = [line for line in sc["kmsg"] if KERNEL_OOM.search(line)]
    assert sc["oom_kill_delta"] == 0 and not oom_lines, (
        f"the kernel OOM killer fired {sc['oom_kill_delta']} times in {sc['scenario']}:\n"
        + "\n".join(oom_lines[:20]) + "\n" + _log(sc))


def _assert_one_clean_kill(sc: Scenario, pid: int) -> Scenario:
    """`pid` was chosen once, SIGKILLed (last signal) and reaped; its report returned."""
    killing, killed = _kills_of(sc, pid)
    assert len(killing) == 1, f"chosen {len(killing)} times\n{_log(sc)}"
    assert len(killed) == 1, f"{len(killed)} kill reports (unparsed: " \
                             f"{sc['killed_unparsed']})\n{_log(sc)}"
    report = killed[0]
    assert report["signals"][-1] == "SIGKILL", report
    assert report["mrelease"] in ("reaped", "exited-first"), report
    assert report["kill_to_free_ms"] is not None, report
    return report


def _assert_leak_killed(sc: Scenario, *, late: bool = True) -> Scenario:
    """Scenarios a, b, f: the leak died of mreaper's SIGKILL, and nothing else was
    killed.  `late`: and not before the leak had most of the machine."""
    leak = sc["leak"]
    assert leak["rc"] == -signal.SIGKILL, f"leak exit {leak['rc']}\n{_log(sc)}"
    assert [k["pid"] for k in sc["killing"]] == [leak["pid"]], f"other kills\n{_log(sc)}"
    report = _assert_one_clean_kill(sc, leak["pid"])
    # It ignores SIGTERM: the term level's SIGTERM is escalated when the kill level is
    # reached (or PSI says so).
    assert report["why"].split(":")[0] in ("term", "kill"), report
    assert report["freed"] is not None and report["freed"] > 0.6 * (report["rss"] or 0), report
    assert leak["charge_after"] is not None and leak["charge_after"] < 16 * MiB, leak
    if late:
        assert sc["peak_rss"][str(leak["pid"])] > 0.6 * sc["mem_total"], sc["peak_rss"]
    _assert_no_kernel_oom(sc)
    assert sc["daemon_rc"] == 0, _log(sc)
    return report


# --- a, b: leaks against the defaults -------------------------------------------------------


@pytest.mark.parametrize("name", ["fast_leak", "slow_leak"])
def test_leak_is_sigkilled_by_mreaper_before_the_kernel_oom_killer(machine: Batch,
                                                                   name: str) -> None:
    """a, b) On the built-in defaults, the leak dies of mreaper's SIGKILL, late (it had
    most of the machine) and before the kernel's OOM killer could act."""
    sc = machine.get(name)
    assert sc["daemon_started"], _log(sc)
    report = _assert_leak_killed(sc)
    # The numbers a reader wants, in the assertion message should anything regress.
    assert sc["min_mem_available"] > 0, (sc["min_mem_available"], report)


# --- c: ranking ------------------------------------------------------------------------------


def test_ranking_exactly_the_first_choice_dies(machine: Batch) -> None:
    """c) The push past the kill level kills exactly the process `mreaper explain` and
    the kernel's oom_score ranked first; the protected, bigger one survives."""
    sc = machine.get("ranking")
    hogs = sc["hogs"]
    first = hogs["mr-mid-7"]["pid"]  # 100 MiB among 60 MiB ones; mr-keep is protected
    assert sc["first_by_oom_score"] == first, sc["oom_scores"]
    assert sc["first_by_explain"] == first, sc["explain"]
    assert re.search(rf"^-\s+{hogs['mr-keep']['pid']}\s+mr-keep\s.*excluded: protected by "
                     r"rule 1", sc["explain"], re.MULTILINE), sc["explain"]
    report = _assert_one_clean_kill(sc, first)
    assert report["signals"] == ["SIGKILL"], report  # term is off: the kill level itself
    assert report["why"].startswith("kill: "), report
    assert [k["pid"] for k in sc["killing"]] == [first], _log(sc)
    assert sc["dead"] == {"mr-mid-7": -signal.SIGKILL}, (sc["dead"], _log(sc))
    assert sc["push"]["written"] < sc["push"]["limit"], sc["push"]  # it stopped at the kill
    _assert_no_kernel_oom(sc)


# --- d: a [[scope]] -----------------------------------------------------------------------------


def test_scope_kills_the_leak_before_the_memcg_oom_killer(cgroup: Batch) -> None:
    """d) The [[scope]] kills the leak at its headroom level: the memcg OOM killer never
    runs in it, and the bigger hog in another cgroup is never touched."""
    sc = cgroup.get("scope_leak")
    assert sc["scope_line"] and "headroom: yes (limit 256 MiB)" in sc["scope_line"], sc
    leak, big = sc["leak"], sc["big"]
    assert leak["rc"] == -signal.SIGKILL, f"leak exit {leak['rc']}\n{_log(sc)}"
    report = _assert_one_clean_kill(sc, leak["pid"])
    assert report["scope"] == "lab" and report["signals"] == ["SIGKILL"], report
    assert report["why"].startswith("lab kill: "), report
    assert report["freed_source"] == "memcg /sys/fs/cgroup/lab-scope/memory.current", report
    assert [(k["scope"], k["pid"]) for k in sc["killing"]] == [("lab", leak["pid"])], _log(sc)
    # The memcg OOM killer never ran in the scope, and the scope never hit memory.max.
    assert sc["scope_events"]["oom_kill"] == 0, sc["scope_events"]
    assert sc["scope_events"]["oom"] == 0, sc["scope_events"]
    assert sc["scope_peak"] < sc["scope_max"], (sc["scope_peak"], sc["scope_max"])
    # The bigger hog outside the scope was never touched.
    assert big["alive"] and big["rss"] > 350 * MiB, big
    assert not any("mr-big" in line for line in sc["daemon_log"]), _log(sc)
    assert sc["other_events"]["oom_kill"] == 0, sc["other_events"]
    _assert_no_kernel_oom(sc)


# --- e: a victim stuck in D state --------------------------------------------------------------


def test_stuck_victim_memory_is_back_while_it_is_stuck(cgroup: Batch) -> None:
    """e) process_mrelease gives the stuck victim's memory back (its cgroup's charge)
    while it is still in D state, and the report says it has not exited."""
    sc = cgroup.get("stuck_victim")
    stuck = sc["stuck"]
    assert stuck["server"] == "mounted" and stuck["server_saw"].startswith("read "), stuck
    assert stuck["state_before_kill"] == "D", stuck  # killable wait of a FUSE request
    assert stuck["killing_seen"], _log(sc)
    first = [k for k in sc["killed"] if k["pid"] == stuck["victim_pid"]]
    assert first, _log(sc)
    report = first[0]
    assert report["signals"] == ["SIGKILL"] and report["mrelease"] == "reaped", report
    assert "still not exited" in report["notes"] and report["kill_to_exit_ms"] is None, report
    assert report["freed"] > 0.8 * stuck["charge_before"], (report, stuck)
    # Seen by the driver: the charge fell to a tenth while the victim was in D state,
    # and it was still there, stuck, when the daemon reported the kill.
    assert stuck["state_when_charge_back"] == "D", stuck
    assert stuck["charge_when_back"] < stuck["charge_before"] // 10, stuck
    assert stuck["alive_at_report"] and stuck["state_at_report"] == "D", stuck
    assert stuck["charge_at_report"] < 8 * MiB, stuck
    assert stuck["rc_after_release"] == -signal.SIGKILL, stuck  # it exits once answered
    _assert_no_kernel_oom(sc)


def test_stuck_victim_is_not_chosen_again(cgroup: Batch) -> None:
    """Once killed and reaped, the stuck victim holds nothing: choosing it again frees
    nothing and waits its exit timeout again.  The next kill must be another process."""
    sc = cgroup.get("stuck_victim")
    pid = sc["stuck"]["victim_pid"]
    killing, _ = _kills_of(sc, pid)
    assert len(killing) == 1, (
        f"the stuck, already reaped victim {pid} was chosen {len(killing)} times "
        f"(rss then: {[_mib(k['rss']) for k in killing]}) while mr-next "
        f"({sc['next']['pid']}) waited\n{_log(sc)}")
    assert sc["next"]["killed_while_stuck"], _log(sc)
    _assert_no_kernel_oom(sc)


def test_stuck_victim_does_not_block_the_next_kill(cgroup: Batch) -> None:
    """With no rule, the stuck victim is not chosen again; but while its kill waits for
    an exit that cannot come, memory is at the kill level again: mr-next must be
    killed at once (the daemon decides in tens of ms), not after the exit timeout."""
    sc = cgroup.get("stuck_then_next")
    nxt = sc["next"]
    assert sc["stuck"]["killing_seen"], _log(sc)
    assert sc["stuck"]["state_when_charge_back"] == "D", sc["stuck"]
    assert sc["push2"]["crossed_at"] is not None, sc["push2"]
    assert nxt["killed_while_stuck"], f"mr-next never killed while the victim was stuck\n" \
                                      f"{_log(sc)}"
    assert nxt["killing_after_crossed_s"] < 1.0, (
        f"mr-next was chosen {nxt['killing_after_crossed_s']:.2f} s after MemAvailable fell "
        f"to the kill level ({nxt['killing_after_first_killing_s']:.2f} s after the stuck "
        f"victim's kill): the daemon waited for the stuck victim's exit\n{_log(sc)}")
    assert len(_kills_of(sc, sc["stuck"]["victim_pid"])[0]) == 1, _log(sc)
    assert nxt["rc"] == -signal.SIGKILL, nxt
    _assert_no_kernel_oom(sc)


# --- f: the daemon under its own memory pressure ------------------------------------------------


def _squeezed(machine: Batch) -> Scenario:
    """Scenario f, once the squeeze is shown to have been real."""
    sc = machine.get("own_pressure")
    own = sc["own"]
    # The squeeze was real: the daemon's cgroup went over memory.high once it was set
    # (its pages are mlocked: reclaim cannot take them, the kernel throttles it
    # instead), and stayed over it, so that any page it touched was throttled.
    assert own["events_after"]["high"] > own["events_unsqueezed"]["high"], own
    assert own["current_after_idle"] > own["high"], own
    assert own["current_end"] > own["high"], own
    assert own["stat_after"]["unevictable"] > 0.8 * own["stat_after"]["anon"], own
    return sc


def test_daemon_squeezed_by_its_own_memory_high_kills_nothing_while_memory_is_plenty(
        machine: Batch) -> None:
    """Squeezed, with no leak yet and most of the memory free: the stall is the
    daemon's own throttling, there is nothing to kill for."""
    sc = _squeezed(machine)
    own = sc["own"]
    kills = [line for line in own["idle"] if re.search(r"\bkill(ing|ed) \d+ ", line)]
    assert not kills, (
        f"with MemAvailable at {_mib(own['mem_available_after_idle'])} the squeezed daemon "
        f"killed: {kills[:3]} ({len(kills)} kill lines)\nits cgroup's memory.pressure: "
        f"{own['pressure_after_idle']}\nthe machine's: {own['machine_pressure_after_idle']}"
        f"\n{_log(sc)}")


def test_daemon_squeezed_by_its_own_memory_high_still_kills_the_leak_and_only_it(
        machine: Batch) -> None:
    """Then a leak elsewhere: the squeezed daemon kills it before the kernel does, and
    nothing else (the bystander, 16 MiB and idle, must survive)."""
    sc = _squeezed(machine)
    _assert_no_kernel_oom(sc)
    assert sc["own"]["bystander_rc"] is None, f"the idle bystander was killed\n{_log(sc)}"
    _assert_leak_killed(sc, late=False)
    assert sc["own"]["daemon_alive"], _log(sc)


# --- the whole kernel log, and the numbers --------------------------------------------------------


def summary(batch: Batch) -> str:
    """Per scenario: each decision (detection to decision) and kill (mrelease outcome,
    kill-to-free, kill-to-exit, freed), the lowest MemAvailable, kernel OOM kills."""
    lines = [f"batch {batch.name}: boot {batch.res.boot_s or 0:.1f} s, "
             f"total {batch.res.total_s:.0f} s"]
    for name, sc in batch.scenarios.items():
        lines.append(f"{name}: {sc.get('duration_s', 0):.0f} s, daemon up in "
                     f"{sc.get('daemon_start_s') or 0:.1f} s, lowest MemAvailable "
                     f"{_mib(sc.get('min_mem_available'))}, kernel OOM kills "
                     f"{sc.get('oom_kill_delta')}" + (", ERROR" if "error" in sc else ""))
        for k in sc.get("killing", []):
            lines.append(f"  decided {k['pid']} {k['name']} in {k['decided_ms']} ms "
                         f"[{k['why']}]")
        for k in sc.get("killed", []):
            lines.append(f"  killed {k['pid']} {k['name']} {'+'.join(k['signals'])}: "
                         f"mrelease {k['mrelease']} in {k['mrelease_ms']} ms, memory back "
                         f"{k['kill_to_free_ms']} ms, exit {k['kill_to_exit_ms']} ms, freed "
                         f"{_mib(k['freed'])}")
    return "\n".join(lines)




@pytest.mark.parametrize("which", list(BATCHES))
def test_vm_ran_every_scenario_and_the_kernel_never_oom_killed(request: pytest.FixtureRequest,
                                                                which: str) -> None:
    """Every scenario ran in the batch's VM, which ended normally, and the whole
    kernel log (and console) has no OOM kill.  Prints the numbers of the batch."""
    batch: Batch = request.getfixturevalue(which)
    print(summary(batch))  # shown with -rP, and on failure
    assert batch.res.returncode == 0, batch.diagnostics()
    assert sorted(batch.scenarios) == sorted(BATCHES[which]), batch.diagnostics()
    assert batch.kernel_log is not None, batch.diagnostics()
    oom = [line for line in batch.kernel_log if KERNEL_OOM.search(line)]
    assert not oom, "\n".join(oom[:30])
    assert "Out of memory" not in batch.res.console, batch.res.console_tail(40)
