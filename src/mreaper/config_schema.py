"""The configuration reference: one table of every key of mreaper.toml (section, key,
type, default, meaning), from which docs/configuration.md, mreaper.toml(5) and the
packaged default configuration are generated (scripts/gen_docs.py).

config.py parses and validates; this table describes.  tests/unit/test_config_schema.py
holds them together: the keys here are exactly the keys config.py accepts (read from
its own "unknown key" errors), each default here is the default config.py applies, and
each default is a value config.py accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

from mreaper import config


@dataclass(frozen=True, slots=True)
class Section:
    name: str      # "daemon"; a sub-table of an array item: "scope.headroom"
    header: str    # how it is written in TOML: "[daemon]", "[[rule]]"
    help: str


@dataclass(frozen=True, slots=True)
class Key:
    section: str
    key: str
    type: str             # short, for tables; the value types are described in VALUE_TYPES
    default: str | None   # as TOML; None: no default (a required key, or one that is off)
    help: str


# The value types the table names, with what config.py accepts for each (its own help
# texts, so the reference says exactly what an error message would say).
VALUE_TYPES: tuple[tuple[str, str], ...] = (
    ("level", config.LEVEL_HELP + ". The level is crossed when the free amount falls "
     "to or below it."),
    ("size", config.SIZE_HELP),
    ("PSI trigger", config.PSI_HELP + ". The kernel reports a stall of at least "
     "stall_us within any window_us; windows not a multiple of 2 s need CAP_SYS_RESOURCE."),
    ("when", config.WHEN_HELP + ". & binds tighter than |."),
    ("path", "an absolute path, or \"\" for off"),
    ("argv", "a command as a list of strings, the first an absolute path, run without a "
     "shell, or [] for none"),
    ("regex", "a Python regular expression, matched with re.search (anywhere in the text; "
     "anchor it with ^ and $ to match whole)"),
)

SECTIONS: tuple[Section, ...] = (
    Section("daemon", "[daemon]", "How the daemon runs and protects itself."),
    Section("detect", "[detect]", "How often memory is looked at, and how the sources "
            "(memory, swap, psi) combine into a level."),
    Section("memory", "[memory]", "MemAvailable (/proc/meminfo) against MemTotal. Each "
            "level is reached when MemAvailable falls to or below it; warn >= term >= kill."),
    Section("swap", "[swap]", "SwapFree against SwapTotal, as [memory]. With no swap at "
            "all, the swap source holds (it does not block a \"memory & swap\" level)."),
    Section("psi", "[psi]", "Kernel PSI triggers on /proc/pressure/memory, one per level."),
    Section("kill", "[kill]", "How a victim is chosen and killed."),
    Section("rule", "[[rule]]", "Rules that change a process's score, one [[rule]] table "
            "each. A rule matches a process when all its matchers match (at least one "
            "matcher is required)."),
    Section("scope", "[[scope]]", "A cgroup v2 subtree watched on its own, with its own "
            "levels and victims; one [[scope]] table each."),
    Section("scope.headroom", "headroom = { ... }", "In a [[scope]]: memory.current "
            "against memory.max/memory.high (inactive page cache counts as available)."),
    Section("scope.psi", "psi = { ... }", "In a [[scope]]: PSI triggers on the cgroup's "
            "memory.pressure."),
    Section("scope.events", "events = { ... }", "In a [[scope]]: memory.events counters; a "
            "level is reached when one of the listed counters rises."),
    Section("events", "[events]", "Kill reports and pressure episodes as JSON lines "
            "(docs/operations.md)."),
    Section("metrics", "[metrics]", "Prometheus metrics (needs the prometheus-client "
            "package)."),
    Section("hooks", "[hooks]", "Commands run before and after a kill (docs/hooks.md)."),
    Section("status", "[status]", "The socket `mreaper status` and `mreaper top` read."),
)


def _levels(section: str, defaults: tuple[str | None, str | None, str | None], kind: str,
            what: str) -> tuple[Key, ...]:
    meaning = {
        "warn": "log a warning (and an episode event); nothing is killed",
        "term": "SIGTERM the chosen victim, SIGKILL after kill.term_timeout seconds",
        "kill": "SIGKILL at once, then process_mrelease",
    }
    return tuple(Key(section, lvl, kind, default, f"{what}: {meaning[lvl]}.")
                 for lvl, default in zip(config.LEVELS, defaults, strict=True))


KEYS: tuple[Key, ...] = (
    # [daemon]
    Key("daemon", "dry_run", "boolean", "false",
        "Do everything but the signal: log what would be killed."),
    Key("daemon", "reapers", "integer 1-16", "2",
        "Reaper threads: kills that can run at the same time."),
    Key("daemon", "mlockall", "boolean", "true",
        "Lock the daemon's memory (mlockall MCL_CURRENT|MCL_FUTURE), so that it is not "
        "paged out when memory is short (needs CAP_IPC_LOCK beyond RLIMIT_MEMLOCK)."),
    Key("daemon", "oom_score_adj", "integer -1000-1000", "-1000",
        "The daemon's own oom_score_adj: -1000 makes it never the kernel OOM killer's "
        "choice."),
    Key("daemon", "nice", "integer -20-19", "-10",
        "The daemon's nice value (0: left as it is)."),
    Key("daemon", "realtime", "boolean", "false",
        "Run the daemon SCHED_FIFO (priority 1; needs CAP_SYS_NICE)."),
    Key("daemon", "log", "\"auto\", \"plain\" or \"journal\"", "\"auto\"",
        "Log format: journal (priority prefixes, no time stamp), plain (with a time "
        "stamp), or auto (journal when standard error is the journal)."),
    Key("daemon", "recovery_timeout", "seconds 0.1-120", "5.0",
        "After a kill: how long to wait at most for the victim to exit and its memory to "
        "show as available before judging again whether to act; also the pause after a "
        "dry-run decision."),
    # [detect]
    Key("detect", "when", "when", "\"memory & swap | psi\"",
        "How the sources combine: a level is reached when the expression holds at that "
        "level."),
    Key("detect", "poll_min", "seconds 0.001-1", "0.01",
        "Shortest interval between two looks at memory, when it falls fast toward a "
        "level. Must not exceed poll_max."),
    Key("detect", "poll_max", "seconds 0.01-10", "1.0",
        "Longest interval between two looks, when memory is plentiful."),
    Key("detect", "scan_interval", "seconds 0.1-600", "5.0",
        "How often the candidate list (the processes and their scores) is refreshed "
        "in the background; ten times as often at or above warn."),
    # [memory] [swap] [psi]
    *_levels("memory", ("\"10%\"", "\"5%\"", "\"2.5%\""), "level", "MemAvailable level"),
    *_levels("swap", ("\"10%\"", "\"5%\"", "\"2.5%\""), "level", "SwapFree level"),
    *_levels("psi", ("\"some 300000 2000000\"", "\"off\"", "\"full 800000 2000000\""),
             "PSI trigger", "PSI trigger"),
    Key("psi", "gate", "level", "\"20%\"",
        "PSI counts on the machine only while MemAvailable is at or below this: the "
        "kernel charges a cgroup's stall at its own memory.max to every ancestor, up to "
        "/proc/pressure/memory, and one full container must not get a bystander killed."),
    # [kill]
    Key("kill", "term_timeout", "seconds 0-3600", "5.0",
        "At the term level: SIGTERM, then SIGKILL after this many seconds (0: SIGKILL at "
        "once). Cut short when memory reaches the kill level meanwhile."),
    Key("kill", "sort_by", "\"oom_score\", \"rss\" or \"private\"", "\"oom_score\"",
        "The base score: the kernel's oom_score (oom_score_adj included), the resident "
        "memory in MiB, or what a kill frees in MiB (a forked child's private memory, "
        "from smaps_rollup, read under pressure; the resident memory until then)."),
    Key("kill", "min_rss", "size", "0",
        "Never kill a process whose resident memory is smaller than this."),
    Key("kill", "mrelease", "boolean", "true",
        "Reap the victim's memory with process_mrelease(2) right after SIGKILL (false: a "
        "plain SIGKILL, for comparison)."),
    Key("kill", "demote", "boolean", "false",
        "Before the kill, give the victim's threads SCHED_IDLE and nice 19, so that it "
        "stops competing for the CPU while it dies."),
    Key("kill", "families", "boolean", "true",
        "Rank families too (a process group, a session, a parent tree, a leaf cgroup): "
        "when two or more of a family's processes grow and, without its biggest, it "
        "holds more than any single process, kill it whole (parents first, each through "
        "its pidfd, each reaped). A family holding a protected or avoided process, or "
        "mreaper itself, is never killed whole."),
    Key("kill", "growth_weight", "number 0-100", "1.0",
        "How much growth in the pressure episode counts next to what is held, for "
        "families and the processes they are compared with (0: growth is ignored)."),
    Key("kill", "pods", "boolean", "true",
        "Kubernetes pods, known from kubelet's cgroup paths (docs/kubernetes.md): every "
        "BestEffort container is chosen before any Burstable one, and those before any "
        "Guaranteed one or any process outside pods, whatever the scores; within a class, "
        "containers above their memory request where the cgroup shows it (kubelet's "
        "MemoryQoS: memory.min or memory.low) come first, furthest above first; a pod's "
        "sandbox (pause) process is never chosen. Changes nothing where no process is in "
        "a pod."),
    # [[rule]]
    Key("rule", "action", "\"prefer\", \"avoid\" or \"protect\"", None,
        "Required. prefer raises the score (kill sooner), avoid lowers it, protect "
        "never kills a matching process."),
    Key("rule", "name", "regex", None, "Matches the process name (comm)."),
    Key("rule", "cmdline", "regex", None, "Matches the command line, joined by spaces."),
    Key("rule", "exe", "regex", None,
        "Matches the executable's path (reading another user's needs CAP_SYS_PTRACE)."),
    Key("rule", "cgroup", "regex", None, "Matches the cgroup v2 path."),
    Key("rule", "user", "user name or uid", None, "Matches the process's real user."),
    Key("rule", "adjust", "integer -100000-100000", "0",
        "The score change: 0 for the action's default (prefer +300, avoid -300); "
        ">= 0 for prefer, <= 0 for avoid, not allowed for protect."),
    # [[scope]]
    Key("scope", "name", "string", None,
        "A short name for logs and metrics (" + config.SCOPE_NAME_HELP + "); default: the "
        "cgroup pattern. Unique, and not \"machine\"."),
    Key("scope", "cgroup", "cgroup path or glob", None,
        "Required. A cgroup below the root, absolute or under the cgroup2 mount; a glob "
        "makes one scope per matching cgroup (e.g. \"kubepods.slice/*\")."),
    Key("scope", "when", "when (headroom, psi, events)", "\"headroom | psi | events\"",
        "How the scope's sources combine."),
    Key("scope", "headroom", "table", None, "The headroom levels (below)."),
    Key("scope", "psi", "table", None, "The PSI triggers (below)."),
    Key("scope", "events", "table", None, "The memory.events counters (below)."),
    Key("scope", "unit", "\"process\" or \"cgroup\"", "\"process\"",
        "What is killed: a process of the subtree, or a child cgroup whole (cgroup.kill, "
        "each process pinned first and reaped)."),
    Key("scope", "select", "\"size\", \"growth\" or \"pressure\"", "\"size\"",
        "With unit = \"cgroup\": which child cgroup, the largest, the fastest growing or "
        "the most stalled."),
    *_levels("scope.headroom", ("\"10%\"", "\"off\"", "\"3%\""), "level", "Headroom level"),
    *_levels("scope.psi", ("\"some 300000 2000000\"", "\"off\"", "\"full 600000 2000000\""),
             "PSI trigger", "PSI trigger"),
    *_levels("scope.events", ("[\"high\"]", "[]", "[\"oom\"]"),
             "list of " + ", ".join(config.EVENT_COUNTERS), "Counters"),
    # [events] [metrics] [hooks] [status]
    Key("events", "path", "path, or \"-\"", "\"\"",
        "Append kill reports and episodes as JSON lines to this file (\"-\": standard "
        "output; \"\": none)."),
    Key("metrics", "listen", "HOST:PORT", "\"\"",
        "Serve Prometheus metrics over HTTP here (e.g. \"127.0.0.1:9772\"; \"\": off)."),
    Key("metrics", "textfile", "path", "\"\"",
        "Write the metrics to this file for node-exporter's textfile collector."),
    Key("hooks", "pre_kill", "argv", "[]",
        "Run before the kill, victim details in MREAPER_* variables; the kill waits for "
        "it at most pre_kill_timeout seconds."),
    Key("hooks", "pre_kill_timeout", "seconds 0-60", "2.0",
        "How long the kill waits for pre_kill."),
    Key("hooks", "post_kill", "argv", "[]", "Run after the kill, with the kill report."),
    Key("status", "socket", "path", "\"/run/mreaper/status.sock\"",
        "The root-only UNIX socket of `mreaper status` and `mreaper top` (\"\": off)."),
)


def keys_of(section: str) -> tuple[Key, ...]:
    return tuple(k for k in KEYS if k.section == section)
