"""Two identical worlds on one API server: upstream kube-proxy programs one, pyproxy the other.

::

    control plane (lab.cluster, no nodes): etcd, kube-apiserver, endpointslice controllers
        │ bridge "under" 192.168.60.0/24
        ├── world "kube-proxy": node ns api0 192.168.60.51 ─┐  each world is a lab.netns Topology:
        └── world "pyproxy":    node ns api0 192.168.60.52 ─┘  node 192.168.50.2, pods pod0..5,
                                                                client pod, external client

Both worlds have the same addresses (separate network namespaces), so a probe's outcome, client
addresses included, is comparable as is. Both proxies are ``node-1`` and read the same
KubeProxyConfiguration file: same mode, cluster CIDRs, NodePort addresses and rate limits.
The API link is the only difference, and no probe goes near it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from pyroute2 import IPRoute

from lab.cluster import ClusterLab
from lab.diff import gen
from lab.diff.probe import Outcome, outcome
from lab.netns import Topology, ns_exec

REPO = Path(__file__).resolve().parents[2]
PROXIES = ("kube-proxy", "pyproxy")
MIN_SYNC = "100ms"
SYNC_PERIOD = "30s"


def proxy_config(lab: ClusterLab, *, mode: str) -> str:
    """The one KubeProxyConfiguration both proxies read."""
    path = lab.path / f"difftest-{mode}.yaml"
    path.write_text(json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": lab.node_admin_kubeconfig},
        "hostnameOverride": "node-1", "mode": mode, "clusterCIDR": ",".join(gen.CLUSTER_CIDRS),
        "nodePortAddresses": list(gen.NODEPORT_CIDRS),
        mode: {"minSyncPeriod": MIN_SYNC, "syncPeriod": SYNC_PERIOD},
        "healthzBindAddress": "0.0.0.0:10256", "metricsBindAddress": "127.0.0.1:10249",
        # Global conntrack sysctls are read-only in a network namespace: leave them alone.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }, indent=1))
    return str(path)


def register_nodes(lab: ClusterLab, zone: str | None) -> None:
    """node-1 (both proxies' node, labelled with the cluster's zone) and node-2 (the others)."""
    for name, ips, node_zone in (("node-1", ("192.168.50.2", "fd00:50::2"), zone),
                                 ("node-2", ("192.168.50.3", "fd00:50::3"), "zone-b")):
        labels = {"kubernetes.io/hostname": name, **({"topology.kubernetes.io/zone": node_zone} if node_zone else {})}
        lab.register_node(name, labels=labels, addresses=ips, message="difftest")
        if not node_zone:  # apply keeps a label it set earlier unless told
            lab.kubectl("label", "node", name, "topology.kubernetes.io/zone-", check=False)


@dataclass
class World:
    proxy: str
    index: int
    topo: Topology
    proc: subprocess.Popen[bytes] | None = None
    log: str = ""
    vantages: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, lab: ClusterLab, *, proxy: str, index: int) -> World:
        topo = Topology.create(pods=gen.PODS, client_sources=len(gen.EXT_SOURCES) - 1,
                               echo_ports=gen.LISTENED, http_ports=(), stream_ports=())
        try:
            client = topo.add_pod("cpod", "10.244.1.100", "fd00:244:1::100")
            with IPRoute(netns=topo.client_ns) as ipr:
                ipr.route("add", dst=gen.EXTERNAL_CIDRS[0], gateway=topo.node_ip)
                ipr.route("add", dst=gen.EXTERNAL_CIDRS[1], gateway=topo.node_ip6, family=socket.AF_INET6)
            lab.plug(topo.node_ns, host_if=f"w{index}", ifname="api0", ip=f"192.168.60.{51 + index}")
            # The kernel rate-limits ICMP errors per peer (IPv6 by default, IPv4 too in pods)
            # and per namespace (1,000 a second, bursts of 50): a "port unreachable" from the
            # node's reject rules or from a pod would turn into a timeout depending on what the
            # other probes did. Upstream rejects TCP with ICMP, pyproxy with a reset (a
            # documented deviation, for this very reason), so the upstream world would lose
            # more. Lift every limit: the comparison is of rules, not of rate limits.
            for ns in [topo.node_ns, *(p.ns for p in topo.pods)]:
                proc = ns_exec(ns, ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/icmp_ratelimit && "
                                    "echo 0 > /proc/sys/net/ipv6/icmp/ratelimit && "
                                    "echo 1000000 > /proc/sys/net/ipv4/icmp_msgs_per_sec && "
                                    "echo 1000000 > /proc/sys/net/ipv4/icmp_msgs_burst"])
                if proc.returncode != 0:
                    raise RuntimeError(f"icmp rate limits in {ns}: {proc.stderr.strip()}")
        except BaseException:
            topo.destroy()
            raise
        return cls(proxy=proxy, index=index, topo=topo,
                   vantages={"pod": client.ns, "node": topo.node_ns, "ext": topo.client_ns})

    def start(self, lab: ClusterLab, *, mode: str) -> None:
        config = proxy_config(lab, mode=mode)
        if self.proxy == "pyproxy":
            argv = [sys.executable, "-m", "pyproxy", "run", "--config", config, "--iptables-backend", "nft", "--v", "0"]
        else:
            argv = [lab.bin("kube-proxy"), "--config", config, "--v=0"]
        self.log = str(lab.path / f"difftest-{self.proxy}-{mode}.log")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.topo.node_ns, *argv], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=REPO)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        self.topo.destroy()

    def metrics(self) -> dict[str, float]:
        proc = ns_exec(self.topo.node_ns, ["curl", "-s", "--max-time", "2", "http://127.0.0.1:10249/metrics"],
                       timeout=10)
        out: dict[str, float] = {}
        for line in proc.stdout.splitlines():
            if line.startswith("kubeproxy_sync_proxy_rules_last"):
                name, _, value = line.rpartition(" ")
                out[name.split("{")[0]] = max(out.get(name.split("{")[0], 0.0), float(value))
        return out

    def synced_since(self, t: float) -> bool:
        """A sync finished after ``t`` and nothing is queued behind it."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.proxy} exited; see {self.log}")
        m = self.metrics()
        last = m.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds", 0.0)
        queued = m.get("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", 0.0)
        return last > t and queued <= last

    def flush_conntrack(self) -> None:
        ns_exec(self.topo.node_ns, ["conntrack", "-F"], timeout=30)
        ns_exec(self.topo.node_ns, ["conntrack", "-F", "-f", "ipv6"], timeout=30)

    def start_probes(self, targets: list[gen.Target], *, tries: int) -> list[tuple[list[int], subprocess.Popen[str]]]:
        """One prober per vantage point, all at once (most of a probe's time is waiting)."""
        running = []
        for vantage, ns in self.vantages.items():
            idx = [i for i, t in enumerate(targets) if t.vantage == vantage]
            if not idx:
                continue
            batch = [{"ip": targets[i].ip, "port": targets[i].port, "protocol": targets[i].protocol,
                      "sources": list(targets[i].sources), "tries": tries} for i in idx]
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "lab.diff.probe"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, cwd=REPO)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(batch))
            proc.stdin.close()
            running.append((idx, proc))
        return running


def probe_all(worlds: list[World], targets: list[gen.Target], *, tries: int) -> list[list[Outcome]]:
    """Every target from its vantage point in every world, concurrently; one list per world."""
    started = [w.start_probes(targets, tries=tries) for w in worlds]
    out = []
    for w, running in zip(worlds, started):
        results: list[Outcome | None] = [None] * len(targets)
        for idx, proc in running:
            assert proc.stdout is not None and proc.stderr is not None
            try:
                stdout = proc.stdout.read()
                err = proc.stderr.read()
                proc.wait(timeout=600)
            finally:
                if proc.poll() is None:
                    proc.kill()
            if proc.returncode != 0:
                raise RuntimeError(f"prober in {w.proxy}'s world failed: {err[-2000:]}")
            for i, raw in zip(idx, json.loads(stdout)):
                results[i] = outcome(raw)
        out.append([r for r in results if r is not None])
    return out


def wait_synced(worlds: list[World], since: float, *, timeout: float = 60) -> float:
    """Until every proxy has synced after ``since`` with nothing queued, twice 0.3 s apart (an
    event still in flight would queue a sync in between). Returns seconds waited."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if all(w.synced_since(since) for w in worlds):
            time.sleep(0.3)
            if all(w.synced_since(since) for w in worlds):
                return time.monotonic() - start
        time.sleep(0.1)
    raise RuntimeError(f"proxies not synced {timeout:.0f}s after the change; see "
                       + ", ".join(w.log for w in worlds))


def apply_cluster(lab: ClusterLab, cluster: gen.Cluster) -> None:
    """Replace every difftest object with ``cluster``'s (delete, then create: the cluster's
    addresses are its own, so a recreated Service gets the same ClusterIP and NodePorts)."""
    lab.kubectl("delete", "services,endpointslices", "-n", "default", "-l", f"{gen.LABEL}=1",
                "--wait=true", "--ignore-not-found")
    register_nodes(lab, cluster.zone)
    objs = gen.objects(cluster)
    # A NodePort or ClusterIP just released by the delete can read "already allocated" for a
    # moment; apply again (idempotent) until the API server takes everything.
    deadline = time.monotonic() + 30
    while objs:
        proc = lab.kubectl("apply", "-f", "-", check=False,
                           stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
        if proc.returncode == 0:
            break
        if "already allocated" not in proc.stderr or time.monotonic() > deadline:
            raise RuntimeError(f"the API server refused seed {cluster.seed}'s objects: {proc.stderr.strip()}")
        time.sleep(0.5)
    for svc in cluster.services:
        status = gen.lb_status(svc)
        if status:
            lab.kubectl("patch", "service", svc.name, "-n", "default", "--subresource=status",
                        "--type=merge", "-p", json.dumps(status))

