"""Many small allocators for the arena, run inside the lab VM by the guest driver.

    python -S pool.py NAME MODE WORKERS STEP_MIB MAX_MIB INTERVAL_S [--cgroup DIR]

A parent (comm NAME) that, on a ``go`` line on stdin, forks WORKERS workers (comm
``arena-w<i>``); each maps STEP_MIB of private anonymous memory every INTERVAL_S up to
MAX_MIB.  MODE:

* ``storm``: all workers at once, each keeps what it grew (a fork storm, a test
  runner's workers);
* ``respawn``: the same, and the parent forks a new worker for each one that dies (a
  worker pool: killing workers one by one never ends);
* ``build``: at most WORKERS at a time, each exits 3 s after it reached MAX_MIB and a
  new one takes its place, 3 * WORKERS in all (a parallel build: compilers come and go).

Says ``ready`` first; dies with the driver (PR_SET_PDEATHSIG), and its workers with it.
Standard library only, ``-S`` for a short start under TCG.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import sys
import time

MiB = 1 << 20
FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0x8000)
LIBC = ctypes.CDLL(None, use_errno=True)
LINGER_S = 3.0  # build: how long a worker holds what it grew before it exits


def worker(i: int, step: int, top: int, interval: float, leave: bool) -> None:
    LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)
    with open("/proc/self/comm", "w") as f:
        f.write(f"arena-w{i}"[:15])
    held = []
    grown = 0
    while grown < top:
        held.append(mmap.mmap(-1, min(step, top - grown), flags=FLAGS))
        grown += step
        time.sleep(interval)
    if leave:  # a compiler holds its memory a while, then exits
        time.sleep(LINGER_S)
        os._exit(0)
    while True:
        signal.pause()


def main(argv: list[str]) -> int:
    cgroup = None
    if "--cgroup" in argv:
        i = argv.index("--cgroup")
        cgroup = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    name, mode, workers = argv[0], argv[1], int(argv[2])
    step, top, interval = int(argv[3]) * MiB, int(argv[4]) * MiB, float(argv[5])
    LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        return 1
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("0")
    with open("/proc/self/comm", "w") as f:
        f.write(name[:15])
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        return 0
    build = mode == "build"
    started = 0

    def spawn() -> None:
        nonlocal started
        if os.fork() == 0:
            try:
                worker(started, step, top, interval, build)
            finally:
                os._exit(0)
        started += 1

    for _ in range(workers):
        spawn()
    total = 3 * workers if build else workers
    while True:
        try:
            os.wait()
        except ChildProcessError:
            if not build or started >= total:
                while True:
                    signal.pause()
            continue
        if mode == "respawn" or (build and started < total):
            spawn()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
