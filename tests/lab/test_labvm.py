"""The lab VM runner: output and exit codes come back, the VM has what mreaper needs
(cgroup v2 + memcg, PSI, process_mrelease, zram), a real global OOM inside it is
survived, and no qemu process outlives a timeout or a SIGTERM.

Three boots in all (each ~3-10 s under TCG): one batches the feature checks and the
global OOM, one times out, one is the CLI killed by SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lab import labvm

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.usefixtures("lab_ready")]

REPO = Path(__file__).resolve().parents[2]
MEM_MIB = 1024

# Runs inside the VM: feature probes as one JSON line, then a global OOM with no daemon.
GUEST_SCRIPT = textwrap.dedent(
    r'''
    import ctypes, json, os, subprocess, sys

    out_dir = sys.argv[1]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    r = libc.syscall(448, -1, 0)  # process_mrelease(-1, 0)
    mrelease_errno = ctypes.get_errno() if r == -1 else 0

    def read(path):
        try:
            with open(path) as f:
                return f.read()
        except OSError as e:
            return f"ERROR {e}"

    meminfo = dict(line.split(":", 1) for line in read("/proc/meminfo").splitlines())
    feats = {
        "controllers": read("/sys/fs/cgroup/cgroup.controllers").split(),
        "subtree_control": read("/sys/fs/cgroup/cgroup.subtree_control").split(),
        "cgroup_fs": [l.split()[2] for l in read("/proc/mounts").splitlines()
                      if l.split()[1] == "/sys/fs/cgroup"],
        "psi_memory": read("/proc/pressure/memory"),
        "memtotal_kib": int(meminfo["MemTotal"].split()[0]),
        "mrelease_errno": mrelease_errno,
        "uid": os.getuid(),
        "env_lab": os.environ.get("MREAPER_LAB"),
        "cwd": os.getcwd(),
    }
    print(json.dumps(feats), flush=True)
    print("to-stderr", file=sys.stderr, flush=True)
    with open(os.path.join(out_dir, "from-vm.txt"), "w") as f:
        f.write("written in the VM\n")

    # Global OOM: no memory limit anywhere, 16 MiB steps, every page touched.
    hog = (
        "chunks = []\n"
        "while True:\n"
        "    b = bytearray(16 << 20)\n"
        "    b[::4096] = b'x' * len(range(0, len(b), 4096))\n"
        "    chunks.append(b)\n"
        "    print(len(chunks) * 16, flush=True)\n"
    )
    p = subprocess.run([sys.executable, "-c", hog], capture_output=True, text=True)
    reached = p.stdout.split()[-1:] or ["0"]
    kmsg = subprocess.run(["/usr/bin/dmesg"], capture_output=True, text=True).stdout
    print(json.dumps({
        "hog_rc": p.returncode,
        "hog_reached_mib": int(reached[0]),
        "oom_lines": [l for l in kmsg.splitlines() if "Out of memory" in l],
    }), flush=True)
    sys.exit(7)
    '''
)


def _qemu_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"qemu-system" in cmdline


def _qemu_children(ppid: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == ppid and "qemu-system" in stat.split("(", 1)[1]:
            found.append(int(d.name))
    return found


@pytest.fixture(scope="module")
def vm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[labvm.LabResult, Path]:
    """One boot: feature probes + global OOM, with an --rw directory."""
    work = tmp_path_factory.mktemp("labvm")
    out_dir = work / "out"
    out_dir.mkdir()
    script = work / "guest.py"
    script.write_text(GUEST_SCRIPT)
    res = labvm.run(
        [sys.executable, str(script), str(out_dir)],
        mem_mib=MEM_MIB, timeout=300, rw=[out_dir], cwd=REPO, log=None,
    )  # fmt: skip
    return res, out_dir


def _lines(res: labvm.LabResult) -> list[dict[str, object]]:
    lines = [json.loads(x) for x in res.stdout.decode().splitlines() if x.startswith("{")]
    assert len(lines) == 2, (res.stdout, res.stderr, res.console_tail())
    return lines


def test_output_and_exit_code_come_back(vm_run: tuple[labvm.LabResult, Path]) -> None:
    res, out_dir = vm_run
    assert res.returncode == 7, (res.stdout, res.stderr, res.console_tail())
    assert not res.timed_out
    assert res.stderr.decode().strip().endswith("to-stderr")
    assert (out_dir / "from-vm.txt").read_text() == "written in the VM\n"
    assert not _qemu_alive(res.qemu_pid)


def test_vm_has_cgroup2_memcg_psi_mrelease(vm_run: tuple[labvm.LabResult, Path]) -> None:
    res, _ = vm_run
    feats = _lines(res)[0]
    assert feats["cgroup_fs"] == ["cgroup2"]
    assert "memory" in feats["controllers"]  # type: ignore[operator]
    assert "memory" in feats["subtree_control"]  # type: ignore[operator]
    assert str(feats["psi_memory"]).startswith("some avg10=")
    memtotal = int(feats["memtotal_kib"])  # type: ignore[call-overload]
    assert 0.85 * MEM_MIB * 1024 < memtotal <= MEM_MIB * 1024
    assert feats["mrelease_errno"] == 9  # EBADF: the syscall exists
    assert feats["uid"] == 0
    assert feats["env_lab"] == "1"
    assert feats["cwd"] == str(REPO)


def test_global_oom_is_survived(vm_run: tuple[labvm.LabResult, Path]) -> None:
    res, _ = vm_run
    oom = _lines(res)[1]
    assert oom["hog_rc"] == -signal.SIGKILL
    assert int(oom["hog_reached_mib"]) >= 512  # type: ignore[call-overload]
    assert any("Killed process" in str(x) for x in oom["oom_lines"])  # type: ignore[attr-defined]
    assert "Out of memory" in res.console  # the kernel's own report, on the serial console


def test_timeout_returns_124_and_kills_qemu() -> None:
    t = time.monotonic()
    res = labvm.run(["/bin/sleep", "600"], timeout=6, log=None)
    assert res.returncode == labvm.EXIT_TIMEOUT
    assert res.timed_out
    assert time.monotonic() - t < 30
    assert not _qemu_alive(res.qemu_pid)


def test_cli_streams_output_and_sigterm_kills_qemu() -> None:
    """The CLI streams stdout live (zram swap is on), and SIGTERM leaves no qemu behind."""
    cmd = "cat /proc/swaps; echo READY; exec sleep 600"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.labvm", "--zram", "64M", "--timeout", "300",
         "--", "/bin/sh", "-c", cmd],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        seen = b""
        deadline = time.monotonic() + 120
        qemus: list[int] = []
        while b"READY" not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
            qemus = qemus or _qemu_children(proc.pid)
        assert b"READY" in seen, (seen, proc.stderr.read() if proc.poll() is not None else b"")
        assert b"/dev/zram0" in seen
        qemus = qemus or _qemu_children(proc.pid)
        assert qemus, "qemu was not a child of the CLI"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        for pid in qemus:
            assert not _qemu_alive(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
