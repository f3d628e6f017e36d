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


def test_a_finished_kill_is_judged_by_its_own_release() -> None:
    """From the kill report: reaped by us, freed by its exit (even when not seen back at
    once: a reader of its smaps may hold its mm a moment), stuck only without an exit
    or with an mm shared with a live process."""
    from concurrent.futures import Future
    from dataclasses import replace

    from test_report import report

    from mreaper.daemon import _release_of
    from mreaper.reap import GroupKillReport, Mrelease
    from mreaper.scope import InFlight

    def inflight(released: bool) -> InFlight:
        f: InFlight = InFlight(Future(), None, 0.0, 100 * MiB, 16 * MiB, ((1, 1),))
        if released:
            f.released.set()
            f.released_at.append(5.0)
        return f

    assert _release_of(report(), inflight(True), 16 * MiB).state is State.REAPED
    exited = report(mrelease=Mrelease.EXITED_FIRST)
    assert _release_of(exited, inflight(False), 16 * MiB).state is State.EXITED
    unseen = report(mrelease=Mrelease.EXITED_FIRST, kill_to_free_s=None)
    assert _release_of(unseen, inflight(False), 0).state is State.EXITED
    shared = report(mrelease=Mrelease.SHARED_MM, kill_to_free_s=None)
    assert _release_of(shared, inflight(False), 0).state is State.STUCK
    hung = report(kill_to_free_s=None, exited=False, mrelease=Mrelease.RETRIES_EXHAUSTED)
    assert _release_of(hung, inflight(False), 0).state is State.STUCK
    group = GroupKillReport(cgroup="", reason="", wall_time=0.0, members=(exited, unseen),
                            skipped=(), freed_bytes=None, freed_source="unmeasured",
                            kill_to_free_s=None, family="tree of 1 'x'")
    assert _release_of(group, inflight(False), None).state is State.EXITED
    group = replace(group, members=(exited, shared))
    assert _release_of(group, inflight(False), None).state is State.STUCK
