"""Unit tests stand made-up regular files in for the kernel's PSI files (procfs and
cgroup2 files cannot be written with chosen figures): the monitor must take them here,
while the daemon takes only files on procfs or cgroup2 (tests/real/test_special_files.py
holds that).  FIFOs and devices are still refused, as everywhere."""

from __future__ import annotations

import pytest

from mreaper import detect


@pytest.fixture(autouse=True)
def made_up_pressure_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detect, "PRESSURE_FILESYSTEMS", None)
