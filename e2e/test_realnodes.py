"""pyproxy as users install it (issue 10): every lab node runs containerd and the real kubelet
v1.37.2, the chart's DaemonSet runs the image built here (non-privileged, NET_ADMIN only), the
backends are a Deployment on the CNI bridge with real readiness probes, the clients are pods
the scheduler placed. Then: curls from pods on every node, from the nodes and from outside; a
rolling update, a pod delete, a container kill and a mode switch while a client keeps
connecting (no connection may fail); helm uninstall and ``pyproxy cleanup`` leave no rules."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.harness import FIGURES, require_real_nodes
from lab.cluster import EXT_IP, ClusterLab, node_ip, ns_run
from lab.workloads import (NAMESPACE, SA_NAMESPACE, Prober, client_pod, cluster_ip, curl, echo_deployment, failures,
                           install_chart, pod_netns_pid, probe, proxy_pods, wait_for, wait_pods_running,
                           wait_ready_endpoints, wait_rolled_out)

NODES = 2
REPLICAS = 4


@pytest.fixture(scope="module")
def rlab() -> Iterator[ClusterLab]:
    require_real_nodes("real-node tests")
    t0 = time.monotonic()
    lab = ClusterLab.up(name=f"rn{os.getpid()}", nodes=NODES, real_nodes=True)
    FIGURES["real nodes: lab up (etcd to every node Ready)"] = f"{time.monotonic() - t0:.1f} s"
    try:
        lab.kubectl("create", "namespace", NAMESPACE)
        FIGURES["real nodes: helm install to DaemonSet Ready"] = f"{install_chart(lab):.1f} s"
        lab.kubectl_apply([echo_deployment("echo", REPLICAS), echo_deployment("solo", 1, node=lab.node_name(1)),
                           *(client_pod(f"client-{i}", lab.node_name(i)) for i in range(1, NODES + 1)),
                           _service("web", "echo", affinity=False), _service("sticky", "echo", affinity=True),
                           _service("local", "solo", local=True), _service("nobody", "nothing-matches"),
                           _service("web6", "echo", family="IPv6")])
        wait_pods_running(lab, "app=echo", REPLICAS)
        wait_pods_running(lab, "role=client", NODES)
        wait_ready_endpoints(lab, "web", REPLICAS)
        wait_ready_endpoints(lab, "local", 1)
        yield lab
        for i in range(1, NODES + 1):
            FIGURES[f"real nodes: node-{i} kubelet + containerd RSS"] = " + ".join(
                f"{_rss_mb(lab.pids[f'{k}-{i}']):.0f}" for k in ("kubelet", "containerd")) + " MB"
    finally:
        lab.down()


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _service(name: str, app: str, *, affinity: bool = False, local: bool = False,
             family: str | None = None) -> dict[str, Any]:
    # eTP Local: a LoadBalancer (no load balancer here: its NodePort and health check node port
    # are what the proxy serves; the API server allocates a health check port only for this type).
    kind = "LoadBalancer" if local else "NodePort" if name == "web" else "ClusterIP"
    spec: dict[str, Any] = {"selector": {"app": app}, "type": kind,
                            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 60}}
    if local:
        spec["externalTrafficPolicy"] = "Local"
    if family:
        spec["ipFamilies"], spec["ipFamilyPolicy"] = [family], "SingleStack"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def _pods(lab: ClusterLab, selector: str) -> list[dict[str, Any]]:
    return json.loads(lab.kubectl("-n", NAMESPACE, "get", "pods", "-l", selector, "-o", "json").stdout)["items"]


def _clients(lab: ClusterLab) -> list[tuple[dict[str, Any], int]]:
    return [(p, pod_netns_pid(lab, p)) for p in sorted(_pods(lab, "role=client"), key=lambda p: p["spec"]["nodeName"])]


def _node_port(lab: ClusterLab, svc: str) -> int:
    return int(lab.kubectl("-n", NAMESPACE, "get", "svc", svc, "-o", "jsonpath={.spec.ports[0].nodePort}").stdout)


@pytest.fixture(scope="module", params=["nftables", "iptables"])
def mode(request: pytest.FixtureRequest, rlab: ClusterLab) -> Iterator[str]:
    """The chart's proxyMode, switched with helm upgrade (a rolling update of the DaemonSet)
    while a client pod keeps connecting to a ClusterIP: not one connection may fail."""
    client, pid = _clients(rlab)[0]
    prober = Prober(pid, f"{cluster_ip(rlab, 'web')}:80", seconds=600)
    try:
        # iptables mode with localhost NodePorts: the chart's privileged init container also
        # sets route_localnet=1; pyproxy itself stays unprivileged.
        extra = ("--set", "config.localhostNodePorts=true") if request.param == "iptables" else ()
        took = install_chart(rlab, mode=request.param, extra=extra)
        FIGURES[f"real nodes: helm upgrade to {request.param}, rolled out"] = f"{took:.1f} s"
    finally:
        prober.proc.terminate()
    got = prober.result()
    FIGURES[f"real nodes: connections during the switch to {request.param} (failed)"] = \
        f"{len(got['answers'])} ({sum(failures(got).values())})"
    assert got["answers"] and not failures(got), f"switching to {request.param}: {failures(got)} {got['failures']}"
    yield request.param


def test_nodes_run_the_real_kubelet_and_containerd(rlab: ClusterLab) -> None:
    nodes = json.loads(rlab.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == [rlab.node_name(i) for i in range(1, NODES + 1)]
    for n in nodes:
        info = n["status"]["nodeInfo"]
        assert info["kubeletVersion"] == "v1.37.2" and info["containerRuntimeVersion"].startswith("containerd://2.")
        assert {"type": "Ready", "status": "True"}.items() <= {
            c["type"]: c for c in n["status"]["conditions"]}["Ready"].items()


def test_the_daemonset_runs_pyproxy_in_each_nodes_network_namespace_with_net_admin_only(
        rlab: ClusterLab, mode: str) -> None:
    ds = json.loads(rlab.kubectl("-n", SA_NAMESPACE, "get", "daemonset", "pyproxy", "-o", "json").stdout)["status"]
    assert ds["desiredNumberScheduled"] == ds["numberReady"] == ds["updatedNumberScheduled"] == NODES
    pods = proxy_pods(rlab)
    assert sorted(pods) == [rlab.node_name(i) for i in range(1, NODES + 1)]
    assert not rlab.kubectl("get", "pods", "-A", "-o", "name").stdout.count("kube-proxy")
    for i in range(1, NODES + 1):
        pod = pods[rlab.node_name(i)]
        pid = rlab.real_node(i).container_pid(pod["metadata"]["name"], SA_NAMESPACE, "pyproxy")
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{rlab.node_ns(i)}").st_ino
        status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
        want = 1 << 12 if mode == "nftables" else (1 << 12) | (1 << 13)  # NET_ADMIN (+ NET_RAW: iptables, auto backend)
        assert int(status["CapEff"], 16) == want
        # The rules of the chosen mode are in the node's namespace, the other mode's are gone.
        nft = ns_run(rlab.node_ns(i), ["nft", "list", "tables"]).stdout
        ipt = ns_run(rlab.node_ns(i), ["iptables-save", "-t", "nat"]).stdout
        if mode == "nftables":
            assert "table ip pyproxy" in nft and "PYPROXY-SERVICES" not in ipt
        else:
            assert "table ip pyproxy" not in nft and "PYPROXY-SERVICES" in ipt


def test_clusterip_from_pods_on_every_node(rlab: ClusterLab, mode: str) -> None:
    """Each client pod reaches the Service; several backends answer (random choice), on both
    nodes; each backend saw the client pod's own address (no masquerade inside the cluster)."""
    ip = cluster_ip(rlab, "web")
    backends_by_node = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in _pods(rlab, "app=echo")}
    for client, pid in _clients(rlab):
        got = probe(pid, f"{ip}:80", count=40)
        assert not failures(got), got["failures"]
        pods = {a[0] for a in got["answers"]}
        assert len(pods) >= 2 and pods <= set(backends_by_node)
        assert {backends_by_node[p] for p in pods} == {rlab.node_name(i) for i in range(1, NODES + 1)}
        assert {a[1] for a in got["answers"]} == {client["status"]["podIP"]}


def test_ipv6_clusterip_from_pods(rlab: ClusterLab, mode: str) -> None:
    """The CNI gives each pod an address of each family; an IPv6 Service is served by the
    ip6 table / ip6tables, and the backend sees the client pod's own IPv6 address."""
    ip = cluster_ip(rlab, "web6")
    assert ":" in ip
    for client, pid in _clients(rlab):
        got = probe(pid, f"[{ip}]:80", count=20)
        assert not failures(got), got["failures"]
        own6 = [a["ip"] for a in client["status"]["podIPs"] if ":" in a["ip"]]
        assert len({a[0] for a in got["answers"]}) >= 2 and {a[1] for a in got["answers"]} == set(own6)


def test_clusterip_from_the_nodes_and_nodeport_from_outside(rlab: ClusterLab, mode: str) -> None:
    ip, port = cluster_ip(rlab, "web"), _node_port(rlab, "web")
    for i in range(1, NODES + 1):
        assert curl(rlab, f"http://{ip}/", node=i).startswith("echo-")
        answer = curl(rlab, f"http://{node_ip(i)}:{port}/", ext=True).split()
        assert answer[0].startswith("echo-")
        assert answer[1] != EXT_IP  # eTP Cluster: masqueraded (the backend may be on the other node)


def test_init_container_sets_sysctls_and_localhost_nodeports_only_where_turned_on(rlab: ClusterLab, mode: str) -> None:
    """iptables mode with ``config.localhostNodePorts``: the init container (the only privileged
    one) set route_localnet=1 in the node's namespace and 127.0.0.1:NodePort answers from the
    node; nftables mode has no localhost NodePorts (as upstream): refused there. In both modes
    the init container set kube-proxy's conntrack timeouts in the node's namespace."""
    port = _node_port(rlab, "web")
    for i in range(1, NODES + 1):
        sysctl = ns_run(rlab.node_ns(i), ["cat", "/proc/sys/net/ipv4/conf/all/route_localnet"]).stdout.strip()
        answer = curl(rlab, f"http://127.0.0.1:{port}/", node=i, timeout=1)
        if mode == "iptables":
            assert sysctl == "1" and answer.startswith("echo-"), answer
        else:
            assert not answer.startswith("echo-"), answer
        timeouts = [ns_run(rlab.node_ns(i), ["cat", f"/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_{t}"]).stdout.strip()
                    for t in ("close_wait", "established")]
        assert timeouts == ["3600", "86400"], timeouts
    spec = proxy_pods(rlab)[rlab.node_name(1)]["spec"]
    assert [c["securityContext"].get("privileged") for c in spec["initContainers"]] == [True]
    assert spec["containers"][0]["securityContext"]["privileged"] is False


def test_client_ip_affinity_sticks(rlab: ClusterLab, mode: str) -> None:
    _, pid = _clients(rlab)[1]
    got = probe(pid, f"{cluster_ip(rlab, 'sticky')}:80", count=20)
    assert not failures(got) and len({a[0] for a in got["answers"]}) == 1


def test_external_traffic_policy_local_keeps_the_client_ip_and_answers_health_checks(
        rlab: ClusterLab, mode: str) -> None:
    """The only backend is on node-1: there the NodePort answers with the external client's own
    address and the health check node port says 200; node-2 has no local endpoint: 503, and
    its NodePort drops the traffic."""
    port = _node_port(rlab, "local")
    hc = int(rlab.kubectl("-n", NAMESPACE, "get", "svc", "local", "-o", "jsonpath={.spec.healthCheckNodePort}").stdout)
    assert curl(rlab, f"http://{node_ip(1)}:{port}/", ext=True).split()[1] == EXT_IP
    codes = {i: ns_run(rlab.ext_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
                                     f"http://{node_ip(i)}:{hc}/"]).stdout for i in (1, 2)}
    assert codes == {1: "200", 2: "503"}
    assert not curl(rlab, f"http://{node_ip(2)}:{port}/", ext=True, timeout=1).startswith("solo-")


def test_a_service_without_endpoints_is_refused_at_once(rlab: ClusterLab, mode: str) -> None:
    _, pid = _clients(rlab)[0]
    got = probe(pid, f"{cluster_ip(rlab, 'nobody')}:80", count=3, timeout=2)
    assert got["errors"] == {"refused": 3}


def test_scaling_the_deployment_reaches_the_rules(rlab: ClusterLab, mode: str) -> None:
    rlab.kubectl("-n", NAMESPACE, "scale", "deployment", "echo", "--replicas=2")
    try:
        wait_ready_endpoints(rlab, "web", 2)
        names = {p["metadata"]["name"] for p in _pods(rlab, "app=echo") if not p["metadata"].get("deletionTimestamp")}
        _, pid = _clients(rlab)[0]
        wait_for("only the 2 remaining backends answer",
                 lambda: {a[0] for a in probe(pid, f"{cluster_ip(rlab, 'web')}:80", count=20)["answers"]} <= names)
    finally:
        rlab.kubectl("-n", NAMESPACE, "scale", "deployment", "echo", f"--replicas={REPLICAS}")
        wait_ready_endpoints(rlab, "web", REPLICAS)


def test_deleting_and_killing_pyproxy_pods_drops_no_connection(rlab: ClusterLab, mode: str) -> None:
    """The rules stay in the kernel while pyproxy is away: a deleted pod comes back (a new pod
    from the DaemonSet), a container killed through the runtime (``ctr tasks kill``) comes
    back (the kubelet restarts it), and the
    client in a pod on that node sees no failure meanwhile."""
    client, pid = _clients(rlab)[0]
    node = client["spec"]["nodeName"]
    prober = Prober(pid, f"{cluster_ip(rlab, 'web')}:80", seconds=600)
    try:
        old = proxy_pods(rlab)[node]
        rlab.kubectl("-n", SA_NAMESPACE, "delete", "pod", old["metadata"]["name"], "--wait=true")
        wait_for("a new pyproxy pod on the node", lambda: proxy_pods(rlab).get(node, old)["metadata"]["uid"]
                 != old["metadata"]["uid"], timeout=60)
        wait_rolled_out(rlab)
        new = proxy_pods(rlab)[node]
        rlab.real_node(rlab.node_index(node)).kill_container(new["metadata"]["name"], SA_NAMESPACE, "pyproxy")
        wait_for("the kubelet restarted the killed container", lambda: _restarts(rlab, node) >= 1, timeout=60)
        wait_rolled_out(rlab)
        time.sleep(1)
    finally:
        prober.proc.terminate()
    got = prober.result()
    FIGURES[f"real nodes: connections during pod delete + container kill, {mode} (failed)"] = \
        f"{len(got['answers'])} ({sum(failures(got).values())})"
    assert len(got["answers"]) > 50 and not failures(got), got["failures"]


def _restarts(rlab: ClusterLab, node: str) -> int:
    pod = proxy_pods(rlab)[node]
    statuses = pod["status"].get("containerStatuses") or []
    return statuses[0]["restartCount"] if statuses and statuses[0].get("ready") else 0


def test_uninstall_then_cleanup_leaves_no_rules(rlab: ClusterLab) -> None:
    """Last (the module's final test): helm uninstall removes the DaemonSet, the rules stay
    (pyproxy never deletes them on exit), ``pyproxy cleanup`` on each node removes them all."""
    got = rlab.helm("uninstall", "pyproxy", "-n", SA_NAMESPACE, "--wait")
    assert got.returncode == 0, got.stderr
    wait_for("pyproxy's pods gone", lambda: not proxy_pods(rlab), timeout=60)
    for i in range(1, NODES + 1):
        ns = rlab.node_ns(i)
        rules = ns_run(ns, ["nft", "list", "ruleset"]).stdout
        assert "pyproxy" in rules.lower()  # still there: nothing is deleted on exit
        assert ns_run(ns, [sys.executable, "-m", "pyproxy", "cleanup"], cwd=os.getcwd()).returncode == 0
        rules = ns_run(ns, ["nft", "list", "ruleset"]).stdout
        assert "pyproxy" not in rules.lower(), rules
