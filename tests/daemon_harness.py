"""`mreaper run` as a child process for end-to-end tests, its log collected line by line
(imported as `daemon_harness`; tests/ is on sys.path)."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time


class DaemonProcess:
    """`mreaper run` as a child, its stderr collected line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "mreaper.cli", "run", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.wait_for(r"running")

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._q.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        rx = re.compile(pattern)
        for line in self.lines:
            if m := rx.search(line):
                return m
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._q.get(timeout=remaining)
            except queue.Empty:
                break
            self.lines.append(line)
            if m := rx.search(line):
                return m
        raise AssertionError(f"no log line matching {pattern!r} within {timeout} s; "
                             f"log so far:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        while not self._q.empty():
            self.lines.append(self._q.get())
        return rc
