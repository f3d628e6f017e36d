"""End to end: `mreaper run` on this host against real, bounded leaks.

No risk to the host: the kill level is an absolute size set a few hundred MiB under
the MemAvailable measured at the start of each test, and every hog lives in a memory
cgroup whose limit stops it long before the machine runs short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess
from mreaper.hogs import GiB, Hog, MemoryCgroup, MiB
from mreaper.linux.procfs import read_meminfo

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: memory cgroups")


@pytest.fixture
def memcgs() -> Iterator[list[MemoryCgroup]]:
    made: list[MemoryCgroup] = []
    yield made
    for cg in made:
        cg.remove()


def _levels(headroom: int) -> list[str]:
    """Absolute levels just under the MemAvailable of now: warn at -headroom/2,
    kill at -headroom, term off (straight to SIGKILL), PSI off.

    Such levels are crossed by anything else that allocates meanwhile (another test
    run, a VM starting), so every process but this test's hogs (named mr-*) is
    protected: the daemon under test can never kill something of someone else's."""
    avail = read_meminfo().mem_available
    kill = avail - headroom
    return ["--memory-warn", f"{(avail - headroom // 2) // MiB}M", "--memory-term", "off",
            "--memory-kill", f"{kill // MiB}M", "--psi-warn", "off", "--psi-kill", "off",
            "--protect", "^(?!mr-)"]


def _alive(hog: Hog) -> bool:
    return hog.proc.poll() is None


def test_leak_killed_protected_and_avoided_survive(memcgs: list[MemoryCgroup]) -> None:
    for _ in range(3):
        memcgs.append(MemoryCgroup.create(limit=2 * GiB))
    protected = Hog(1200 * MiB, memcgs[0], name="mr-protected")
    avoided = Hog(900 * MiB, memcgs[1], name="mr-avoided")
    daemon = DaemonProcess(*_levels(400 * MiB), "--protect", "^mr-protected$",
                           "--avoid", "^mr-avoided$")
    try:
        leak = Hog(1500 * MiB, memcgs[2], name="mr-leak", step=32 * MiB, interval=0.05)
        rc = leak.proc.wait(timeout=60)
        m = daemon.wait_for(rf"killed {leak.pid} 'mr-leak'.*process_mrelease (\S+)")
        assert rc == -signal.SIGKILL
        assert m.group(1) in ("reaped", "exited-first")
        assert memcgs[2].usage() < 50 * MiB  # the leak's memory really came back
        assert _alive(protected) and _alive(avoided)
        assert not any("killed" in line and "mr-protected" in line for line in daemon.lines)
    finally:
        assert daemon.stop() == 0
        for h in (protected, avoided):
            h.kill()


def test_dry_run_kills_nothing(memcgs: list[MemoryCgroup]) -> None:
    memcgs.append(MemoryCgroup.create(limit=1700 * MiB))
    daemon = DaemonProcess(*_levels(300 * MiB), "--dry-run", "--prefer", "^mr-leak$")
    try:
        leak = Hog(1500 * MiB, memcgs[0], name="mr-leak", step=32 * MiB, interval=0.02)
        daemon.wait_for(rf"dry run: would kill {leak.pid} 'mr-leak'")
        time.sleep(0.5)
        assert _alive(leak)
        assert not any(line.startswith("killed") or " killed " in line for line in daemon.lines)
        leak.kill()
    finally:
        assert daemon.stop() == 0


def test_sighup_reload_keeps_running_config_on_error(tmp_path: Path) -> None:
    cfg = tmp_path / "mreaper.toml"
    cfg.write_text("[daemon]\nreapers = 2\n")
    daemon = DaemonProcess("--config", str(cfg), "--psi-warn", "off", "--psi-kill", "off")
    try:
        cfg.write_text("[daemon]\nreapers = 99\n")
        daemon.proc.send_signal(signal.SIGHUP)
        m = daemon.wait_for(r"reload refused, keeping the running configuration: (.*)")
        assert m.group(1) == f"{cfg}: daemon.reapers = 99: an integer from 1 to 16"
        assert daemon.proc.poll() is None
        cfg.write_text("[memory]\nwarn = \"20%\"\n")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(r"configuration reloaded from .*memory warn/term/kill 20%/5%/2.5%")
    finally:
        assert daemon.stop() == 0
    assert any("got SIGTERM, stopping" in line for line in daemon.lines)


def test_refuses_to_start_on_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[memory]\nkill = \"50%\"\nterm = \"10%\"\n")
    victim = subprocess.Popen(["sleep", "60"])
    try:
        out = subprocess.run([sys.executable, "-m", "mreaper.cli", "run", "--config", str(cfg)],
                             check=False, capture_output=True, text=True, timeout=30)
        assert out.returncode == 2
        assert out.stderr.strip() == (f"mreaper run: {cfg}: memory.kill = '50%': must be at or "
                                      "below memory.term (10%)")
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_a_leak_started_after_the_last_scan_is_seen(tmp_path: Path,
                                                    memcgs: list[MemoryCgroup]) -> None:
    """The background scan runs once (600 s interval, no warn level to hurry it) and
    sees only a decoy; the leak starts after it.  The daemon must kill the leak (the
    preferred process), not pick the decoy from its stale list."""
    cfg = tmp_path / "mreaper.toml"
    cfg.write_text("[detect]\nscan_interval = 600.0\n")
    levels = _levels(400 * MiB)
    levels[levels.index("--memory-warn") + 1] = "off"
    memcgs += [MemoryCgroup.create(limit=512 * MiB), MemoryCgroup.create(limit=2 * GiB)]
    decoy = Hog(200 * MiB, memcgs[0], name="mr-decoy")
    daemon = DaemonProcess("--config", str(cfg), *levels, "--prefer", "^mr-late-leak$")
    try:
        time.sleep(1.0)  # the first (and only) scan is done
        leak = Hog(1500 * MiB, memcgs[1], name="mr-late-leak", step=32 * MiB, interval=0.05)
        assert leak.proc.wait(timeout=60) == -signal.SIGKILL
        daemon.wait_for(rf"killed {leak.pid} 'mr-late-leak'")
        assert decoy.proc.poll() is None
        assert not any("mr-decoy" in line for line in daemon.lines)
    finally:
        assert daemon.stop() == 0
        decoy.kill()
