"""pacing.pace: when a scope may kill again, from what is known of its victims' releases."""

from __future__ import annotations

from mreaper.pacing import EXITED_LAG, REAPED_LAG, Release, State, pace

MiB = 1 << 20


def test_a_release_seen_in_the_figure_frees_the_next_look() -> None:
    r = Release(State.REAPED, 16 * MiB, freed=16 * MiB, known_at=1.0, available_at_kill=100 * MiB)
    # The figure shows the 16 MiB back, the level still holds: act now, not after a lag.
    assert pace(4 * MiB, [r], now=1.05, looked_at=1.04, available=116 * MiB).act


def test_a_release_known_after_the_look_waits_for_the_next_look() -> None:
    r = Release(State.REAPED, 16 * MiB, freed=16 * MiB, known_at=1.05, available_at_kill=100 * MiB)
    assert not pace(4 * MiB, [r], now=1.06, looked_at=1.04, available=100 * MiB).act


def test_no_second_kill_for_the_same_shortfall_while_the_figure_lags() -> None:
    """Known back but not shown (per-CPU free lists): a credit within the lag window only."""
    for state, lag in ((State.REAPED, REAPED_LAG), (State.EXITED, EXITED_LAG)):
        r = Release(state, 16 * MiB, freed=16 * MiB, known_at=1.0, available_at_kill=100 * MiB)
        assert not pace(10 * MiB, [r], now=1.0 + lag / 2, looked_at=1.0 + lag / 2,
                        available=100 * MiB).act, state
        # Beyond what it can hide: act.
        assert pace(20 * MiB, [r], now=1.0 + lag / 2, looked_at=1.0 + lag / 2,
                    available=100 * MiB).act, state
        # The window is over: the figure is believed.
        assert pace(10 * MiB, [r], now=1.0 + lag + 0.01, looked_at=1.0 + lag + 0.01,
                    available=100 * MiB).act, state


def test_several_in_flight_when_one_release_cannot_cover_the_shortfall() -> None:
    first = Release(State.PENDING, 16 * MiB, available_at_kill=100 * MiB)
    second = Release(State.PENDING, 16 * MiB, available_at_kill=100 * MiB)
    assert pace(40 * MiB, [first], now=1, looked_at=1, available=100 * MiB).act
    assert pace(40 * MiB, [first, second], now=1, looked_at=1, available=100 * MiB).act
    third = Release(State.PENDING, 16 * MiB, available_at_kill=100 * MiB)
    assert not pace(40 * MiB, [first, second, third], now=1, looked_at=1,
                    available=100 * MiB).act
    # One rise of the figure is taken off once, not once per kill.
    assert not pace(24 * MiB, [first, second, third], now=1, looked_at=1,
                    available=116 * MiB).act


def test_a_stuck_release_holds_nothing_back() -> None:
    r = Release(State.STUCK, 16 * MiB, known_at=1.0, available_at_kill=100 * MiB)
    assert pace(1, [r], now=1.01, looked_at=1.01, available=100 * MiB).act


def test_without_a_byte_figure_only_every_release_seen_allows_a_kill() -> None:
    pending = Release(State.PENDING, 16 * MiB, available_at_kill=None)
    assert not pace(None, [pending], now=1, looked_at=1, available=None).act
    assert pace(None, [], now=1, looked_at=1, available=None).act
