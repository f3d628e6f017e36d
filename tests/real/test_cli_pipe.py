"""`mreaper` writing into a pipe whose reader has gone (`mreaper explain --all | head -1`):
no traceback, exit 141 (128 + SIGPIPE, what a shell reports for a tool SIGPIPE killed),
and nothing but the output that fitted.  Real pipes, real commands; the read end is closed
before the command writes, so the outcome does not depend on timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mreaper import cli

MREAPER = Path(sys.executable).with_name("mreaper")
pytestmark = pytest.mark.skipif(not MREAPER.exists(), reason=f"no {MREAPER} (pip install -e .)")


def run_into_closed_pipe(*args: str, stderr_too: bool = False,
                         timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run `mreaper ARGS` with its stdout (and, if asked, its stderr) the write end of a
    pipe whose read end is already closed: its first write gets EPIPE."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([str(MREAPER), *args], stdin=subprocess.DEVNULL, stdout=w,
                              stderr=w if stderr_too else subprocess.PIPE, timeout=timeout,
                              check=False)
    finally:
        os.close(w)


@pytest.fixture
def events(tmp_path: Path) -> str:
    path = tmp_path / "events.jsonl"
    line = {"event": "episode", "scope": "machine", "phase": "start", "severity": "warn",
            "reason": "test", "wall_time": 1_700_000_000.0, "duration_s": 0.0}
    path.write_text("".join(json.dumps(line) + "\n" for _ in range(50)))
    return str(path)


@pytest.fixture
def empty(tmp_path: Path) -> str:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return str(path)


COMMANDS = {
    "explain-all": ["explain", "--all"],
    "status-json": ["status", "--json", "--socket", "/nonexistent/mreaper.sock"],
    "status": ["status", "--socket", "/nonexistent/mreaper.sock"],
    "top": ["top", "--socket", "/nonexistent/mreaper.sock", "--interval", "0.1"],
    "config": ["config"],
    "history": ["history", "--events", "EVENTS"],
    "history-json": ["history", "--json", "--events", "EVENTS"],
}


@pytest.mark.parametrize("argv", list(COMMANDS.values()), ids=list(COMMANDS))
def test_a_closed_pipe_ends_the_command_quietly_with_141(argv: list[str], events: str,
                                                         empty: str) -> None:
    argv = [events if a == "EVENTS" else a for a in argv]
    if argv[0] in ("explain", "status", "top", "config"):
        argv += ["--config", empty]
    result = run_into_closed_pipe(*argv)
    assert result.stderr == b"", result.stderr.decode()
    assert result.returncode == cli.EXIT_PIPE == 141


def test_stdout_and_stderr_both_closed(empty: str) -> None:
    """`mreaper explain 2>&1 | head -1`: both streams are the dead pipe; the handler must
    not die writing its own complaint."""
    result = run_into_closed_pipe("explain", "--all", "--config", empty, stderr_too=True)
    assert result.returncode == cli.EXIT_PIPE


def test_head_reads_one_line_and_leaves(empty: str) -> None:
    """The case as reported: `mreaper top | head -1` in a shell with pipefail.  `top`
    without a terminal prints a frame every interval until its output is gone, so head's
    exit always makes a later write fail."""
    script = (f"set -o pipefail; {MREAPER} top --config {empty} --interval 0.1 "
              "--socket /nonexistent/mreaper.sock | head -1; echo \"status ${PIPESTATUS[0]}\"")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                            check=False, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, \
        result.stderr
    assert result.stderr == ""
    out = result.stdout.splitlines()
    assert out[0].startswith("mreaper top"), out
    assert out[-1] == "status 141"


def test_a_broken_pipe_that_is_not_our_output_is_not_swallowed(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Only a dead stdout/stderr means "the reader left": a BrokenPipeError from a socket
    or pipe of the command's own is a bug to see, not a quiet exit 141."""
    def broken(_args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_config", broken)
    with pytest.raises(BrokenPipeError):
        cli.main(["config"])
