"""`mreaper kill` as a user runs it: a subprocess, exit codes, stderr, and what it signalled.

Documented exit codes (cli.py): 2 for bad arguments or a refused/missing target, 1 for
permission denied, 3 for a process that had already exited (a zombie); in all three
nothing was signalled."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import is_alive_unsignalled, kernel_threads, status_fields
from mreaper import hogs
from mreaper.linux import procfs

MiB = hogs.MiB
PY = sys.executable
CLI = [PY, "-m", "mreaper.cli"]
EXIT_USAGE, EXIT_FORBIDDEN, EXIT_ZOMBIE = 2, 1, 3


def mreaper(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False, **kw)  # type: ignore[call-overload]


def assert_refused(r: subprocess.CompletedProcess[str], pid: int, code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mreaper kill: "), r.stderr
    assert f"PID {pid}" in lines[0], r.stderr
    for w in words:
        assert w in lines[0], r.stderr


def starttime(pid: int) -> int:
    return procfs.read_stat(pid).starttime


# --- refused or missing targets: exit 2, nothing signalled --------------------------------


def test_pid_that_does_not_exist() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1  # no process can have it
    assert_refused(mreaper("kill", str(pid)), pid, EXIT_USAGE, "no process")


def test_pid_that_exited_and_was_waited_for(spawn: object) -> None:
    p = spawn()  # type: ignore[operator]
    p.kill()
    p.wait()
    if os.path.exists(f"/proc/{p.pid}"):
        pytest.fail(f"PID {p.pid} was reused at once; rerun")
    assert_refused(mreaper("kill", str(p.pid)), p.pid, EXIT_USAGE, "no process")


def wait_for_state(pid: int, state: str) -> None:
    for _ in range(1000):
        if procfs.read_stat(pid).state == state:
            return
        time.sleep(0.01)
    pytest.fail(f"PID {pid} never reached state {state}")


def test_zombie_is_said_to_be_dead_not_killed() -> None:
    """A zombie: exited, its memory freed, waiting for its parent (us) to reap it.  It
    took SIGKILL without error and `kill` printed "killed" with exit 0."""
    child = subprocess.Popen(["true"])
    try:
        wait_for_state(child.pid, "Z")
        r = mreaper("kill", str(child.pid))
        assert r.returncode == EXIT_ZOMBIE, (r.returncode, r.stderr)
        assert r.stdout == ""
        assert r.stderr == (f"mreaper kill: PID {child.pid} (true) is already dead: a zombie "
                            f"waiting for its parent (PID {os.getpid()}) to reap it; its "
                            "memory is already freed, nothing was signalled\n")
        r = mreaper("kill", "--json", str(child.pid))
        assert r.returncode == EXIT_ZOMBIE and r.stdout == ""
    finally:
        child.wait()
    assert child.returncode == 0  # exited by itself; no signal of ours


def test_a_leader_that_called_pthread_exit_is_not_taken_for_a_zombie() -> None:
    """Its /proc State is Z, but another thread runs on (and holds the memory): the
    process is alive, so `kill` must not call it dead (the pidfd is not readable)."""
    child = subprocess.Popen(
        [PY, "-c", "import ctypes, threading, time; "
         "threading.Thread(target=time.sleep, args=(1000,)).start(); time.sleep(0.1); "
         "ctypes.CDLL(None).pthread_exit(None)"], stdin=subprocess.DEVNULL)
    try:
        wait_for_state(child.pid, "Z")
        assert len(os.listdir(f"/proc/{child.pid}/task")) == 2
        r = mreaper("kill", str(child.pid))
        assert "already dead" not in r.stderr, r.stderr
        assert r.returncode == 0, (r.returncode, r.stderr)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("zero", [0x0660, 0xFF10, 0x0966], ids=["arabic-indic", "fullwidth",
                                                                "devanagari"])
def test_a_pid_in_other_than_ascii_digits_signals_nothing(spawn: object, zero: int) -> None:
    """int() reads "\u0662\u0662..." as 22...: the PID of a live process written in other
    digits was killed.  Only ASCII digits name a process."""
    p = spawn()  # type: ignore[operator]
    text = "".join(chr(zero + int(d)) for d in str(p.pid))
    r = mreaper("kill", text)
    assert r.returncode == EXIT_USAGE and r.stdout == ""
    assert "is not a process ID (a positive integer in ASCII digits)" in r.stderr, r.stderr
    assert is_alive_unsignalled(p.pid)


def test_pid_1() -> None:
    before = starttime(1)
    assert_refused(mreaper("kill", "1"), 1, EXIT_USAGE, "PID 1")
    assert starttime(1) == before and is_alive_unsignalled(1)


@pytest.mark.parametrize("which", ["kthreadd", "another kernel thread"])
def test_kernel_thread(which: str) -> None:
    kthreads = kernel_threads(limit=2)
    pid = 2 if which == "kthreadd" else kthreads[-1]
    assert procfs.read_stat(pid).is_kernel_thread
    before = starttime(pid)
    assert_refused(mreaper("kill", str(pid)), pid, EXIT_USAGE, "kernel thread")
    assert starttime(pid) == before


def test_mreaper_itself() -> None:
    """`exec` keeps the shell's PID, so $$ is the PID of the mreaper process."""
    p = subprocess.Popen(["sh", "-c", f"exec {shlex.join(CLI)} kill $$"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == EXIT_USAGE, (p.returncode, err)  # not -9: it did not kill itself
    assert_refused(subprocess.CompletedProcess(p.args, p.returncode, out, err), p.pid,
                   EXIT_USAGE, "itself")


def test_mreapers_parent() -> None:
    r = subprocess.run(["sh", "-c", f'{shlex.join(CLI)} kill $$; echo "parent alive, rc=$?"'],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0
    assert r.stdout == "parent alive, rc=2\n"
    assert "parent" in r.stderr and "Traceback" not in r.stderr


def test_thread_id() -> None:
    """A non-leader thread of a child we start ourselves."""
    child = subprocess.Popen(
        [PY, "-c", "import sys, threading; e = threading.Event(); "
         "threading.Thread(target=e.wait, daemon=True).start(); print(flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        tid = next(int(t) for t in os.listdir(f"/proc/{child.pid}/task") if int(t) != child.pid)
        assert_refused(mreaper("kill", str(tid)), tid, EXIT_USAGE, "thread")
        assert is_alive_unsignalled(child.pid)
    finally:
        child.kill()
        child.wait()


# Runs `mreaper kill` as uid/gid 65534: the interpreter starts as root (it may live under
# a directory nobody cannot traverse, like /root/.pyenv), imports mreaper.cli and the
# command modules it loads on first use, drops every privilege, then runs the command
# exactly as the console script would.
AS_NOBODY = """
import os, sys
import locale, mreaper.cli, mreaper.cli_status, mreaper.cli_history, mreaper.install_files
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
assert (os.getuid(), os.geteuid(), os.getgid()) == (65534, 65534, 65534)
sys.exit(mreaper.cli.main(sys.argv[1:]))
"""


@pytest.mark.root
def test_permission_denied(spawn: object) -> None:
    target = spawn()  # type: ignore[operator]  # a root-owned sleep
    assert status_fields(target.pid)["Uid"].split()[0] == "0"
    r = subprocess.run([PY, "-c", AS_NOBODY, "kill", str(target.pid)], capture_output=True,
                       text=True, timeout=60, cwd="/", check=False)
    assert_refused(r, target.pid, EXIT_FORBIDDEN, "permission denied")
    assert target.poll() is None and is_alive_unsignalled(target.pid)


@pytest.mark.root
def test_nobody_can_kill_its_own_process(spawn: object) -> None:
    """The other side of the permission check: same uid, the kill goes through."""
    target = spawn(user=65534, group=65534, extra_groups=[])  # type: ignore[operator]
    r = subprocess.run([PY, "-c", AS_NOBODY, "kill", "--json", str(target.pid)],
                       capture_output=True, text=True, timeout=60, cwd="/", check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["uid"] == 65534
    assert target.wait(timeout=30) == -signal.SIGKILL


# --- argument errors: exit 2, nothing signalled ---------------------------------------------


@pytest.mark.parametrize("value", ["abc", "-1", "3601", "nan", ""])
def test_term_timeout_rejects(spawn: object, value: str) -> None:
    target = spawn()  # type: ignore[operator]
    r = mreaper("kill", "--term-timeout", value, str(target.pid))
    assert r.returncode == EXIT_USAGE, r.stderr
    assert "--term-timeout" in r.stderr and repr(value) in r.stderr
    assert r.stdout == ""
    assert is_alive_unsignalled(target.pid)


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5", ""])
def test_bad_pid_argument(value: str) -> None:
    r = mreaper("kill", value)
    assert r.returncode == EXIT_USAGE, r.stderr
    assert "PID" in r.stderr and r.stdout == ""


# --- successful kills ---------------------------------------------------------------------------


@pytest.mark.root
def test_kill_json_reaps_and_reports(memcg: hogs.MemoryCgroup, hog_factory: object) -> None:
    size = 128 * MiB
    hog = hog_factory(size, memcg, name="cli-victim")  # type: ignore[operator]
    before = memcg.usage()
    r = mreaper("kill", "--json", str(hog.pid))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    report = json.loads(r.stdout)
    assert report["pid"] == hog.pid and report["name"] == "cli-victim"
    assert report["mrelease"] in ("reaped", "exited-first")
    assert report["mrelease_errno"] == {"reaped": "0", "exited-first": "ESRCH"}[report["mrelease"]]
    assert [s["name"] for s in report["signals"]] == ["SIGKILL"]
    assert report["exited"] is True
    assert report["reason"] == "mreaper kill"
    assert report["memcg"] == "/" + os.path.basename(memcg.path)
    assert report["freed_bytes"] >= size * 9 // 10
    assert report["freed_source"].startswith("memcg ")
    assert hog.proc.wait(timeout=30) == -signal.SIGKILL
    assert before - memcg.usage() >= size * 9 // 10


@pytest.mark.root
def test_kill_human_output(memcg: hogs.MemoryCgroup, hog_factory: object) -> None:
    hog = hog_factory(32 * MiB, memcg, name="cli-human")  # type: ignore[operator]
    r = mreaper("kill", str(hog.pid))
    assert r.returncode == 0, r.stderr
    assert str(hog.pid) in r.stdout and "cli-human" in r.stdout
    assert "process_mrelease reaped" in r.stdout or "process_mrelease exited-first" in r.stdout
    assert hog.proc.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.root
def test_kill_with_term_timeout_lets_it_exit(memcg: hogs.MemoryCgroup,
                                             hog_factory: object) -> None:
    hog = hog_factory(32 * MiB, memcg)  # type: ignore[operator]
    r = mreaper("kill", "--json", "--term-timeout", "30", str(hog.pid))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["mrelease"] == "not-called"
    assert [s["name"] for s in report["signals"]] == ["SIGTERM"]
    assert hog.proc.wait(timeout=30) == -signal.SIGTERM


@pytest.mark.root
def test_kill_no_mrelease(memcg: hogs.MemoryCgroup, hog_factory: object) -> None:
    hog = hog_factory(32 * MiB, memcg)  # type: ignore[operator]
    r = mreaper("kill", "--json", "--no-mrelease", str(hog.pid))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["mrelease"] == "not-called" and report["mrelease_attempts"] == 0
    assert [s["name"] for s in report["signals"]] == ["SIGKILL"]
    assert hog.proc.wait(timeout=30) == -signal.SIGKILL


def test_console_script_is_installed() -> None:
    script = os.path.join(os.path.dirname(PY), "mreaper")
    assert os.access(script, os.X_OK), script
    r = subprocess.run([script, "kill", "1"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert_refused(r, 1, EXIT_USAGE, "PID 1")


@pytest.mark.root
def test_inside_a_pid_namespace_pid_2_is_an_ordinary_process() -> None:
    """In a container's PID namespace, PID 2 is whatever the init started second -- here
    a `sleep` -- and mreaper must be able to kill it (kernel threads are not even
    visible there)."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux, scripts/install-deps) is missing")
    script = f"sleep 1000 & exec {shlex.join(CLI)} kill --json 2"
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["pid"] == 2 and report["mrelease"] in ("reaped", "exited-first")

