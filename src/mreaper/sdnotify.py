"""sd_notify(3) without libsystemd: state datagrams to $NOTIFY_SOCKET, and the watchdog.

systemd gives a Type=notify service the address of a datagram socket in $NOTIFY_SOCKET:
a path, or an abstract-namespace name written with a leading '@'.  Each message is
newline-separated KEY=VALUE assignments (READY=1, STATUS=..., WATCHDOG=1, STOPPING=1,
RELOADING=1).  With WatchdogSec= set, systemd exports $WATCHDOG_USEC (and $WATCHDOG_PID,
the process meant to ping) and restarts the service when WATCHDOG=1 does not come in
time; sd_watchdog_enabled(3) advises pinging at half the timeout.

Sending never raises and never blocks (MSG_DONTWAIT): a notification that cannot be
delivered must not stop a kill.  Outside systemd every call is a cheap no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping

WATCHDOG_GAP = 1.0  # seconds: at most one WATCHDOG=1 per second, however fast the loop turns


def notify_address(env: Mapping[str, str] | None = None) -> str | None:
    """The socket address from $NOTIFY_SOCKET in the form socket.sendto takes: a path,
    or "\\0name" for "@name" (abstract namespace).  None when unset or not a UNIX address."""
    value = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, or a form we do not speak (e.g. "vsock:...")


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when the watchdog
    is off, malformed, or meant for another process ($WATCHDOG_PID is not us)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    want = env.get("WATCHDOG_PID", "")
    if want:
        try:
            if int(want) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class Notifier:
    """A service manager's notification socket (or none): READY, STATUS, WATCHDOG,
    RELOADING, STOPPING.  Every method returns whether the datagram went out."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.address = notify_address(env)
        self.watchdog_every = watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._pinged = float("-inf")

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send KEY=VALUE lines, e.g. send(READY=1, STATUS="watching")."""
        if self.address is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode(errors="replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, socket.MSG_DONTWAIT, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up is done: `systemctl start` returns now."""
        fields: dict[str, str | int] = {"READY": 1}
        if status is not None:
            line = _one_line(status)
            fields["STATUS"] = line
            self._last_status = line
        return self.send(**fields)

    def status(self, text: str) -> bool:
        """Free-form state for `systemctl status`; sent only when it changed."""
        text = _one_line(text)
        if text == self._last_status:
            return True
        self._last_status = text
        return self.send(STATUS=text)

    def reloading(self) -> bool:
        """A reload begins (send ready() when it is over).  MONOTONIC_USEC is what
        Type=notify-reload (systemd >= 253) wants; older managers ignore it."""
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        """Shutdown begins."""
        return self.send(STOPPING=1)

    def watchdog(self) -> bool:
        """Ping the watchdog unconditionally."""
        self._pinged = time.monotonic()
        return self.send(WATCHDOG=1)

    def watchdog_due(self, now: float | None = None) -> bool:
        """Call once per loop turn: pings when the watchdog is on and WATCHDOG_GAP seconds
        (or half the timeout, if shorter) have passed since the last ping.  Pinging on the
        turn rather than on a timer of its own is the point: only a loop that turns
        pings, and the loop turns at least every detect.poll_max (<= 10 s)."""
        if self.watchdog_every is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._pinged < min(self.watchdog_every, WATCHDOG_GAP):
            return False
        return self.watchdog()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
