"""The arena's contenders: how each one is configured, started, watched and stopped.

Shared by the host side (``run.py``: what is installed, the exact configurations for
the report) and the guest driver (``guest.py``: starting them in the VM).

Every contender is tuned to the same levels where its design allows:

* **MemAvailable level**: act (SIGKILL) when MemAvailable <= 5 % of MemTotal, no SIGTERM
  stage.  earlyoom 1.7 (``-m 5,5``), nohang 0.2.0 (soft = hard = 5 %) and mreaper
  (``memory.kill = "5%"``, ``term = "off"``) take it as it is.  oomd 0.5.0 has no
  MemAvailable detector: ``memory_above`` on the root reads MemTotal - MemFree.  With
  little page cache MemAvailable is MemFree minus the kernel's reserve
  (``totalreserve_pages``: each zone's high watermark plus its largest lowmem
  reserve), so the equivalent threshold is MemTotal - level - reserve, computed in the
  VM from /proc/zoneinfo (page cache only makes it fire earlier).  ("95%" would never
  fire: the kernel keeps MemFree above its watermarks, ~57 MiB here, and OOMs first.)
  systemd-oomd 252 has no memory level at all (its swap rule needs swap, the VM has
  none): pressure only.
* **PSI**: mreaper's documented default kill trigger (full 800 ms in a 2 s window, i.e.
  40 % full stall over 2 s) is kept.  Its nearest avg10 equivalent is full avg10 >= 10 %
  (sustained 40 % stall from rest brings avg10 to ~7-10 % within 2 s), held >= 1 s (the
  shortest systemd-oomd accepts): used for systemd-oomd and oomd.  earlyoom has no PSI;
  nohang measures PSI only when swap exists and memory is already low, so in a swapless
  VM it cannot use it (left at its default, off).
* **cgroup with memory.max** (workload ``cgroup_leak``): mreaper watches the cgroup as a
  ``[[scope]]`` (kill at 5 % headroom left under memory.max); oomd gets a ruleset on the
  cgroup (memory.current above 95 % of memory.max, or the same PSI rule); systemd-oomd
  monitors the slice holding it (pressure).  earlyoom and nohang look at the machine
  only: they are run unchanged and what happens is recorded.

Self-protection is what each package ships (their units): mreaper sets its own
oom_score_adj -1000; earlyoom, nohang and oomd run at 0 (their units set none);
systemd-oomd runs from its unit (OOMScoreAdjust=-900).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

LEVEL_PERCENT = 5.0
#: The limited cgroup of the cgroup_leak workload.
LIMIT_MIB = 256
#: Full-stall avg10 equivalent of mreaper's default PSI kill trigger, and its hold time.
AVG10_LIMIT = 10
AVG10_HOLD_S = 1

CONTENDERS = ("mreaper", "earlyoom", "nohang", "systemd-oomd", "oomd", "kernel")

NOHANG_DEFAULT_CONF = "/etc/nohang/nohang.conf"
SYSTEMD_OOMD = "/lib/systemd/systemd-oomd"


@dataclass(frozen=True)
class Requirement:
    """A host program a contender needs, and how to get it."""

    path: str
    package: str

    def present(self) -> bool:
        return os.path.exists(self.path) and os.access(self.path, os.X_OK)


REQUIREMENTS: dict[str, tuple[Requirement, ...]] = {
    "mreaper": (),
    "earlyoom": (Requirement("/usr/bin/earlyoom", "earlyoom"),),
    "nohang": (Requirement("/usr/sbin/nohang", "nohang"),),
    "systemd-oomd": (Requirement(SYSTEMD_OOMD, "systemd-oomd"),
                     Requirement("/usr/bin/oomctl", "systemd-oomd"),
                     Requirement("/lib/systemd/systemd", "systemd")),
    "oomd": (Requirement("/usr/bin/oomd", "oomd"),),
    "kernel": (),
}


def missing(contender: str) -> list[Requirement]:
    """The requirements of `contender` that are not installed here."""
    return [r for r in REQUIREMENTS[contender] if not r.present()]


def install_hint(reqs: list[Requirement]) -> str:
    pkgs = sorted({r.package for r in reqs})
    hint = "apt-get install -y --no-install-recommends " + " ".join(pkgs)
    if "systemd-oomd" in pkgs:
        hint += (" (pin systemd-oomd to the installed systemd version, e.g. "
                 "systemd-oomd=$(dpkg-query -W -f='${Version}' systemd), so that apt does "
                 "not upgrade systemd itself)")
    return hint


# --- configurations ------------------------------------------------------------------


def mreaper_config(workload: str) -> str:
    text = (
        "# arena: mreaper's built-in defaults (PSI triggers included), one kill level at\n"
        "# MemAvailable 5 %, no SIGTERM stage, no status socket\n"
        "[memory]\n"
        'warn = "10%"\n'
        'term = "off"\n'
        f'kill = "{LEVEL_PERCENT:g}%"\n'
        "\n[status]\n"
        'socket = ""\n'
    )
    if workload == "cgroup_leak":
        text += (
            "\n# the limited cgroup as a scope: kill at 5 % headroom left under memory.max\n"
            "[[scope]]\n"
            'name = "limited"\n'
            'cgroup = "arena/limited"\n'
            f'headroom = {{ warn = "20%", term = "off", kill = "{LEVEL_PERCENT:g}%" }}\n'
        )
    return text


def earlyoom_argv() -> list[str]:
    # Debian's default EARLYOOM_ARGS is "-r 3600"; -m TERM,KILL at 5 % both (SIGKILL at
    # once); -s 100,100: the swap condition always holds (no swap in the VM).
    return ["/usr/bin/earlyoom", "-r", "3600", "-m", f"{LEVEL_PERCENT:g},{LEVEL_PERCENT:g}",
            "-s", "100,100"]


NOHANG_CHANGES = {
    "soft_threshold_min_mem": f"{LEVEL_PERCENT:g} %",
    "hard_threshold_min_mem": f"{LEVEL_PERCENT:g} %",
}


def nohang_config(default_text: str) -> str:
    """Debian's /etc/nohang/nohang.conf with the two memory levels at 5 %."""
    out = []
    seen = set()
    for line in default_text.splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in NOHANG_CHANGES:
            out.append(f"{key} = {NOHANG_CHANGES[key]}")
            seen.add(key)
        else:
            out.append(line)
    for key, value in NOHANG_CHANGES.items():
        if key not in seen:
            out.append(f"{key} = {value}")
    return "\n".join(out) + "\n"


def nohang_config_summary() -> str:
    return ("Debian's /etc/nohang/nohang.conf (nohang 0.2.0) with "
            + ", ".join(f"{k} = {v}" for k, v in NOHANG_CHANGES.items())
            + "; everything else as shipped (psi_checking_enabled = False: nohang reads PSI "
            "only when swap exists)")


def total_reserve(zoneinfo: str) -> int:
    """The kernel's totalreserve_pages in bytes (calculate_totalreserve_pages(): per zone,
    the high watermark plus the largest lowmem_reserve), from /proc/zoneinfo."""
    total = 0
    high = 0
    for line in zoneinfo.splitlines():
        fields = line.split()
        if line.startswith("Node "):
            high = 0
        elif fields[:1] == ["high"] and len(fields) == 2:
            high = int(fields[1])
        elif fields[:1] == ["protection:"]:
            prot = [int(x) for x in line.split("(", 1)[1].rstrip(")").split(",") if x.strip()]
            total += high + max(prot, default=0)
    return total * 4096


def oomd_machine_threshold(mem_total: int, zoneinfo: str) -> int:
    """memory_above on "/" (MemTotal - MemFree) equivalent to MemAvailable <= the level."""
    return mem_total - int(mem_total * LEVEL_PERCENT / 100) - total_reserve(zoneinfo)


def oomd_config(workload: str, machine_threshold: int) -> str:
    def pressure(cgroup: str) -> dict[str, object]:
        return {"name": "pressure_above",
                "args": {"cgroup": cgroup, "resource": "memory",
                         "threshold": str(AVG10_LIMIT), "duration": str(AVG10_HOLD_S)}}

    rulesets: list[dict[str, object]] = []
    mib = machine_threshold >> 20
    if workload == "cgroup_leak":
        limit = LIMIT_MIB * (100 - LEVEL_PERCENT) / 100
        rulesets.append({
            "name": "arena/limited near its memory.max",
            "detectors": [
                [f"memory.current above {limit:g}M (95 % of memory.max)",
                 {"name": "memory_above",
                  "args": {"cgroup": "arena/limited", "threshold": f"{limit:g}M",
                           "duration": "0"}}],
                [f"full pressure avg10 above {AVG10_LIMIT} for {AVG10_HOLD_S}s",
                 pressure("arena/limited")],
            ],
            "actions": [{"name": "kill_by_memory_size_or_growth",
                         "args": {"cgroup": "arena/limited"}}],
        })
    rulesets.append({
        "name": "machine low on memory",
        "detectors": [
            [f"MemTotal - MemFree above {mib}M (MemTotal - 5 % - kernel reserve)",
             {"name": "memory_above",
              "args": {"cgroup": "/", "threshold": f"{mib}M", "duration": "0"}}],
            [f"full pressure avg10 above {AVG10_LIMIT} for {AVG10_HOLD_S}s", pressure("/")],
        ],
        "actions": [{"name": "kill_by_memory_size_or_growth", "args": {"cgroup": "arena/*"}}],
    })
    return json.dumps({"rulesets": rulesets}, indent=2) + "\n"


def oomd_argv(config_path: str) -> list[str]:
    # Debian's /etc/default/oomd: --interval 1 (--cgroup-fs dropped: the VM is pure v2)
    return ["/usr/bin/oomd", "--interval", "1", "--config", config_path]


SYSTEMD_SLICE = (
    "[Unit]\n"
    "Description=mreaper arena workloads\n"
    "[Slice]\n"
    "MemoryAccounting=yes\n"
    "ManagedOOMMemoryPressure=kill\n"
    f"ManagedOOMMemoryPressureLimit={AVG10_LIMIT}%\n"
)
SYSTEMD_OOMD_CONF = (
    "[OOM]\n"
    f"DefaultMemoryPressureDurationSec={AVG10_HOLD_S}s\n"
)


def describe_all() -> dict[str, dict[str, str]]:
    """The exact configuration of every contender per workload, for the report."""
    default_nohang = ""
    if os.path.exists(NOHANG_DEFAULT_CONF):
        with open(NOHANG_DEFAULT_CONF) as f:
            default_nohang = f.read()
    out: dict[str, dict[str, str]] = {}
    for workload in ("leak", "cgroup_leak"):
        out.setdefault("mreaper", {})[workload] = mreaper_config(workload)
        out.setdefault("oomd", {})[workload] = (
            "oomd " + " ".join(oomd_argv("arena.json")[1:]) + "\n"
            + oomd_config(workload, 0).replace('"0M"', '"<MemTotal - 5 % - reserve>M"')
            .replace("above 0M", "above <MemTotal - 5 % - reserve>M"))
    out["earlyoom"] = {"all": " ".join(earlyoom_argv())}
    out["nohang"] = {"all": nohang_config_summary()}
    if default_nohang:
        changed = [ln for ln in nohang_config(default_nohang).splitlines()
                   if ln.split("=", 1)[0].strip() in NOHANG_CHANGES]
        out["nohang"]["changed lines"] = "\n".join(changed)
    out["systemd-oomd"] = {
        "all": ("/run/systemd/system/arena.slice:\n" + SYSTEMD_SLICE
                + "/etc/systemd/oomd.conf.d/arena.conf:\n" + SYSTEMD_OOMD_CONF
                + "every workload process runs in its own scope in arena.slice "
                "(systemd-run --scope --slice=arena.slice); cgroup_leak's scope has "
                f"MemoryMax={LIMIT_MIB}M MemorySwapMax=0")}
    out["kernel"] = {"all": "no daemon: the kernel's OOM killer (and memcg OOM) only"}
    return out
