"""contrib/systemd/mreaper.service and mreaper.slice, parsed: the settings that keep the
daemon alive, sandboxed, notified and able to reap are present with the right values;
and contrib/install.sh is valid sh that rewrites ExecStart=.  (The unit running under a
real systemd, through a kill, is tests/lab/test_systemd.py.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "systemd" / "mreaper.service"
SLICE = REPO / "contrib" / "systemd" / "mreaper.slice"
INSTALL = REPO / "contrib" / "install.sh"

Unit = dict[str, dict[str, list[str]]]


def parse(path: Path) -> Unit:
    """systemd's unit syntax as far as these files use it: sections, Key=Value lines
    (a key may repeat), comments."""
    out: Unit = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1)
            continue
        key, sep, value = line.partition("=")
        assert sep and section, f"{path}: not a Key=Value line in a section: {raw!r}"
        out[section][key.strip()].append(value.strip())
    return out


def one(unit: Unit, section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{section}.{key}: {values}"
    return values[0]


def words(unit: Unit, section: str, key: str) -> set[str]:
    return {w for v in unit[section][key] for w in v.split()}


def test_service_type_lifecycle_and_self_protection() -> None:
    u = parse(UNIT)
    s = "Service"
    assert one(u, s, "Type") == "notify"
    assert one(u, s, "NotifyAccess") == "main"
    assert re.fullmatch(r"/\S+/bin/mreaper run", one(u, s, "ExecStart"))
    assert one(u, s, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(u, s, "Restart") == "on-failure"
    # the loop pings on its turns, at least every detect.poll_max (<= 10 s)
    assert int(one(u, s, "WatchdogSec").removesuffix("s")) > 10
    assert one(u, s, "OOMScoreAdjust") == "-1000"
    assert -20 <= int(one(u, s, "Nice")) < 0
    assert one(u, s, "MemoryMin") == one(u, s, "MemoryLow") == "64M"
    assert one(u, s, "Slice") == "mreaper.slice"
    assert one(u, "Install", "WantedBy") == "multi-user.target"


def test_conflicts_with_every_other_userspace_killer() -> None:
    """Two killers act twice on one shortage; systemd-oomd is on by default on Fedora
    and Ubuntu desktops, so it must be named too."""
    assert {"earlyoom.service", "nohang.service", "nohang-desktop.service",
            "systemd-oomd.service"} <= words(parse(UNIT), "Unit", "Conflicts")


def test_slice_carries_the_protection_from_the_root() -> None:
    u = parse(SLICE)
    assert one(u, "Slice", "MemoryMin") == "64M"
    assert one(u, "Slice", "MemoryLow") == "64M"
    assert "mreaper.slice" in words(parse(UNIT), "Unit", "Requires")


def test_capabilities_exactly_what_is_needed() -> None:
    u = parse(UNIT)
    assert words(u, "Service", "CapabilityBoundingSet") == {
        "CAP_KILL", "CAP_IPC_LOCK", "CAP_SYS_RESOURCE", "CAP_SYS_NICE", "CAP_SYS_PTRACE"}
    assert one(u, "Service", "NoNewPrivileges") == "yes"
    assert u["Service"]["AmbientCapabilities"] == [""]
    # each capability is justified in a comment
    text = UNIT.read_text()
    for cap in words(u, "Service", "CapabilityBoundingSet"):
        assert re.search(rf"^#\s+{cap}\s+\S", text, re.M), f"no comment for {cap}"


def test_sandbox() -> None:
    u = parse(UNIT)
    s = "Service"
    assert one(u, s, "ProtectSystem") == "strict"
    assert one(u, s, "ProtectHome") == "read-only"
    assert one(u, s, "RuntimeDirectory") == "mreaper"  # /run/mreaper/status.sock
    assert one(u, s, "RuntimeDirectoryMode") == "0700"
    assert words(u, s, "RestrictAddressFamilies") == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # Settings that would blind or cripple the daemon must stay off.
    for key in ("ProtectProc", "ProcSubset", "ProtectKernelTunables", "ProtectControlGroups",
                "RestrictRealtime", "MemoryDenyWriteExecute", "MemoryMax", "PrivateUsers",
                "DynamicUser", "User"):
        assert key not in u[s], key


def test_syscall_filter_allows_the_reaping_calls_and_never_kills() -> None:
    u = parse(UNIT)
    s = "Service"
    allowed = words(u, s, "SystemCallFilter")
    assert "@system-service" in allowed
    assert {"process_mrelease", "pidfd_open", "pidfd_send_signal"} <= allowed
    assert not any(w.startswith("~") for w in allowed)
    assert one(u, s, "SystemCallErrorNumber") == "ENOSYS"
    assert one(u, s, "SystemCallArchitectures") == "native"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_knows_the_syscalls_and_they_are_not_in_the_group() -> None:
    """process_mrelease is outside @system-service: the reason it is named in the unit."""
    known = subprocess.run(["systemd-analyze", "syscall-filter", "@known"], check=False,
                           capture_output=True, text=True)
    if known.returncode != 0:
        pytest.skip(f"systemd-analyze syscall-filter: {known.stderr.strip()}")
    assert re.search(r"^\s+process_mrelease$", known.stdout, re.M)
    group = subprocess.run(["systemd-analyze", "syscall-filter", "@system-service"],
                           check=True, capture_output=True, text=True).stdout
    assert not re.search(r"^\s+process_mrelease$", group, re.M)


def test_install_script_is_valid_sh_and_rewrites_exec_start() -> None:
    subprocess.run(["sh", "-n", str(INSTALL)], check=True)
    text = INSTALL.read_text()
    assert 's|^ExecStart=.*|ExecStart=$PREFIX/bin/mreaper run|' in text
    assert "PREFIX=/opt/mreaper" in text
    assert one(parse(UNIT), "Service", "ExecStart") == "/opt/mreaper/bin/mreaper run"
    assert 'chmod 0644 "$tmp"' in text and "chown root:root" in text
    help_text = subprocess.run(["sh", str(INSTALL), "--help"], check=True, capture_output=True,
                               text=True).stdout
    assert "--prefix DIR" in help_text and "--uninstall" in help_text
