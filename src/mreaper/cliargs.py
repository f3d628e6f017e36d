"""Argument types shared by the `mreaper` subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def seconds_between(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds within [lo, hi], else a clear error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed is {lo:g} to {hi:g} seconds")
        return value

    return parse
