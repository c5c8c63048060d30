"""A real multi-node cluster in network namespaces: etcd, kube-apiserver and
kube-controller-manager (EndpointSlice controllers only), built from Go modules by
``lab/build-k8s.sh``; nodes with pod bridges and host-gw routes; a pod runner per node.

::

    <tag>-cp      192.168.60.1    etcd (127.0.0.1), kube-apiserver :6443, kube-controller-manager,
                                  and the underlay bridge "under" every node is plugged into
    <tag>-n1..nN  192.168.60.1X   pod bridge cbr0 10.244.X.1/24; routes to the other nodes' pod CIDRs
                                  via their node IPs (flannel host-gw); the lab kubelet; pyproxy
    <tag>-ext     192.168.60.200  an external client for NodePorts

Dual-stack: every link also has an IPv6 address (fd00:60::1, fd00:60::1X, fd00:60::200; pod
bridges fd00:244:X::1/64), Services get a ClusterIP of each family (fd00:96::/108), and pods
get an address of each family.

Every address lives in namespaces the lab creates. ``python3 -m lab up|down|status`` drives it;
the e2e tests use :class:`ClusterLab` directly.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns

from lab.realnode import NODE_ROOT, RealNode

REPO = Path(__file__).resolve().parents[1]
STATE_ROOT = Path(os.environ.get("PYPROXY_LAB_DIR", "/run/pyproxy-lab"))
CP_IP = "192.168.60.1"
EXT_IP = "192.168.60.200"
SERVICE_CIDR = "10.96.0.0/16"
DNS_IP = "10.96.0.10"
"""The cluster DNS Service's ClusterIP (kubeadm's choice: the tenth address of the range)."""
CLUSTER_CIDR = "10.244.0.0/16"
CP_IP6 = "fd00:60::1"
EXT_IP6 = "fd00:60::200"
SERVICE_CIDR6 = "fd00:96::/108"
CLUSTER_CIDR6 = "fd00:244::/32"
NODAD = 0x02  # IFA_F_NODAD: IPv6 addresses usable at once
API_PORT = 6443


def node_ip(i: int) -> str:
    return f"192.168.60.{10 + i}"


def zone(i: int, zones: int = 0) -> str:
    """Node i's topology.kubernetes.io/zone: zone-a, zone-b, ... round robin over ``zones``
    zones (0: one per node)."""
    return f"zone-{chr(ord('a') + (i - 1) % (zones or 26))}"


def pod_cidr(i: int) -> str:
    return f"10.244.{i}.0/24"


def node_ip6(i: int) -> str:
    return f"fd00:60::{10 + i}"


def pod_cidr6(i: int) -> str:
    return f"fd00:244:{i}::/64"


def ns_run(ns: str | None, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, *argv], check=False, **kw)


def lab_images(extra: tuple[str, ...] = ()) -> list[Path]:
    """The OCI archives every real node imports: pause, pyproxy's image, the lab's tools, and
    ``extra`` (lab.images names)."""
    from lab import images

    return [images.build(name) for name in ("pause", "pyproxy", "tools", *extra)]


def build_binaries(script: str = "build-k8s.sh") -> Path:
    """Build (or reuse from the cache) upstream binaries with ``lab/<script>``: the control
    plane's (build-k8s.sh) or a real node's (build-node.sh); return their directory."""
    proc = subprocess.run(["bash", str(REPO / "lab" / script)], capture_output=True, text=True, timeout=5400)
    if proc.returncode != 0:
        raise RuntimeError(f"lab/{script} failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


@dataclass
class ClusterLab:
    name: str = "lab"
    nodes: int = 2
    tag: str = ""
    bin_dir: str = ""
    dir: str = ""
    admin_token: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    owner_pid: int = 0
    """The process that brought the lab up, for labs that die with it (tests, benchmarks);
    0 for a lab meant to outlive its creator (``python3 -m lab up``)."""
    real_nodes: bool = False
    """Nodes run containerd and the real kubelet (lab.realnode), the control plane adds
    kube-scheduler, the Node authorizer and the controllers pods need; False: the lab's
    stand-in kubelet runs pods as ``unshare --net`` processes (quicker, no images)."""
    node_bin_dir: str = ""
    """lab/build-node.sh's output (real nodes only)."""
    images: list[str] = field(default_factory=list)
    """The OCI archives every real node imports, resolved once at start (every node gets the
    same images even if the sources change meanwhile)."""
    zones: int = 0
    """How many zones the nodes are spread over, round robin (0: a zone per node)."""
    dns: bool = False
    """Real nodes only: run cluster DNS (CoreDNS, ``lab.clusterdns``) at DNS_IP, the kubelets'
    clusterDNS, so pods resolve Service names (Kubernetes' own e2e specs do)."""

    # -- naming --------------------------------------------------------------------------
    @property
    def cp_ns(self) -> str:
        return f"{self.tag}-cp"

    @property
    def ext_ns(self) -> str:
        return f"{self.tag}-ext"

    def node_ns(self, i: int) -> str:
        return f"{self.tag}-n{i}"

    def node_name(self, i: int) -> str:
        return f"node-{i}"

    def node_index(self, name: str) -> int:
        """The inverse of :meth:`node_name`."""
        return int(name.rsplit("-", 1)[1])

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def admin_kubeconfig(self) -> str:
        """For use inside the cp namespace (server 127.0.0.1)."""
        return str(self.path / "admin.kubeconfig")

    @property
    def node_admin_kubeconfig(self) -> str:
        """For use inside node namespaces (server 192.168.60.1)."""
        return str(self.path / "admin-node.kubeconfig")

    def bin(self, name: str, *, node: bool = False) -> str:
        """An upstream binary: the control plane's build, or (``node``) build-node.sh's."""
        return str(Path(self.node_bin_dir if node else self.bin_dir) / name)

    def real_node(self, i: int) -> RealNode:
        return RealNode(name=self.node_name(i), netns=self.node_ns(i), dir=str(NODE_ROOT / f"{self.tag}-n{i}"),
                        bin_dir=self.node_bin_dir, node_ips=(node_ip(i), node_ip6(i)),
                        pod_cidrs=(pod_cidr(i), pod_cidr6(i)), cluster_dns=(DNS_IP,) if self.dns else ())

    # -- state file ----------------------------------------------------------------------
    def save(self) -> None:
        (self.path / "state.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, name: str) -> ClusterLab:
        path = STATE_ROOT / name / "state.json"
        if not path.exists():
            raise FileNotFoundError(f"no lab named {name!r} is up (no {path}); run 'python3 -m lab up'")
        return cls(**json.loads(path.read_text()))

    # -- bring up ------------------------------------------------------------------------
    @classmethod
    def reap_orphans(cls) -> None:
        """Take down labs whose owning process is gone (a test run that was killed)."""
        for state in STATE_ROOT.glob("*/state.json"):
            try:
                lab = cls(**json.loads(state.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if lab.owner_pid and not _alive(lab.owner_pid):
                lab.down()

    @classmethod
    def up(cls, *, name: str = "lab", nodes: int = 2, bin_dir: str | None = None,
           owned: bool = True, real_nodes: bool = False, extra_images: tuple[str, ...] = (),
           dns: bool = False, zones: int = 0) -> ClusterLab:
        """A lab in namespaces of its own; ``extra_images`` (lab.images names) are imported into
        every real node's containerd beside the lab's own (the e2e specs' agnhost, ...); ``dns``
        (real nodes only) runs CoreDNS as the cluster's DNS (``lab.clusterdns``)."""
        if dns and not real_nodes:
            raise ValueError("cluster DNS runs as a pod: it needs real nodes")
        if dns:
            extra_images = (*extra_images, "coredns")
        cls.reap_orphans()
        if (STATE_ROOT / name / "state.json").exists():
            raise RuntimeError(f"lab {name!r} is already up; run 'python3 -m lab down --name {name}' first")
        lab = cls(name=name, nodes=nodes, tag=f"pxl{secrets.token_hex(2)}",
                  bin_dir=bin_dir or str(build_binaries()), dir=str(STATE_ROOT / name),
                  admin_token=secrets.token_hex(16), owner_pid=os.getpid() if owned else 0,
                  real_nodes=real_nodes, node_bin_dir=str(build_binaries("build-node.sh")) if real_nodes else "",
                  dns=dns, zones=zones)
        if real_nodes:  # built (or found in the cache) before anything starts
            lab.images = [str(p) for p in lab_images(extra_images)]
        lab.path.mkdir(parents=True, exist_ok=True)
        lab.save()
        try:
            lab._network()
            lab._certs()
            lab._control_plane()
            lab._register_nodes()
            for i in range(1, nodes + 1):
                lab._start_kubelet(i)
            if real_nodes:
                lab._wait("every node Ready", lambda: lab.ready_nodes() == nodes, timeout=120)
            if dns:
                from lab import clusterdns

                lab.kubectl_apply(clusterdns.objects())
            lab.save()
        except BaseException:
            lab.down()
            raise
        return lab

    def _new_ns(self, name: str) -> None:
        netns.create(name)
        self.namespaces.append(name)
        self.save()
        with IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        ns_run(ns, ["sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}"])

    def _network(self) -> None:
        self._new_ns(self.cp_ns)
        with IPRoute(netns=self.cp_ns) as ipr:
            ipr.link("add", ifname="under", kind="bridge")
            br = ipr.link_lookup(ifname="under")[0]
            ipr.addr("add", index=br, address=CP_IP, prefixlen=24)
            ipr.addr("add", index=br, address=CP_IP6, prefixlen=64, flags=NODAD)
            ipr.link("set", index=br, state="up")
        self._sysctl(self.cp_ns, "net.ipv4.ip_forward", "1")
        self._sysctl(self.cp_ns, "net.ipv6.conf.all.forwarding", "1")
        attach = [(self.node_ns(i), node_ip(i), node_ip6(i)) for i in range(1, self.nodes + 1)] + [
            (self.ext_ns, EXT_IP, EXT_IP6)]
        for k, (ns, ip, ip6) in enumerate(attach):
            self._new_ns(ns)
            self.plug(ns, host_if=f"u{k}", ifname="eth0", ip=ip, ip6=ip6)
            with IPRoute(netns=ns) as ipr:
                ipr.route("add", dst="default", gateway=CP_IP)
                ipr.route("add", dst="::/0", gateway=CP_IP6, family=socket.AF_INET6)
        with IPRoute(netns=self.cp_ns) as ipr:
            # The control plane is on the pod network too (host-gw): a pod reaching the API
            # server (its in-cluster config, through the kubernetes Service) keeps its own
            # address, and the answer must find its way back to it.
            for i in range(1, self.nodes + 1):
                ipr.route("add", dst=pod_cidr(i), gateway=node_ip(i))
                ipr.route("add", dst=pod_cidr6(i), gateway=node_ip6(i), family=socket.AF_INET6)
        for i in range(1, self.nodes + 1):
            ns = self.node_ns(i)
            with IPRoute(netns=ns) as ipr:
                if not self.real_nodes:  # on a real node, the CNI bridge plugin makes cbr0
                    ipr.link("add", ifname="cbr0", kind="bridge")
                    br = ipr.link_lookup(ifname="cbr0")[0]
                    ipr.addr("add", index=br, address=pod_cidr(i).replace(".0/24", ".1"), prefixlen=24)
                    ipr.addr("add", index=br, address=pod_cidr6(i).replace("::/64", "::1"), prefixlen=64,
                             flags=NODAD)
                    ipr.link("set", index=br, state="up")
                for j in range(1, self.nodes + 1):
                    if j != i:  # flannel host-gw: the other nodes' pod CIDRs via their node IPs
                        ipr.route("add", dst=pod_cidr(j), gateway=node_ip(j))
                        ipr.route("add", dst=pod_cidr6(j), gateway=node_ip6(j), family=socket.AF_INET6)
            for key, value in (("net.ipv4.ip_forward", "1"), ("net.bridge.bridge-nf-call-iptables", "1"),
                               ("net.ipv6.conf.all.forwarding", "1"),
                               ("net.bridge.bridge-nf-call-ip6tables", "1")):
                self._sysctl(ns, key, value)

    def plug(self, ns: str, *, host_if: str, ifname: str, ip: str, ip6: str = "") -> None:
        """Plug namespace ``ns`` into the control plane's bridge "under" with a veth pair:
        ``host_if`` on the bridge, ``ifname`` in ``ns`` with ``ip``/24 (and ``ip6``/64)."""
        with IPRoute(netns=self.cp_ns) as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": ifname, "net_ns_fd": ns})
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname="under")[0], state="up")
        with IPRoute(netns=ns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=ip, prefixlen=24)
            if ip6:
                ipr.addr("add", index=idx, address=ip6, prefixlen=64, flags=NODAD)
            ipr.link("set", index=idx, state="up")

    def _certs(self) -> None:
        d = self.path

        def ossl(*args: str) -> None:
            proc = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=d)
            if proc.returncode != 0:
                raise RuntimeError(f"openssl {' '.join(args)}: {proc.stderr}")

        ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "7", "-subj", "/CN=pyproxy-lab-ca")
        san = (f"subjectAltName=IP:{CP_IP},IP:127.0.0.1,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,"
               "DNS:kubernetes.default.svc,DNS:localhost")
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
             "-subj", "/CN=kube-apiserver", "-addext", san)
        ossl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "apiserver.crt", "-days", "7", "-copy_extensions", "copy")
        ossl("genrsa", "-out", "sa.key", "2048")
        (d / "tokens.csv").write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        for path, server in ((self.admin_kubeconfig, f"https://127.0.0.1:{API_PORT}"),
                             (self.node_admin_kubeconfig, f"https://{CP_IP}:{API_PORT}")):
            Path(path).write_text(kubeconfig(server=server, ca=str(d / "ca.crt"), token=self.admin_token,
                                             user="admin"))
        if not self.real_nodes:
            return
        # Each kubelet's identity: system:node:NAME in group system:nodes (the Node authorizer
        # and NodeRestriction let it touch its own Node and the pods bound to it, nothing else).
        for i in range(1, self.nodes + 1):
            n = self.node_name(i)
            ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{n}.key", "-out", f"{n}.csr",
                 "-subj", f"/O=system:nodes/CN=system:node:{n}")
            ossl("x509", "-req", "-in", f"{n}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{n}.crt", "-days", "7")

    def _spawn(self, key: str, ns: str, argv: list[str], *, nsenter: bool = False,
               env: dict[str, str] | None = None) -> None:
        """Start a lab process in namespace ``ns``: with ``ip netns exec`` (its own mount
        namespace and /sys), or with ``nsenter`` (the network namespace only: the kubelet and
        containerd must share the host's mounts)."""
        log = open(self.path / f"{key}.log", "ab")  # noqa: SIM115 - owned by the child
        prefix = ["nsenter", f"--net=/run/netns/{ns}"] if nsenter else ["ip", "netns", "exec", ns]
        proc = subprocess.Popen([*prefix, *argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                                cwd=REPO)  # ``python -m lab.…`` children find the lab from there
        self.pids[key] = proc.pid
        self.save()

    def _wait(self, what: str, check: Any, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.3)
        raise RuntimeError(f"lab: {what} not ready after {timeout:.0f}s; see the logs in {self.path}")

    def start_etcd(self) -> None:
        d = self.path
        self._spawn("etcd", self.cp_ns, [
            self.bin("etcd"), "--data-dir", str(d / "etcd"), "--name", "lab",
            "--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
            "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "lab=http://127.0.0.1:2380", "--unsafe-no-fsync", "--log-level", "warn"])

    def start_apiserver(self) -> None:
        d = self.path
        self._spawn("kube-apiserver", self.cp_ns, [
            self.bin("kube-apiserver"), "--etcd-servers=http://127.0.0.1:2379",
            "--bind-address=0.0.0.0", f"--secure-port={API_PORT}", f"--advertise-address={CP_IP}",
            f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'ca.crt'}", f"--token-auth-file={d / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d / 'sa.key'}", f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR6}",
            # Real kubelets: the Node authorizer and NodeRestriction, as a kubeadm cluster has them,
            # and the ServiceAccount admission that mounts a pod's token. The stand-in kubelet
            # mounts nothing and acts as admin.
            *(["--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction"] if self.real_nodes
              else ["--authorization-mode=RBAC", "--disable-admission-plugins=ServiceAccount"]),
            "--allow-privileged=true", "--kubelet-preferred-address-types=InternalIP",
            "--enable-priority-and-fairness=false", "--profiling=false", "--v=1"])

    def api_ready(self) -> bool:
        return self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0

    def _control_plane(self) -> None:
        self.start_etcd()
        self._wait("etcd", lambda: "true" in ns_run(self.cp_ns, ["curl", "-s", "http://127.0.0.1:2379/health"]).stdout)
        self.start_apiserver()
        self._wait("kube-apiserver", self.api_ready, timeout=120)
        controllers = ["endpointslice-controller", "endpointslice-mirroring-controller"]
        if self.real_nodes:  # what Deployments, DaemonSets and pods with a ServiceAccount need
            controllers += ["deployment-controller", "replicaset-controller", "daemonset-controller",
                            "garbage-collector-controller", "serviceaccount-controller",
                            "root-ca-certificate-publisher-controller", "namespace-controller",
                            "pod-garbage-collector-controller",
                            # Kubernetes' own Service e2e specs (lab/e2especs.py) run their
                            # backends as ReplicationControllers and read Endpoints too.
                            "replicationcontroller-controller", "endpoints-controller",
                            # Lifts the not-ready taint a kubelet registers its Node with.
                            "node-lifecycle-controller"]
        self._spawn("kube-controller-manager", self.cp_ns, [
            self.bin("kube-controller-manager"), f"--kubeconfig={self.admin_kubeconfig}",
            f"--controllers={','.join(controllers)}", f"--root-ca-file={self.path / 'ca.crt'}",
            "--leader-elect=false", "--use-service-account-credentials=false",
            "--kube-api-qps=200", "--kube-api-burst=400", "--concurrent-service-endpoint-syncs=10",
            "--secure-port=0", "--v=1"])
        if self.real_nodes:
            self._spawn("kube-scheduler", self.cp_ns, [
                self.bin("kube-scheduler", node=True), f"--kubeconfig={self.admin_kubeconfig}",
                f"--authentication-kubeconfig={self.admin_kubeconfig}",
                f"--authorization-kubeconfig={self.admin_kubeconfig}", "--leader-elect=false", "--v=1"])

    def _register_nodes(self) -> None:
        # A zone per node: upstream's Traffic Distribution specs need three.
        for i in range(1, self.nodes + 1):
            self.register_node(self.node_name(i), labels={"kubernetes.io/hostname": self.node_name(i),
                                                          "topology.kubernetes.io/zone": zone(i, self.zones)},
                               addresses=(node_ip(i), node_ip6(i)), pod_cidrs=(pod_cidr(i), pod_cidr6(i)),
                               message="lab kubelet")

    def register_node(self, name: str, *, labels: dict[str, str], addresses: tuple[str, ...],
                      pod_cidrs: tuple[str, ...] = (), message: str) -> None:
        """Create or update a Node; without real kubelets, also its status (addresses, Ready)."""
        node: dict[str, Any] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
        if pod_cidrs:
            node["spec"] = {"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)}
        self.kubectl_apply([node])
        if self.real_nodes:
            return  # the kubelet reports its own status
        status = {"status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]
                             + [{"type": "Hostname", "address": name}],
                             "conditions": [{"type": "Ready", "status": "True",
                                             "reason": "KubeletReady", "message": message}]}}
        self.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))

    def _start_kubelet(self, i: int) -> None:
        if self.real_nodes:
            self._start_real_node(i)
            return
        self._spawn(f"kubelet-{i}", self.node_ns(i), [
            sys.executable, "-m", "lab.kubelet", "--kubeconfig", self.node_admin_kubeconfig,
            "--node", self.node_name(i), "--pod-cidr", f"{pod_cidr(i)},{pod_cidr6(i)}", "--state-dir", str(self.path / f"node-{i}")])

    def _start_real_node(self, i: int) -> None:
        node = self.real_node(i)
        node.write_config(kubeconfig=kubeconfig(
            server=f"https://{CP_IP}:{API_PORT}", ca=str(self.path / "ca.crt"), user=f"system:node:{node.name}",
            cert=str(self.path / f"{node.name}.crt"), key=str(self.path / f"{node.name}.key")))
        self._spawn(f"containerd-{i}", node.netns, node.containerd_argv(), nsenter=True, env=node.env())
        self._wait(f"containerd on {node.name}", lambda: os.path.exists(node.sock), timeout=30)
        for archive in self.images:
            node.import_image(Path(archive))
        self._spawn(f"kubelet-{i}", node.netns, node.kubelet_argv(), nsenter=True, env=node.env())

    def ready_nodes(self) -> int:
        out = self.kubectl("get", "nodes", "-o", "json", check=False).stdout or '{"items": []}'
        return sum(1 for n in json.loads(out)["items"] for c in n["status"].get("conditions") or []
                   if c["type"] == "Ready" and c["status"] == "True")

    # -- using it ------------------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = ns_run(self.cp_ns, [self.bin("kubectl"), f"--kubeconfig={self.admin_kubeconfig}", *args],
                      input=stdin)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return ns_run(self.cp_ns, [self.bin("helm"), "--kubeconfig", self.admin_kubeconfig, *args])

    def kubectl_apply(self, objects: list[dict[str, Any]]) -> None:
        self.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))

    def pod_pid(self, namespace: str, name: str, timeout: float = 30) -> int:
        """PID of a running pod's process (enter its network with nsenter -t PID -n)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for f in self.path.glob(f"node-*/pods/{namespace}_{name}.json"):
                return int(json.loads(f.read_text())["pid"])
            time.sleep(0.1)
        raise RuntimeError(f"pod {namespace}/{name} is not running")

    def stop(self, key: str, sig: int = signal.SIGTERM) -> None:
        pid = self.pids.pop(key, None)
        if pid is None:
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.save()

    def down(self) -> None:
        if self.real_nodes:
            for i in range(1, self.nodes + 1):  # no kubelet left to restart what is killed next
                self.stop(f"kubelet-{i}")
            for i in range(1, self.nodes + 1):
                self.real_node(i).kill_pods()
        for key in sorted(self.pids, key=lambda k: (k.startswith("etcd"), k.startswith("kube-apiserver"))):
            self.stop(key)
        if self.real_nodes:
            for i in range(1, self.nodes + 1):
                self.real_node(i).remove_leftovers()
        for ns in reversed(self.namespaces):
            try:
                netns.remove(ns)
            except OSError:
                pass
        self.namespaces.clear()
        shutil.rmtree(self.path, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "tag": self.tag, "nodes": self.nodes,
                "processes": {k: ("running" if _alive(p) else "dead") for k, p in self.pids.items()},
                "api": "ready" if self.api_ready() else "not ready"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def kubeconfig(*, server: str, ca: str, user: str, token: str = "", cert: str = "", key: str = "") -> str:
    """A kubeconfig that authenticates with a bearer ``token``, or a client ``cert`` and ``key``."""
    creds = {"token": token} if token else {"client-certificate": cert, "client-key": key}
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": user}}],
    }, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--name", default="lab")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--real-nodes", action="store_true",
                        help="containerd and the real kubelet on every node (builds them and the images "
                             "on first use); default: the lab's stand-in kubelet")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or sys.platform != "linux":
        print("lab: needs root on Linux (network namespaces); run it with sudo", file=sys.stderr)
        return 2
    if args.action == "up":
        lab = ClusterLab.up(name=args.name, nodes=args.nodes, owned=False, real_nodes=args.real_nodes)
        print(json.dumps(lab.status(), indent=1))
        print(f"kubectl: ip netns exec {lab.cp_ns} {lab.bin('kubectl')} --kubeconfig {lab.admin_kubeconfig} ...")
        return 0
    try:
        lab = ClusterLab.load(args.name)
    except FileNotFoundError as err:
        print(f"lab: {err}", file=sys.stderr)
        return 0 if args.action == "down" else 1
    if args.action == "down":
        lab.down()
        print(f"lab {args.name} is down")
    else:
        print(json.dumps(lab.status(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
