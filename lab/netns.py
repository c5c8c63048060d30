"""Build a one-node cluster out of network namespaces, as a CNI would wire it.

::

    client ns (external)              node ns                          pod ns (one per pod)
    eth0 192.168.50.1/24  <--veth-->  eth0 192.168.50.2/24
         fd00:50::1/64                     fd00:50::2/64               (every link is dual-stack:
                                      br0  fd00:244:1::1/64             pods fd00:244:1::1x/64)
     + extra client sources           br0  10.244.1.1/24  <--veth-->  eth0 10.244.1.1x/24
       192.168.50.101...              default via 192.168.50.1          default via 10.244.1.1
     routes 10.96.0.0/12 and
     192.168.60.0/24 (external and
     LB IPs) via the node

Bridge ports are in hairpin mode. The node forwards (``ip_forward=1``) and passes bridged traffic through netfilter
(``bridge-nf-call-iptables=1``), which is what lets replies between two pods on the same bridge
be un-DNATed: without it, pod-to-ClusterIP traffic to a pod on the same node breaks. Those are
the sysctls a bridge CNI sets.

Everything is removed by :meth:`Topology.destroy`, which the context manager always calls.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute, netns

NETNS_PREFIX = "pxt"


@dataclass
class Pod:
    name: str
    ns: str
    ip: str
    ip6: str = ""
    """The pod's IPv6 address (every lab pod is dual-stack)."""


NODAD = 0x02  # IFA_F_NODAD: the address is usable at once, without duplicate detection


@dataclass
class Probe:
    """What a probe client saw."""

    answers: list[tuple[str, str, str | None]]
    """(pod that answered, source IP the pod saw, source we bound or None)."""
    errors: dict[str, int]
    durations: list[float]

    @property
    def pods(self) -> list[str]:
        return [a[0] for a in self.answers]

    @property
    def seen_ips(self) -> set[str]:
        return {a[1] for a in self.answers}


def ns_exec(ns: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command inside a namespace and wait for it."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=False, **kw)


def _sysctl(ns: str, name: str, value: str) -> None:
    path = "/proc/sys/" + name.replace(".", "/")
    proc = ns_exec(ns, ["sh", "-c", f"echo {value} > {path}"])
    if proc.returncode != 0:
        raise RuntimeError(f"sysctl {name}={value} in {ns}: {proc.stderr.strip()}")


def remove_stale_namespaces() -> None:
    """Remove lab namespaces left by a process that no longer exists (a killed test run)."""
    for name in netns.listnetns():
        if not name.startswith(NETNS_PREFIX):
            continue
        pid = name[len(NETNS_PREFIX):].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            netns.remove(name)


@dataclass
class Topology:
    node_ip: str = "192.168.50.2"
    client_ip: str = "192.168.50.1"
    bridge_ip: str = "10.244.1.1"
    pod_cidr: str = "10.244.1.0/24"
    cluster_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/12"
    node_ip6: str = "fd00:50::2"
    client_ip6: str = "fd00:50::1"
    bridge_ip6: str = "fd00:244:1::1"
    cluster_cidr6: str = "fd00:244::/32"
    service_cidr6: str = "fd00:96::/108"
    external_cidr: str = "192.168.60.0/24"
    """Where external IPs and LoadBalancer IPs live: the client routes it to the node. The node
    routes it back (its default route) and the client, which does not forward, drops it: an
    address no rule DNATs times out."""
    client_sources: list[str] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    tag: str = ""

    @property
    def node_ns(self) -> str:
        return f"{self.tag}-node"

    @property
    def client_ns(self) -> str:
        return f"{self.tag}-client"

    @classmethod
    def create(cls, *, pods: int = 3, client_sources: int = 12, echo_ports: tuple[int, ...] = (8080,),
               http_ports: tuple[int, ...] = (8081,), bulk_ports: tuple[int, ...] = (),
               stream_ports: tuple[int, ...] = (8083,)) -> Topology:
        remove_stale_namespaces()
        topo = cls(tag=f"{NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(2)}")
        try:
            topo._build(pods, client_sources)
            topo.start_echo(echo_ports, http_ports, bulk_ports, stream_ports)
        except BaseException:
            topo.destroy()
            raise
        return topo

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def _new_ns(self, name: str) -> str:
        netns.create(name)
        self.namespaces.append(name)
        with IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return name

    def _build(self, n_pods: int, n_sources: int) -> None:
        node = self._new_ns(self.node_ns)
        client = self._new_ns(self.client_ns)
        with IPRoute(netns=node) as ipr:
            ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": client})
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address=self.node_ip, prefixlen=24)
            ipr.addr("add", index=eth0, address=self.node_ip6, prefixlen=64, flags=NODAD)
            ipr.link("set", index=eth0, state="up")
            ipr.link("add", ifname="br0", kind="bridge")
            br0 = ipr.link_lookup(ifname="br0")[0]
            ipr.addr("add", index=br0, address=self.bridge_ip, prefixlen=24)
            ipr.addr("add", index=br0, address=self.bridge_ip6, prefixlen=64, flags=NODAD)
            ipr.link("set", index=br0, state="up")
            ipr.route("add", dst="default", gateway=self.client_ip)
            ipr.route("add", dst="::/0", gateway=self.client_ip6, family=socket.AF_INET6)
        with IPRoute(netns=client) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address=self.client_ip, prefixlen=24)
            for i in range(n_sources):
                src = f"192.168.50.{101 + i}"
                ipr.addr("add", index=eth0, address=src, prefixlen=24)
                self.client_sources.append(src)
            ipr.addr("add", index=eth0, address=self.client_ip6, prefixlen=64, flags=NODAD)
            ipr.link("set", index=eth0, state="up")
            # The external client may reach ClusterIPs through the node (as a router would).
            ipr.route("add", dst=self.service_cidr, gateway=self.node_ip)
            ipr.route("add", dst=self.service_cidr6, gateway=self.node_ip6, family=socket.AF_INET6)
            ipr.route("add", dst=self.external_cidr, gateway=self.node_ip)
        for name, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.bridge.bridge-nf-call-iptables", "1"),
            ("net.bridge.bridge-nf-call-ip6tables", "1"),
            # Not a CNI setting: lifts the kernel's per-client ICMP rate limit (a burst of 6,
            # then 1/s) so tests that count "port unreachable" answers for UDP are exact.
            ("net.ipv4.icmp_ratelimit", "0"),
        ):
            _sysctl(node, name, value)
        for i in range(n_pods):
            self.add_pod(f"pod{i}", f"10.244.1.{10 + i}", f"fd00:244:1::{10 + i}")

    def add_pod(self, name: str, ip: str, ip6: str = "") -> Pod:
        ns = self._new_ns(f"{self.tag}-{name}")
        with IPRoute(netns=self.node_ns) as ipr:
            host_if = f"v{name}"[:15]
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname="br0")[0], state="up")
        # Hairpin mode, as the bridge CNI's hairpinMode sets it: a pod reaching itself through
        # a ClusterIP is DNATed back to the port it came in on, and a bridge only sends a frame
        # out of its ingress port when that port is in hairpin mode.
        proc = subprocess.run(["ip", "-n", self.node_ns, "link", "set", "dev", host_if, "type",
                               "bridge_slave", "hairpin", "on"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"hairpin on {host_if}: {proc.stderr.strip()}")
        with IPRoute(netns=ns) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address=ip, prefixlen=24)
            if ip6:
                ipr.addr("add", index=eth0, address=ip6, prefixlen=64, flags=NODAD)
            ipr.link("set", index=eth0, state="up")
            ipr.route("add", dst="default", gateway=self.bridge_ip)
            if ip6:
                ipr.route("add", dst="::/0", gateway=self.bridge_ip6, family=socket.AF_INET6)
        pod = Pod(name, ns, ip, ip6)
        self.pods.append(pod)
        return pod

    def start_echo(self, ports: tuple[int, ...], http_ports: tuple[int, ...] = (),
                   bulk_ports: tuple[int, ...] = (), stream_ports: tuple[int, ...] = ()) -> None:
        """Start the echo backend in every pod and wait until each one is listening."""
        for pod in self.pods:
            argv = ["ip", "netns", "exec", pod.ns, sys.executable, "-m", "lab.echo",
                    "--name", pod.name, *[a for p in ports for a in ("--port", str(p))],
                    *[a for p in http_ports for a in ("--http-port", str(p))],
                    *[a for p in bulk_ports for a in ("--bulk-port", str(p))],
                    *[a for p in stream_ports for a in ("--stream-port", str(p))]]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            self.procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"echo server in {pod.name} did not start")

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def probe(self, ns: str, target: str, *, proto: str = "tcp", count: int = 1,
              sources: list[str] | None = None, timeout: float = 2.0) -> Probe:
        """Run the probe client inside ``ns`` (bounded: count attempts, 60 s at most)."""
        argv = [sys.executable, "-m", "lab.client", "--target", target, "--proto", proto,
                "--count", str(count), "--timeout", str(timeout), "--deadline", "60"]
        for s in sources or []:
            argv += ["--source", s]
        proc = ns_exec(ns, argv, timeout=90)
        if proc.returncode != 0:
            raise RuntimeError(f"probe failed: {proc.stderr}")
        data = json.loads(proc.stdout)
        return Probe([tuple(a) for a in data["answers"]], data["errors"], data["durations"])

    def pyproxy(self, *args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the pyproxy CLI inside the node namespace (or ``ns``)."""
        return ns_exec(ns or self.node_ns, [sys.executable, "-m", "pyproxy", *args])

    def destroy(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        self.procs.clear()
        for name in reversed(self.namespaces):
            try:
                netns.remove(name)
            except OSError:
                pass
        self.namespaces.clear()
