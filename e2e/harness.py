"""Helpers for the e2e tests: pyproxy on every lab node, workloads, and probes from pods/nodes."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from lab.cluster import CLUSTER_CIDR, CLUSTER_CIDR6, CP_IP, REPO, ClusterLab, kubeconfig, ns_run
from lab.workloads import SA_NAMESPACE, answers, cluster_ip, curl, wait_for, wait_ready_endpoints

__all__ = ["FIGURES", "SA", "SA_NAMESPACE", "ProxyFleet", "answers", "cluster_ip", "curl", "install_chart", "pod",
           "require_real_nodes", "sa_kubeconfig", "service", "wait_for", "wait_ready_endpoints"]

FIGURES: dict[str, str] = {}
"""What e2e tests measured on the way (name: value with its unit), printed after the run."""
SA = "pyproxy"


def require_real_nodes(what: str) -> None:
    """Skip (run by hand) or fail (scripts/test.sh, CI) when the real-node lab cannot run here:
    a missing cluster tool or mmdebstrap (which builds the images)."""
    import os
    import shutil

    import pytest

    from lab.preflight import CLUSTER_TOOLS, missing

    why = missing(CLUSTER_TOOLS) or (None if shutil.which("mmdebstrap") else
                                     "mmdebstrap is missing: run 'bash scripts/setup.sh' first")
    if why:
        if os.environ.get("CI") or os.environ.get("PYPROXY_ALL_TIERS"):
            pytest.fail(f"{what} cannot run here: {why}")
        pytest.skip(why)


def install_chart(lab: ClusterLab) -> None:
    proc = lab.helm("upgrade", "--install", "pyproxy", str(REPO / "charts" / "pyproxy"), "-n", SA_NAMESPACE,
                "--set", f"apiServer.host={CP_IP}")
    if proc.returncode != 0:
        raise RuntimeError(f"helm install: {proc.stderr}")


def sa_kubeconfig(lab: ClusterLab) -> str:
    """A kubeconfig for node namespaces that authenticates as the chart's ServiceAccount."""
    token = lab.kubectl("create", "token", SA, "-n", SA_NAMESPACE, "--duration", "2h").stdout.strip()
    path = lab.path / "pyproxy-sa.kubeconfig"
    path.write_text(kubeconfig(server=f"https://{CP_IP}:6443", ca=str(lab.path / "ca.crt"),
                               token=token, user="system:serviceaccount:kube-system:pyproxy"))
    return str(path)


@dataclass
class ProxyFleet:
    """pyproxy running in every node namespace, as the DaemonSet would run it."""

    lab: ClusterLab
    mode: str
    kubeconfig: str
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def chart_config(self) -> str:
        """The chart's ConfigMap as installed in the API: what the DaemonSet would read."""
        path = self.lab.path / "chart-config.yaml"
        if not path.exists():
            text = self.lab.kubectl("get", "configmap", "pyproxy-config", "-n", SA_NAMESPACE, "-o",
                                    "jsonpath={.data.config\\.yaml}").stdout
            path.write_text(text)
        return str(path)

    def start(self, i: int) -> None:
        log = open(self.lab.path / f"pyproxy-{i}.log", "ab")  # noqa: SIM115
        argv = ["ip", "netns", "exec", self.lab.node_ns(i), sys.executable, "-m", "pyproxy", "run",
                "--config", self.chart_config(), "--kubeconfig", self.kubeconfig,
                "--hostname-override", self.lab.node_name(i), "--cluster-cidr", f"{CLUSTER_CIDR},{CLUSTER_CIDR6}",
                "--proxy-mode", self.mode, "--v", "1"]
        self.procs[i] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_all(self) -> None:
        for i in range(1, self.lab.nodes + 1):
            self.start(i)
        for i in range(1, self.lab.nodes + 1):
            self.wait_healthy(i)

    def wait_healthy(self, i: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = ns_run(self.lab.node_ns(i), ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                                 "http://127.0.0.1:10256/healthz"])
            if proc.stdout.strip() == "200" and self.lab.path.joinpath(f"pyproxy-{i}.log").read_text().count("synced"):
                return
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"pyproxy on node {i} exited: "
                                   f"{self.lab.path.joinpath(f'pyproxy-{i}.log').read_text()[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"pyproxy on node {i} not healthy after {timeout}s")

    def kill(self, i: int, sig: int = 9) -> None:
        proc = self.procs.pop(i)
        proc.send_signal(sig)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for i in list(self.procs):
            self.kill(i, 15)
        for i in range(1, self.lab.nodes + 1):
            ns_run(self.lab.node_ns(i), [sys.executable, "-m", "pyproxy", "cleanup"])


def pod(name: str, node: str, *, labels: dict[str, str], namespace: str = "e2e") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "echo", "image": "pyproxy-lab/echo",
                                     "ports": [{"name": "http", "containerPort": 8081},
                                               {"name": "line", "containerPort": 8080}]}]}}


def service(name: str, selector: dict[str, str], *, namespace: str = "e2e", node_port: int | None = None,
            affinity: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": selector, "type": "NodePort" if node_port else "ClusterIP",
                            "ports": [{"name": "http", "port": 80, "targetPort": 8081, "protocol": "TCP",
                                       **({"nodePort": node_port} if node_port else {})}]}
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity}}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": spec}
