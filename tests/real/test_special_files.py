"""Special files where a PSI file or the configuration is expected (issue 11, defect 5).

A FIFO in place of the pressure file or the configuration used to hang start-up, `mreaper
config`, `run` and a SIGHUP reload; /dev/null or a regular file in place of the pressure
file took the trigger (the daemon claimed triggers were armed); /dev/zero as the
configuration was read without end.  Everything that could hang runs in a subprocess
with a generous timeout (a hang is a failure, not a stuck test run), and under a memory
limit where it could grow without bound.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CLI = [sys.executable, "-m", "mreaper.cli"]
HANG = 30  # seconds: far beyond what any of this takes when it works


def _limit_memory() -> None:
    """For a child that might read /dev/zero without end: 1 GiB of address space."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def cli(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], check=False, capture_output=True, text=True,
                          timeout=HANG, stdin=stdin, preexec_fn=_limit_memory)


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "fifo"
    os.mkfifo(path, 0o600)
    yield path


# --- the pressure file ------------------------------------------------------------------------

_MONITOR = textwrap.dedent("""
    import json, sys, time
    from mreaper.config import PsiTrigger
    from mreaper.detect import PsiMonitor
    mon = PsiMonitor({"warn": PsiTrigger("some", 150000, 2000000),
                      "kill": PsiTrigger("full", 400000, 2000000)}, sys.argv[1])
    mon.refresh(time.monotonic())
    print(json.dumps({"fds": len(mon.fds), "fallback": mon.fallback,
                      "averages": mon.averages(),
                      "active": mon.active(time.monotonic())}))
""")


def monitor_on(path: str) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-c", _MONITOR, path], check=False,
                       capture_output=True, text=True, timeout=HANG)
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def test_fifo_in_place_of_the_pressure_file_is_refused_without_hanging(fifo: Path) -> None:
    assert monitor_on(str(fifo)) == {
        "fds": 0, "averages": {}, "active": {"warn": False, "kill": False},
        "fallback": f"{fifo}: not the kernel's pressure file but a FIFO (named pipe)"}


def test_dev_null_in_place_of_the_pressure_file_takes_no_trigger() -> None:
    assert monitor_on("/dev/null") == {
        "fds": 0, "averages": {}, "active": {"warn": False, "kill": False},
        "fallback": "/dev/null: not the kernel's pressure file but a character device"}


def test_regular_file_in_place_of_the_pressure_file_takes_no_trigger(tmp_path: Path) -> None:
    fake = tmp_path / "memory"
    fake.write_text("some avg10=99.00 avg60=99.00 avg300=99.00 total=1\n"
                    "full avg10=99.00 avg60=99.00 avg300=99.00 total=1\n")
    out = monitor_on(str(fake))
    assert out["fds"] == 0
    assert out["averages"] == {}  # its made-up figures are not believed either
    assert out["active"] == {"warn": False, "kill": False}
    assert str(out["fallback"]).startswith(f"{fake}: not the kernel's pressure file: a "
                                           "regular file on a filesystem of type 0x")
    assert fake.read_text().count("\n") == 2  # nothing was written into it


def test_the_kernels_own_pressure_files_are_taken() -> None:
    for path in ("/proc/pressure/memory", "/sys/fs/cgroup/unified/memory.pressure"):
        if not os.path.exists(path):
            continue
        out = monitor_on(path)
        assert (out["fds"], out["fallback"]) == (2, None), out
        assert set(out["averages"]) == {"some", "full"}


_DAEMON = textwrap.dedent("""
    import logging, sys
    from mreaper import config
    from mreaper.daemon import Daemon, setup_logging
    cfg = config.apply(config.Config(), {
        "daemon": {"dry_run": True, "mlockall": False},
        "memory": {"warn": "48M", "term": "32M", "kill": "16M"},
        "status": {"socket": ""}}, "test")
    setup_logging("plain", 0)
    # no cgroup2 in this mounts file: no alternate pressure file to fall back on
    sys.exit(Daemon(cfg, mounts_file=sys.argv[2], pressure_path=sys.argv[1]).run())
""")


def test_daemon_starts_with_a_fifo_as_its_pressure_file_and_says_why(
        fifo: Path, tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\n")
    log = tmp_path / "daemon.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _DAEMON, str(fifo), str(mounts)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        deadline = time.monotonic() + HANG
        while "running" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "start-up hung:\n" + log.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=HANG) == 0, log.read_text()
        finally:
            proc.kill()
    assert (f"scope machine: MemAvailable, SwapFree, PSI averages ({fifo}: not the kernel's "
            "pressure file but a FIFO (named pipe))") in log.read_text()


# --- the configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["config", "run"])
def test_fifo_as_the_config_is_refused_without_hanging(fifo: Path, command: str) -> None:
    p = cli(command, "--config", str(fifo))
    assert p.returncode == 2
    assert p.stderr.strip() == (f"mreaper {command}: {fifo}: --config = '{fifo}': not a "
                                "regular file but a FIFO (named pipe): give the path of a "
                                "TOML file")


def test_dev_zero_on_stdin_as_the_config_is_refused() -> None:
    with open("/dev/zero", "rb") as zero:
        p = cli("config", "--config", "/dev/stdin", stdin=zero.fileno())
    assert p.returncode == 2
    assert p.stderr.strip() == ("mreaper config: /dev/stdin: --config = '/dev/stdin': not a "
                                "regular file but a character device: give the path of a "
                                "TOML file")


def test_a_regular_file_on_stdin_is_read(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text("[daemon]\nreapers = 5\n")
    cfg.chmod(0o644)
    with cfg.open("rb") as f:
        p = cli("config", "--config", "/dev/stdin", stdin=f.fileno())
    assert p.returncode == 0, p.stderr
    assert "reapers = 5" in p.stdout


def test_config_larger_than_1_mib_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "big.toml"
    line = "# " + "x" * 1021 + "\n"  # 1 KiB of comment
    cfg.write_text("[daemon]\nreapers = 3\n" + line * 1024)
    cfg.chmod(0o644)
    p = cli("config", "--config", str(cfg))
    assert p.returncode == 2
    assert p.stderr.strip() == (f"mreaper config: {cfg}: --config = '{cfg}': larger than "
                                "1048576 bytes (1 MiB): a configuration file is a short "
                                "TOML document")
    cfg.write_text("[daemon]\nreapers = 3\n" + line * 1000)  # just under: fine
    assert cli("config", "--config", str(cfg)).returncode == 0


def test_sighup_with_a_fifo_as_the_config_keeps_the_loop_running(tmp_path: Path) -> None:
    """The config replaced by a FIFO, then SIGHUP: the reload is refused at once and
    the daemon still stops promptly on SIGTERM (a loop stuck opening the FIFO does not)."""
    cfg = tmp_path / "mreaper.toml"
    cfg.write_text(textwrap.dedent("""
        [memory]
        warn = "48M"
        term = "32M"
        kill = "16M"
        [daemon]
        dry_run = true
        [status]
        socket = ""
    """))
    cfg.chmod(0o644)
    log = tmp_path / "daemon.log"
    with log.open("w") as err:
        proc = subprocess.Popen([*CLI, "run", "--config", str(cfg), "--psi-warn", "off",
                                 "--psi-kill", "off"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + HANG
        while "running" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        cfg.unlink()
        os.mkfifo(cfg, 0o600)
        proc.send_signal(signal.SIGHUP)
        while "reload refused" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the reload hung:\n" + log.read_text()
            time.sleep(0.05)
        assert (f"reload refused, keeping the running configuration: {cfg}: --config = "
                f"'{cfg}': not a regular file but a FIFO (named pipe)") in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
