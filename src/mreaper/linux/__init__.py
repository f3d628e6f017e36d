"""Kernel interfaces, facts in and no policy: syscalls, /proc, cgroups, PSI."""

from mreaper.linux.syscalls import (
    LinuxSyscalls,
    Support,
    SyscallError,
    Syscalls,
    lock_memory,
    mlockall,
    pidfd_open,
    pidfd_send_signal,
    probe_support,
    process_mrelease,
)

__all__ = [
    "LinuxSyscalls",
    "Support",
    "SyscallError",
    "Syscalls",
    "lock_memory",
    "mlockall",
    "pidfd_open",
    "pidfd_send_signal",
    "probe_support",
    "process_mrelease",
]
