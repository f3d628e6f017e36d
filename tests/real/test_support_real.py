"""probe_support under a real seccomp filter, lock_memory, and odd process names on a
live process: what the unit tests fake, here with the real kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import is_alive_unsignalled, wait_until
from mreaper.linux import procfs
from mreaper.reap import KillOptions, Mrelease, Victim, kill_and_reap, refusal

PY = sys.executable

# Installs a seccomp filter on process_mrelease (ERRNO(ENOSYS), or KILL_PROCESS), then
# asks probe_support.  PR_SET_DUMPABLE 0: a probe child killed by SIGSYS dumps no core.
SECCOMP_PROBE = r"""
import ctypes, errno, sys
from mreaper.linux.syscalls import _NR, probe_support

RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
action = RET_KILL_PROCESS if sys.argv[1] == "kill" else RET_ERRNO | errno.ENOSYS

class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]

class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

prog = (SockFilter * 4)(
    SockFilter(0x20, 0, 0, 0),                           # ld [seccomp_data.nr]
    SockFilter(0x15, 0, 1, _NR["process_mrelease"]),     # jeq process_mrelease
    SockFilter(0x06, 0, 0, action),                      # ret action
    SockFilter(0x06, 0, 0, RET_ALLOW),                   # ret allow
)
fprog = SockFprog(len(prog), prog)
libc = ctypes.CDLL(None, use_errno=True)
ul = ctypes.c_ulong
assert libc.prctl(38, ul(1), ul(0), ul(0), ul(0)) == 0          # PR_SET_NO_NEW_PRIVS
assert libc.prctl(4, ul(0), ul(0), ul(0), ul(0)) == 0           # PR_SET_DUMPABLE
assert libc.prctl(22, ul(2), ctypes.byref(fprog), ul(0), ul(0)) == 0  # SECCOMP_MODE_FILTER
s = probe_support()
print(s.pidfd, s.mrelease, s.seccomp)
print(s.detail)
"""


def probe_under_filter(action: str) -> tuple[list[str], str]:
    r = subprocess.run([PY, "-c", SECCOMP_PROBE, action], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, (r.returncode, r.stderr)  # the prober itself never dies
    first, detail = r.stdout.split("\n", 1)
    return first.split(), detail


def test_probe_support_under_a_filter_that_fails_the_call() -> None:
    answer, detail = probe_under_filter("errno")
    assert answer == ["True", "False", "True"]
    assert "process_mrelease: no" in detail
    assert "probed in a child" in detail


def test_probe_support_survives_a_filter_that_kills_the_caller() -> None:
    answer, detail = probe_under_filter("kill")
    assert answer == ["False", "False", "True"]
    assert "SIGSYS" in detail


@pytest.mark.root
def test_lock_memory_takes_onfault_on_this_kernel() -> None:
    code = ("from mreaper.linux.syscalls import lock_memory\n"
            "print(lock_memory())\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmLck')][0].strip())\n")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    flags, vmlck = r.stdout.splitlines()
    assert flags == "MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT"
    assert int(vmlck.split()[1]) > 0


# A process that names itself (prctl PR_SET_NAME, raw bytes) and waits.
NAMED = r"""
import ctypes, sys
name = bytes.fromhex(sys.argv[1])
assert ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0) == 0
print(flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize(("comm", "stat_comm", "status_name"), [
    (b"a) Z (b c", "a) Z (b c", "a) Z (b c"),
    (b"x\n) R 1 (", "x\n) R 1 (", "x\\n) R 1 ("),
    (b"\xff\xfeok", "\\xff\\xfeok", "\\xff\\xfeok"),
])
def test_odd_names_on_a_live_process(comm: bytes, stat_comm: str, status_name: str) -> None:
    p = subprocess.Popen([PY, "-c", NAMED, comm.hex()], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"\n"
        # asleep in read(): the comm must not shift the fields after it
        wait_until(lambda: procfs.read_stat(p.pid).state == "S", what="the child to block")
        st = procfs.read_stat(p.pid)
        assert (st.pid, st.comm, st.state) == (p.pid, stat_comm, "S")
        assert st.ppid == os.getpid()
        status = procfs.read_status(p.pid)
        assert status.name == status_name and status.tgid == p.pid and status.has_mm
        assert refusal(st, status.tgid) is None
        with Victim.open(p.pid, starttime=st.starttime) as v:
            assert v.name == status_name
            report = kill_and_reap(v, KillOptions(exit_timeout=10))
        assert report.mrelease in (Mrelease.REAPED, Mrelease.EXITED_FIRST)
        assert p.wait(timeout=30) < 0
    finally:
        p.kill()
        p.wait()
    assert not is_alive_unsignalled(p.pid)
