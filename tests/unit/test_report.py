"""KillReport (JSON and human forms), KillOptions validation, the formatting helpers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from mreaper import reap
from mreaper.reap import Holdings, KillOptions, KillReport, Mrelease, SignalSent

MiB = 1 << 20


def report(**kw: object) -> KillReport:
    base = KillReport(
        pid=4242, starttime=987654, name="ölfresser ) Z (", cmdline=("python3", "-c", "x = 'ü'"),
        uid=1000, cgroup="/user.slice/a b", memcg="/mreaper-test-1",
        holdings=Holdings(vm_rss=300 * MiB, rss_anon=290 * MiB, rss_file=10 * MiB,
                          rss_shmem=0, vm_swap=0),
        reason="MemAvailable 3% < 5%", wall_time=1700000000.25,
        signals=(SignalSent("SIGTERM", 0.0), SignalSent("SIGKILL", 0.5)),
        mrelease=Mrelease.REAPED, mrelease_errno="0", mrelease_attempts=1, mrelease_s=0.012,
        kill_to_free_s=0.013, kill_to_exit_s=0.02, exited=True, freed_bytes=289 * MiB,
        freed_source="memcg /sys/fs/cgroup/memory/mreaper-test-1/memory.usage_in_bytes",
        demoted=False, notes=("ignored SIGTERM for 0.5 s",),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("outcome", list(Mrelease))
def test_to_json_round_trips(outcome: Mrelease) -> None:
    r = report(mrelease=outcome, freed_bytes=None if outcome is Mrelease.SHARED_MM else 5)
    d = json.loads(r.to_json())
    assert d == r.to_dict()
    assert d["mrelease"] == outcome.value
    assert Mrelease(d["mrelease"]) is outcome
    # every field is there, nested records as objects, tuples as lists
    assert set(d) == {f for f in KillReport.__dataclass_fields__}
    assert d["pid"] == 4242 and d["starttime"] == 987654
    assert d["name"] == "ölfresser ) Z ("
    assert d["cmdline"] == ["python3", "-c", "x = 'ü'"]
    assert d["holdings"] == {"vm_rss": 300 * MiB, "rss_anon": 290 * MiB, "rss_file": 10 * MiB,
                             "rss_shmem": 0, "vm_swap": 0, "private": None}
    assert d["signals"] == [{"name": "SIGTERM", "at_s": 0.0}, {"name": "SIGKILL", "at_s": 0.5}]
    assert d["notes"] == ["ignored SIGTERM for 0.5 s"]
    # and back into an equal report
    back = KillReport(**{**d, "holdings": Holdings(**d["holdings"]),
                         "signals": tuple(SignalSent(**s) for s in d["signals"]),
                         "mrelease": Mrelease(d["mrelease"]), "cmdline": tuple(d["cmdline"]),
                         "notes": tuple(d["notes"])})
    assert back == r


def test_to_json_is_one_line_with_unmeasured_fields_as_null() -> None:
    r = report(mrelease=Mrelease.NOT_CALLED, mrelease_errno="", mrelease_attempts=0,
               mrelease_s=None, kill_to_free_s=None, kill_to_exit_s=None, exited=False,
               freed_bytes=None, freed_source="unmeasured", signals=(), notes=())
    text = r.to_json()
    assert "\n" not in text
    d = json.loads(text)
    assert d["mrelease_s"] is None and d["freed_bytes"] is None and d["signals"] == []


@pytest.mark.parametrize("outcome", [o for o in Mrelease if o is not Mrelease.NOT_CALLED])
def test_human_mentions_pid_name_and_outcome(outcome: Mrelease) -> None:
    r = report(mrelease=outcome, mrelease_errno="ESRCH")
    text = r.human()
    assert "4242" in text
    assert "ölfresser ) Z (" in text
    assert outcome.value in text
    assert "SIGTERM+SIGKILL" in text
    assert "MemAvailable 3% < 5%" in text
    assert "ignored SIGTERM" in text


def test_human_exit_on_sigterm_names_what_happened() -> None:
    """No SIGKILL was sent: the line must not time anything "after SIGKILL"."""
    r = report(mrelease=Mrelease.NOT_CALLED, mrelease_errno="", mrelease_s=None,
               kill_to_free_s=0.03, kill_to_exit_s=0.03,
               signals=(SignalSent("SIGTERM", 0.0),), notes=("exited on SIGTERM",))
    text = r.human()
    assert "4242" in text and "ölfresser" in text
    assert "with SIGTERM" in text
    assert "exited on SIGTERM" in text
    assert "process_mrelease" not in text
    assert "SIGKILL" not in text, text


def test_human_shows_freed_bytes_and_source() -> None:
    text = report().human()
    assert "freed 289.0 MiB (memcg /sys/fs/cgroup/memory/mreaper-test-1" in text
    assert "rss 300.0 MiB" in text


@pytest.mark.parametrize(("n", "text"), [
    (None, "?"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (MiB, "1.0 MiB"),
    (3 * (1 << 30), "3.0 GiB"), (5 * (1 << 40), "5120.0 GiB"), (-2 * MiB, "-2.0 MiB"),
])
def test_fmt_bytes(n: int | None, text: str) -> None:
    assert reap.fmt_bytes(n) == text


def test_fmt_ms() -> None:
    assert reap.fmt_ms(None) == "?"
    assert reap.fmt_ms(0.0125) == "12.5 ms"


@pytest.mark.parametrize("kw", [
    {"term_timeout": -1}, {"term_timeout": 3601}, {"term_timeout": float("nan")},
    {"exit_timeout": 0}, {"exit_timeout": -1}, {"exit_timeout": float("inf")},
    {"retries": 0}, {"retries": 1001},
])
def test_kill_options_reject_out_of_range(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        KillOptions(**kw)  # type: ignore[arg-type]


def test_kill_options_defaults() -> None:
    o = KillOptions()
    assert (o.term_timeout, o.mrelease, o.demote) == (0.0, True, False)
    assert o.exit_timeout > 0 and o.retries >= 1
    KillOptions(term_timeout=0, exit_timeout=3600, retries=1)
    KillOptions(term_timeout=3600, exit_timeout=0.001, retries=1000)
