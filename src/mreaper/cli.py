"""The `mreaper` command: thin argument parsing over the library and the daemon."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mreaper import __version__
from mreaper.reap import (
    KillOptions,
    Victim,
    VictimError,
    VictimForbidden,
    kill_and_reap,
)

EXIT_USAGE = 2      # bad arguments or a target we refuse: nothing was signalled
EXIT_FORBIDDEN = 1  # permission denied: nothing was signalled


def _nonnegative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed is 0 to 3600 seconds")
    return value


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process ID (a positive integer)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mreaper", description=__doc__)
    p.add_argument("--version", action="version", version=f"mreaper {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    k = sub.add_parser("kill", help="kill one process through a pidfd and reap it at once")
    k.add_argument("pid", type=_pid, metavar="PID")
    k.add_argument("--term-timeout", type=_nonnegative_seconds, default=0.0, metavar="S",
                   help="send SIGTERM first and SIGKILL after S seconds (default: SIGKILL at once)")
    k.add_argument("--json", action="store_true", help="print the kill report as JSON")
    k.add_argument("--no-mrelease", action="store_true",
                   help="plain SIGKILL without process_mrelease (for comparison)")

    d = sub.add_parser("demo", help="show plain SIGKILL against kill-and-reap on a starved hog")
    d.add_argument("--size", type=int, default=256, metavar="MIB",
                   help="memory the hog allocates, in MiB (default 256)")
    d.add_argument("--json", action="store_true", help="print both kill reports as JSON")
    return p


def cmd_kill(args: argparse.Namespace) -> int:
    try:
        victim = Victim.open(args.pid)
    except VictimForbidden as e:
        print(f"mreaper kill: {e}", file=sys.stderr)
        return EXIT_FORBIDDEN
    except VictimError as e:
        print(f"mreaper kill: {e}", file=sys.stderr)
        return EXIT_USAGE
    with victim:
        report = kill_and_reap(victim, KillOptions(term_timeout=args.term_timeout,
                                                   mrelease=not args.no_mrelease),
                               reason="mreaper kill")
    print(report.to_json() if args.json else report.human())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "kill":
        return cmd_kill(args)
    if args.command == "demo":
        from mreaper.demo import run_demo

        return run_demo(size_mib=args.size, as_json=args.json)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
