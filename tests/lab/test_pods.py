"""Pods, in the lab VM with systemd as PID 1: systemd builds kubelet's slice hierarchy
(systemd cgroup driver) and a node-wide squeeze meets mreaper at its default levels.

kubelet's tree, made as kubelet makes it through systemd (transient slices named
kubepods-<qos>-pod<uid>.slice, whose dashes systemd turns into the hierarchy, and one
scope per container): a BestEffort pod and a Burstable pod with two containers each, a
Guaranteed pod with one container and a squeezer, each pod with its pause process (a
`sleep` exec'd as argv[0] /pause, in a container scope of its own, as the sandbox is).
oom_score_adj is left at 0 everywhere (kubelet would give BestEffort 1000 and
Guaranteed -997, and the kernel's score would then agree with the class): here the
scores point at the Guaranteed squeezer, the biggest process of the VM, so only
mreaper's QoS tiers can put the pods in Kubernetes' order.  The squeezer grows until
mreaper kills it, or a bound.

The same squeeze runs twice, in two boots: with the defaults (kill.pods on), and with
`[kill] pods = false`, where the squeezer must be the first victim (the test can fail).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import labvm
from mreaper.linux import cgroup

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.usefixtures("lab_ready")]

REPO = Path(__file__).resolve().parents[2]
MEM_MIB = 1024

# Runs in the VM as root, under systemd.  Prints one JSON line with what it saw.
GUEST = textwrap.dedent(r'''
    import json, os, subprocess, sys, time

    repo, pods_on = sys.argv[1], sys.argv[2] == "on"
    py = sys.executable
    res = {"pods_on": pods_on}
    open("/proc/self/oom_score_adj", "w").write("-1000")   # the harness is no candidate

    def sh(*argv, timeout=120):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr

    HOG = ("import sys, time\n"
           "b = b'\\x01' * (int(sys.argv[1]) << 20)\n"
           "print('ready', flush=True)\n"
           "time.sleep(100000)\n")
    # grows 4 MiB every 50 ms (slow enough for TCG), to a bound that is past the VM's RAM
    SQUEEZE = ("import time\n"
               "chunks = []\n"
               "import sys\n"
               "print('ready', flush=True)\n"
               "sys.stdin.readline()   # go\n"
               "for _ in range(400):\n"
               "    chunks.append(b'\\x02' * (4 << 20))\n"
               "    time.sleep(0.05)\n"
               "time.sleep(100000)\n")

    def uid(n):
        return f"{n:08x}-1111-4222-8333-444455556666"

    def adj_zero():   # children must not inherit the harness's -1000
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("0")

    def container(pod_slice, cid, argv):
        p = subprocess.Popen(["systemd-run", "--quiet", "--scope", f"--slice={pod_slice}",
                              f"--unit=cri-containerd-{cid}.scope", "--", *argv],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, preexec_fn=adj_zero)
        return p

    procs = {}   # name -> (Popen, pod uid, qos, container id)
    pods = [("besteffort", 1, "kubepods-besteffort-pod{}.slice"),
            ("burstable", 2, "kubepods-burstable-pod{}.slice"),
            ("guaranteed", 3, "kubepods-pod{}.slice")]
    for qos, n, slice_t in pods:
        u = uid(n)
        s = slice_t.format(u.replace("-", "_"))
        pause_id = f"{n}0" * 32
        procs[f"{qos}-pause"] = (container(s, pause_id,
                                           ["/bin/bash", "-c", "exec -a /pause sleep 100000"]),
                                 u, qos, pause_id)
        for c in (1, 2):
            cid = (f"{n}{c}" * 32)[:64]
            if qos == "guaranteed" and c == 2:
                argv = [py, "-c", SQUEEZE]
                name = "guaranteed-squeezer"
            else:
                argv = [py, "-c", HOG, "80"]
                name = f"{qos}-c{c}"
            procs[name] = (container(s, cid, argv), u, qos, cid)
    for name, (p, *_rest) in procs.items():
        if "pause" not in name and "squeezer" not in name:
            res.setdefault("ready", {})[name] = p.stdout.readline().strip()
    time.sleep(1)
    res["oom_score_adj"] = {name: int(open(f"/proc/{p.pid}/oom_score_adj").read())
                            for name, (p, *_r) in procs.items()}
    res["cgroups"] = {name: open(f"/proc/{p.pid}/cgroup").read().strip()
                      for name, (p, *_r) in procs.items()}
    res["cmdline"] = {name: open(f"/proc/{p.pid}/cmdline").read().split("\0")[:-1]
                      for name, (p, *_r) in procs.items() if "pause" in name}

    os.makedirs("/run/mr-lab", mode=0o755, exist_ok=True)
    cfg = "/run/mr-lab/mreaper.toml"
    with open(cfg, "w") as f:   # the default levels and ranking; a kill log to read
        f.write('[events]\npath = "/run/mr-lab/events.jsonl"\n')
        if not pods_on:
            f.write("[kill]\npods = false\n")
    os.chmod(cfg, 0o644)
    res["explain"] = sh(py, "-m", "mreaper", "explain", "--config", cfg, "--all")
    res["start"] = sh("systemd-run", "--unit=mreaper-lab", "-p", "Type=notify",
                      "-p", "NotifyAccess=main", "--", py, "-m", "mreaper", "run",
                      "--config", cfg, timeout=300)

    # the squeeze
    squeezer = procs["guaranteed-squeezer"][0]
    res["squeezer_ready"] = squeezer.stdout.readline().strip()
    squeezer.stdin.write("go\n")
    squeezer.stdin.flush()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and squeezer.poll() is None:
        time.sleep(0.2)
    time.sleep(3)   # any kill in flight lands in the log
    res["exit"] = {name: p.poll() for name, (p, *_r) in procs.items()}
    for name, (p, *_r) in procs.items():
        if p.poll() is None:
            p.kill()
    res["pids"] = {name: p.pid for name, (p, *_r) in procs.items()}
    res["pods"] = {name: [u, q, cid] for name, (_p, u, q, cid) in procs.items()}
    try:
        with open("/run/mr-lab/events.jsonl") as f:
            res["events"] = [json.loads(l) for l in f if l.strip()]
    except OSError as e:
        res["events"] = str(e)
    res["journal"] = sh("journalctl", "-u", "mreaper-lab.service", "-o", "cat",
                        "--no-pager")[1]
    res["kernel_oom"] = [l for l in sh("dmesg")[1].splitlines() if "Out of memory" in l]
    sh("systemctl", "stop", "mreaper-lab.service")
    print(json.dumps(res), flush=True)
''')


@contextlib.contextmanager
def out_of_reach() -> Iterator[None]:
    """qemu (~1.2 GB, the biggest process here) out of reach of the other mreaper
    daemons that tests run on this host meanwhile (with levels just under the current
    MemAvailable, they take the biggest process: qemu was SIGKILLed so, twice): while
    the VM runs, this process (and so qemu) sits in a cgroup2 directory of its own
    marked user.oomd_omit, which mreaper honours, and with oom_score_adj -1000 where
    that is allowed (not without CAP_SYS_RESOURCE).  Its memory is bounded by -m."""
    host = cgroup.find_mounts().unified
    here = Path(f"{host}/mreaper-lab-pods-{os.getpid()}")
    own = Path("/proc/self/cgroup").read_text().split("0::", 1)[-1].splitlines()[0]
    adj = Path("/proc/self/oom_score_adj")
    old = adj.read_text().strip()
    with contextlib.suppress(OSError):
        adj.write_text("-1000")
    moved = False
    with contextlib.suppress(OSError):
        here.mkdir()
        os.setxattr(here, "user.oomd_omit", b"1")
        (here / "cgroup.procs").write_text(str(os.getpid()))
        moved = True
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            adj.write_text(old)
        if moved:
            Path(f"{host}/{own.lstrip('/')}/cgroup.procs").write_text(str(os.getpid()))
        with contextlib.suppress(OSError):
            here.rmdir()


def boot(tmp_path_factory: pytest.TempPathFactory, pods: str) -> dict[str, Any]:
    work = tmp_path_factory.mktemp(f"pods-{pods}")
    script = work / "guest.py"
    script.write_text(GUEST)
    python = sys.executable if (REPO / ".venv").exists() else shutil.which("python3")
    assert python is not None
    with out_of_reach():
        res = labvm.run([python, str(script), str(REPO), pods], mem_mib=MEM_MIB,
                        systemd=True, timeout=1200, cwd=str(REPO))
    return res.last_json()


@pytest.fixture(scope="module")
def pods_on(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return boot(tmp_path_factory, "on")


@pytest.fixture(scope="module")
def pods_off(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return boot(tmp_path_factory, "off")


def _show(r: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in r.items() if k != "explain"}, indent=1)[-8000:]


def victims(r: dict[str, Any]) -> list[str]:
    """Names of the processes mreaper killed, in order, from its events."""
    by_pid = {pid: name for name, pid in r["pids"].items()}
    assert isinstance(r["events"], list), _show(r)
    return [by_pid.get(e["pid"], f"other:{e['pid']}:{e['name']}")
            for e in r["events"] if e["event"] == "kill"]


def test_systemd_built_kubelets_tree(pods_on: dict[str, Any]) -> None:
    cg = pods_on["cgroups"]
    u = pods_on["pods"]["besteffort-c1"][0].replace("-", "_")
    assert cg["besteffort-c1"] == (
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/"
        f"cri-containerd-{pods_on['pods']['besteffort-c1'][2]}.scope"), cg
    assert cg["guaranteed-c1"].startswith("0::/kubepods.slice/kubepods-pod"), cg
    assert pods_on["cmdline"]["burstable-pause"] == ["/pause", "100000"]
    assert all(v == "ready" for v in pods_on["ready"].values()), pods_on["ready"]
    assert set(pods_on["oom_score_adj"].values()) == {0}, pods_on["oom_score_adj"]


def test_explain_shows_pods_and_classes(pods_on: dict[str, Any]) -> None:
    rc, out = pods_on["explain"]
    assert rc == 0, out
    for name in ("besteffort-c1", "burstable-c2", "guaranteed-c1"):
        uid, qos, cid = pods_on["pods"][name]
        cls = {"besteffort": "BestEffort", "burstable": "Burstable",
               "guaranteed": "Guaranteed"}[qos]
        assert f"pod {uid} ({cls}) container {cid[:12]}" in out, out
    assert out.count("excluded: the pod's sandbox (pause) process") == 3, out


def test_squeeze_kills_in_kubernetes_order(pods_on: dict[str, Any]) -> None:
    r = pods_on
    killed = victims(r)
    print("kill order with kill.pods:", killed, "kill-to-free ms:",
          [round(e["kill_to_free_s"] * 1000, 1) if e["kill_to_free_s"] is not None else None
           for e in r["events"] if e["event"] == "kill"],
          "signals:", [[x["name"] for x in e["signals"]] for e in r["events"]
                       if e["event"] == "kill"])
    assert killed, _show(r)
    assert killed[0].startswith("besteffort-c"), killed
    # every BestEffort and Burstable container before any Guaranteed one or anything else
    first_other = next((i for i, n in enumerate(killed)
                        if not n.startswith(("besteffort-c", "burstable-c"))), len(killed))
    before = killed[:first_other]
    assert sorted(before) == ["besteffort-c1", "besteffort-c2", "burstable-c1",
                              "burstable-c2"], killed
    assert [n.split("-")[0] for n in before] == ["besteffort"] * 2 + ["burstable"] * 2, killed
    # never the pause process; the pods' sandboxes outlived the squeeze
    assert not any("pause" in n for n in killed), killed
    assert all(r["exit"][f"{q}-pause"] is None for q in ("besteffort", "burstable",
                                                          "guaranteed")), r["exit"]
    assert not r["kernel_oom"], r["kernel_oom"]


def test_reports_name_pod_and_container(pods_on: dict[str, Any]) -> None:
    r = pods_on
    kills = [e for e in r["events"] if e["event"] == "kill"]
    by_pid = {pid: name for name, pid in r["pids"].items()}
    for e in kills:
        name = by_pid.get(e["pid"])
        if name is None:
            continue
        uid, qos, cid = r["pods"][name]
        cls = {"besteffort": "BestEffort", "burstable": "Burstable",
               "guaranteed": "Guaranteed"}[qos]
        assert (e["pod_uid"], e["qos"], e["container_id"]) == (uid, cls, cid), e
        assert f"killed {e['pid']} " in r["journal"]
        assert f"; in pod {uid} ({cls}) container {cid[:12]}" in r["journal"], r["journal"]


def test_without_pods_the_score_decides(pods_off: dict[str, Any]) -> None:
    """kill.pods = false: the biggest score, the Guaranteed squeezer, dies first."""
    killed = victims(pods_off)
    print("kill order without kill.pods:", killed)
    assert killed and killed[0] == "guaranteed-squeezer", _show(pods_off)
