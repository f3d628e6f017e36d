"""Fixtures for the lab tests: the ``lab`` marker and a gate that the VM can be booted.

A machine that cannot boot the lab VM fails these tests; they are skipped only when
qemu is genuinely not installable there (no apt candidate for ``qemu-system-x86``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # `lab` lives at the repository's top level, beside src/
    sys.path.insert(0, REPO)

from lab import labvm  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: boots a throw-away qemu VM (slow under TCG)")


def _apt_candidate(pkg: str) -> str | None:
    try:
        out = subprocess.run(
            ["apt-cache", "policy", pkg], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:
        return None
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            cand = line.split(":", 1)[1].strip()
            return None if cand == "(none)" else cand
    return None


@pytest.fixture(scope="session")
def lab_ready() -> None:
    """Kernel, boot image and initramfs in the cache; fail unless qemu cannot be installed."""
    if shutil.which(labvm.QEMU) is None:
        if _apt_candidate("qemu-system-x86") is None:
            pytest.skip("qemu-system-x86 is not installable here (no apt candidate)")
        pytest.fail("qemu-system-x86 is installable but missing: run scripts/install-deps")
    try:
        labvm.prepare(lambda msg: print(msg, file=sys.stderr))
    except labvm.LabError as e:
        pytest.fail(f"cannot prepare the lab VM: {e}")
