"""The Debian package in the lab VM with systemd as PID 1, as an administrator uses it.

One boot: `dpkg -i` the .deb that scripts/build-deb builds (as `make deb` does); its
postinst enables and starts mreaper.service, which becomes active (Type=notify: only
after READY=1); `mreaper status` answers over the socket; a changed
/etc/mreaper/mreaper.toml is applied by `systemctl reload`; a leak is killed and
reaped under the package's unit; `apt-get purge` stops the service and leaves no file
behind (the file lists of the places the package touches, before and after, are equal).

The VM's root is this host's, overlaid: its /usr/sbin/policy-rc.d (a container's, "exit
101": never start services) is removed in the VM first, as a real machine has none.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest

from lab import labvm
from mreaper.reap import fmt_bytes

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.usefixtures("lab_ready")]

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
MEM_MIB = 1536

GUEST = textwrap.dedent(r'''
    import json, os, re, subprocess, sys, time

    deb = sys.argv[1]
    res = {}
    PROPS = ["ActiveState", "SubState", "Result", "StatusText", "MainPID", "NRestarts",
             "UnitFileState", "FragmentPath"]
    WALK = ["/etc", "/lib/systemd/system", "/usr/sbin", "/usr/share/man/man5",
            "/usr/share/man/man8", "/usr/share/bash-completion/completions",
            "/usr/share/zsh/vendor-completions", "/var/lib/systemd", "/var/lib/dpkg/info",
            "/run/mreaper"]
    LIST = ["/usr/lib/python3/dist-packages", "/usr/share/doc"]

    def sh(*argv, timeout=300):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr

    def props():
        _, out = sh("systemctl", "show", "mreaper.service", *[f"-p{p}" for p in PROPS])
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal():
        return sh("journalctl", "-u", "mreaper.service", "-o", "cat", "--no-pager")[1]

    def snapshot():
        found = set()
        for top in WALK:
            for d, dirs, files in os.walk(top):
                for name in dirs + files:
                    found.add(os.path.join(d, name))
        for top in LIST:
            found.update(os.path.join(top, n) for n in os.listdir(top))
        return found

    def meminfo(key):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    if os.path.exists("/usr/sbin/policy-rc.d"):
        os.remove("/usr/sbin/policy-rc.d")
    before = snapshot()
    res["install"] = sh("dpkg", "-i", deb, timeout=900)
    res["listed"] = sh("dpkg", "-L", "mreaper")[1].splitlines()
    deadline = time.monotonic() + 60
    while props().get("ActiveState") == "activating" and time.monotonic() < deadline:
        time.sleep(0.5)
    res["after_install"] = props()
    res["status"] = sh("/usr/sbin/mreaper", "status")

    # A changed configuration, applied by reload: kill 300 MiB under MemAvailable now.
    avail = meminfo("MemAvailable")
    kill = (avail - 300 * 2**20) // 2**20
    res["kill_mib"] = kill
    # as an administrator edits the conffile: values under its [memory] header
    with open("/etc/mreaper/mreaper.toml") as f:
        text = f.read()
    res["memory_header"] = text.count("\n[memory]\n")
    text = text.replace("\n[memory]\n", "\n".join(
        ["", "[memory]", f'warn = "{kill + 100}M"', 'term = "off"', f'kill = "{kill}M"', ""]), 1)
    with open("/etc/mreaper/mreaper.toml", "w") as f:
        f.write(text)
    res["reload"] = sh("systemctl", "reload", "mreaper.service")
    time.sleep(2)
    res["after_reload"] = props()

    hog = "\n".join([
        "import ctypes, time",
        "ctypes.CDLL(None).prctl(15, b'mr-debhog', 0, 0, 0)",
        "chunks = []",
        "while len(chunks) < 700 // 16:",
        "    b = bytearray(16 << 20)",
        "    b[::4096] = b'x' * len(range(0, len(b), 4096))",
        "    chunks.append(b)",
        "    time.sleep(0.05)",
        "time.sleep(600)",
    ])
    p = subprocess.Popen(["/usr/bin/python3", "-c", hog])
    res["hog_pid"] = p.pid
    try:
        res["hog_rc"] = p.wait(timeout=240)
    except subprocess.TimeoutExpired:
        p.kill()
        res["hog_rc"] = "survived"
    time.sleep(2)
    res["after_kill"] = props()
    res["journal"] = journal()

    res["purge"] = sh("apt-get", "purge", "-y", "mreaper", timeout=900)
    res["after_purge"] = props()
    after = snapshot()
    res["left_behind"] = sorted(after - before)
    res["gone"] = sorted(before - after)
    # files and links the package listed that are still there (not directories, such as
    # /lib, a link to usr/lib on a merged-/usr system, that other packages share)
    res["listed_left"] = [f for f in res["listed"] if os.path.lexists(f) and not os.path.isdir(f)]
    print(json.dumps(res), flush=True)
''')


@pytest.fixture(scope="module")
def vm_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("deb")
    p = subprocess.run([str(REPO / "scripts" / "build-deb")], check=False, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    deb = REPO / p.stdout.strip().splitlines()[-1]
    script = work / "guest.py"
    script.write_text(GUEST)
    res = labvm.run(["/usr/bin/python3", str(script), str(deb)], mem_mib=MEM_MIB,
                    systemd=True, timeout=1500, cwd="/")
    return res.last_json()


def _show(r: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in r.items() if k != "listed"}, indent=1)[-6000:]


def test_dpkg_install_starts_the_service_ready(vm_run: dict[str, Any]) -> None:
    r = vm_run
    rc, out = r["install"]
    assert rc == 0, out
    s = r["after_install"]
    assert (s["ActiveState"], s["SubState"]) == ("active", "running"), _show(r)
    assert s["UnitFileState"] == "enabled", s
    assert s["FragmentPath"] == "/lib/systemd/system/mreaper.service", s
    assert s["StatusText"].startswith("machine ok"), s   # sd_notify reached systemd
    rc, out = r["status"]
    assert rc == 0 and out.startswith("mreaper daemon "), out
    assert "/usr/sbin/mreaper" in r["listed"] and "/etc/mreaper/mreaper.toml" in r["listed"]


def test_reload_applies_the_changed_config(vm_run: dict[str, Any]) -> None:
    r = vm_run
    assert r["memory_header"] == 1
    assert r["reload"][0] == 0, r["reload"]
    assert r["after_reload"]["ActiveState"] == "active"
    assert r["after_reload"]["MainPID"] == r["after_install"]["MainPID"]   # not a restart
    kill = r["kill_mib"] << 20
    levels = f"{fmt_bytes(kill + (100 << 20))}/off/{fmt_bytes(kill)}"
    assert (f"configuration reloaded from /etc/mreaper/mreaper.toml: when memory & swap | "
            f"psi; memory warn/term/kill {levels};") in r["journal"], r["journal"][-3000:]


def test_kills_and_reaps_a_leak(vm_run: dict[str, Any]) -> None:
    r = vm_run
    assert r["hog_rc"] == -9, _show(r)
    assert f"killed {r['hog_pid']} 'mr-debhog'" in r["journal"], r["journal"][-3000:]
    assert any(f"killed {r['hog_pid']} 'mr-debhog'" in line and
               ("process_mrelease reaped" in line or "process_mrelease exited-first" in line)
               for line in r["journal"].splitlines()), r["journal"][-3000:]
    assert r["after_kill"]["NRestarts"] == "0"


def test_purge_leaves_nothing_behind(vm_run: dict[str, Any]) -> None:
    r = vm_run
    assert r["purge"][0] == 0, r["purge"][1]
    assert r["after_purge"]["ActiveState"] in ("inactive", "failed") and \
        r["after_purge"]["UnitFileState"] == "", r["after_purge"]
    assert r["left_behind"] == [], r["left_behind"]
    assert r["listed_left"] == [], r["listed_left"]
