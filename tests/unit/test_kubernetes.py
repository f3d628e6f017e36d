"""deploy/kubernetes/, parsed: the manifests validate offline against the Kubernetes
schemas (kubernetes-validate, pinned); the DaemonSet has what docs/kubernetes.md
promises (host PID namespace, the cgroup2 tree, exactly the unit's capabilities,
system-node-critical, a memory request and no limit); the ConfigMap is a configuration
mreaper's own parser accepts, and ranks kubelet's cgroup layouts (both drivers) as
Kubernetes would: BestEffort, then Burstable, then the rest; never the pause container
nor the node's services.  (Fixture cgroup paths: this host runs no kubelet.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mreaper import config, policy, scope

REPO = Path(__file__).resolve().parents[2]
KDIR = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.35.0"   # a current minor the schemas of kubernetes-validate 1.37 cover
MiB = 1 << 20


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KDIR / name).read_text()) if d]


def daemonset() -> dict[str, Any]:
    (ds,) = [d for d in docs("daemonset.yaml") if d["kind"] == "DaemonSet"]
    return ds


def unit_capabilities() -> set[str]:
    unit = (REPO / "contrib" / "systemd" / "mreaper.service").read_text()
    (line,) = re.findall(r"(?m)^CapabilityBoundingSet=(.*)$", unit)
    return {c.removeprefix("CAP_") for c in line.split()}


@pytest.mark.parametrize("name", ["daemonset.yaml", "configmap.yaml"])
def test_manifests_validate_against_the_kubernetes_schemas(name: str) -> None:
    for doc in docs(name):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_podmonitor_scrapes_the_metrics_port() -> None:
    (pm,) = docs("podmonitor.yaml")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    ds = daemonset()
    assert pm["spec"]["selector"]["matchLabels"].items() <= \
        ds["spec"]["template"]["metadata"]["labels"].items()
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert endpoint["port"] in ports
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    listen = tomllib.loads(configmap_toml())["metrics"]["listen"]
    assert listen.rsplit(":", 1)[1] == str(ports["metrics"])


def test_daemonset_promises() -> None:
    ds = daemonset()
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert ds["metadata"]["namespace"] == "kube-system"  # where system-* classes are allowed
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc.get("privileged", False) is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == unit_capabilities()
    # a memory request, and no limit that could throttle it (memory or CPU)
    assert c["resources"]["requests"]["memory"]
    assert "limits" not in c["resources"]
    # the cgroup2 tree of the host, writable (PSI triggers, cgroup.kill)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    cg = mounts["/sys/fs/cgroup"]
    assert volumes[cg["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert not cg.get("readOnly", False)
    conf = mounts["/etc/mreaper"]
    assert volumes[conf["name"]]["configMap"]["name"] == "mreaper"
    assert volumes[conf["name"]]["configMap"]["defaultMode"] & 0o022 == 0  # mreaper checks
    assert c["args"] == ["run", "--config", "/etc/mreaper/mreaper.toml"]


def configmap_toml() -> str:
    (cm,) = docs("configmap.yaml")
    text: str = cm["data"]["mreaper.toml"]
    return text


def candidate(pid: int, cgroup: str, *, oom_score: int, adj: int, rss_mib: int,
              name: str = "app") -> policy.Candidate:
    # the pause image's process runs /pause (kube.is_pause)
    argv0 = "/pause" if name == "pause" else name
    return policy.Candidate(pid=pid, starttime=pid, name=name, cmdline=(argv0,), exe="",
                            uid=0, cgroup=cgroup, rss=rss_mib * MiB, swap=0,
                            oom_score=oom_score, oom_score_adj=adj)


UID = "0d8f4a2e_51c3_4b1e_9a77_3c0f2b6d9e11"
CID = "4f1c" * 16
USER = "/user.slice/user-1000.slice/user@1000.service/app.slice"   # delegated to uid 1000


def layouts(view: str) -> dict[str, list[policy.Candidate]]:
    """kubelet's cgroups for each QoS class, systemd and cgroupfs drivers, with the
    oom_score_adj kubelet gives each class (BestEffort 1000, Burstable 2-999, Guaranteed
    -997, pause -998), as mreaper reads them in /proc/<pid>/cgroup: from the host's
    cgroup namespace ("host"), or from its own container's (the runtime gave it one; it
    sits in a Burstable pod, three levels below kubepods), where the kernel shows paths
    relative to its own cgroup ("ns")."""
    if view == "host":
        sd, fs, root = "/kubepods.slice", "/kubepods", ""
    else:
        sd = fs = "/../../.."
        root = "/../../../.."
    cases = {
        "besteffort": [f"{sd}/kubepods-besteffort.slice/kubepods-besteffort-pod{UID}.slice/"
                       f"cri-containerd-{CID}.scope", f"{fs}/besteffort/pod{UID}/{CID}"],
        "burstable": [f"{sd}/kubepods-burstable.slice/kubepods-burstable-pod{UID}.slice/"
                      f"cri-containerd-{CID}.scope", f"{fs}/burstable/pod{UID}/{CID}"],
        "guaranteed": [f"{sd}/kubepods-pod{UID}.slice/cri-containerd-{CID}.scope",
                       f"{fs}/pod{UID}/{CID}"],
    }
    adj = {"besteffort": 1000, "burstable": 500, "guaranteed": -997}
    out: dict[str, list[policy.Candidate]] = {}
    pid = 100
    for qos, paths in cases.items():
        out[qos] = []
        for path in paths:
            pid += 1
            # a small BestEffort process against a large Burstable and Guaranteed one
            size = {"besteffort": 20, "burstable": 4000, "guaranteed": 8000}[qos]
            score = max(0, min(2000, size // 8 + adj[qos]))
            out[qos].append(candidate(pid, path, oom_score=score, adj=adj[qos], rss_mib=size))
    out["pause"] = [candidate(pid + 1, cases["besteffort"][0], oom_score=1000, adj=-998,
                              rss_mib=1, name="pause"),
                    candidate(pid + 2, cases["guaranteed"][1], oom_score=0, adj=-998,
                              rss_mib=1, name="pause")]
    out["node"] = [candidate(pid + 3, f"{root}/system.slice/kubelet.service", oom_score=1900,
                             adj=-999, rss_mib=12000, name="kubelet"),
                   candidate(pid + 4, f"{root}/system.slice/containerd.service",
                             oom_score=1900, adj=-999, rss_mib=12000, name="containerd"),
                   candidate(pid + 5, f"{root}/system.slice/cron.service", oom_score=1500,
                             adj=0, rss_mib=12000, name="bigcron")]
    # a user's own cgroups named like kubelet's, in the subtree systemd delegates to them:
    # neither protected nor taken for a pod
    out["user"] = [candidate(pid + 6, f"{root}{USER}/system.slice/kubelet.service",
                             oom_score=1800, adj=0, rss_mib=14000, name="userhog"),
                   candidate(pid + 7, f"{root}{USER}/kubepods-besteffort.slice/x", oom_score=10,
                             adj=0, rss_mib=50, name="usersmall")]
    return out


@pytest.mark.parametrize("view", ["host", "ns"])
def test_configmap_ranks_pods_as_kubernetes_would(view: str) -> None:
    cfg = config.apply(config.Config(), tomllib.loads(configmap_toml()), "configmap.yaml")
    groups = layouts(view)
    assert cfg.pods  # the order is mreaper's own (kill.pods), not rules over paths
    ranked = policy.rank([c for cs in groups.values() for c in cs], cfg.rules,
                         sort_by=cfg.sort_by, min_rss=cfg.min_rss, pods=cfg.pods)
    order = [r.candidate.pid for r in ranked if r.eligible]
    qos_of = {c.pid: qos for qos, cs in groups.items() for c in cs}
    classes = [qos_of[pid] for pid in order]
    # BestEffort (both drivers) first, then Burstable; each in one block
    assert classes[:4] == ["besteffort"] * 2 + ["burstable"] * 2, classes
    assert "guaranteed" in classes[4:]
    # never the pause container, never kubelet or containerd
    excluded = {r.candidate.name for r in ranked if not r.eligible}
    assert {"pause", "kubelet", "containerd"} <= excluded
    assert not any(qos_of[p] == "pause" for p in order)
    protected = {r.candidate.name for r in ranked if r.must_live}
    assert {"kubelet", "containerd"} <= protected
    # the user's look-alike cgroups: no protection, no BestEffort bonus
    by_name = {r.candidate.name: r for r in ranked}
    assert by_name["userhog"].eligible and not by_name["userhog"].touched_by
    assert not by_name["usersmall"].touched_by


def test_configmap_has_no_scope_and_a_kubepods_scope_is_flagged_in_a_cgroup_namespace(
        ) -> None:
    # The shipped ConfigMap configures no [[scope]] (docs/kubernetes.md says why): in a
    # cgroup namespace of its own, no process's path is ever inside a scope's.
    base = tomllib.loads(configmap_toml())
    assert "scope" not in base
    cfg = config.apply(config.Config(), base, "configmap.yaml")
    host_init, ns_init = "/init.scope", "/../../../../init.scope"
    assert scope.namespace_problem(cfg, ns_init) is None  # no scope: nothing to say
    with_scope = config.apply(config.Config(), {**base, "scope": [
        {"cgroup": "kubepods.slice", "name": "kubepods"}]}, "test")
    problem = scope.namespace_problem(with_scope, ns_init)
    assert problem is not None and "kubepods" in problem and ns_init in problem
    assert scope.namespace_problem(with_scope, host_init) is None
    assert scope.namespace_problem(with_scope, "/") is None
    # what it warns about: a namespaced path is in no scope, a host path is
    pod = (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID}.slice/"
           f"cri-containerd-{CID}.scope")
    assert policy.in_scope(pod, "/kubepods.slice")
    assert not policy.in_scope("/../../.." + pod.removeprefix("/kubepods.slice"),
                               "/kubepods.slice")
