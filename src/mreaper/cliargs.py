"""Argument types shared by the `mreaper` subcommands.

Numbers are ASCII digits only: Python's int() and float() also take "\u0665" (an
Arabic-Indic five), "\uff15" (a fullwidth five), "5_0", " 5 ", "1e3", "nan" and "inf",
none of which a user means as a number on a command line; a PID in digits the user may
read as others must not name some process.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

# re.ASCII: [0-9] is ASCII already; the flag keeps any later \d or \s ASCII too
_INTEGER_RE = re.compile(r"[0-9]{1,18}", re.ASCII)
_DECIMAL_RE = re.compile(r"(?:[0-9]{1,18}(?:\.[0-9]{0,18})?|\.[0-9]{1,18})", re.ASCII)


def ascii_integer(text: str) -> int | None:
    """`text` as a whole number of ASCII digits (at most 18), else None."""
    return int(text) if _INTEGER_RE.fullmatch(text) else None


def ascii_decimal(text: str) -> float | None:
    """`text` as a decimal number of ASCII digits with an optional point ("5", "2.5",
    ".5", "5."), else None: no sign, exponent, underscore, space, nan or inf."""
    return float(text) if _DECIMAL_RE.fullmatch(text) else None


def signed_integer(text: str) -> int:
    """An argparse type: a whole number, ASCII digits with an optional "-" (the range is
    checked where the value is used, with the configuration's own message)."""
    value = ascii_integer(text[1:] if text.startswith("-") else text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (ASCII digits)")
    return -value if text.startswith("-") else value


def signed_decimal(text: str) -> float:
    """An argparse type: a decimal number, ASCII digits with an optional "-" and point
    (the range is checked where the value is used)."""
    value = ascii_decimal(text[1:] if text.startswith("-") else text)
    if value is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number (ASCII digits, e.g. 5 or 0.5)")
    return -value if text.startswith("-") else value


def seconds_between(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds within [lo, hi], else a clear error."""

    def parse(text: str) -> float:
        value = ascii_decimal(text)
        if value is None:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of seconds (ASCII digits, e.g. 5 or 0.5)")
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed is {lo:g} to {hi:g} seconds")
        return value

    return parse

