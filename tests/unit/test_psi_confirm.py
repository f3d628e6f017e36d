"""Judging a PSI trigger event by the pressure file's totals (detect.confirm_stall).

Pure functions over (time, cumulative stall) samples, so the histories here are made
up: a real machine cannot be made to stall on a schedule.  The real-kernel side is in
real/test_psi.py.
"""

from __future__ import annotations

import bisect

from hypothesis import given, settings
from hypothesis import strategies as st

from mreaper.config import PsiTrigger
from mreaper.detect import MIN_SPAN, WINDOW_SLACK, confirm_rate, confirm_stall

TRIG = PsiTrigger("some", 1_900_000, 2_000_000)  # 95 % of a 2 s window
S = 1_000_000  # us per second


def test_the_ci_flake_a_look_long_before_the_window_is_no_confirmation() -> None:
    """The case CI hit: the only totals before the event were read 5.7 s earlier, and
    2 s of stall since then could lie anywhere in those 5.7 s.  The old check read it
    as 2 s in the 2 s window and made the level active."""
    assert confirm_stall(TRIG, [(0.0, 0), (5.71, 2 * S)], 5.71) is None


def test_bounds_decide_when_they_can() -> None:
    # no more than 1 s of stall since a look 2.5 s ago: the window cannot hold 1.9 s
    assert confirm_stall(TRIG, [(0.0, 0), (2.5, 1 * S)], 2.5) is False
    # 2.45 s of stall in 2.5 s: at least 1.95 s of it in the last 2 s
    assert confirm_stall(TRIG, [(0.0, 0), (2.5, 2_450_000)], 2.5) is True
    # a look inside the window: 1.9 s already since it
    assert confirm_stall(TRIG, [(0.5, 0), (2.5, 1_900_000)], 2.5) is True


def test_dense_looks_judge_by_rate_over_the_window() -> None:
    samples = [(t / 10, int(t / 10 * 0.96 * S)) for t in range(0, 31)]  # 96 % stalled
    assert confirm_stall(TRIG, samples, 3.0) is True
    calm = [(t / 10, int(t / 10 * 0.05 * S)) for t in range(0, 31)]
    assert confirm_stall(TRIG, calm, 3.0) is False


def test_right_after_arming_a_too_short_span_cannot_tell() -> None:
    assert confirm_stall(TRIG, [(0.0, 0), (0.1, 95_000)], 0.1) is None
    assert confirm_stall(TRIG, [(0.0, 0)], 0.0) is None
    # the newest totals must be from now: older ones say nothing of the event
    assert confirm_stall(TRIG, [(0.0, 0), (1.0, 5)], 3.0) is None


def test_confirm_rate() -> None:
    assert confirm_rate(TRIG, [(0.0, 0), (0.1, 96_000)]) is True
    assert confirm_rate(TRIG, [(0.0, 0), (0.1, 40_000)]) is False
    assert confirm_rate(TRIG, [(0.0, 0)]) is False
    assert confirm_rate(TRIG, [(1.0, 0), (1.0, 10)]) is False


def _history(rates: list[float], step: float) -> tuple[list[float], list[int]]:
    """Cumulative stall (us) at the ends of steps of `step` seconds with these rates."""
    times, totals, total = [0.0], [0], 0.0
    for i, r in enumerate(rates):
        total += r * step * S
        times.append((i + 1) * step)
        totals.append(round(total))
    return times, totals


def _at(times: list[float], totals: list[int], t: float) -> float:
    """Cumulative stall at time t, interpolated within its step."""
    i = min(max(bisect.bisect_right(times, t) - 1, 0), len(times) - 2)
    frac = (t - times[i]) / (times[i + 1] - times[i])
    return totals[i] + frac * (totals[i + 1] - totals[i])


@settings(max_examples=300, deadline=None)
@given(rates=st.lists(st.floats(0, 1), min_size=20, max_size=60),
       look_steps=st.lists(st.integers(1, 40), min_size=1, max_size=30),
       stall_pct=st.integers(5, 95))
def test_judgements_are_sound(rates: list[float], look_steps: list[int],
                              stall_pct: int) -> None:
    """Whatever the history and however the looks are spaced: a judgement the bounds
    alone make (no look near the window's start) is exactly right, and one made by
    rate over a span within the slack is off by no more than the slack allows."""
    step = 0.1
    times, totals = _history(rates, step)
    trig = PsiTrigger("some", stall_pct * 20_000, 2_000_000)
    window = 2.0
    end = times[-1]
    if end < window:
        return
    looks, t = [], 0.0
    for k in look_steps:
        t += k * 0.05
        if t >= end:
            break
        looks.append(t)
    looks.append(end)
    samples = [(lt, round(_at(times, totals, lt))) for lt in looks]
    truth = _at(times, totals, end) - _at(times, totals, end - window)
    verdict = confirm_stall(trig, samples, end)
    older = [lt for lt in looks if lt <= end - window]
    near = bool(older) and end - older[-1] <= window * (1 + WINDOW_SLACK)
    slack_us = window * WINDOW_SLACK * S
    tol = 2  # rounding of the samples, us
    if verdict is True:
        if near:
            assert truth >= trig.stall_us - slack_us - tol
        elif older:
            assert truth >= trig.stall_us - tol
        else:
            assert truth >= trig.stall_us * MIN_SPAN - tol
    elif verdict is False:
        if near:
            assert truth < trig.stall_us * (1 + WINDOW_SLACK) + tol
        elif older:
            assert truth < trig.stall_us + tol
