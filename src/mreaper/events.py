"""Events: kill reports and pressure episodes as JSON lines; reading them back (`mreaper history`).

One event per line, each a JSON object with an "event" key ("kill" or "episode"), a
"scope" and a "wall_time" (seconds since the epoch).  A line is written whole or not
at all: a write that fails half-way (ENOSPC) is cut back off the file, so one full
disk never corrupts the lines written after space comes back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from mreaper.reap import KillReport, fmt_bytes
from mreaper.report import Episode, Sample, pod_fields

log = logging.getLogger("mreaper")

STDOUT = "-"
FILE_MODE = 0o600  # command lines can carry secrets: root-readable only


class EventsSink:
    """Append each kill report and each episode phase as one JSON line to `path`
    ("-": standard output).

    The file is opened with O_APPEND and every line goes out in one write(2) loop; on
    any OSError the partial line is truncated away, the file is closed, the error is
    raised (Fanout logs it once) and the next event reopens the file.  A file renamed
    or removed under us (logrotate) is noticed and a new one created at `path`.
    """

    def __init__(self, path: str) -> None:
        if not path:
            raise ValueError("EventsSink needs a path (or \"-\" for standard output)")
        self.path = path
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._dirty = False  # a partial line could not be cut off: start the next on a new line
        if path != STDOUT:
            self._open()  # fail at start-up, not at the first kill

    # -- the Sink protocol
    def kill(self, report: KillReport, scope: str) -> None:
        self.write({"event": "kill", "scope": scope, **report.to_dict(), **pod_fields(report)})

    def episode(self, event: Episode) -> None:
        self.write(event.to_dict())

    wants_samples = False  # the events file has kills and episodes, no gauges

    def sample(self, sample: Sample) -> None:
        pass

    def close(self) -> None:
        if self._fd is not None and self.path != STDOUT:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None

    # -- writing
    def write(self, event: Mapping[str, object]) -> None:
        """One event as one line; raises OSError if it could not be written whole."""
        line = (json.dumps(event, sort_keys=True, default=str) + "\n").encode()
        if self.path == STDOUT:
            _write_all(sys.stdout.fileno(), line)
            return
        fd = self._current_fd()
        if self._dirty:
            line = b"\n" + line
        try:
            start = os.fstat(fd).st_size
        except OSError:
            self.close()
            raise
        try:
            _write_all(fd, line)
        except OSError:
            try:
                os.ftruncate(fd, start)
                self._dirty = False
            except OSError:
                self._dirty = True
            self.close()
            raise
        self._dirty = False

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     FILE_MODE)
        st = os.fstat(fd)
        self._fd, self._ino = fd, (st.st_dev, st.st_ino)
        return fd

    def _current_fd(self) -> int:
        if self._fd is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._ino:
                    return self._fd
            except OSError:
                pass
            self.close()  # rotated or removed: start a new file at the path
        return self._open()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - write(2) returns an error rather than 0 here
            raise OSError(errno.EIO, "write returned 0")
        view = view[n:]


# --- reading back ------------------------------------------------------------------------


class HistoryError(ValueError):
    """A bad `mreaper history` argument: names the argument, the value and what is allowed."""

    def __init__(self, arg: str, value: object, allowed: str) -> None:
        super().__init__(f"{arg} = {value!r}: {allowed}")
        self.arg, self.value, self.allowed = arg, value, allowed


SINCE_HELP = ("an ISO date/time (e.g. 2026-05-09, 2026-05-09T14:30, "
              "\"2026-05-09 14:30:00+02:00\"; without a zone: local time) or a time back "
              "from now: a number with s, m, h or d (e.g. 90s, 10m, 2h, 1d)")
LAST_HELP = "a positive whole number of events (ASCII digits)"
# re.ASCII: \d would take "\u0665" (Arabic-Indic five) and float() would read it
_RELATIVE = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,12})?)\s*([smhd])\s*$", re.ASCII)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, now: float | None = None) -> float:
    """`--since` as seconds since the epoch: an ISO time or "10m"/"2h"/"1d" back from now."""
    m = _RELATIVE.match(value)
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise HistoryError("--since", value, SINCE_HELP) from None
    if when.tzinfo is None:
        when = when.astimezone()  # naive: local time
    return when.timestamp()


def read_events(path: str, last: int | None = None, since: str | float | None = None, *,
                now: float | None = None, bad_lines: list[tuple[int, str]] | None = None,
                ) -> list[dict[str, Any]]:
    """The events in `path` ("-": standard input), oldest first: those at or after
    `since` (an ISO time, "10m"/"2h"/"1d", or seconds since the epoch), of them the
    `last` N.  Damaged lines (see `damage`) are skipped; (line number, what is wrong)
    is appended to `bad_lines` for each, if given.  Raises HistoryError for bad
    arguments, OSError for the file."""
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
        raise HistoryError("--last", last, LAST_HELP)
    cutoff = since if since is None or isinstance(since, int | float) else parse_since(since, now)
    kept: deque[dict[str, Any]] = deque(maxlen=last)
    if path == STDOUT:
        kept.extend(_select(sys.stdin.buffer, cutoff, bad_lines))
    else:
        with open(path, "rb") as f:
            kept.extend(_select(f, cutoff, bad_lines))
    return list(kept)


# The times `datetime.fromtimestamp` can show in any zone: from the epoch to the end of
# year 9999 less a day (a zone's offset).  1e20 overflows time_t, NaN is no time at all.
WALL_MIN, WALL_MAX = 0.0, 253_402_214_400.0


def damage(event: object) -> str | None:
    """What is wrong with one decoded line, or None: an event is a JSON object whose
    "event" is a string and whose "wall_time" is a time (seconds since the epoch, within
    1970-9999, finite).  The other fields are shown as they are, or "?" (see `_row`)."""
    if not isinstance(event, dict):
        return f"not a JSON object but {type(event).__name__ if event is not None else 'null'}"
    kind = event.get("event")
    if not isinstance(kind, str):
        return '"event" is missing or not a string' if kind is None else \
            f'"event" is {_shown(kind)}, not a string'
    wall = event.get("wall_time")
    if wall is None:
        return '"wall_time" is missing'
    if isinstance(wall, bool) or not isinstance(wall, int | float):
        return f'"wall_time" is {_shown(wall)}, not a number'
    if not WALL_MIN <= wall <= WALL_MAX:  # NaN compares false: refused too
        return (f'"wall_time" is {_shown(wall)}: not a time (seconds since the epoch, '
                f"{WALL_MIN:.0f} to {WALL_MAX:.0f})")
    return None


def _shown(value: object, limit: int = 40) -> str:
    try:
        text = json.dumps(value)  # the value as the file has it: 1e+20, NaN, "x"
    except (ValueError, RecursionError):
        text = type(value).__name__
    return _printable(text, limit)


def _select(lines: Iterable[bytes], cutoff: float | None,
            bad_lines: list[tuple[int, str]] | None) -> Iterator[dict[str, Any]]:
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
        except ValueError as e:  # bad JSON, bad UTF-8, an integer of over 4300 digits
            problem: str | None = f"not JSON ({_printable(str(e), 80)})"
        except RecursionError:  # "[[[[...": json recurses on each nesting
            problem = "not JSON (nested too deeply)"
        else:
            problem = damage(event)
        if problem is not None:
            if bad_lines is not None:
                bad_lines.append((number, problem))
            continue
        if cutoff is not None and event["wall_time"] < cutoff:
            continue
        yield event


# --- the table ------------------------------------------------------------------------------

HEADER = ("time", "scope", "event", "pid/name | phase/severity", "rss", "outcome",
          "kill-to-free ms", "freed")
_RIGHT = {4, 6, 7}  # right-aligned columns (numbers)


def history_table(events: Iterable[Mapping[str, Any]]) -> str:
    """A fixed-width table, one row per event; names are shown with control characters
    escaped, so a hostile process name cannot break the table or the terminal."""
    rows = [HEADER] + [_row(e) for e in events]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in _RIGHT else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _row(e: Mapping[str, Any]) -> tuple[str, ...]:
    wall = _finite(e.get("wall_time"))
    when = (dt.datetime.fromtimestamp(wall).strftime("%Y-%m-%d %H:%M:%S")
            if wall is not None and WALL_MIN <= wall <= WALL_MAX else "?")
    scope = _printable(str(e.get("scope", "?")))
    kind = _printable(str(e.get("event", "?")))
    if kind == "kill":
        holdings = e.get("holdings")
        rss = _finite(holdings.get("vm_rss")) if isinstance(holdings, Mapping) else None
        ktf = _finite(e.get("kill_to_free_s"))
        freed = _finite(e.get("freed_bytes"))
        return (when, scope, kind,
                f"{_printable(str(e.get('pid', '?')), 12)} {_printable(str(e.get('name', '')))}",
                fmt_bytes(int(rss) if rss is not None else None),
                _printable(str(e.get("mrelease", "?"))),
                f"{ktf * 1000:.1f}" if ktf is not None else "?",
                fmt_bytes(int(freed) if freed is not None else None))
    if kind == "episode":
        phase = _printable(str(e.get("phase", "?")))
        duration = _finite(e.get("duration_s"))
        outcome = (f"after {duration:.1f} s" if phase != "start" and
                   duration is not None else "")
        return (when, scope, kind, f"{phase}/{_printable(str(e.get('severity', '?')))}", "",
                outcome, "", "")
    return (when, scope, kind, "", "", "", "", "")


def _finite(value: object) -> float | None:
    """A number a row can show, else None ("?"): not a bool, not NaN or infinite, not an
    integer too large for a float (float(10**400) raises OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and abs(number) < 2.0**63 else None


def _printable(text: str, limit: int = 40) -> str:
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"
