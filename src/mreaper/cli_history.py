"""`mreaper history`: past kills and pressure episodes from the events file, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from mreaper import config
from mreaper.events import LAST_HELP, STDOUT, HistoryError, history_table, parse_since, read_events

EXIT_USAGE = 2
EXIT_IO = 1


def _last(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed is {LAST_HELP}")
    return int(text)


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


def _events_path(args: argparse.Namespace) -> str:
    if args.events:
        return str(args.events)
    cfg = config.load(args.config, required=args.config is not None)
    if not cfg.events_path:
        raise HistoryError("--events", None, "no events file: give --events PATH or set "
                           f"[events] path in {cfg.origin}")
    if cfg.events_path == STDOUT:
        raise HistoryError("--events", None, "events go to standard output ([events] path = "
                           f"\"-\" in {cfg.origin}): give --events PATH")
    return cfg.events_path


def cmd_history(args: argparse.Namespace) -> int:
    try:
        path = _events_path(args)
        bad: list[int] = []
        events = read_events(path, last=args.last, since=args.since, bad_lines=bad)
    except (HistoryError, config.ConfigError) as e:
        print(f"mreaper history: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"mreaper history: {e.filename or path}: {e.strerror}", file=sys.stderr)
        return EXIT_IO
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        print(f"mreaper history: warning: {path}: skipped {len(bad)} unreadable lines "
              f"({shown})", file=sys.stderr)
    if args.json:
        for event in events:
            print(json.dumps(event, sort_keys=True))
    else:
        print(history_table(events))
    return 0
