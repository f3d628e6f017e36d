"""sd_notify without libsystemd: addresses ($NOTIFY_SOCKET path and '@' abstract), the
datagrams as systemd reads them, the watchdog interval and its pacing, and silence (no
error, no exception) when there is no manager or it does not listen."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mreaper import sdnotify
from mreaper.sdnotify import Notifier, notify_address, watchdog_interval


class Manager:
    """A stand-in for PID 1's notification socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2)

    def recv(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(2)
        return True


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Manager, str]]:
    if request.param == "path":
        env_value = str(tmp_path / "notify")
        m = Manager(env_value)
    else:
        name = f"mreaper-test-notify-{os.getpid()}-{id(tmp_path)}"
        env_value = "@" + name
        m = Manager("\0" + name)
    yield m, env_value
    m.sock.close()


def test_addresses() -> None:
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@abc/def"}) == "\0abc/def"
    for bad in ("", "@", "relative/path", "vsock:2:1234"):
        assert notify_address({"NOTIFY_SOCKET": bad}) is None
    assert notify_address({}) is None


def test_states_reach_the_manager(manager: tuple[Manager, str]) -> None:
    m, address = manager
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.enabled
    assert n.ready("watching\nmachine")
    assert m.recv() == {"READY": "1", "STATUS": "watching machine"}
    assert n.status("MemAvailable 3 GiB")
    assert m.recv() == {"STATUS": "MemAvailable 3 GiB"}
    assert n.status("MemAvailable 3 GiB")  # unchanged: not sent again
    assert not m.pending()
    assert n.reloading()
    got = m.recv()
    assert got["RELOADING"] == "1" and int(got["MONOTONIC_USEC"]) > 0
    assert n.watchdog()
    assert m.recv() == {"WATCHDOG": "1"}
    assert n.stopping()
    assert m.recv() == {"STOPPING": "1"}
    n.close()
    n.close()


def test_no_manager_is_a_silent_no_op(tmp_path: Path) -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping()
    assert not n.watchdog_due(1e9)
    # A manager that went away: no exception, just False.
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled and not gone.ready()


def test_watchdog_interval() -> None:
    me = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(me)}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(me + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "x"}) is None
    for bad in ("", "0", "-5", "soon"):
        assert watchdog_interval({"WATCHDOG_USEC": bad}) is None
    assert watchdog_interval({}) is None


def test_watchdog_pacing(manager: tuple[Manager, str]) -> None:
    m, address = manager
    n = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "20000000"})
    assert n.watchdog_every == 10.0
    assert n.watchdog_due(100.0)  # the first turn pings
    assert m.recv() == {"WATCHDOG": "1"}
    # At most one ping per WATCHDOG_GAP, then one on each turn after it.
    n._pinged = 100.0
    assert not n.watchdog_due(100.0 + sdnotify.WATCHDOG_GAP / 2)
    assert n.watchdog_due(100.0 + sdnotify.WATCHDOG_GAP)
    assert m.recv() == {"WATCHDOG": "1"}
    assert not m.pending()
    # A short watchdog (WatchdogSec=1s): half of it wins over the gap.
    fast = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
    fast._pinged = 50.0
    assert fast.watchdog_every == 0.5
    assert fast.watchdog_due(50.5)
