"""When a scope may kill again: paced by the victims' own releases, not by a clock.

Pure.  After a kill the loop used to wait a fixed settle time (0.3 s after a reap, 1 s
after a plain exit) before it could act again, even when the victim's report said its
memory was back within milliseconds: against many small allocators (a `make -j`, a
worker pool) that is one kill a second while the kernel OOM killer fires.

The rule here: at each look where a level holds, every kill not yet behind us gives a
*credit* (the bytes it is still expected to give back that the figure cannot show
yet).  The scope acts again when the shortfall under the level is larger than the sum
of the credits; so

* a victim whose memory is known back (its charge fell, or process_mrelease reaped
  it) gives as credit only what the figure does not show yet: with a figure that shows
  the release, if the level still holds at the next look, that look acts;
* a victim still dying gives its expected release (its private memory): when one
  victim cannot cover the shortfall, the next is killed at once, several in flight
  (the reaper pool reaps them in parallel);
* the hard floor against killing twice for the same shortfall: freed pages sit on the
  freeing CPU's per-CPU free lists, counted as used in MemAvailable
  (research/mrelease-facts.md: 675 MiB on one CPU after a 2 GiB exit, seconds to show;
  pages our reaper freed showed within ~240 ms).  So a known release, less what the
  figure already shows, stays a credit for REAPED_LAG (reaped by us) or EXITED_LAG
  (freed by the victim's own exit) seconds, and no longer;
* a release known stuck (mm shared with a live process, no exit within the deadline, a
  failed kill) gives nothing: waiting for it frees nothing;
* a release known only after the look was taken counts as still pending: the look
  that judges it must come after it.

Where no byte figure holds (a level held by PSI or swap only), the shortfall is unknown:
the scope then acts when no kill is pending and no plain exit is inside its lag window.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

# Seconds freed pages may sit on per-CPU free lists unseen by MemAvailable before the
# figure is believed again: pages our reaper thread freed, and pages the victim's own
# exit freed (the former SETTLE_REAPED and SETTLE_EXITED bounds).
REAPED_LAG = 0.3
EXITED_LAG = 1.0


class State(enum.Enum):
    """What is known of one kill's release."""

    PENDING = "pending"  # signalled; memory not known back yet
    REAPED = "reaped"    # process_mrelease freed it from our own thread (charge confirmed)
    EXITED = "exited"    # its own exit freed it: pages may lag on per-CPU free lists
    STUCK = "stuck"      # known not to come back soon: shared mm, no exit, kill failed


@dataclass(frozen=True, slots=True)
class Release:
    """One kill as the pacing sees it."""

    state: State
    expected: int                 # bytes the kill should give back (private memory)
    freed: int | None = None      # bytes measured back (its memory cgroup's charge)
    known_at: float | None = None  # monotonic time the state became known
    available_at_kill: int | None = None  # the scope's figure just before the kill


@dataclass(frozen=True, slots=True)
class Pace:
    act: bool
    why: str


def credit(r: Release, *, now: float, looked_at: float) -> int:
    """Bytes `r` may still give back, before what the figure shows is taken off."""
    if r.state is State.PENDING or (r.known_at is not None and r.known_at > looked_at):
        return max(r.expected, 0)
    if lingering(r, now):
        return max(r.freed if r.freed is not None else r.expected, 0)
    return 0


def pace(shortfall: int | None, releases: Sequence[Release], *, now: float, looked_at: float,
         available: int | None) -> Pace:
    """May the scope kill again at this look?  `shortfall`: bytes under the level that
    holds (None: the level holds by a figure without bytes, PSI or swap).  `releases`
    in the order of their kills.

    What the figure already shows is taken off the credits once, from the figure at the
    earliest kill still owed: several kills in flight share one rise of the figure."""
    owing = [(r, c) for r in releases if (c := credit(r, now=now, looked_at=looked_at))]
    owed = sum(c for _, c in owing)
    if owing and available is not None and owing[0][0].available_at_kill is not None:
        owed = max(owed - max(available - owing[0][0].available_at_kill, 0), 0)
    if shortfall is None:
        if owed:
            return Pace(False, f"{len(owing)} releases not yet seen, no byte figure to "
                               "weigh them against")
        return Pace(True, "every release seen")
    if not owed or shortfall > owed:
        return Pace(True, f"shortfall {shortfall >> 10} KiB > {owed >> 10} KiB still to come "
                          f"from {len(owing)} kills")
    return Pace(False, f"shortfall {shortfall >> 10} KiB <= {owed >> 10} KiB still to come "
                       f"from {len(owing)} kills")


def lingering(r: Release, now: float) -> bool:
    """Whether a known release may still be unseen in the figure (its lag window is
    open)."""
    lag = {State.REAPED: REAPED_LAG, State.EXITED: EXITED_LAG}.get(r.state)
    return lag is not None and r.known_at is not None and now - r.known_at < lag
