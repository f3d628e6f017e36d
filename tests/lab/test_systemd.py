"""mreaper as a systemd service, in the lab VM with systemd as PID 1.

One boot: contrib/install.sh installs a wheel of this tree into /opt/mreaper with the
unit; `systemd-analyze verify` passes; `systemctl start` returns once the daemon said
READY=1 (Type=notify) and the status text and watchdog pings come in; under its own
sandbox and SystemCallFilter= the daemon probes, locks its memory, arms a 1 s PSI trigger
(CAP_SYS_RESOURCE) and kills a real leak below an absolute level with process_mrelease
(journal: reaped or exited-first, no restart, no SIGSYS); `mreaper status` reads it over
the socket; `systemctl reload` and `systemctl stop` end cleanly (inactive, exit 0).

Needs the daemon wired to the status server and sd_notify (status.serve, Notifier):
without READY=1, `systemctl start` of a Type=notify unit times out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

from lab import labvm

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.usefixtures("lab_ready")]

REPO = Path(__file__).resolve().parents[2]
MEM_MIB = 1536
MiB = 1 << 20


def build_wheel(out_dir: Path) -> Path:
    """A wheel of src/mreaper as it is in this tree, built without a network or a build
    backend (the VM has no network): the package files, the console script, RECORD."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    dist_info = f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {}
    for path in sorted((REPO / "src" / name).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".typed"):
            files[path.relative_to(REPO / "src").as_posix()] = path.read_bytes()
    scripts = "".join(f"{k} = {v}\n" for k, v in project.get("scripts", {}).items())
    files[f"{dist_info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\n"
                                      f"Version: {version}\n").encode()
    files[f"{dist_info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: mreaper-tests\n"
                                   b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    files[f"{dist_info}/entry_points.txt"] = f"[console_scripts]\n{scripts}".encode()
    record = []
    for arc, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{arc},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = out_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for arc, data in files.items():
            z.writestr(arc, data)
    return wheel


# Runs in the VM as root, under systemd.  Prints one JSON line with what it saw.
GUEST = textwrap.dedent(r'''
    import ctypes, json, os, re, subprocess, sys, time

    repo, wheel = sys.argv[1], sys.argv[2]
    res = {}
    PROPS = ["ActiveState", "SubState", "Result", "StatusText", "MainPID", "NRestarts",
             "ExecMainStatus", "ExecMainCode", "WatchdogUSec", "WatchdogTimestampMonotonic",
             "ControlGroup"]

    def sh(*argv, timeout=300):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr

    def props():
        _, out = sh("systemctl", "show", "mreaper.service", *[f"-p{p}" for p in PROPS])
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal():
        return sh("journalctl", "-u", "mreaper.service", "-o", "cat", "--no-pager")[1]

    def meminfo(key):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    res["install"] = sh("sh", f"{repo}/contrib/install.sh", "--wheel", wheel, "--no-start",
                        timeout=900)
    st = os.stat("/etc/mreaper/mreaper.toml")
    res["config_file"] = [oct(st.st_mode & 0o7777), st.st_uid, st.st_gid]
    with open("/etc/systemd/system/mreaper.service") as f:
        res["exec_start"] = [l.strip() for l in f if l.startswith("ExecStart=")]
    res["default_config"] = sh("/opt/mreaper/bin/mreaper", "config")[1]
    res["verify"] = sh("systemd-analyze", "verify", "/etc/systemd/system/mreaper.service")

    # Levels for this test: kill 300 MiB under MemAvailable now, PSI warn on a 1 s
    # window (a privileged trigger: CAP_SYS_RESOURCE), no SIGTERM stage.
    avail = meminfo("MemAvailable")
    kill = (avail - 300 * 2**20) // 2**20
    res["avail_mib"], res["kill_mib"] = avail // 2**20, kill
    with open("/etc/mreaper/mreaper.toml", "w") as f:
        f.write("\n".join([
            "[memory]", f'warn = "{kill + 100}M"', 'term = "off"', f'kill = "{kill}M"',
            "[psi]", 'warn = "some 150000 1000000"', 'term = "off"', 'kill = "off"',
            "[detect]", "scan_interval = 1.0", ""]))
    os.chmod("/etc/mreaper/mreaper.toml", 0o644)

    t0 = time.monotonic()
    res["start"] = sh("systemctl", "start", "mreaper.service", timeout=300)
    res["start_s"] = time.monotonic() - t0
    res["after_start"] = props()
    pid = int(res["after_start"].get("MainPID", "0"))
    if pid:
        with open(f"/proc/{pid}/status") as f:
            res["main_status"] = {k: v.strip() for k, v in
                                  (l.split(":", 1) for l in f if ":" in l)
                                  if k in ("Seccomp", "NoNewPrivs", "CapEff", "CapBnd",
                                           "VmLck")}
        with open(f"/proc/{pid}/oom_score_adj") as f:
            res["oom_score_adj"] = int(f.read())
        res["nice"] = os.getpriority(os.PRIO_PROCESS, pid)
    cg = res["after_start"].get("ControlGroup", "")
    for name in ("memory.min", "memory.low"):
        for where in (cg, os.path.dirname(cg)):
            try:
                with open(f"/sys/fs/cgroup{where}/{name}") as f:
                    res[f"{where}:{name}"] = f.read().strip()
            except OSError as e:
                res[f"{where}:{name}"] = str(e)
    time.sleep(3)  # a few loop turns: STATUS= and WATCHDOG=1
    res["after_settle"] = props()
    res["status_before"] = sh("/opt/mreaper/bin/mreaper", "status")

    # The leak: grows 16 MiB every 50 ms up to 700 MiB, then waits to be killed.
    hog = "\n".join([
        "import ctypes, time",
        "ctypes.CDLL(None).prctl(15, b'mr-vmhog', 0, 0, 0)",
        "chunks = []",
        "while len(chunks) < 700 // 16:",
        "    b = bytearray(16 << 20)",
        "    b[::4096] = b'x' * len(range(0, len(b), 4096))",
        "    chunks.append(b)",
        "    time.sleep(0.05)",
        "time.sleep(600)",
    ])
    p = subprocess.Popen([sys.executable, "-c", hog])
    res["hog_pid"] = p.pid
    try:
        res["hog_rc"] = p.wait(timeout=240)
    except subprocess.TimeoutExpired:
        p.kill()
        res["hog_rc"] = "survived"
    time.sleep(2)
    res["after_kill"] = props()
    res["status_after"] = sh("/opt/mreaper/bin/mreaper", "status")

    res["reload"] = sh("systemctl", "reload", "mreaper.service")
    time.sleep(2)
    res["after_reload"] = props()

    res["stop"] = sh("systemctl", "stop", "mreaper.service", timeout=120)
    res["after_stop"] = props()
    res["socket_left"] = os.path.exists("/run/mreaper/status.sock")
    res["journal"] = journal()
    res["kernel"] = [l for l in sh("journalctl", "-k", "-o", "cat", "--no-pager")[1].splitlines()
                     if re.search(r"seccomp|SIGSYS|Out of memory|audit", l, re.I)]
    print(json.dumps(res), flush=True)
''')


@pytest.fixture(scope="module")
def vm_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("systemd")
    wheel = build_wheel(work)
    script = work / "guest.py"
    script.write_text(GUEST)
    python = shutil.which("python3", path="/usr/bin") or sys.executable
    res = labvm.run([python, str(script), str(REPO), str(wheel)], mem_mib=MEM_MIB,
                    systemd=True, timeout=1500, cwd="/")
    return res.last_json()


def _show(r: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in r.items() if k != "default_config"}, indent=1)[-6000:]


def test_installs_and_verifies(vm_run: dict[str, Any]) -> None:
    r = vm_run
    rc, out = r["install"]
    assert rc == 0, out
    assert r["exec_start"] == ["ExecStart=/opt/mreaper/bin/mreaper run"]
    assert r["config_file"] == ["0o644", 0, 0]
    assert "[status]" in r["default_config"]
    rc, out = r["verify"]
    assert rc == 0, out
    assert "mreaper.service" not in out, out  # no complaint about our unit at all


def test_starts_ready_with_status_and_watchdog(vm_run: dict[str, Any]) -> None:
    r = vm_run
    assert r["start"][0] == 0, _show(r)
    s = r["after_start"]
    assert (s["ActiveState"], s["SubState"]) == ("active", "running"), _show(r)
    assert s["WatchdogUSec"] == "20s"
    settled = r["after_settle"]
    assert re.fullmatch(r"machine ok, MemAvailable \S+ \S+; no kills", settled["StatusText"]), \
        settled
    assert int(settled["WatchdogTimestampMonotonic"]) > 0  # WATCHDOG=1 arrived
    assert settled["NRestarts"] == "0"
    # the sandbox is in force, and the daemon is protected
    st = r["main_status"]
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
    assert int(st["CapBnd"], 16) == (1 << 5) | (1 << 14) | (1 << 24) | (1 << 23) | (1 << 19)
    assert r["oom_score_adj"] == -1000 and r["nice"] == -10
    assert int(st["VmLck"].split()[0]) > 0  # mlockall took
    # mreaper status reads the daemon through its socket
    rc, out = r["status_before"]
    assert rc == 0 and re.match(r"mreaper daemon \d+ at /run/mreaper/status\.sock ", out), out


def test_journal_shows_a_clean_start_under_the_filter(vm_run: dict[str, Any]) -> None:
    j = vm_run["journal"]
    assert "kernel: pidfd: yes; process_mrelease: yes; seccomp mode 2: probed in a child" in j, j
    assert "memory locked (MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT)" in j
    assert "self-protection:" not in j, j  # oom_score_adj, nice, mlockall all allowed
    # the 1 s window is a privileged trigger: accepted, so CAP_SYS_RESOURCE is in force
    assert "PSI triggers unavailable" not in j, j
    assert re.search(r"scope machine: .*PSI triggers\b.*\(1\)", j), j
    assert "status on /run/mreaper/status.sock" in j


def test_kills_a_leak_through_its_own_syscall_filter(vm_run: dict[str, Any]) -> None:
    r = vm_run
    assert r["hog_rc"] == -9, _show(r)
    m = re.search(rf"killed {r['hog_pid']} 'mr-vmhog' .*process_mrelease (\S+) \((\w+)\)",
                  r["journal"])
    assert m is not None, r["journal"]
    assert m.group(1) in ("reaped", "exited-first"), m.group(0)
    after = r["after_kill"]
    assert after["ActiveState"] == "active" and after["NRestarts"] == "0", after
    assert re.search(rf"1 kills, last {r['hog_pid']} 'mr-vmhog' (reaped|exited-first)",
                     after["StatusText"]), after
    assert not any("SIGSYS" in x or "Out of memory" in x for x in r["kernel"]), r["kernel"]
    rc, out = r["status_after"]
    assert rc == 0 and f"{r['hog_pid']} 'mr-vmhog'" in out, out


def test_reloads_and_stops_cleanly(vm_run: dict[str, Any]) -> None:
    r = vm_run
    assert r["reload"][0] == 0, r["reload"]
    assert r["after_reload"]["ActiveState"] == "active"
    assert "configuration reloaded from" in r["journal"]
    assert r["stop"][0] == 0, r["stop"]
    s = r["after_stop"]
    assert (s["ActiveState"], s["Result"]) == ("inactive", "success"), s
    assert s["ExecMainStatus"] == "0", s
    assert "got SIGTERM, stopping" in r["journal"] and "stopped" in r["journal"]
    assert r["socket_left"] is False
