"""Syscall numbers per ABI, ABI detection, mlockall flags, SyscallError, probe_support."""

from __future__ import annotations

import errno
import os
import platform
import subprocess
import sys

import pytest

from mreaper.linux import syscalls
from mreaper.linux.syscalls import SyscallError, syscall_error, syscall_number

X32 = 0x40000000

# From the kernel's tables: scripts/syscall.tbl (generic), arch/alpha/kernel/syscalls/
# syscall.tbl, arch/mips/kernel/syscalls/syscall_{o32,n64,n32}.tbl,
# arch/x86/entry/syscalls/syscall_64.tbl (x32 = common number | __X32_SYSCALL_BIT).
TABLE = {
    "generic": {"pidfd_send_signal": 424, "pidfd_open": 434, "process_mrelease": 448},
    "alpha": {"pidfd_send_signal": 534, "pidfd_open": 544, "process_mrelease": 558},
    "mips-o32": {"pidfd_send_signal": 4424, "pidfd_open": 4434, "process_mrelease": 4448},
    "mips-n64": {"pidfd_send_signal": 5424, "pidfd_open": 5434, "process_mrelease": 5448},
    "mips-n32": {"pidfd_send_signal": 6424, "pidfd_open": 6434, "process_mrelease": 6448},
    "x32": {"pidfd_send_signal": 424 | X32, "pidfd_open": 434 | X32,
            "process_mrelease": 448 | X32},
}


@pytest.mark.parametrize(("abi", "name", "number"),
                         [(abi, name, nr) for abi, t in TABLE.items() for name, nr in t.items()])
def test_syscall_number_per_abi(abi: str, name: str, number: int) -> None:
    assert syscall_number(name, abi) == number


def test_process_mrelease_numbers_quoted_in_the_issue() -> None:
    assert syscall_number("process_mrelease", "generic") == 448
    assert syscall_number("process_mrelease", "alpha") == 558
    assert [syscall_number("process_mrelease", f"mips-{a}") for a in ("o32", "n64", "n32")] == [
        4448, 5448, 6448]
    assert syscall_number("process_mrelease", "x32") == 0x400001C0


def test_unknown_syscall_or_abi_is_a_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match="frobnicate"):
        syscall_number("frobnicate", "generic")
    with pytest.raises(KeyError, match="vax"):
        syscall_number("process_mrelease", "vax")


@pytest.mark.parametrize(("machine", "multiarch", "bits", "abi"), [
    ("x86_64", "x86_64-linux-gnu", 64, "generic"),
    ("x86_64", "x86_64-linux-gnux32", 32, "x32"),
    ("aarch64", "aarch64-linux-gnu", 64, "generic"),
    ("armv7l", "arm-linux-gnueabihf", 32, "generic"),
    ("i686", "i386-linux-gnu", 32, "generic"),
    ("ppc64le", "powerpc64le-linux-gnu", 64, "generic"),
    ("s390x", "s390x-linux-gnu", 64, "generic"),
    ("riscv64", "riscv64-linux-gnu", 64, "generic"),
    ("loongarch64", "loongarch64-linux-gnu", 64, "generic"),
    ("alpha", "alpha-linux-gnu", 64, "alpha"),
    ("mips", "mipsel-linux-gnu", 32, "mips-o32"),
    ("mips64", "mipsel-linux-gnu", 32, "mips-o32"),  # o32 userland on a 64-bit kernel
    ("mips64", "mips64el-linux-gnuabi64", 64, "mips-n64"),
    ("mips64", "", 64, "mips-n64"),
    ("mips64", "mips64el-linux-gnuabin32", 32, "mips-n32"),
    ("MIPS64", "mips64-linux-gnuabin32", 32, "mips-n32"),
])
def test_detect_abi(machine: str, multiarch: str, bits: int, abi: str) -> None:
    assert syscalls.detect_abi(machine, multiarch, bits) == abi


def test_detect_abi_i386_userland_on_an_x86_64_kernel_is_not_x32() -> None:
    # uname() reports the *kernel's* machine: a 32-bit i386 Python on a 64-bit kernel
    # sees "x86_64" with 32-bit pointers.  It uses the i386 table (process_mrelease 448),
    # not x32 (448 | 0x40000000, which an i386 process gets ENOSYS for).
    assert syscalls.detect_abi("x86_64", "i386-linux-gnu", 32) == "generic"


def test_detect_abi_of_this_interpreter() -> None:
    expected = "generic" if platform.machine() in ("x86_64", "aarch64") else None
    if expected is None:
        pytest.skip(f"expectation written for x86_64/aarch64 hosts, this is {platform.machine()}")
    assert syscalls.detect_abi() == expected
    assert TABLE["generic"] == syscalls._NR


@pytest.mark.parametrize(("machine", "flags"), [
    ("x86_64", (1, 2, 4)),
    ("aarch64", (1, 2, 4)),
    ("mips64", (1, 2, 4)),
    ("parisc64", (1, 2, 4)),
    ("s390x", (1, 2, 4)),
    ("ppc64le", (0x2000, 0x4000, 0x8000)),
    ("ppc64", (0x2000, 0x4000, 0x8000)),
    ("ppc", (0x2000, 0x4000, 0x8000)),
    ("sparc64", (0x2000, 0x4000, 0x8000)),
    ("sparc", (0x2000, 0x4000, 0x8000)),
    ("alpha", (0x2000, 0x4000, 0x8000)),
])
def test_mlock_flags_per_arch(machine: str, flags: tuple[int, int, int]) -> None:
    assert syscalls.mlock_flags(machine) == flags


# --- SyscallError ---------------------------------------------------------------------------


def test_esrch_is_a_process_lookup_error_and_a_syscall_error() -> None:
    e = syscall_error(errno.ESRCH, "process_mrelease")
    assert isinstance(e, ProcessLookupError)
    assert isinstance(e, SyscallError)
    assert isinstance(e, OSError)
    assert e.errno == errno.ESRCH
    assert e.syscall == "process_mrelease"
    assert e.errno_name == "ESRCH"
    assert "process_mrelease" in str(e) and "ESRCH" in str(e)
    with pytest.raises(ProcessLookupError):
        raise e


@pytest.mark.parametrize("err", [errno.EPERM, errno.EACCES])
def test_eperm_and_eacces_are_permission_errors(err: int) -> None:
    e = syscall_error(err, "pidfd_send_signal", "pid 1")
    assert isinstance(e, PermissionError)
    assert isinstance(e, SyscallError)
    assert e.errno == err
    assert e.syscall == "pidfd_send_signal"
    assert "pid 1" in str(e)


@pytest.mark.parametrize(("err", "builtin"), [
    (errno.EINTR, InterruptedError),
    (errno.EAGAIN, BlockingIOError),
    (errno.ECHILD, ChildProcessError),
    (errno.ENOENT, FileNotFoundError),
])
def test_other_builtin_subclasses(err: int, builtin: type[OSError]) -> None:
    e = syscall_error(err, "x")
    assert isinstance(e, builtin) and isinstance(e, SyscallError) and e.errno == err


@pytest.mark.parametrize("err", [errno.EINVAL, errno.EBADF, errno.ENOSYS])
def test_einval_ebadf_enosys_are_plain_syscall_errors(err: int) -> None:
    e = syscall_error(err, "process_mrelease")
    assert type(e) is SyscallError
    assert not isinstance(e, (ProcessLookupError, PermissionError))
    assert e.errno == err and e.syscall == "process_mrelease"
    assert e.errno_name == errno.errorcode[err]


def test_syscall_error_of_an_unknown_errno_still_formats() -> None:
    e = syscall_error(4000, "process_mrelease")
    assert e.errno == 4000
    assert e.errno_name == "E4000"
    assert "process_mrelease" in str(e)


def test_real_calls_raise_the_kernels_errno() -> None:
    with pytest.raises(SyscallError) as bad_pid:
        syscalls.pidfd_open(-1)
    assert bad_pid.value.errno == errno.EINVAL and bad_pid.value.syscall == "pidfd_open"
    with pytest.raises(SyscallError) as bad_fd:
        syscalls.process_mrelease(-1)
    assert bad_fd.value.errno == errno.EBADF and bad_fd.value.syscall == "process_mrelease"
    with pytest.raises(SyscallError) as bad_sig:
        syscalls.pidfd_send_signal(-1, 0)
    assert bad_sig.value.errno == errno.EBADF and bad_sig.value.syscall == "pidfd_send_signal"


# --- probe_support ----------------------------------------------------------------------------


def _fake_status(tmp_path: os.PathLike[str], seccomp: int | None) -> str:
    path = os.path.join(tmp_path, "status")
    with open("/proc/self/status") as real, open(path, "w") as f:
        for line in real:
            if not line.startswith(("Seccomp:", "Seccomp_filters:")):
                f.write(line)
        if seccomp is not None:
            f.write(f"Seccomp:\t{seccomp}\nSeccomp_filters:\t1\n")
    return path


def test_probe_support_without_seccomp_answers_in_process(tmp_path: os.PathLike[str],
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    forks: list[int] = []
    real_fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or real_fork())
    support = syscalls.probe_support(_fake_status(tmp_path, 0))
    assert support == syscalls.Support(pidfd=True, mrelease=True, seccomp=False,
                                       detail=support.detail)
    assert forks == []
    assert "process_mrelease: yes" in support.detail


def test_probe_support_under_seccomp_probes_in_a_child_and_answers(
        tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`Seccomp: 2` (a filter): the probe runs in a forked child, and since this kernel
    supports both calls (and no filter really applies) the answer is still yes."""
    forks: list[int] = []
    real_fork = os.fork

    def counting_fork() -> int:
        pid = real_fork()
        if pid:
            forks.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", counting_fork)
    support = syscalls.probe_support(_fake_status(tmp_path, 2))
    assert len(forks) == 1, "the probe must run in exactly one child"
    with pytest.raises(ChildProcessError):  # and the child was waited for
        os.waitpid(forks[0], os.WNOHANG)
    assert support.pidfd and support.mrelease and support.seccomp
    assert "probed in a child" in support.detail


def test_probe_support_with_an_unreadable_status_assumes_no_filter(tmp_path: os.PathLike[str]
                                                                   ) -> None:
    missing = os.path.join(tmp_path, "nope")
    assert syscalls._seccomp_mode(missing) == 0
    garbage = os.path.join(tmp_path, "garbage")
    with open(garbage, "wb") as f:
        f.write(b"Seccomp:\n\xff\xfe")
    assert syscalls._seccomp_mode(garbage) == 0
    assert syscalls.probe_support(missing).mrelease


def test_probe_support_on_this_kernel_via_the_real_status() -> None:
    # In a fresh interpreter, reading the real /proc/self/status (no filter here).
    support = subprocess.run(
        [sys.executable, "-c",
         "from mreaper.linux.syscalls import probe_support as p; s = p(); "
         "print(s.pidfd, s.mrelease)"],
        capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert support == ["True", "True"]
