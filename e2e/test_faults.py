"""Fault injection against the real API server (hardening issue, defects 2 and 3).

pyproxy on node 1 reaches the lab's API server through :mod:`e2e.faultproxy`, which can stall
its watches (half-open), cut its connections, answer 410 storms, 500/503/504, bodies that are
not JSON objects, or slow every byte; its ``nft`` is a wrapper that can be made to fail. For
each fault, while it lasts: traffic keeps flowing through the last good rules, the daemon stays
up and ``/healthz`` says what is true (200 while every change it knows of is applied, 503 while
one waits on a failing kernel). Once it ends, pyproxy recovers by itself and programs the
changes made in the meantime: a new Service, a new endpoint, a deleted Service.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e.harness import SA, SA_NAMESPACE, answers, cluster_ip, curl, pod, service, wait_for, wait_ready_endpoints
from lab.cluster import CLUSTER_CIDR, CLUSTER_CIDR6, CP_IP, REPO, ClusterLab, kubeconfig, ns_run

PROXY_PORT, CONTROL = 7443, "127.0.0.1:7444"
API_FAULTS = ["stall", "cut", "gone", "gone-event", "status-500", "status-503", "status-504", "garbage",
              "garbage-watch", "slow-20000"]
STORMS = ("gone", "gone-event", "garbage")
"""Faults that make the client list again and again: how often it does is checked."""
IDLE_TIMEOUT = 3


@dataclass
class Faulty:
    """pyproxy on node 1, through the fault proxy, with a breakable nft."""

    lab: ClusterLab
    proxy: subprocess.Popen[bytes]
    pyproxy: subprocess.Popen[bytes]
    nft_flag: Path
    log: Path

    def set(self, mode: str) -> None:
        out = ns_run(self.lab.cp_ns, ["curl", "-s", "-X", "POST", f"http://{CONTROL}/fault?mode={mode}"])
        assert f'"{mode}"' in out.stdout, out

    def stats(self) -> str:
        return ns_run(self.lab.cp_ns, ["curl", "-s", f"http://{CONTROL}/stats"]).stdout

    def lists(self) -> int:
        """LIST requests the proxy has seen so far."""
        return int(json.loads(self.stats())["stats"].get("list", 0))

    def healthz(self) -> str:
        return ns_run(self.lab.node_ns(1), ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                            "--max-time", "2", "http://127.0.0.1:10256/healthz"]).stdout

    def metric(self, name: str) -> float:
        text = ns_run(self.lab.node_ns(1), ["curl", "-s", "--max-time", "2", "http://127.0.0.1:10249/metrics"]).stdout
        return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def alive(self) -> bool:
        return self.pyproxy.poll() is None


@pytest.fixture(scope="module")
def faulty(lab: ClusterLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    tmp = tmp_path_factory.mktemp("faults")
    proxy_log = open(tmp / "faultproxy.log", "wb")  # noqa: SIM115
    proxy = subprocess.Popen(
        ["ip", "netns", "exec", lab.cp_ns, sys.executable, "-m", "e2e.faultproxy",
         "--listen", f"{CP_IP}:{PROXY_PORT}", "--control", CONTROL,
         "--upstream", "https://127.0.0.1:6443", "--ca", str(lab.path / "ca.crt")],
        cwd=REPO, stdout=proxy_log, stderr=subprocess.STDOUT, start_new_session=True)
    token = lab.kubectl("create", "token", SA, "-n", SA_NAMESPACE, "--duration", "2h").stdout.strip()
    cfg = tmp / "via-proxy.kubeconfig"
    cfg.write_text(kubeconfig(server=f"http://{CP_IP}:{PROXY_PORT}", ca="", token=token,
                              user="system:serviceaccount:kube-system:pyproxy"))
    # nft, failing while the flag file exists.
    wrap = tmp / "bin"
    wrap.mkdir()
    flag = tmp / "nft-fails"
    real = subprocess.run(["sh", "-c", "command -v nft"], capture_output=True, text=True).stdout.strip()
    (wrap / "nft").write_text(f'#!/bin/sh\nif [ -e "{flag}" ]; then echo "injected nft failure" >&2; exit 1; fi\n'
                              f'exec {real} "$@"\n')
    (wrap / "nft").chmod(0o755)
    log = tmp / "pyproxy.log"
    env = {**os.environ, "PATH": f"{wrap}:{os.environ['PATH']}"}
    wait_for("fault proxy", lambda: '"pass"' in ns_run(lab.cp_ns, ["curl", "-s", f"http://{CONTROL}/stats"]).stdout,
             timeout=20)
    pyproxy = subprocess.Popen(
        ["ip", "netns", "exec", lab.node_ns(1), sys.executable, "-m", "pyproxy", "run",
         "--kubeconfig", str(cfg), "--hostname-override", lab.node_name(1),
         "--cluster-cidr", f"{CLUSTER_CIDR},{CLUSTER_CIDR6}", "--proxy-mode", "nftables",
         "--watch-idle-timeout", str(IDLE_TIMEOUT), "--sync-period", "1", "--v", "1"],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115
    f = Faulty(lab=lab, proxy=proxy, pyproxy=pyproxy, nft_flag=flag, log=log)
    try:
        wait_for("pyproxy healthy", lambda: f.healthz() == "200" and "synced" in log.read_text(), timeout=60)
        yield f
    finally:
        for p in (pyproxy, proxy):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        ns_run(lab.node_ns(1), [sys.executable, "-m", "pyproxy", "cleanup"])


def _deploy(lab: ClusterLab, app: str, pods: list[str]) -> str:
    lab.kubectl_apply([service(app, {"app": app}),
                       *(pod(p, lab.node_name(1 + k % lab.nodes), labels={"app": app}) for k, p in enumerate(pods))])
    wait_ready_endpoints(lab, app, len(pods))
    return cluster_ip(lab, app)


def _delete(lab: ClusterLab, *apps: str) -> None:
    for app in apps:
        lab.kubectl("delete", "svc,pods", "-n", "e2e", "-l", f"app={app}", "--wait=false", check=False)
        lab.kubectl("delete", "svc", app, "-n", "e2e", "--ignore-not-found", "--wait=false", check=False)


def _served_by(lab: ClusterLab, cip: str, n: int = 20) -> set[str]:
    return set(answers(lab, f"http://{cip}/", n, node=1))


@pytest.mark.parametrize("fault", API_FAULTS)
def test_api_fault_keeps_rules_and_recovers(lab: ClusterLab, faulty: Faulty, fault: str):
    slug = re.sub(r"[^a-z0-9]", "", fault)
    a, b, c = f"fa-{slug}", f"fb-{slug}", f"fc-{slug}"
    cip_a = _deploy(lab, a, [f"{a}-0", f"{a}-1"])
    cip_c = _deploy(lab, c, [f"{c}-0"])
    try:
        wait_for("services programmed", lambda: _served_by(lab, cip_a) == {f"{a}-0", f"{a}-1"}
                 and _served_by(lab, cip_c, 3) == {f"{c}-0"})
        errors0 = faulty.metric("pyproxy_reflector_errors_total")
        lists0 = faulty.lists()
        faulty.set(fault)
        time.sleep(IDLE_TIMEOUT + 2)  # long enough for every watch to hit the fault (or time out)
        # Changes while pyproxy cannot see them: a new Service, a new endpoint, a deletion.
        lab.kubectl_apply([service(b, {"app": b}), pod(f"{b}-0", lab.node_name(2), labels={"app": b}),
                           pod(f"{a}-2", lab.node_name(2), labels={"app": a})])
        lab.kubectl("delete", "svc", c, "-n", "e2e", "--wait=true")
        wait_ready_endpoints(lab, a, 3)
        # The last good rules keep serving; the daemon is up and healthy (nothing it knows of
        # is waiting to be applied).
        got = answers(lab, f"http://{cip_a}/", 20, node=1)
        assert set(got) <= {f"{a}-0", f"{a}-1", f"{a}-2"} and len(got) == 20, got
        assert faulty.alive(), faulty.log.read_text()[-3000:]
        assert faulty.healthz() == "200"
        if fault in STORMS:
            # Three reflectors, a few seconds: with backoff a handful of LISTs, not a flood.
            lists = faulty.lists() - lists0
            assert lists < 40, f"{lists} LISTs during the fault"
        faulty.set("pass")
        cip_b = cluster_ip(lab, b)
        # Recovers by itself: every change made meanwhile reaches the kernel.
        wait_for("the new Service", lambda: _served_by(lab, cip_b, 3) == {f"{b}-0"}, timeout=90)
        wait_for("the new endpoint", lambda: f"{a}-2" in _served_by(lab, cip_a, 30), timeout=30)
        wait_for("the deleted Service gone", lambda: f"{c}-0" not in curl(lab, f"http://{cip_c}/", node=1, timeout=1),
                 timeout=30)
        assert faulty.healthz() == "200" and faulty.alive()
        if not fault.startswith("slow"):
            assert faulty.metric("pyproxy_reflector_errors_total") > errors0, faulty.stats()
    finally:
        faulty.set("pass")
        _delete(lab, a, b, c)


def test_nft_failing_keeps_the_old_rules_reports_unhealthy_and_recovers(lab: ClusterLab, faulty: Faulty):
    a, b = "fa-nft", "fb-nft"
    cip_a = _deploy(lab, a, [f"{a}-0", f"{a}-1"])
    try:
        wait_for("service programmed", lambda: _served_by(lab, cip_a) == {f"{a}-0", f"{a}-1"})
        failures0 = faulty.metric("kubeproxy_sync_proxy_rules_nftables_sync_failures_total")
        faulty.nft_flag.touch()
        lab.kubectl_apply([service(b, {"app": b}), pod(f"{b}-0", lab.node_name(2), labels={"app": b})])
        wait_ready_endpoints(lab, b, 1)
        # The change cannot be applied: /healthz turns 503 once it waited 2 x sync period.
        wait_for("/healthz 503 while nft fails", lambda: faulty.healthz() == "503", timeout=30)
        assert _served_by(lab, cip_a) == {f"{a}-0", f"{a}-1"}  # old rules in place
        assert faulty.alive()
        assert faulty.metric("kubeproxy_sync_proxy_rules_nftables_sync_failures_total") > failures0
        faulty.nft_flag.unlink()
        cip_b = cluster_ip(lab, b)
        wait_for("the Service queued meanwhile", lambda: _served_by(lab, cip_b, 3) == {f"{b}-0"}, timeout=60)
        wait_for("/healthz 200 again", lambda: faulty.healthz() == "200", timeout=10)
    finally:
        faulty.nft_flag.unlink(missing_ok=True)
        _delete(lab, a, b)
