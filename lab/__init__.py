"""Test lab for mreaper: throw-away QEMU VMs for real system-wide memory pressure.

Not part of the shipped ``mreaper`` package: it drives qemu, apt and a Debian kernel
and only serves the project's own tests.  See :mod:`lab.labvm`.
"""
