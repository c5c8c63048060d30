"""The real-node lab's workloads and chart installs: what e2e/test_realnodes.py and the demo
deploy on a lab whose nodes run containerd and the real kubelet.

Everything here goes through the API as a user would: the chart by ``helm``, backends as a
Deployment with a readiness probe, clients as pods placed by the scheduler; the only thing done
from outside is entering a client pod's network namespace (by its container's PID, from the
node's containerd) to run curl or the lab's probe client in it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from lab.cluster import CLUSTER_CIDR, CLUSTER_CIDR6, CP_IP, REPO, ClusterLab, ns_run

SA_NAMESPACE = "kube-system"
"""Where the chart is installed."""
TOOLS = "docker.io/library/lab-tools:dev"
NAMESPACE = "e2e"


def install_chart(lab: ClusterLab, *, mode: str = "nftables", extra: tuple[str, ...] = (),
                  timeout: float = 180) -> float:
    """``helm upgrade --install`` of charts/pyproxy with the image built here (the chart's
    default ``pyproxy:dev``, already in every node's containerd), waiting until the DaemonSet
    is rolled out; returns the seconds it took."""
    t0 = time.monotonic()
    proc = lab.helm("upgrade", "--install", "pyproxy", str(REPO / "charts" / "pyproxy"), "-n", SA_NAMESPACE,
                "--set", f"apiServer.host={CP_IP}", "--set", f"config.clusterCIDR={CLUSTER_CIDR}\\,{CLUSTER_CIDR6}",
                "--set", f"config.proxyMode={mode}",
                # nf_conntrack_max is the host's, read-only in a node's network namespace: the
                # init container sets the timeouts (the namespace's own) and leaves it alone.
                "--set", "config.conntrack.maxPerCore=0",
                *extra, "--wait", "--timeout", f"{int(timeout)}s")
    if proc.returncode != 0:
        raise RuntimeError(f"helm upgrade --install: {proc.stderr.strip()}\n{daemonset_report(lab)}")
    wait_rolled_out(lab, timeout=timeout)
    return time.monotonic() - t0


def daemonset_report(lab: ClusterLab) -> str:
    return lab.kubectl("-n", SA_NAMESPACE, "get", "daemonset,pods", "-o", "wide", check=False).stdout


def wait_rolled_out(lab: ClusterLab, timeout: float = 180) -> None:
    """Every node runs the DaemonSet's current template, Ready (helm --wait can return while the
    controller has not yet counted the last pod)."""
    proc = lab.kubectl("-n", SA_NAMESPACE, "rollout", "status", "daemonset/pyproxy", f"--timeout={int(timeout)}s",
                       check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pyproxy's DaemonSet did not roll out: {proc.stderr.strip()}\n{daemonset_report(lab)}")


def proxy_pods(lab: ClusterLab) -> dict[str, dict[str, Any]]:
    """pyproxy's pods by node name."""
    out = lab.kubectl("-n", SA_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/name=pyproxy", "-o", "json").stdout
    return {p["spec"]["nodeName"]: p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")}


def echo_deployment(name: str, replicas: int, *, node: str | None = None) -> dict[str, Any]:
    """Backends: the lab's echo server (answers ``<pod name> <client ip>``), Ready by a real
    HTTP probe, so the EndpointSlice controller sees what the kubelet saw."""
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 2,
        "containers": [{
            "name": "echo", "image": TOOLS, "imagePullPolicy": "Never",
            "command": ["python3", "/opt/lab/echo.py", "--name", "$(POD_NAME)", "--port", "8080",
                        "--http-port", "8081"],
            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            "ports": [{"name": "http", "containerPort": 8081}, {"name": "line", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/", "port": 8081}, "periodSeconds": 1},
        }]}
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    else:  # spread evenly over the nodes, so both local and remote backends exist everywhere
        spec["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                              "whenUnsatisfiable": "DoNotSchedule",
                                              "labelSelector": {"matchLabels": {"app": name}}}]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}}


def client_pod(name: str, node: str) -> dict[str, Any]:
    """A pod that only holds a network namespace on ``node`` for probes to run in."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE,
                                                            "labels": {"role": "client"}},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "client", "image": TOOLS, "imagePullPolicy": "Never",
                                     "command": ["sleep", "infinity"]}]}}


def wait_pods_running(lab: ClusterLab, selector: str, count: int, timeout: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    pods: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        out = lab.kubectl("-n", NAMESPACE, "get", "pods", "-l", selector, "-o", "json").stdout
        pods = [p for p in json.loads(out)["items"] if p["status"].get("phase") == "Running"
                and all(c.get("ready") for c in p["status"].get("containerStatuses") or [{}])]
        if len(pods) == count:
            return pods
        time.sleep(0.5)
    raise AssertionError(f"pods {selector}: {len(pods)} running and ready, want {count}:\n"
                         + lab.kubectl("-n", NAMESPACE, "get", "pods", "-o", "wide").stdout)


def pod_netns_pid(lab: ClusterLab, pod: dict[str, Any]) -> int:
    """PID of the pod's first container, from the containerd of the node it runs on."""
    return lab.real_node(lab.node_index(pod["spec"]["nodeName"])).container_pid(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                             pod["spec"]["containers"][0]["name"])


def probe(pid: int, target: str, *, count: int, http: bool = True, interval: float = 0.0,
          deadline: float = 60.0, timeout: float = 1.0) -> dict[str, Any]:
    """The lab's probe client in a pod's network namespace: ``{"answers": [[pod, seen_ip],
    ...], "errors": {...}}``. Each attempt is a new connection."""
    argv = ["nsenter", "-t", str(pid), "-n", sys.executable, "-m", "lab.client", "--target", target,
            "--count", str(count), "--interval", str(interval), "--deadline", str(deadline),
            "--timeout", str(timeout), "--reset-close", *(["--http"] if http else [])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=deadline + 30, cwd=REPO)
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(f"probe client failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


class Prober:
    """The probe client running in the background (during a rolling update, a pod kill)."""

    def __init__(self, pid: int, target: str, *, seconds: float, interval: float = 0.02) -> None:
        self.argv = ["nsenter", "-t", str(pid), "-n", sys.executable, "-m", "lab.client", "--target", target,
                     "--count", str(int(seconds / interval) + 1000), "--interval", str(interval),
                     "--deadline", str(seconds), "--timeout", "1", "--reset-close", "--http"]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)

    def result(self, timeout: float = 300) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        if not out.strip():
            raise RuntimeError(f"probe client failed ({self.proc.returncode}): {err[-2000:]}")
        result: dict[str, Any] = json.loads(out)
        return result


def failures(result: dict[str, Any]) -> dict[str, int]:
    """The probe's failed attempts by kind (running out of time at the end is not a failure)."""
    return {k: v for k, v in result["errors"].items() if k != "deadline"}


def cluster_ip(lab: ClusterLab, name: str, namespace: str = "e2e") -> str:
    return lab.kubectl("get", "svc", name, "-n", namespace, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()


def wait_ready_endpoints(lab: ClusterLab, service_name: str, count: int, namespace: str = "e2e",
                         timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    ready = -1
    while time.monotonic() < deadline:
        out = lab.kubectl("get", "endpointslices", "-n", namespace, "-l",
                          f"kubernetes.io/service-name={service_name}", "-o", "json").stdout
        ready = sum(1 for s in json.loads(out)["items"] for e in s.get("endpoints") or []
                    if (e.get("conditions") or {}).get("ready"))
        if ready == count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{service_name}: {ready} ready endpoints, want {count}")


def curl(lab: ClusterLab, url: str, *, pod_pid: int | None = None, node: int | None = None,
         ext: bool = False, source: str | None = None, timeout: float = 2) -> str:
    """One curl from a pod (by its PID), a node, or the external client; returns its output."""
    argv = ["curl", "-sS", "--max-time", str(timeout), url]
    if source:
        argv[1:1] = ["--interface", source]
    if pod_pid is not None:
        proc = subprocess.run(["nsenter", "-t", str(pod_pid), "-n", *argv], capture_output=True, text=True,
                              timeout=timeout + 5)
    else:
        ns = lab.ext_ns if ext else lab.node_ns(node or 1)
        proc = ns_run(ns, argv, timeout=timeout + 5)
    return (proc.stdout or proc.stderr).strip()


def answers(lab: ClusterLab, url: str, n: int, **where: Any) -> list[str]:
    """The pod names that answered n requests (errors kept as their text)."""
    return [curl(lab, url, **where).split(" ")[0] for _ in range(n)]


def wait_for(what: str, check: Any, timeout: float = 30, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
