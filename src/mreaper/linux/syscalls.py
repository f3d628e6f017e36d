"""Raw Linux syscalls mreaper needs: pidfd_open, pidfd_send_signal, process_mrelease, mlockall.

Bound with ctypes on purpose: a ctypes foreign call releases the GIL, so a reaper
thread blocked in process_mrelease (which can run for hundreds of milliseconds on a
multi-GiB victim) does not stop the monitor thread.  Errors are raised as
`SyscallError`, an OSError subclass whose `errno` is exactly the kernel's, and which
also inherits the matching builtin (ESRCH -> ProcessLookupError, EPERM ->
PermissionError, ...), so callers can catch either way.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from dataclasses import dataclass
from typing import Protocol

# --- syscall numbers --------------------------------------------------------------
# Since Linux 5.1 new syscalls share one number on every architecture ("generic"),
# offset per ABI on the few that keep separate tables.  Values from the kernel's
# syscall tables (arch/*/kernel/syscalls/syscall.tbl, scripts/syscall.tbl).
_GENERIC = {"pidfd_send_signal": 424, "pidfd_open": 434, "process_mrelease": 448}
_ABI_OFFSET = {
    "generic": 0,
    "mips-o32": 4000,
    "mips-n64": 5000,
    "mips-n32": 6000,
}
_ALPHA = {"pidfd_send_signal": 534, "pidfd_open": 544, "process_mrelease": 558}
_X32_BIT = 0x40000000


def detect_abi(machine: str | None = None, multiarch: str | None = None,
               pointer_bits: int | None = None) -> str:
    """Name the syscall ABI of this interpreter: generic, alpha, x32, mips-o32/n64/n32."""
    machine = (machine if machine is not None else os.uname().machine).lower()
    if multiarch is None:
        multiarch = getattr(sys.implementation, "_multiarch", "") or ""
    if pointer_bits is None:
        pointer_bits = ctypes.sizeof(ctypes.c_void_p) * 8
    if machine.startswith("alpha"):
        return "alpha"
    # uname says x86_64 for i386 userlands on 64-bit kernels too: only the multiarch
    # tuple tells x32 (x86_64-linux-gnux32) from i386 (generic numbers).
    if machine == "x86_64" and multiarch.endswith("gnux32"):
        return "x32"
    if machine.startswith("mips"):
        if "abin32" in multiarch:
            return "mips-n32"
        if "abi64" in multiarch or pointer_bits == 64:
            return "mips-n64"
        return "mips-o32"
    return "generic"


def syscall_number(name: str, abi: str) -> int:
    """The syscall number of `name` under `abi` (see detect_abi)."""
    if name not in _GENERIC:
        raise KeyError(f"unknown syscall {name!r}; known: {sorted(_GENERIC)}")
    if abi == "alpha":
        return _ALPHA[name]
    if abi == "x32":
        return _GENERIC[name] | _X32_BIT
    if abi not in _ABI_OFFSET:
        raise KeyError(f"unknown ABI {abi!r}; known: alpha, x32, {', '.join(_ABI_OFFSET)}")
    return _GENERIC[name] + _ABI_OFFSET[abi]


# mlockall flags differ on a few architectures (asm-generic/mman-common.h vs
# arch/{alpha,powerpc,sparc}/include/uapi/asm/mman.h).
def mlock_flags(machine: str | None = None) -> tuple[int, int, int]:
    """(MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT) for this architecture."""
    machine = (machine if machine is not None else os.uname().machine).lower()
    if machine.startswith(("ppc", "powerpc", "sparc", "alpha")):
        return 0x2000, 0x4000, 0x8000
    return 1, 2, 4


# --- errors -------------------------------------------------------------------


class SyscallError(OSError):
    """A failed syscall: `errno` is the kernel's, `syscall` names the call."""

    syscall: str

    def __init__(self, err: int, syscall: str, detail: str = "") -> None:
        msg = f"{syscall}: {os.strerror(err)}"
        if detail:
            msg += f" ({detail})"
        super().__init__(err, msg)
        self.syscall = syscall

    def __str__(self) -> str:
        return f"[Errno {self.errno}] {errno.errorcode.get(self.errno or 0, '?')}: {self.strerror}"

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno or 0, f"E{self.errno}")


# One class per builtin OSError subclass, so `except ProcessLookupError` works.
_BUILTIN_BY_ERRNO: dict[int, type[OSError]] = {
    errno.ESRCH: ProcessLookupError,
    errno.EPERM: PermissionError,
    errno.EACCES: PermissionError,
    errno.EINTR: InterruptedError,
    errno.EAGAIN: BlockingIOError,
    errno.ECHILD: ChildProcessError,
    errno.ENOENT: FileNotFoundError,
}
_CLASS_BY_ERRNO: dict[int, type[SyscallError]] = {
    num: type(f"SyscallError_{errno.errorcode[num]}", (SyscallError, base), {})
    for num, base in _BUILTIN_BY_ERRNO.items()
}


def syscall_error(err: int, syscall: str, detail: str = "") -> SyscallError:
    """Build the SyscallError for `err`, inheriting the matching builtin if there is one."""
    return _CLASS_BY_ERRNO.get(err, SyscallError)(err, syscall, detail)


# --- the calls ------------------------------------------------------------------


class Syscalls(Protocol):
    """The syscall surface the engine uses; swapped for a fault injector in tests."""

    def pidfd_open(self, pid: int, flags: int = 0) -> int: ...
    def pidfd_send_signal(self, pidfd: int, sig: int, flags: int = 0) -> None: ...
    def process_mrelease(self, pidfd: int, flags: int = 0) -> None: ...


def _load_libc() -> ctypes.CDLL:
    """The C library: glibc's soname, else the symbols the interpreter already has
    (dlopen(NULL): musl and others).  Not ctypes.util.find_library, which spawns
    ldconfig and pulls subprocess into a daemon that needs neither (3 MiB of RSS)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(None, use_errno=True)


_libc = _load_libc()
_libc.syscall.restype = ctypes.c_long
_libc.mlockall.argtypes = [ctypes.c_int]
_libc.mlockall.restype = ctypes.c_int
_ABI = detect_abi()
_NR = {name: syscall_number(name, _ABI) for name in _GENERIC}


def _check(ret: int, name: str) -> int:
    if ret < 0:
        raise syscall_error(ctypes.get_errno(), name)
    return ret


def pidfd_open(pid: int, flags: int = 0) -> int:
    """pidfd_open(2): a file descriptor that refers to process `pid` for its lifetime."""
    nr = _NR["pidfd_open"]
    return _check(_libc.syscall(ctypes.c_long(nr), ctypes.c_int(pid), ctypes.c_uint(flags)),
                  "pidfd_open")


def pidfd_send_signal(pidfd: int, sig: int, flags: int = 0) -> None:
    """pidfd_send_signal(2) with no siginfo: signal the process the pidfd pins.

    Signal 0 checks permission and existence without sending anything.
    """
    nr = _NR["pidfd_send_signal"]
    _check(_libc.syscall(ctypes.c_long(nr), ctypes.c_int(pidfd), ctypes.c_int(sig),
                         ctypes.c_void_p(None), ctypes.c_uint(flags)), "pidfd_send_signal")


def process_mrelease(pidfd: int, flags: int = 0) -> None:
    """process_mrelease(2): free a dying process's memory from the caller's context.

    Only a process that is exiting (SIGKILLed) can be reaped; a live one gives
    EINVAL, one that already passed exit_mm gives ESRCH.  Releases the GIL.
    """
    nr = _NR["process_mrelease"]
    _check(_libc.syscall(ctypes.c_long(nr), ctypes.c_int(pidfd), ctypes.c_uint(flags)),
           "process_mrelease")


def mlockall(flags: int) -> None:
    """mlockall(2): keep our pages resident so we can still act under pressure."""
    _check(_libc.mlockall(flags), "mlockall")


M_ARENA_MAX = -8  # glibc malloc.h


def one_malloc_arena() -> bool:
    """mallopt(M_ARENA_MAX, 1): every thread allocates from the main arena.  By default
    glibc gives each thread that allocates an arena of its own, a 64 MiB mapping, and
    under mlockall every such mapping counts as locked (VmLck) and its touched pages
    stay pinned.  The daemon's threads allocate little and rarely at once.  False where
    there is no mallopt (not glibc)."""
    mallopt = getattr(_libc, "mallopt", None)
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, 1))


def lock_memory() -> str:
    """mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT), falling back without ONFAULT
    (kernels before 4.4 answer EINVAL).  Returns the flags that took."""
    current, future, onfault = mlock_flags()
    try:
        mlockall(current | future | onfault)
        return "MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT"
    except SyscallError as e:
        if e.errno != errno.EINVAL:
            raise
    mlockall(current | future)
    return "MCL_CURRENT|MCL_FUTURE"


class LinuxSyscalls:
    """The real kernel, as a `Syscalls`."""

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        return pidfd_open(pid, flags)

    def pidfd_send_signal(self, pidfd: int, sig: int, flags: int = 0) -> None:
        pidfd_send_signal(pidfd, sig, flags)

    def process_mrelease(self, pidfd: int, flags: int = 0) -> None:
        process_mrelease(pidfd, flags)


# --- support probe ----------------------------------------------------------------


@dataclass(frozen=True)
class Support:
    """What this kernel (and any seccomp filter around us) lets us do."""

    pidfd: bool
    mrelease: bool
    seccomp: bool
    detail: str


def _seccomp_mode(status_path: str = "/proc/self/status") -> int:
    try:
        with open(status_path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _probe_errnos() -> tuple[int, int]:
    """Call both syscalls with an invalid fd: EBADF means present, ENOSYS absent."""
    results = []
    for name in ("pidfd_send_signal", "process_mrelease"):
        args: list[object] = [ctypes.c_long(_NR[name]), ctypes.c_int(-1)]
        if name == "pidfd_send_signal":
            args += [ctypes.c_int(0), ctypes.c_void_p(None), ctypes.c_uint(0)]
        else:
            args += [ctypes.c_uint(0)]
        ret = _libc.syscall(*args)
        results.append(ctypes.get_errno() if ret < 0 else 0)
    return results[0], results[1]


def probe_support(status_path: str = "/proc/self/status") -> Support:
    """Find out whether pidfds and process_mrelease work here, without ever dying of it.

    Under a seccomp filter (`Seccomp: 2`), a call the filter does not allow may kill
    us with SIGSYS instead of failing: earlyoom died that way under its own systemd
    unit.  So with a filter the calls are probed in a forked child, and a child killed
    by a signal means "not allowed".
    """
    mode = _seccomp_mode(status_path)
    if mode == 0:
        pidfd_err, mrelease_err = _probe_errnos()
    else:
        pidfd_err, mrelease_err, died = _probe_in_child()
        if died:
            return Support(False, False, True,
                           f"the seccomp filter kills callers of these syscalls ({died})")
    pidfd = pidfd_err != errno.ENOSYS
    mrelease = mrelease_err != errno.ENOSYS
    parts = []
    parts.append("pidfd: yes" if pidfd else "pidfd: no (ENOSYS; Linux >= 5.3 needed)")
    parts.append("process_mrelease: yes" if mrelease
                 else "process_mrelease: no (ENOSYS; Linux >= 5.15 needed, or blocked by seccomp)")
    if mode:
        parts.append(f"seccomp mode {mode}: probed in a child")
    return Support(pidfd, mrelease, mode != 0, "; ".join(parts))


def _probe_in_child() -> tuple[int, int, str]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no Python-level cleanup, just the two calls
        try:
            os.close(r)
            a, b = _probe_errnos()
            os.write(w, f"{a} {b}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        import signal

        name = signal.Signals(os.WTERMSIG(status)).name
        return errno.ENOSYS, errno.ENOSYS, f"probe child died of {name}"
    a, b = (int(x) for x in data.split())
    return a, b, ""
