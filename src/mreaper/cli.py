"""The `mreaper` command: thin argument parsing over the library and the daemon."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from mreaper import __version__, config, instance
from mreaper.cliargs import (
    ascii_integer,
    seconds_between,
    signed_decimal,
    signed_integer,
)
from mreaper.policy import printable
from mreaper.reap import (
    Escalation,
    KillOptions,
    Mrelease,
    Victim,
    VictimError,
    VictimForbidden,
    fmt_bytes,
    kill_and_reap,
)

EXIT_USAGE = 2      # bad arguments or a target we refuse: nothing was signalled
EXIT_FORBIDDEN = 1  # permission denied: nothing was signalled
EXIT_ZOMBIE = 3     # `kill`: the process had already exited (a zombie): nothing was signalled
EXIT_PIPE = 128 + signal.SIGPIPE  # 141: our output's reader went away (`| head`), as a
#                                   shell reports a tool that SIGPIPE killed
EXIT_INTERRUPTED = 130  # `kill` interrupted (128 + SIGINT): the victim was still killed


def _pid(text: str) -> int:
    # ASCII digits only: int() takes "\u0662\u0662..." (Arabic-Indic) too, and a PID
    # the user cannot read back must not name a process
    pid = ascii_integer(text)
    if pid is None or pid <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a process ID (a positive integer in ASCII digits)")
    return pid


def build_parser() -> argparse.ArgumentParser:
    from mreaper import cli_status, install_files
    from mreaper.cli_history import add_history_parser

    p = argparse.ArgumentParser(prog="mreaper", description=__doc__)
    p.add_argument("--version", action="version", version=f"mreaper {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    k = sub.add_parser("kill", help="kill one process through a pidfd and reap it at once")
    k.add_argument("pid", type=_pid, metavar="PID")
    k.add_argument("--term-timeout", type=seconds_between(0, 3600), default=0.0, metavar="S",
                   help="send SIGTERM first and SIGKILL after S seconds (default: SIGKILL at once)")
    k.add_argument("--json", action="store_true", help="print the kill report as JSON")
    k.add_argument("--no-mrelease", action="store_true",
                   help="plain SIGKILL without process_mrelease (for comparison)")

    for name, helptext in (("run", "run the daemon"),
                           ("config", "print the effective configuration as TOML"),
                           ("explain", "rank the processes as the daemon would, with reasons")):
        c = sub.add_parser(name, help=helptext)
        _add_config_flags(c)
        if name == "explain":
            c.add_argument("--all", action="store_true", help="list every process, not the top 20")
            c.add_argument("--scope", metavar="NAME",
                           help="rank within a configured [[scope]] (default: the machine)")
            c.add_argument("--growth", type=seconds_between(0, 60), default=0.0, metavar="S",
                           help="measure growth over S seconds (two looks) and show the "
                                "families as the daemon would rank them (default: one look, "
                                "no growth)")
        if name == "run":
            _add_run_flags(c)

    add_history_parser(sub)
    cli_status.add_status_parsers(sub)
    install_files.add_parser(sub)

    d = sub.add_parser("demo", help="show plain SIGKILL against kill-and-reap on a starved hog")
    d.add_argument("--size", type=signed_integer, default=256, metavar="MIB",
                   help="memory the hog allocates, in MiB (default 256)")
    d.add_argument("--json", action="store_true", help="print both kill reports as JSON")
    return p


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log debug lines too")
    p.add_argument("--lock-file", metavar="PATH",
                   help="the single-instance lock (default $MREAPER_LOCK_FILE, else "
                        f"{instance.DEFAULT} as root)")
    p.add_argument("--allow-second-instance", action="store_true",
                   help="run even while another mreaper holds the lock (two killers "
                        "act twice on one shortage)")


def build_run_parser() -> argparse.ArgumentParser:
    """`mreaper run` alone: the same flags as its subcommand in build_parser(), without
    loading what only the other commands need (status client, history, demo)."""
    p = argparse.ArgumentParser(prog="mreaper run", description="run the daemon")
    _add_config_flags(p)
    _add_run_flags(p)
    return p


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """The common settings as flags; they override the file, and are validated by the
    same code with the same messages (origin "command line")."""
    p.add_argument("--config", metavar="PATH",
                   help=f"TOML configuration file (default {config.DEFAULT_PATH}, if present)")
    p.add_argument("--dry-run", action="store_true", default=None,
                   help="do everything but the signal; log what would be killed")
    p.add_argument("--reapers", type=signed_integer, metavar="N", help="reaper threads (1-16)")
    p.add_argument("--term-timeout", type=signed_decimal, metavar="S",
                   help="at the term level: SIGTERM, then SIGKILL after S seconds")
    for section in ("memory", "swap"):
        for level in config.LEVELS:
            p.add_argument(f"--{section}-{level}", metavar="LEVEL", dest=f"{section}_{level}",
                           help=f"{section} {level} level: a percentage, a size, or both "
                                "comma-separated (the lower wins), or off")
    for level in config.LEVELS:
        p.add_argument(f"--psi-{level}", metavar="TRIGGER", dest=f"psi_{level}",
                       help=f'PSI trigger for the {level} level: "some|full STALL_US WINDOW_US" '
                            "or off")
    p.add_argument("--when", metavar="EXPR", help='how sources combine: e.g. "memory & swap | psi"')
    p.add_argument("--sort-by", metavar="KEY", help="oom_score or rss")
    p.add_argument("--min-rss", metavar="SIZE", help="never kill a process smaller than this")
    for action in ("prefer", "avoid", "protect"):
        p.add_argument(f"--{action}", metavar="REGEX", action="append", default=[],
                       help=f"{action} processes whose name matches (repeatable)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {}

    def put(section: str, key: str, value: object) -> None:
        if value is not None:
            data.setdefault(section, {})[key] = value

    put("daemon", "dry_run", args.dry_run)
    put("daemon", "reapers", args.reapers)
    put("kill", "term_timeout", args.term_timeout)
    put("kill", "sort_by", args.sort_by)
    put("kill", "min_rss", args.min_rss)
    put("detect", "when", args.when)
    for section in ("memory", "swap"):
        for level in config.LEVELS:
            value = getattr(args, f"{section}_{level}")
            if value is not None:
                parts = [v.strip() for v in value.split(",")]
                put(section, level, parts if len(parts) > 1 else parts[0])
    for level in config.LEVELS:
        put("psi", level, getattr(args, f"psi_{level}"))
    rules = [{"action": action, "name": regex}
             for action in ("prefer", "avoid", "protect") for regex in getattr(args, action)]
    if rules:
        data["rule"] = rules
    return data


def load_config(args: argparse.Namespace) -> config.Config:
    """The file (if any), then the flags.  Flag rules are added after the file's."""
    cfg = config.load(args.config, required=args.config is not None)
    overrides = _overrides(args)
    if not overrides:
        return cfg
    file_rules, file_origin = cfg.rules, cfg.origin
    cfg = config.apply(cfg, overrides, "command line", rule_start=len(file_rules) + 1)
    rules = file_rules + cfg.rules if "rule" in overrides else cfg.rules
    return dataclasses.replace(cfg, rules=rules, origin=f"{file_origin} + command line")


def checked_config(args: argparse.Namespace) -> config.Config:
    """load_config, then what `run` would refuse before it starts, wherever that needs no
    root and no side effect: the levels against this machine's MemTotal and SwapTotal,
    metrics without prometheus-client.  `run` (at start and on SIGHUP) and `config` both
    go through here, so `config` never calls valid what `run` refuses."""
    from mreaper.linux import procfs
    from mreaper.sinks import preflight

    cfg = load_config(args)
    try:
        mem = procfs.read_meminfo()
    except (OSError, ValueError) as e:
        raise config.ConfigError("/proc/meminfo", "MemTotal", None,
                                 f"cannot read it to check the levels against: {e}") from None
    config.check_totals(cfg, mem.mem_total, mem.swap_total)
    preflight(cfg)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from mreaper.daemon import Daemon, setup_logging
    from mreaper.sinks import build_sink

    cfg = checked_config(args)
    setup_logging(cfg.log, args.verbose)
    log = logging.getLogger("mreaper")
    path = args.lock_file or instance.default_path()
    lock = None
    try:
        lock = instance.acquire(path)
        for note in lock.notes:
            log.warning("single-instance lock: %s", note)
    except instance.AlreadyRunning as e:
        if not args.allow_second_instance:
            log.error("%s: refusing to start a second killer (two act twice on one "
                      "shortage); stop it first, or pass --allow-second-instance", e)
            return EXIT_FORBIDDEN
        log.warning("%s: starting beside it, as --allow-second-instance asks", e)
    except instance.InstanceError as e:
        if not args.allow_second_instance:
            log.error("single-instance lock: %s", e)
            return EXIT_FORBIDDEN
        log.warning("single-instance lock: %s; starting without it, as "
                    "--allow-second-instance asks", e)
    try:
        sink, hooks = build_sink(cfg)
        daemon = Daemon(cfg, reload=lambda: checked_config(args), sink=sink,
                        before_kill=hooks.before_kill if hooks and hooks.pre_kill else None)
        return daemon.run()
    finally:
        if lock is not None:
            lock.close()


def cmd_config(args: argparse.Namespace) -> int:
    print(config.to_toml(checked_config(args)), end="")
    return 0


def _explain_families(ranked: list[Any], growth: dict[tuple[int, int], int], weight: float,
                      sampled: float, limit: int | None) -> None:
    from mreaper import families

    found = families.group(ranked, growth, weight=weight)
    how = (f"growth over {sampled:g} s" if sampled else
           "growth not measured: --growth S measures it over S seconds")
    print(f"\nfamilies (process group, session, parent tree, cgroup; {how}; growth weight "
          f"{weight:g}):")
    print(families.explain_families(found, limit=None if limit is None else 10))
    family, why = families.choose(found, ranked, growth, weight=weight)
    print(f"-> {'kill whole: ' if family is not None else 'no family killed whole: '}{why}")


def cmd_explain(args: argparse.Namespace) -> int:
    from mreaper import podmem, policy, scope
    from mreaper.linux import cgroup

    cfg = load_config(args)
    candidates, warnings = policy.scan()
    for w in warnings:
        print(f"mreaper explain: warning: {w}", file=sys.stderr)
    try:
        unified = cgroup.find_mounts().unified
    except OSError:
        unified = ""
    if cfg.pods:
        candidates = podmem.with_requests(candidates, unified)
    prefs = scope.preferences(candidates, unified)
    limit = None if args.all else 20
    if not args.scope or args.scope == scope.MACHINE:
        growth: dict[tuple[int, int], int] = {}
        if args.growth > 0:
            import time

            before = {(c.pid, c.starttime): c.rss for c in candidates}
            time.sleep(args.growth)
            candidates, _ = policy.scan(private=True)
            if cfg.pods:
                candidates = podmem.with_requests(candidates, unified)
            prefs = scope.preferences(candidates, unified)
            growth = {(c.pid, c.starttime): c.rss - before.get((c.pid, c.starttime), 0)
                      for c in candidates}
        ranked = policy.rank(candidates, cfg.rules, sort_by=cfg.sort_by, min_rss=cfg.min_rss,
                             cgroup_preferences=prefs, pods=cfg.pods)
        print("scope machine: every process")
        print(policy.explain_table(ranked, limit=limit))
        if cfg.families:
            _explain_families(ranked, growth, cfg.growth_weight, args.growth, limit)
        return 0
    resolved = scope.resolve_scopes(cfg, unified) if unified else {}
    names = sorted(resolved)
    chosen = {n: v for n, v in resolved.items()
              if n == args.scope or n.split("@", 1)[0] == args.scope}
    if not chosen:
        known = ", ".join(["machine", *names]) or "machine"
        print(f"mreaper explain: --scope {args.scope!r}: no such scope with a cgroup present "
              f"now; known: {known}", file=sys.stderr)
        return EXIT_USAGE
    for name, (sc, path) in chosen.items():
        rel = cgroup.relative(unified, path)
        ranked = policy.rank(candidates, cfg.rules, sort_by=cfg.sort_by, min_rss=cfg.min_rss,
                             scope_cgroup=rel, cgroup_preferences=prefs, pods=cfg.pods)
        inside = [r for r in ranked if policy.in_scope(r.candidate.cgroup, rel)]
        print(f"scope {name}: cgroup {path}; unit {sc.unit}"
              + (f" by {sc.select}" if sc.unit == "cgroup" else ""))
        if sc.unit == "cgroup":
            children = scope.child_cgroups(path, unified, candidates, ranked, previous={},
                                           interval=cfg.scan_interval)
            pick = scope.pick_child(children, sc.select)
            for child in children:
                mark = "->" if pick is not None and child.path == pick.path else "  "
                print(f"{mark} {child.path}  size {fmt_bytes(child.size)}  pressure "
                      f"{child.pressure:.1f}%  {child.excluded or 'eligible'}")
            if pick is None:
                print("   no child cgroup may be killed: a process would be chosen instead")
        print(policy.explain_table(inside, limit=limit))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    try:
        victim = Victim.open(args.pid)
    except VictimForbidden as e:
        print(f"mreaper kill: {e}", file=sys.stderr)
        return EXIT_FORBIDDEN
    except VictimError as e:
        print(f"mreaper kill: {e}", file=sys.stderr)
        return EXIT_USAGE
    # Ctrl-C (or a SIGTERM) while the victim is in its SIGTERM grace: it was meant to
    # die, so it gets its SIGKILL now and is reaped, and we say so; before, a
    # KeyboardInterrupt traceback left it SIGTERMed and alive with nothing said.
    escalation = Escalation()
    interrupted: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        interrupted.append(name)
        escalation.stop(f"interrupted ({name}): SIGKILL at once")

    saved = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with victim:
            if _exited(victim):
                print(f"mreaper kill: PID {victim.pid} ({printable(victim.name)}) is "
                      f"already dead: a zombie waiting for its parent (PID "
                      f"{victim.stat.ppid}) to reap it; its memory is already freed, nothing "
                      "was signalled", file=sys.stderr)
                return EXIT_ZOMBIE
            report = kill_and_reap(victim, KillOptions(term_timeout=args.term_timeout,
                                                       mrelease=not args.no_mrelease),
                                   reason="mreaper kill", escalation=escalation)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        escalation.close()
    print(report.to_json() if args.json else report.human())
    if interrupted:
        what = ("spared it" if report.spared else
                "sent " + "+".join(s.name for s in report.signals)
                + (f", process_mrelease {report.mrelease.value}"
                   if report.mrelease is not Mrelease.NOT_CALLED else "")
                + (", it exited" if report.exited else ", it has not exited yet"))
        print(f"mreaper kill: interrupted by {interrupted[0]}: {what}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_USAGE if report.spared else 0


def _exited(victim: Victim) -> bool:
    """The whole process has exited and waits to be reaped (a zombie).  A pidfd polls
    readable exactly then (kernel/pid.c pidfd_poll: the thread group is empty), unlike
    "State: Z" in /proc, which a leader that called pthread_exit shows while its other
    threads run on and hold the memory."""
    return bool(select.select([victim.pidfd], [], [], 0)[0])


def _reader_gone(stream: TextIO | None) -> bool:
    """`stream`'s file is a pipe (or socket) whose reading end is closed: poll says
    POLLERR for a pipe without readers (fs/pipe.c pipe_poll), POLLHUP for a socket whose
    peer is gone."""
    if stream is None:
        return False
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # replaced by a test harness, or closed
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in poller.poll(0))


def main(argv: Sequence[str] | None = None) -> int:
    """`mreaper`: run the command.  Output into a pipe whose reader left early
    (`mreaper explain --all | head -1`) ends the command quietly with EXIT_PIPE (141,
    what a shell reports for a tool killed by SIGPIPE), without a traceback: the rest of
    the output has nowhere to go.  SIGPIPE itself stays ignored (Python's default), so
    a closed socket is an error where it happens, never a silent death."""
    try:
        try:
            return _main(argv)
        finally:
            # Flushed here, not at interpreter exit, where a BrokenPipeError would only
            # be printed as "Exception ignored" with exit code 120.  (None: started
            # with fd 1 closed.)
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        gone = [s for s in (sys.stdout, sys.stderr) if _reader_gone(s)]
        if not gone:
            raise  # not our output: a socket or pipe of the command's own, a bug to see
        # The Python documentation's recipe (library/signal.html, "Note on SIGPIPE"): point
        # the dead streams at /dev/null so that the flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in gone:
            assert stream is not None
            os.dup2(devnull, stream.fileno())
        os.close(devnull)
        return EXIT_PIPE


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    if argv[:1] == ["run"]:
        # The daemon stays resident for months: it loads only what it runs.  Arguments
        # `run` does not know go to the full parser below, for its usual message.
        parsed, rest = build_run_parser().parse_known_args(argv[1:])
        if not rest:
            parsed.command = "run"
            args = parsed
    commands: dict[str, Callable[[argparse.Namespace], int]] = {"run": cmd_run}
    if args is None:
        from mreaper import cli_status, install_files
        from mreaper.cli_history import cmd_history

        args = build_parser().parse_args(argv)
        commands.update({"kill": cmd_kill, "config": cmd_config, "explain": cmd_explain,
                         "history": cmd_history,
                         "install-files": install_files.cmd_install_files})
        commands.update(cli_status.COMMANDS)
    if args.command in commands:
        try:
            return commands[args.command](args)
        except config.ConfigError as e:
            print(f"mreaper {args.command}: {e}", file=sys.stderr)
            return EXIT_USAGE
    if args.command == "demo":
        from mreaper.demo import run_demo

        return run_demo(size_mib=args.size, as_json=args.json)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
