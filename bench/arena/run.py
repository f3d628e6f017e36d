"""The arena: the same memory workloads against each low-memory killer, one at a time,
each in a fresh 1 GiB lab VM (host side).

    .venv/bin/python bench/arena/run.py                    # 3 reps, every contender/workload
    .venv/bin/python bench/arena/run.py --quick            # 1 rep, fast_leak + many
    .venv/bin/python bench/arena/run.py --reps 5 --contenders mreaper,earlyoom \
        --workloads fast_leak,slow_leak

Contenders (``contenders.py`` has their exact configurations): mreaper (this tree, at
``HEAD`` by default: ``--mreaper-tree worktree`` runs the working tree), earlyoom,
nohang, systemd-oomd (systemd as PID 1 in the VM), oomd, and the kernel alone.
Workloads (``guest.py``): ``fast_leak`` (64 MiB steps 20 ms apart), ``slow_leak``
(8 MiB every 50 ms), ``many`` (many mid-size idle processes and a bigger one, then a
push: exactly one should die, the largest), ``cgroup_leak`` (a leak in a cgroup with
memory.max 256 MiB beside a bigger idle bystander).

One VM per (contender, repetition) runs every selected workload in turn, each with a
freshly started contender, dropped caches and new cgroups (the VM is fresh per
contender; workloads are independent within it).  Repetitions are the outer loop and
the contender order rotates between them, so that slow drift of this shared host's load
hits every contender alike.

The peers must be installed on the host (the VM sees the host's root): the script says
what is missing and how to install it, and skips those contenders (``--strict``:
refuse instead).  It is a benchmark, not a test: ``make test`` does not run it.

Output: ``bench/results/<YYYY-MM-DD>-<hostname>/arena.{json,md}`` and one
``arena-<workload>.png`` per workload (MemAvailable over time, first repetition, one line
per contender, the kill marked); ``--quick`` writes under ``bench/results/tmp/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import contenders as cf  # noqa: E402
from guest import WORKLOADS  # noqa: E402

from lab import labvm  # noqa: E402

Json = dict[str, Any]
VM_MIB = 1024
VM_TIMEOUT_S = 900.0
#: A VM that stops without its results (e.g. QEMU killed by a host low-memory killer:
#: this host is shared) is run again, this many times in all.
ATTEMPTS = 3
QUICK_WORKLOADS = ("fast_leak", "many")
PEERS = tuple(c for c in cf.CONTENDERS if c != "mreaper")
WORKLOAD_TEXT = {
    "fast_leak": "fast leak: 64 MiB steps, 20 ms apart, in its own cgroup, no limit",
    "slow_leak": "slow leak: 8 MiB every 50 ms, in its own cgroup, no limit",
    "many": ("many mid-size idle processes (up to 48 MiB each, in cgroups of their own) "
             "and one of 320 MiB bring MemAvailable to the level + 96 MiB; then a push (a "
             "process growing 8 MiB every 50 ms, up to 176 MiB past the level, which is a "
             "real OOM, and always smaller than the big one); exactly one should die: "
             "arena-big"),
    "storm": ("a fork storm: a parent forks 120 workers at once, each growing 1 MiB every "
              "100 ms to 8 MiB and keeping it (960 MiB in all, in a 1 GiB VM), beside an "
              "idle 200 MiB bystander; the pool or its workers should die, not the bystander"),
    "respawn_pool": ("a worker pool: 80 workers growing 1 MiB every 100 ms to 10 MiB, and the "
                     "parent forks a new one for each that dies, beside an idle 200 MiB "
                     "bystander; the pool should die (at its parent), not the bystander"),
    "build": ("a parallel build: 100 workers at a time, 300 in all, each growing 1 MiB every "
              "100 ms to 12 MiB, holding it 3 s and exiting, beside an idle 200 MiB bystander; the "
              "build should die, not the bystander"),
    "cgroup_leak": (f"a leak (8 MiB every 50 ms) in a cgroup with memory.max "
                    f"{cf.LIMIT_MIB} MiB and memory.swap.max 0, beside an idle "
                    "300 MiB bystander in a cgroup of its own; the level is 5 % headroom "
                    "left under memory.max"),
}


def say(msg: str) -> None:
    print(f"arena: {msg}", file=sys.stderr, flush=True)


# --- preparation ------------------------------------------------------------------------


def check_contenders(wanted: Sequence[str], strict: bool) -> list[str]:
    """The contenders that can run here; says what is missing and how to install it."""
    usable = []
    for name in wanted:
        miss = cf.missing(name)
        if not miss:
            usable.append(name)
            continue
        paths = ", ".join(r.path for r in miss)
        say(f"{name}: missing {paths}; install with: {cf.install_hint(miss)}")
    if strict and len(usable) != len(wanted):
        raise SystemExit("arena: --strict: some contenders are not installed (see above)")
    return usable


def check_lab() -> None:
    try:
        labvm.prepare(say)
    except labvm.LabError as e:
        raise SystemExit(f"arena: the lab VM cannot start: {e} (scripts/install-deps installs "
                         "qemu-system-x86 and busybox-static)") from e
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say("matplotlib is missing: no plots (pip install -e '.[bench]')")


def protect_vms() -> None:
    """oom_score_adj -1000 for this process, inherited by every QEMU it starts: a VM
    (~1.2 GB RSS) is the largest process here, and other engineers' low-memory killers
    on this shared host (benchmarks, tests) would otherwise pick it and break a run."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as e:
        say(f"cannot protect the VMs from host low-memory killers (oom_score_adj -1000: "
            f"{e.strerror}); a VM killed from outside is run again")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=False).stdout.strip()


def mreaper_source(tree: str, tmp: Path) -> tuple[str, Json]:
    """PYTHONPATH for mreaper in the VM: an export of HEAD's src/, or the working tree."""
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "src"))
    info: Json = {"tree": tree, "commit": head, "src_dirty_in_worktree": dirty}
    if tree == "worktree":
        return str(REPO / "src"), info
    archive = subprocess.run(["git", "archive", "HEAD", "src"], cwd=REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    return str(tmp / "src"), info


# --- running --------------------------------------------------------------------------------


def run_vm(contender: str, workloads: Sequence[str], src: str, rep: int,
           timeout: float) -> list[Json]:
    argv = [sys.executable, str(HERE / "guest.py"), "--contender", contender,
            "--workloads", ",".join(workloads), "--mreaper-src", src, "--tag", str(rep)]
    load0 = os.getloadavg()
    t = time.monotonic()
    res = labvm.run(argv, mem_mib=VM_MIB, timeout=timeout, systemd=contender == "systemd-oomd",
                    cwd=str(REPO), log=None)
    wall = time.monotonic() - t
    load1 = os.getloadavg()
    out = res.stdout.decode(errors="replace")
    results = []
    for line in out.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                results.append(json.loads(line))
    got = {r.get("workload") for r in results}
    for w in workloads:
        if w not in got:
            results.append({"workload": w, "contender": contender,
                            "error": f"no result (VM exit {res.returncode}); stderr tail:\n"
                            + res.stderr.decode(errors="replace")[-2000:]
                            + "\nconsole tail:\n" + res.console_tail(15)})
    for r in results:
        r.update(rep=rep, vm={"returncode": res.returncode, "wall_s": round(wall, 1),
                              "boot_s": None if res.boot_s is None else round(res.boot_s, 2),
                              "accel": res.accel, "host_load": [round(load0[0], 2),
                                                                round(load1[0], 2)]})
    return results


def rotated(items: Sequence[str], k: int) -> list[str]:
    k %= max(1, len(items))
    return list(items[k:]) + list(items[:k])


# --- summaries ------------------------------------------------------------------------------


def stall_of(r: Json) -> float | None:
    """The stall that matters: the machine's, or the arena cgroups' for cgroup_leak."""
    key = "arena_stall_ms" if r["workload"] == "cgroup_leak" else "stall_ms"
    value = r.get(key)
    return None if value is None else float(value)


def low_of(r: Json) -> float | None:
    key = "min_headroom" if r["workload"] == "cgroup_leak" else "min_mem_available"
    value = r.get(key)
    return None if value is None else value / (1 << 20)


def some_of(r: Json) -> float | None:
    value = r.get("some_stall_ms")
    return None if value is None else float(value)


METRICS = {
    "level_to_kill_s": lambda r: r.get("level_to_kill_s"),
    "kill_to_back_s": lambda r: r.get("kill_to_back_s"),
    "level_to_back_s": lambda r: r.get("level_to_back_s"),
    "stall_ms": stall_of,
    "some_stall_ms": some_of,
    "low_mib": low_of,
}


def spread(values: Iterable[float | None]) -> Json:
    given = list(values)
    vals = [v for v in given if v is not None]
    n_none = len(given) - len(vals)
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "missing": n_none}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals), "missing": n_none}


def summarise(results: list[Json], contenders: Sequence[str],
              workloads: Sequence[str]) -> dict[str, dict[str, Json]]:
    cells: dict[str, dict[str, Json]] = {}
    for w in workloads:
        for c in contenders:
            rs = [r for r in results if r["workload"] == w and r["contender"] == c]
            ok = [r for r in rs if "error" not in r]
            cell: Json = {"runs": len(rs), "errors": len(rs) - len(ok)}
            for name, fn in METRICS.items():
                cell[name] = spread([fn(r) for r in ok])
            cell["kernel_oom_kills"] = sum(int(r.get("kernel_oom_kills", 0)) for r in ok)
            cell["wrong_victims"] = sum(int(r.get("wrong_victims", 0)) for r in ok)
            cell["bystanders_killed"] = sum(len(r.get("bystanders_killed") or []) for r in ok)
            cell["contender_kills"] = [int(r.get("contender_kills", 0)) for r in ok]
            cell["no_kill_runs"] = sum(1 for r in ok if not r.get("kills"))
            cell["timed_out_runs"] = sum(1 for r in ok if r.get("timed_out"))
            cell["killed_before_level"] = sum(1 for r in ok if r.get("killed_before_level"))
            cell["victims"] = [victim_text(r) for r in ok]
            cells.setdefault(w, {})[c] = cell
    return cells


def victim_text(r: Json) -> str:
    kills = r.get("kills") or []
    if not kills:
        return "none (timed out)" if r.get("timed_out") else "none"
    if len(kills) > 4:  # many small allocators: count them
        oom = sum(1 for k in kills if k["by"] == "kernel-oom")
        wrong = [k["comm"] for k in kills if not k["expected"]]
        return (f"{len(kills) - oom} by {r['contender']}, {oom} by kernel OOM"
                + (f" [WRONG: {', '.join(wrong)}]" if wrong else ""))
    parts = []
    for k in kills:
        by = "kernel OOM" if k["by"] == "kernel-oom" else r["contender"]
        parts.append(f"{k['comm']} by {by}" + ("" if k["expected"] else " [WRONG]"))
    return "; ".join(parts)


def verdicts(cells: dict[str, dict[str, Json]], contenders: Sequence[str]) -> list[Json]:
    """The targets, judged on medians; a missing value (memory never back) loses."""
    out: list[Json] = []
    if "mreaper" not in contenders:
        return out
    peers = [c for c in contenders if c != "mreaper"]
    m = {w: cells[w]["mreaper"] for w in cells}
    ooms = sum(c["kernel_oom_kills"] for c in m.values())
    out.append({"target": "mreaper: zero kernel OOM kills, every workload and rep",
                "met": ooms == 0, "detail": f"{ooms} kernel OOM kills"})
    wrong = sum(c["wrong_victims"] for c in m.values())
    nokill = sum(c["no_kill_runs"] for c in m.values())
    out.append({"target": "mreaper: zero wrong victims, every workload and rep",
                "met": wrong == 0 and nokill == 0,
                "detail": f"{wrong} wrong victims, {nokill} runs without a kill"})
    for w, row in cells.items():
        for metric, label in (("stall_ms", "less memory stall"),
                              ("level_to_back_s", "shorter level-to-memory-back")):
            mine = row["mreaper"][metric]["median"]
            lost, ties = [], []
            for p in peers:
                theirs = row[p][metric]["median"]
                if mine is None:
                    lost.append(p)
                elif theirs is None:
                    continue
                elif theirs < mine:
                    lost.append(p)
                elif theirs == mine:
                    ties.append(p)
            met = not lost and not ties
            detail = "beats every peer" if met else (
                ("loses to " + ", ".join(lost) if lost else "")
                + ("; " if lost and ties else "")
                + ("ties with " + ", ".join(ties) if ties else ""))
            out.append({"target": f"{w}: {label} than every peer (median)", "met": met,
                        "detail": detail})
    return out


# --- report -----------------------------------------------------------------------------------


def fmt(cell: Json, key: str, scale: float = 1.0, digits: int = 2) -> str:
    s = cell[key]
    if s["median"] is None:
        return "—" + (f" ({s['missing']}x n/a)" if s.get("missing") else "")
    med, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    text = f"{med:.{digits}f}"
    if s["n"] > 1:
        text += f" ({lo:.{digits}f}-{hi:.{digits}f})"
    if s.get("missing"):
        text += f" +{s['missing']}x n/a"
    return text


def markdown(doc: Json) -> str:
    meta, cells = doc["meta"], doc["summary"]["cells"]
    lines = [
        "# Arena: mreaper against its peers under real memory pressure",
        "",
        f"Run {meta['date']} on `{meta['host']}` ({meta['host_cpus']} CPUs): "
        f"{meta['reps']} repetition(s), VM {VM_MIB} MiB, {meta['vm_cpus']} vCPUs, kernel "
        f"{meta.get('guest_kernel', '?')} under {meta.get('accel', '?')}; mreaper "
        f"{meta['mreaper']['tree']} at `{meta['mreaper']['commit'][:12]}`. Wall time "
        f"{meta['wall_min']:.1f} min; host load average {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end (the host is shared: TCG speed varies with it).",
        "",
        "Reproduce: `" + meta["command"] + "`",
        "",
        "## Method",
        "",
        "- Each (contender, repetition) boots a fresh 1 GiB VM (stock Debian kernel, no swap, "
        "cgroup v2) that runs every workload in turn; before each workload the page cache is "
        "dropped, the contender is started afresh and waits until it watches.",
        "- The **level** is MemAvailable <= 5 % of MemTotal (for `cgroup_leak`: headroom "
        "under memory.max <= 5 % of it). All contenders are tuned to it where they can "
        "be (below).",
        "- The guest driver samples MemAvailable, `/proc/pressure/memory` `full total`, the "
        "workload cgroups' memory.current and every workload process's anonymous RSS every "
        "~20 ms. Kill signals come from kernel tracing (`signal:signal_generate` for "
        "SIGKILL/SIGTERM, `oom:mark_victim` for the kernel OOM killer, trace clock = "
        "CLOCK_MONOTONIC), deaths from pidfds. Nothing is taken from the contenders' logs.",
        "- **level→kill**: level crossed to the first kill signal; **kill→back**: that "
        "signal to memory back (MemAvailable up by >= half the victim's anonymous RSS at "
        "the kill; `cgroup_leak`: the arena cgroups' memory.current down by as much); "
        "**level→back** is their sum and the headline latency. Resolution is the 20 ms "
        "sampling period.",
        "- **stall**: delta of `full total` in /proc/pressure/memory from the workload's "
        "start to its end (3 s after the last death; `cgroup_leak`: the arena parent "
        "cgroup's memory.pressure, since the machine is not short); the targets are "
        "judged on it. **some**: the same for `some total` (the machine's; time at least "
        "one task stalled), for information. **low**: lowest "
        "MemAvailable (`cgroup_leak`: lowest headroom), MiB.",
        "- Cells: median (min-max) over repetitions. `n/a`: the quantity does not exist "
        "in a run (no kill, or memory never back before the run ended).",
        "- A run ends 3 s after the last death once the expected victim died (`many`: "
        "once anything died; the push then stops growing and holds), or after 60 s.",
        "",
    ]
    for w in doc["workloads"]:
        lines += [f"## {w}", "", WORKLOAD_TEXT[w], "",
                  "| contender | level→kill s | kill→back s | level→back s | stall ms | "
                  "some ms | low MiB | kernel OOM kills | wrong victims | victims (per rep) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in doc["contenders"]:
            cell = cells[w][c]
            victims = " / ".join(cell["victims"]) or "—"
            if cell["errors"]:
                victims += f" ({cell['errors']} run(s) failed)"
            lines.append(
                f"| {c} | {fmt(cell, 'level_to_kill_s')} | {fmt(cell, 'kill_to_back_s')} | "
                f"{fmt(cell, 'level_to_back_s')} | {fmt(cell, 'stall_ms', digits=0)} | "
                f"{fmt(cell, 'some_stall_ms', digits=0)} | "
                f"{fmt(cell, 'low_mib', digits=0)} | {cell['kernel_oom_kills']} | "
                f"{cell['wrong_victims']} | {victims} |")
        lines += ["", f"![{w}](arena-{w}.png)", ""]
    own = mreaper_figures(doc)
    if own:
        lines += ["## mreaper's own account (from its log)", "",
                  "How long mreaper took from the look that saw the level to the victim "
                  "pinned (`decided in`), what `process_mrelease` answered (`reaped`: it "
                  "freed the address space; `exited-first` (ESRCH): the victim had already "
                  "dropped its mm, its own exit freed the memory), and its own kill-to-"
                  "memory-back. Median (min-max) over repetitions.", "",
                  "| workload | decided in ms | process_mrelease | its memory back ms |",
                  "|---|---|---|---|"]
        for w, f in own.items():
            lines.append(f"| {w} | {f['decided']} | {f['mrelease']} | {f['back']} |")
        lines.append("")
    lines += ["## Targets", "", "| target | met | detail |", "|---|---|---|"]
    for v in doc["summary"]["verdicts"]:
        lines.append(f"| {v['target']} | {'yes' if v['met'] else '**no**'} | {v['detail']} |")
    lines += ["", "## Configurations", ""]
    for c, parts in doc["configs"].items():
        if c not in doc["contenders"]:
            continue
        for part, text in parts.items():
            lines += [f"**{c}** ({part}):", "", "```", text.rstrip(), "```", ""]
    lines += ["Equivalence notes (where it is impossible):", ""]
    lines += [f"- {n}" for n in EQUIVALENCE_NOTES]
    if doc.get("notes"):
        lines += ["", "## Findings", ""] + [f"- {n}" for n in doc["notes"]]
    errors = [r for r in doc["results"] if "error" in r]
    if errors:
        lines += ["", "## Failed runs", ""]
        for r in errors:
            first = r["error"].strip().splitlines()[-1] if r["error"].strip() else "?"
            lines.append(f"- {r['contender']} / {r['workload']} rep {r['rep']}: {first}")
    return "\n".join(lines) + "\n"


DECIDED = re.compile(r"decided in ([\d.]+) ms")
MRELEASE = re.compile(r"process_mrelease (\S+) \((\w+)\) in ([\d.]+) ms; memory back "
                      r"([\d.]+) ms")


def mreaper_figures(doc: Json) -> dict[str, Json]:
    """Per workload: mreaper's "decided in", process_mrelease outcomes, memory back."""
    out: dict[str, Json] = {}
    for w in doc["workloads"]:
        decided: list[float | None] = []
        back: list[float | None] = []
        outcomes: dict[str, int] = {}
        for r in doc["results"]:
            if r["workload"] != w or r["contender"] != "mreaper":
                continue
            for line in r.get("contender_log", []):
                if (m := DECIDED.search(line)) and " killing " in line:
                    decided.append(float(m.group(1)))
                if m2 := MRELEASE.search(line):
                    key = f"{m2.group(1)} ({m2.group(2)})"
                    outcomes[key] = outcomes.get(key, 0) + 1
                    back.append(float(m2.group(4)))
        if not decided and not outcomes:
            continue

        def text(values: list[float | None]) -> str:
            s = spread(values)
            if s["median"] is None:
                return "—"
            return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"

        out[w] = {"decided": text(decided), "back": text(back),
                  "mrelease": ", ".join(f"{k} x{n}" for k, n in sorted(outcomes.items()))
                  or "—"}
    return out


EQUIVALENCE_NOTES = [
    "earlyoom 1.7 and nohang 0.2.0 act on MemAvailable exactly like mreaper (5 %, SIGKILL "
    "at once); earlyoom has no PSI; nohang reads PSI only when swap exists, so not here.",
    "oomd 0.5.0 has no MemAvailable detector: `memory_above` on `/` is MemTotal - MemFree, "
    "so page cache counts as used and `95%` fires at or before MemAvailable 5 %. Its loop "
    "runs once a second (`--interval` takes whole seconds; Debian ships 1). It kills whole "
    "cgroups (here one process each) and ranks by size or growth, not by oom_score.",
    "systemd-oomd 252 has no memory-level rule at all; ManagedOOMSwap needs swap (the VM "
    "has none). Only ManagedOOMMemoryPressure applies: full avg10 above the limit for "
    "longer than DefaultMemoryPressureDurationSec (1 s is its minimum), checked once a "
    "second, and only with reclaim activity in the cgroup. avg10 lags: from rest, a 100 % "
    "stall takes ~1 s to lift avg10 over 10 % and avg10 is updated every 2 s.",
    "PSI: mreaper's kill trigger (full 800 ms in 2 s, its default) was kept; full avg10 > "
    "10 % for 1 s is its nearest avg10 equivalent (used for oomd and systemd-oomd).",
    "cgroup_leak: earlyoom and nohang watch the machine only (MemAvailable stays high), "
    "so the memcg OOM killer acts; that is what the row records.",
]


def at(pts: list[tuple[float, float]], t: float) -> float:
    """The value of a step series at time t: the last sample at or before it."""
    before = [v for ts, v in pts if ts <= t + 1e-9]
    return before[-1] if before else pts[0][1]


def plot(doc: Json, out_dir: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    colors = dict(zip(cf.CONTENDERS, ("tab:green", "tab:blue", "tab:orange", "tab:purple",
                                      "tab:brown", "tab:gray"), strict=True))
    for w in doc["workloads"]:
        fig, ax = plt.subplots(figsize=(9, 5))
        level_mib = None
        scoped = w == "cgroup_leak"
        for c in doc["contenders"]:
            runs = [r for r in doc["results"] if r["workload"] == w and r["contender"] == c
                    and "samples" in r]
            if not runs:
                continue
            r = min(runs, key=lambda r: r["rep"])
            s = r["samples"]
            key = "headroom_kib" if scoped else "avail_kib"
            pts = [(t / 1000, v / 1024) for t, v in zip(s["t_ms"], s[key], strict=True)
                   if v is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            # steps: between two samples nothing is known (the driver itself can stall
            # for seconds while the machine thrashes), so no slope is drawn
            ax.plot(xs, ys, color=colors.get(c), lw=1.3, label=c, drawstyle="steps-post")
            level_mib = (cf.LIMIT_MIB * cf.LEVEL_PERCENT / 100 if scoped
                         else r["level"] / (1 << 20))
            if r.get("t_kill") is not None:
                tk = r["t_kill"]
                yk = at(pts, tk)
                first = next((k for k in r.get("kills", []) if k["workload_process"]), None)
                by = "kernel OOM" if first and first["by"] == "kernel-oom" else c
                ax.plot([tk], [yk], marker="x", ms=10, mew=2, color=colors.get(c))
                ax.annotate(f"{by}", (tk, yk), textcoords="offset points",
                            xytext=(4, -12), fontsize=7, color=colors.get(c))
            if r.get("t_back") is not None:
                tb = r["t_back"]
                yb = at(pts, tb)
                ax.plot([tb], [yb], marker="o", ms=5, color=colors.get(c), mfc="none")
        if level_mib is not None:
            ax.axhline(level_mib, color="red", ls="--", lw=0.8, label="level (5 %)")
        ax.set_xlabel("seconds since the workload started")
        ax.set_ylabel("headroom under memory.max, MiB" if scoped else "MemAvailable, MiB")
        ax.set_title(f"arena: {w} (first repetition; x = first kill signal, o = memory back)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / f"arena-{w}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)
    return made


def slim(results: list[Json]) -> list[Json]:
    """Keep the time series and the configuration text of the first repetition only (the
    plots need the one; the other is the same in every repetition)."""
    first = min((r["rep"] for r in results), default=0)
    out = []
    for result in results:
        r = dict(result)
        r.pop("debug_rss", None)
        if r.get("rep") != first:
            r.pop("samples", None)
            if "config" in r:
                r["config"] = f"(as in repetition {first})"
        out.append(r)
    return out


def write_outputs(out_dir: Path, doc: Json) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc["results"] = slim(doc["results"])
    (out_dir / "arena.json").write_text(json.dumps(doc, indent=1) + "\n")


def finish(out_dir: Path, doc: Json, contenders: Sequence[str],
           workloads: Sequence[str]) -> None:
    cells = summarise(doc["results"], contenders, workloads)
    doc["summary"] = {"cells": cells, "verdicts": verdicts(cells, contenders)}
    write_outputs(out_dir, doc)
    doc["plots"] = plot(doc, out_dir)
    (out_dir / "arena.md").write_text(markdown(doc))
    write_outputs(out_dir, doc)


# --- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--contenders", default=",".join(cf.CONTENDERS))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--quick", action="store_true",
                   help=f"1 rep, workloads {','.join(QUICK_WORKLOADS)}, into bench/results/tmp")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--mreaper-tree", choices=("head", "worktree"), default="head")
    p.add_argument("--vm-timeout", type=float, default=VM_TIMEOUT_S)
    p.add_argument("--strict", action="store_true", help="refuse if a contender is missing")
    p.add_argument("--check", action="store_true", help="only check what is installed")
    p.add_argument("--replot", type=Path, metavar="ARENA_JSON",
                   help="rebuild arena.md and the plots from an arena.json")
    args = p.parse_args(argv)

    if args.replot:
        old: Json = json.loads(args.replot.read_text())
        finish(args.replot.parent, old, old["contenders"], old["workloads"])
        return 0
    wanted = [c for c in args.contenders.split(",") if c]
    workloads = [w for w in args.workloads.split(",") if w]
    bad = [c for c in wanted if c not in cf.CONTENDERS] + [w for w in workloads
                                                           if w not in WORKLOADS]
    if bad:
        p.error(f"unknown {bad}; contenders {cf.CONTENDERS}, workloads {WORKLOADS}")
    reps = args.reps
    if args.quick:
        reps, workloads = 1, [w for w in QUICK_WORKLOADS if w in workloads] or workloads
    contenders = check_contenders(wanted, args.strict)
    if args.check:
        say("usable: " + ", ".join(contenders))
        return 0
    if not contenders:
        raise SystemExit("arena: no contender can run")
    if os.geteuid() != 0:
        say("note: not root; the VM runs as root inside, but apt-get checks may differ")
    check_lab()
    protect_vms()

    host = socket.gethostname()
    date = dt.date.today().isoformat()
    out_dir = args.out or (REPO / "bench" / "results" / ("tmp" if args.quick else "")
                           / f"{date}-{host}")
    tmp = Path(tempfile.mkdtemp(prefix="arena-src-"))
    try:
        src, mreaper_info = mreaper_source(args.mreaper_tree, tmp)
        doc: Json = {
            "meta": {"date": date, "host": host, "host_cpus": os.cpu_count(),
                     "host_kernel": platform.release(), "vm_mib": VM_MIB, "vm_cpus": 2,
                     "reps": reps, "mreaper": mreaper_info,
                     "command": "sudo .venv/bin/python bench/arena/run.py "
                     + " ".join(argv if argv is not None else sys.argv[1:]),
                     "load_start": [round(x, 2) for x in os.getloadavg()],
                     "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
            "contenders": contenders, "workloads": workloads,
            "configs": cf.describe_all(), "results": [],
        }
        t0 = time.monotonic()
        for rep in range(1, reps + 1):
            for c in rotated(contenders, rep - 1):
                say(f"rep {rep}/{reps}: {c} ({', '.join(workloads)})")
                for attempt in range(1, ATTEMPTS + 1):
                    results = run_vm(c, workloads, src, rep, args.vm_timeout)
                    lost = [r for r in results if r["vm"]["returncode"] != 0
                            and str(r.get("error", "")).startswith("no result")]
                    for r in results:
                        r["vm"]["attempt"] = attempt
                    if not lost or attempt == ATTEMPTS:
                        break
                    say(f"  the VM stopped early (exit {lost[0]['vm']['returncode']}): "
                        f"again ({attempt + 1}/{ATTEMPTS})")
                for r in results:
                    say(f"  {r['workload']}: " + (
                        "ERROR " + r["error"].strip().splitlines()[-1] if "error" in r else
                        f"{victim_text(r)}; level→back {r.get('level_to_back_s')} s, stall "
                        f"{stall_of(r)} ms, kernel OOM kills {r.get('kernel_oom_kills')}"))
                doc["results"] += results
                doc["meta"]["wall_min"] = (time.monotonic() - t0) / 60
                doc["meta"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
                for r in results:
                    if "kernel" in r:
                        doc["meta"]["guest_kernel"] = r["kernel"]
                    doc["meta"]["accel"] = r["vm"]["accel"]
                finish(out_dir, doc, contenders, workloads)
        say(f"done in {(time.monotonic() - t0) / 60:.1f} min: {out_dir}/arena.md")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
