"""`mreaper history`: past kills and pressure episodes from the events file, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from mreaper import config
from mreaper.cliargs import ascii_integer
from mreaper.events import LAST_HELP, STDOUT, HistoryError, history_table, parse_since, read_events

EXIT_USAGE = 2
EXIT_IO = 1


def _last(text: str) -> int:
    last = ascii_integer(text)
    if last is None or last < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed is {LAST_HELP}")
    return last


def _since(text: str) -> str:
    try:
        parse_since(text)
    except HistoryError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed is {e.allowed}") from None
    return text


def add_history_parser(
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add `history` to the `mreaper` subcommands."""
    h = subparsers.add_parser("history", help="past kills and pressure episodes from the events "
                              "file")
    h.add_argument("--events", metavar="PATH",
                   help="the events file (default: [events] path of the configuration)")
    h.add_argument("--config", metavar="PATH",
                   help=f"configuration to take the events path from (default "
                        f"{config.DEFAULT_PATH}, if present)")
    h.add_argument("--last", type=_last, metavar="N", help="only the last N events")
    h.add_argument("--since", type=_since, metavar="T",
                   help="only events from T on: an ISO time (local unless it has a zone) or "
                        "a time back from now like 30s, 10m, 2h, 1d")
    h.add_argument("--json", action="store_true", help="the events as JSON lines, as stored")
    return h


class NoEventsFile(Exception):
    """No events file to read: none configured, or events go to standard output."""


EXAMPLE_EVENTS = "/var/log/mreaper/events.jsonl"
SHOWN_BAD = 10  # damaged lines reported one by one; the rest are counted


def _events_path(args: argparse.Namespace) -> str:
    if args.events:
        return str(args.events)
    cfg = config.load(args.config, required=args.config is not None)
    conf = args.config or config.DEFAULT_PATH
    if not cfg.events_path:
        where = (f"{conf} does not exist and the built-in defaults record none"
                 if cfg.origin == "built-in defaults" else f"{conf} has no [events] path")
        raise NoEventsFile(
            f"no events file is configured, so there is no history to show ({where}); to "
            f"record kills and pressure episodes, put [events] path = \"{EXAMPLE_EVENTS}\" "
            f"in {conf} and restart the daemon; to read a file, give --events PATH")
    if cfg.events_path == STDOUT:
        raise NoEventsFile(f"events go to standard output ([events] path = \"-\" in {conf}), "
                           "not to a file: give --events PATH")
    return cfg.events_path


def cmd_history(args: argparse.Namespace) -> int:
    try:
        path = _events_path(args)
        bad: list[tuple[int, str]] = []
        events = read_events(path, last=args.last, since=args.since, bad_lines=bad)
    except (HistoryError, config.ConfigError, NoEventsFile) as e:
        print(f"mreaper history: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"mreaper history: {e.filename or path}: {e.strerror}", file=sys.stderr)
        return EXIT_IO
    # Damaged lines are skipped, each named (file:line: what is wrong) so that it can
    # be found and mended; the good events are shown all the same.
    for number, problem in bad[:SHOWN_BAD]:
        print(f"mreaper history: warning: {path}:{number}: skipped: {problem}", file=sys.stderr)
    if len(bad) > SHOWN_BAD:
        print(f"mreaper history: warning: {path}: skipped {len(bad) - SHOWN_BAD} more damaged "
              f"lines ({len(bad)} in all)", file=sys.stderr)
    if args.json:
        for event in events:
            print(json.dumps(event, sort_keys=True))
    else:
        print(history_table(events))
    return 0
