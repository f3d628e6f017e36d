"""One workload process of the arena, run inside the lab VM by the guest driver.

    python -S hog.py NAME SIZE_MIB [STEP_MIB INTERVAL_S] [--cgroup DIR]

It dies with the driver (PR_SET_PDEATHSIG), sets its comm to NAME and its
oom_score_adj to 0 (the driver runs at -1000 and children inherit that), joins
the cgroup DIR when given (under systemd-run the scope already holds it), then:

* without STEP_MIB: maps SIZE_MIB of private anonymous memory, says ``ready``
  and sleeps for ever (an idle, mid-size process);
* with STEP_MIB: says ``ready``, waits for a ``go`` line on stdin, then maps
  STEP_MIB more every INTERVAL_S seconds up to SIZE_MIB (a leak, or the push).
  A ``stop`` line on stdin ends the growth; the memory is kept.

Memory is private anonymous and faulted in at once with ``MAP_POPULATE`` (one
syscall per step: 4x faster than filling a bytearray under TCG, and what
``process_mrelease`` can free).  Only the standard library is used, so ``-S``
(no site import) keeps the start-up short under TCG.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import signal
import sys

MiB = 1 << 20
FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0x8000)


def main(argv: list[str]) -> int:
    cgroup = None
    if "--cgroup" in argv:
        i = argv.index("--cgroup")
        cgroup = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    name, size = argv[0], int(argv[1]) * MiB
    step = int(argv[2]) * MiB if len(argv) > 2 else 0
    interval = float(argv[3]) if len(argv) > 3 else 0.0
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        return 1
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("0")
    with open("/proc/self/comm", "w") as f:
        f.write(name[:15])
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    held: list[mmap.mmap] = []
    if not step:
        held.append(mmap.mmap(-1, size, flags=FLAGS))
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        while True:
            signal.pause()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        return 0
    grown = 0
    while grown < size:
        held.append(mmap.mmap(-1, min(step, size - grown), flags=FLAGS))
        grown += step
        if select.select([sys.stdin], [], [], interval)[0]:
            line = sys.stdin.readline()
            if not line or line.strip() == "stop":
                break
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
