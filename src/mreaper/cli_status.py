"""`mreaper status` and `mreaper top`: what the running daemon decides from, read from
its status socket, or computed here when no daemon answers.

`status` prints each scope's figures, its levels and the distance to them, the top
candidates and the last kills, once.  `top` redraws the same live in the terminal with
a gauge per scope, using plain ANSI escapes (alternate screen, hidden cursor, cbreak
input); q or Ctrl-C quits and restores the terminal.  Without a terminal, `top` prints
plain frames (`--once`: one frame).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any, TextIO

from mreaper import config as config_mod
from mreaper import policy
from mreaper.cliargs import seconds_between
from mreaper.config import Config
from mreaper.detect import assess, parse_pressure, read_pressure_file
from mreaper.linux import procfs
from mreaper.reap import fmt_bytes
from mreaper.status import (
    CLIENT_TIMEOUT,
    NoDaemon,
    QueryDenied,
    StatusError,
    UntrustedServer,
    query,
)

TOP_CANDIDATES = 10
LAST_KILLS = 5
LEVEL_MARKS = {"warn": "W", "term": "T", "kill": "K"}

# ANSI: select graphic rendition, alternate screen, cursor
_RESET, _BOLD, _DIM = "\x1b[0m", "\x1b[1m", "\x1b[2m"
_SEVERITY_COLOR = {"none": "\x1b[32m", "warn": "\x1b[33m", "term": "\x1b[31m",
                   "kill": "\x1b[1;31m"}
ENTER_SCREEN = "\x1b[?1049h\x1b[?25l"   # alternate screen on, cursor hidden
LEAVE_SCREEN = "\x1b[?25h\x1b[?1049l"   # cursor shown, alternate screen off


# --- the arguments -----------------------------------------------------------------------


def add_status_parsers(subparsers: Any) -> None:
    """Add `status` and `top` to the `mreaper` command's subparsers."""
    s = subparsers.add_parser("status", help="show what the running daemon decides from "
                                             "(or compute it here when none runs)")
    t = subparsers.add_parser("top", help="live view: a gauge per scope, the top candidates, "
                                          "the last kills (q quits)")
    for p in (s, t):
        p.add_argument("--socket", metavar="PATH",
                       help="the daemon's status socket (default: [status] socket of the "
                            f"configuration, {Config().status_socket})")
        p.add_argument("--config", metavar="PATH",
                       help="configuration for the socket path and, when no daemon answers, "
                            f"the levels and rules (default {config_mod.DEFAULT_PATH}, if present)")
        p.add_argument("--timeout", type=seconds_between(0.1, 3600), default=CLIENT_TIMEOUT,
                       metavar="S",
                       help=f"wait this long for the daemon's answer (default {CLIENT_TIMEOUT:g})")
    s.add_argument("--json", action="store_true", help="print the status as one JSON document")
    t.add_argument("--interval", type=seconds_between(0.1, 3600), default=1.0, metavar="S",
                   help="seconds between refreshes (default 1)")
    t.add_argument("--once", action="store_true", help="print one frame and exit")


# --- where the figures come from ------------------------------------------------------------


def _psi_averages(path: str) -> dict[str, float]:
    try:  # non-blocking and bounded: a FIFO or /dev/zero in its place is no figure
        return parse_pressure(read_pressure_file(path))
    except (OSError, ValueError):
        return {}


def local_status(cfg: Config, top: int = TOP_CANDIDATES,
                 proc: str = procfs.PROC) -> dict[str, Any]:
    """What a daemon with `cfg` would show, computed here and now: the machine scope from
    /proc/meminfo, PSI averages instead of triggers (a trigger only fires for a process
    that armed it), candidates from a fresh scan.  No kills: only the daemon knows them."""
    mem = procfs.read_meminfo(proc)
    avgs = _psi_averages(f"{proc}/pressure/memory")
    active = {lvl: avgs.get(trig.kind, 0.0) >= 100.0 * trig.stall_us / trig.window_us
              for lvl, trig in cfg.psi.items() if trig is not None}
    verdict = assess(cfg, mem, active)
    scope: dict[str, Any] = {
        "scope": "machine", "severity": verdict.severity.name.lower(), "reason": verdict.reason,
        "mem_total": mem.mem_total, "mem_available": mem.mem_available,
        "swap_total": mem.swap_total, "swap_free": mem.swap_free,
        "levels": {lvl: cfg.memory[lvl].bytes_of(mem.mem_total) for lvl in config_mod.LEVELS},
        "swap_levels": {lvl: cfg.swap[lvl].bytes_of(mem.swap_total) for lvl in config_mod.LEVELS},
        "psi": avgs,
    }
    candidates, _warnings = policy.scan(proc)
    ranked = policy.rank(candidates, cfg.rules, sort_by=cfg.sort_by, min_rss=cfg.min_rss,
                         pods=cfg.pods)
    return {
        "pid": None, "dry_run": cfg.dry_run, "config": cfg.origin, "scopes": [scope],
        "candidates": [{"pid": r.candidate.pid, "name": r.candidate.name, "rss": r.candidate.rss,
                        "oom_score": r.candidate.oom_score, "score": r.score,
                        "excluded": r.excluded, "rules": list(r.touched_by)}
                       for r in ranked[:top]],
        "kills": [],
    }


def fetch(socket_path: str, cfg: Config, timeout: float = CLIENT_TIMEOUT,
          origin: str = "") -> tuple[dict[str, Any], str]:
    """The daemon's status, or the local one; and the line that says which.  The
    status is as answered (JSON-safe, for --json); the line is printable (escaped).

    "origin" names where an empty socket path came from (the status socket is off)."""
    if not socket_path:
        why = f"the status socket is off in {origin or cfg.origin}"
    else:
        try:
            answer = query(socket_path, timeout)
        except NoDaemon:
            why = f"no daemon running at {socket_path}"
        except QueryDenied as e:
            why = f"cannot query the daemon at {socket_path} ({e})"
        except UntrustedServer as e:
            why = f"refused to query {socket_path} ({e})"
        except StatusError as e:
            why = f"the daemon at {socket_path} did not answer ({e})"
        else:
            if "error" not in answer:
                answer["source"] = "daemon"
                answer["socket"] = socket_path
                pid = answer.get("pid")
                extra = "; dry run" if answer.get("dry_run") else ""
                return answer, policy.printable(
                    f"mreaper daemon {pid} at {socket_path} "
                    f"(config: {answer.get('config', '?')}{extra})")
            why = f"the daemon at {socket_path} refused: {answer['error']}"
    line = f"{why}: computed locally"
    st = local_status(cfg)
    st["source"] = "local"
    st["socket"] = socket_path
    st["note"] = line
    return st, policy.printable(line)


def printable_tree(value: Any) -> Any:
    """`value` (a decoded JSON document) with every string in it, keys too, escaped
    (policy.printable): what a daemon answers, or a fake one, or a process names
    itself, reaches the terminal only as visible text, never as an escape sequence
    or a line break."""
    if isinstance(value, str):
        return policy.printable(value)
    if isinstance(value, Mapping):
        return {printable_tree(k): printable_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable_tree(v) for v in value]
    return value


def _config_and_socket(args: argparse.Namespace) -> tuple[Config, str]:
    cfg = config_mod.load(args.config, required=args.config is not None)
    return cfg, args.socket if args.socket is not None else cfg.status_socket


# --- rendering ---------------------------------------------------------------------------------


def _num(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _signed(n: int) -> str:
    return ("+" if n >= 0 else "-") + fmt_bytes(abs(n))


def _levels_line(value: int | None, levels: Mapping[str, Any]) -> str:
    """"warn 3.1 GiB (9.2 GiB above)  term ...": each level and the distance to it."""
    parts = []
    for lvl in config_mod.LEVELS:
        bound = _num(levels.get(lvl))
        if bound is None:
            parts.append(f"{lvl} off")
        elif value is None:
            parts.append(f"{lvl} {fmt_bytes(bound)}")
        elif value > bound:
            parts.append(f"{lvl} {fmt_bytes(bound)} ({fmt_bytes(value - bound)} above)")
        else:
            parts.append(f"{lvl} {fmt_bytes(bound)} (REACHED, {fmt_bytes(bound - value)} below)")
    return "  ".join(parts)


def _pct(part: int | None, total: int | None) -> str:
    if part is None or not total:
        return ""
    return f" ({100.0 * part / total:.1f}%)"


def gauge_of(scope: Mapping[str, Any]) -> tuple[str, int | None, int | None, Mapping[str, Any]]:
    """(label, value, total, levels) of a scope's main gauge: MemAvailable against MemTotal
    for the machine, headroom against the limit for a cgroup."""
    if "mem_total" in scope:
        return ("MemAvailable", _num(scope.get("mem_available")), _num(scope.get("mem_total")),
                scope.get("levels") or {})
    return ("headroom", _num(scope.get("headroom")), _num(scope.get("limit")),
            scope.get("levels") or {})


def scope_lines(scope: Mapping[str, Any]) -> list[str]:
    name = str(scope.get("scope", "?"))
    severity = str(scope.get("severity", "?"))
    reason = str(scope.get("reason") or "")
    state = "ok: no level held" if severity == "none" else f"{severity.upper()}: {reason}"
    lines = [f"{name}: {state}"]
    label, value, total, levels = gauge_of(scope)
    if "mem_total" in scope:
        lines.append(f"  memory  MemAvailable {fmt_bytes(value)} of {fmt_bytes(total)}"
                     f"{_pct(value, total)}")
        lines.append(f"          {_levels_line(value, levels)}")
        swap_total = _num(scope.get("swap_total"))
        swap_free = _num(scope.get("swap_free"))
        if swap_total:
            lines.append(f"  swap    SwapFree {fmt_bytes(swap_free)} of {fmt_bytes(swap_total)}"
                         f"{_pct(swap_free, swap_total)}")
            lines.append(f"          {_levels_line(swap_free, scope.get('swap_levels') or {})}")
        else:
            lines.append("  swap    none (the swap source holds: it never vetoes a kill)")
    else:
        current = _num(scope.get("current"))
        lines.append(f"  cgroup  {scope.get('cgroup', '?')}: current {fmt_bytes(current)}, "
                     f"limit {fmt_bytes(total) if total is not None else 'none'}, "
                     f"{label} {fmt_bytes(value)}{_pct(value, total)}")
        lines.append(f"          {_levels_line(value, levels)}")
        events = scope.get("events")
        if isinstance(events, Mapping) and events:
            lines.append("  events  " + ", ".join(f"{k} {v}" for k, v in sorted(events.items())))
    psi = scope.get("psi")
    if isinstance(psi, Mapping) and psi:
        lines.append("  psi     " + _psi_text(psi))
    return lines


def _psi_text(psi: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} avg10 {float(psi[k]):.2f}%" for k in ("some", "full") if k in psi)


def candidate_lines(candidates: Sequence[Mapping[str, Any]], limit: int) -> list[str]:
    if not candidates:
        return ["top candidates: none"]
    rows = [("#", "PID", "NAME", "RSS", "OOM_SCORE", "SCORE", "NOTE")]
    position = 0
    for c in candidates[:limit]:
        excluded = c.get("excluded")
        if excluded is None:
            position += 1
        note = f"excluded: {excluded}" if excluded else "; ".join(map(str, c.get("rules") or []))
        rows.append((str(position) if excluded is None else "-", str(c.get("pid", "?")),
                     policy.printable(str(c.get("name", "?")))[:24],
                     fmt_bytes(_num(c.get("rss"))), str(c.get("oom_score", "?")),
                     str(c.get("score", "?")), note))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    right = (False, True, False, True, True, True)
    out = ["top candidates:"]
    for r in rows:
        cells = [r[i].rjust(widths[i]) if right[i] else r[i].ljust(widths[i]) for i in range(6)]
        out.append(("  " + "  ".join(cells) + "  " + r[6]).rstrip())
    return out


def _when(wall_time: object) -> str:
    if not isinstance(wall_time, int | float):
        return "?"
    t = time.localtime(wall_time)
    fmt = "%H:%M:%S" if time.strftime("%Y%m%d", t) == time.strftime("%Y%m%d") \
        else "%Y-%m-%d %H:%M:%S"
    return time.strftime(fmt, t)


def _ms(seconds: object) -> str:
    return f"{seconds * 1000:.0f} ms" if isinstance(seconds, int | float) else "?"


def kill_line(k: Mapping[str, Any]) -> str:
    """One kill report (process or cgroup) in a line."""
    freed = _num(k.get("freed_bytes"))
    tail = f"freed {fmt_bytes(freed)}" if freed is not None else "freed ?"
    tail += f", memory back in {_ms(k.get('kill_to_free_s'))}"
    if "members" in k:
        members = k.get("members") or []
        outcomes = ", ".join(f"{m.get('pid')} {m.get('mrelease')}" for m in members
                             if isinstance(m, Mapping))
        return (f"{_when(k.get('wall_time'))}  cgroup {k.get('cgroup')} ({len(members)} "
                f"processes: {outcomes}); {tail}  [{k.get('reason', '')}]")
    holdings = k.get("holdings") or {}
    rss = _num(holdings.get("vm_rss")) if isinstance(holdings, Mapping) else None
    sigs = "+".join(str(s.get("name")) for s in k.get("signals") or [] if isinstance(s, Mapping))
    return (f"{_when(k.get('wall_time'))}  {k.get('pid')} "
            f"{policy.printable(str(k.get('name', '?')))!r} rss {fmt_bytes(rss)}; "
            f"{sigs or 'no signal'}; process_mrelease {k.get('mrelease', '?')}; {tail}  "
            f"[{k.get('reason', '')}]")


def kill_lines(st: Mapping[str, Any], limit: int) -> list[str]:
    kills = [k for k in st.get("kills") or [] if isinstance(k, Mapping)]
    if st.get("source") == "local":
        return ["last kills: known only to the daemon"]
    if not kills:
        return ["last kills: none"]
    return ["last kills:"] + ["  " + kill_line(k) for k in kills[-limit:][::-1]]


def render_status(st: Mapping[str, Any], source_line: str) -> str:
    """The human form of `mreaper status`: the source line first."""
    lines = [source_line]
    scopes = [s for s in st.get("scopes") or [] if isinstance(s, Mapping)]
    if not scopes:
        lines.append("scopes: no look yet")
    for scope in scopes:
        lines += scope_lines(scope)
    lines += candidate_lines(st.get("candidates") or [], TOP_CANDIDATES)
    lines += kill_lines(st, LAST_KILLS)
    return "\n".join(lines)


def gauge(value: int | None, total: int | None, levels: Mapping[str, Any], width: int, *,
          severity: str = "none", color: bool = False) -> str:
    """`[#######.....]` of `width` cells inside the brackets: the filled part is value /
    total, with the levels marked W, T, K where they fall (a mark overwrites the cell)."""
    width = max(width, 3)
    if value is None or not total:
        return "[" + "?" * width + "]"
    filled = min(width, max(0, round(width * value / total)))
    cells = ["#"] * filled + ["."] * (width - filled)
    for lvl in ("warn", "term", "kill"):  # lower levels drawn last: they win a shared cell
        bound = _num(levels.get(lvl))
        if bound is not None:
            cells[min(width - 1, max(0, int(width * bound / total)))] = LEVEL_MARKS[lvl]
    text = "".join(cells)
    if color:
        sev = _SEVERITY_COLOR.get(severity, "")
        text = sev + text[:filled] + _RESET + _DIM + text[filled:] + _RESET
    return "[" + text + "]"


def render_top(st: Mapping[str, Any], source_line: str, *, width: int, height: int,
               interval: float, color: bool = False, now: float | None = None) -> list[str]:
    """One frame of `mreaper top`, at most `height` lines each at most `width` cells wide
    (color escapes do not count)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    title = f"mreaper top  {stamp}  every {interval:g} s, q quits"[:width]
    lines: list[tuple[str, str | None]] = []  # (plain text, colored text or None)
    lines.append((title, _BOLD + title + _RESET if color else None))
    lines.append((source_line[:width], None))
    scopes = [s for s in st.get("scopes") or [] if isinstance(s, Mapping)]
    if not scopes:
        lines.append(("scopes: no look yet", None))
    for scope in scopes:
        label, value, total, levels = gauge_of(scope)
        name = str(scope.get("scope", "?"))[:12].ljust(12)
        severity = str(scope.get("severity", "?"))
        right = (f" {label} {fmt_bytes(value)} / {fmt_bytes(total)}"
                 f"  {'ok' if severity == 'none' else severity.upper()}")
        bar = max(10, width - len(name) - 1 - 2 - len(right))
        plain = f"{name} {gauge(value, total, levels, bar)}{right}"
        colored = None
        if color and len(plain) <= width:
            bar_text = gauge(value, total, levels, bar, severity=severity, color=True)
            colored = f"{name} {bar_text}{right}"
        lines.append((plain[:width], colored))
        lines.append(((" " * 13 + _levels_line(value, levels))[:width], None))
        if severity != "none" and scope.get("reason"):
            lines.append(((" " * 13 + str(scope["reason"]))[:width], None))
        swap_total = _num(scope.get("swap_total"))
        if swap_total:
            swap_free = _num(scope.get("swap_free"))
            swap_levels = scope.get("swap_levels") or {}
            sw_right = f" SwapFree {fmt_bytes(swap_free)} / {fmt_bytes(swap_total)}"
            sw_bar = max(10, width - 13 - 2 - len(sw_right))
            lines.append(((" " * 13 + gauge(swap_free, swap_total, swap_levels, sw_bar)
                           + sw_right)[:width], None))
        psi = scope.get("psi")
        if isinstance(psi, Mapping) and psi:
            lines.append(((" " * 13 + "psi " + _psi_text(psi))[:width], None))
    lines.append(("", None))
    kills = kill_lines(st, LAST_KILLS)
    room = max(2, height - len(lines) - len(kills) - 1)
    for text in candidate_lines(st.get("candidates") or [], max(1, room - 2)):
        lines.append((text[:width], None))
    lines.append(("", None))
    for text in kills:
        lines.append((text[:width], None))
    return [(c if c is not None else p) for p, c in lines[:height]]


# --- the commands ----------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    cfg, socket_path = _config_and_socket(args)
    st, source_line = fetch(socket_path, cfg, args.timeout,
                            origin=args.config or config_mod.DEFAULT_PATH)
    if args.json:  # json.dumps escapes control characters itself (ensure_ascii)
        print(json.dumps(st, indent=2, sort_keys=True, default=str))
    else:
        print(render_status(printable_tree(st), source_line))
    return 0


class _Terminal:
    """The terminal for `top`: alternate screen, hidden cursor, cbreak input without echo;
    all restored on exit, whatever the exit (q, Ctrl-C, SIGTERM, an exception)."""

    def __init__(self, out: TextIO, inp: TextIO | None) -> None:
        self.out = out
        self.in_fd = inp.fileno() if inp is not None and inp.isatty() else None
        self._saved: list[Any] | None = None

    def __enter__(self) -> _Terminal:
        if self.in_fd is not None:
            self._saved = termios.tcgetattr(self.in_fd)
            tty.setcbreak(self.in_fd, termios.TCSANOW)  # no line buffering, no echo; ^C works
        self.out.write(ENTER_SCREEN)
        self.out.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.out.write(LEAVE_SCREEN)
            self.out.flush()
        if self.in_fd is not None and self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.in_fd, termios.TCSADRAIN, self._saved)

    def draw(self, lines: Sequence[str]) -> None:
        # Home, each line cleared to its end, the rest of the screen cleared: no flicker.
        self.out.write("\x1b[H" + "\x1b[K\r\n".join(lines) + "\x1b[K\x1b[J")
        self.out.flush()


@contextlib.contextmanager
def _signals_raise_exit(wake_w: int) -> Iterator[None]:
    """SIGTERM/SIGHUP end `top` through its `finally` (the terminal is restored); SIGWINCH
    wakes the loop to redraw at the new size."""
    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    def winch(_signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            os.write(wake_w, b"w")

    old = {sig: signal.signal(sig, handler) for sig, handler in
           ((signal.SIGTERM, stop), (signal.SIGHUP, stop), (signal.SIGWINCH, winch))}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _wait_for_key(in_fd: int | None, wake_r: int, timeout: float) -> bytes | None:
    """Keys typed within `timeout` (b"" when none), or None when input is at its end."""
    fds = [wake_r] + ([in_fd] if in_fd is not None else [])
    ready, _, _ = select.select(fds, [], [], timeout)
    keys = b""
    if wake_r in ready:
        with contextlib.suppress(OSError):
            os.read(wake_r, 64)
    if in_fd is not None and in_fd in ready:
        keys = os.read(in_fd, 64)
        if not keys:
            return None
    return keys


def cmd_top(args: argparse.Namespace) -> int:
    cfg, socket_path = _config_and_socket(args)
    origin = args.config or config_mod.DEFAULT_PATH
    out = sys.stdout

    def frame(width: int, height: int, color: bool) -> list[str]:
        st, source_line = fetch(socket_path, cfg, args.timeout, origin=origin)
        return render_top(printable_tree(st), source_line, width=width, height=height,
                          interval=args.interval, color=color)

    if args.once or not out.isatty():
        return _top_plain(frame, args.once, args.interval)
    return _top_live(frame, args.interval)


def _top_plain(frame: Callable[[int, int, bool], list[str]], once: bool,
               interval: float) -> int:
    """No terminal (or --once): frames as plain text, separated by a blank line."""
    size = shutil.get_terminal_size((100, 40))
    try:
        while True:
            print("\n".join(frame(size.columns, size.lines, False)), flush=True)
            if once:
                return 0
            time.sleep(interval)
            print(flush=True)
    except KeyboardInterrupt:
        return 0


def _top_live(frame: Callable[[int, int, bool], list[str]], interval: float) -> int:
    out = sys.stdout
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    term = _Terminal(out, sys.stdin)
    try:
        with _signals_raise_exit(wake_w), term:
            in_fd = term.in_fd
            while True:
                size = os.get_terminal_size(out.fileno())
                term.draw(frame(size.columns, size.lines, True))
                keys = _wait_for_key(in_fd, wake_r, interval)
                if keys is None:
                    in_fd = None  # input closed: keep running until a signal
                elif b"q" in keys.lower() or b"\x03" in keys:
                    return 0
    except KeyboardInterrupt:
        return 0
    finally:
        os.close(wake_r)
        os.close(wake_w)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"status": cmd_status,
                                                            "top": cmd_top}
