"""Shared fixtures: root gating, bounded memory cgroups, hogs and plain child processes.

Every hog runs in its own memory cgroup with a limit, so a runaway is stopped by the
cgroup and never by a system-wide OOM, and its charge (MemoryCgroup.usage()) tells
exactly what a kill gave back.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import pytest

from mreaper import hogs

# tests/helpers.py is imported as `helpers` by the test modules.
if os.path.dirname(__file__) not in sys.path:
    sys.path.insert(0, os.path.dirname(__file__))

MiB = hogs.MiB
GiB = hogs.GiB

# Each test session has its own single-instance lock (mreaper.instance): the `mreaper
# run` daemons it starts must not be refused because another session's daemon runs on
# this shared machine.  Tests of the lock itself pass --lock-file.
_LOCK_DIR = tempfile.mkdtemp(prefix="mreaper-test-lock-")
os.environ.setdefault("MREAPER_LOCK_FILE", os.path.join(_LOCK_DIR, "mreaper.lock"))
atexit.register(shutil.rmtree, _LOCK_DIR, True)

ROOT_REASON = "needs root: memory cgroups, freezer, signals across users, ns_last_pid"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip(ROOT_REASON)


@pytest.fixture
def root() -> None:
    """Request this (or mark the test `root`) when a test cannot run unprivileged."""
    if os.geteuid() != 0:
        pytest.skip(ROOT_REASON)


# --- memory cgroups ------------------------------------------------------------------


MemcgFactory = Callable[[int], hogs.MemoryCgroup]


@pytest.fixture
def memcg_factory(root: None) -> Iterator[MemcgFactory]:
    """Make throw-away memory cgroups with a limit; all removed (tasks killed) at the end."""
    made: list[hogs.MemoryCgroup] = []

    def make(limit: int) -> hogs.MemoryCgroup:
        cg = hogs.MemoryCgroup.create(limit=limit)
        made.append(cg)
        return cg

    yield make
    for cg in reversed(made):
        cg.remove()


@pytest.fixture
def memcg(memcg_factory: MemcgFactory) -> hogs.MemoryCgroup:
    """One memory cgroup limited to 512 MiB (hogs in it stay well below)."""
    return memcg_factory(512 * MiB)


# --- hogs and plain processes --------------------------------------------------------


HogFactory = Callable[..., hogs.Hog]


@pytest.fixture
def hog_factory() -> Iterator[HogFactory]:
    """Start hogs (hogs.Hog); each must be given a memory cgroup.  Killed at the end."""
    started: list[hogs.Hog] = []

    def start(size: int, memcg: hogs.MemoryCgroup, **kw: object) -> hogs.Hog:
        assert memcg is not None, "every hog is bounded by a memory cgroup"
        assert size <= GiB, "hogs stay <= 1 GiB"
        h = hogs.Hog(size, memcg, **kw)  # type: ignore[arg-type]
        started.append(h)
        return h

    yield start
    for h in started:
        h.kill()


SpawnFactory = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn() -> Iterator[SpawnFactory]:
    """Start plain child processes (default: `sleep 1000`); SIGKILLed and waited at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str] | None = None, **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv or ["sleep", "1000"], stdin=subprocess.DEVNULL,
                             **kw)  # type: ignore[call-overload]
        procs.append(p)
        return p

    yield start
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait(timeout=30)


@pytest.fixture
def freezer(root: None) -> Iterator[hogs.Freezer]:
    """A v1 freezer cgroup; thawed and removed at the end."""
    fz = hogs.Freezer()
    try:
        yield fz
    finally:
        fz.remove()


@pytest.fixture(scope="session")
def shared_mm_helper(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CLONE_VM helper (helpers.SHARED_MM_C), compiled with gcc once per session."""
    import helpers

    return str(helpers.compile_c(helpers.SHARED_MM_C,
                                 tmp_path_factory.mktemp("cbin") / "shared_mm"))
