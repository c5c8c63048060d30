"""External traffic with real packets: externalIPs, LoadBalancer IPs (``ipMode: Proxy`` left
alone), loadBalancerSourceRanges before DNAT, and externalTrafficPolicy: Local, in nftables
mode and iptables mode on both backends.

The client namespace routes 192.168.60.0/24 (external and LB IPs) to the node; a packet no
rule DNATs goes back to the client, which does not forward it, so it times out like a dropped
one. An answer names the pod and the source address it saw.
"""

from __future__ import annotations

from typing import Any

import pytest

from lab.netns import ns_exec
from tests import scenario as sc
from tests.netns.conftest import NODE, Programmed, base_objects

pytestmark = pytest.mark.netns

EXT_IP, LB_IP, PROXY_LB_IP = "192.168.60.10", "192.168.60.20", "192.168.60.21"
EXT_CIP, LB_CIP = "10.96.0.20", "10.96.0.21"
LB_NODEPORT = 30090
ALL = {"pod0", "pod1", "pod2"}


def _objects(topo, *, ranges: list[str] | None = None, etp: str = "Cluster",
             nodes: tuple[str, str, str] = (NODE, NODE, NODE)) -> list[dict[str, Any]]:
    backends = [p.ip for p in topo.pods[:3]]
    tcp = [sc.port(8080, name="http")]
    ext = sc.service("ext", EXT_CIP, [sc.port(80, name="http")])
    ext["spec"]["externalIPs"] = [EXT_IP]
    lb = sc.service("lb", LB_CIP, [sc.port(80, name="http", node_port=LB_NODEPORT)], svc_type="LoadBalancer")
    lb["spec"]["externalTrafficPolicy"] = etp
    if ranges is not None:
        lb["spec"]["loadBalancerSourceRanges"] = ranges
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP, "ipMode": "VIP"},
                                                 {"ip": PROXY_LB_IP, "ipMode": "Proxy"}]}}
    lb_slice = sc.endpoint_slice("lb", backends, tcp)
    for ep, node in zip(lb_slice["endpoints"], nodes):
        ep["nodeName"] = node
    return [*base_objects(topo), ext, sc.endpoint_slice("ext", backends, tcp), lb, lb_slice]


@pytest.fixture
def external(kernel: Programmed) -> Programmed:
    """Kernel modes only: userspace mode proxies ClusterIPs and NodePorts (README)."""
    return kernel


def test_external_ip_and_lb_ip_reach_every_backend_masqueraded(external: Programmed):
    topo = external.topo
    external.apply(_objects(topo))
    for target in (EXT_IP, LB_IP):
        probe = topo.probe(topo.client_ns, f"{target}:80", count=45)
        assert probe.errors == {} and set(probe.pods) == ALL, (target, probe)
        # externalTrafficPolicy: Cluster: masqueraded to the node's address on the pod bridge.
        assert probe.seen_ips == {topo.bridge_ip}, (target, probe.seen_ips)
    # ipMode: Proxy: the load balancer proxies, so no rule matches its IP here.
    unmatched = topo.probe(topo.client_ns, f"{PROXY_LB_IP}:80", count=2, timeout=1)
    assert unmatched.errors == {"timeout": 2}
    # A port the Service does not declare is not forwarded either.
    assert topo.probe(topo.client_ns, f"{EXT_IP}:81", count=1, timeout=1).errors == {"timeout": 1}


def test_external_ip_without_endpoints_is_refused(external: Programmed):
    topo = external.topo
    objects = [o for o in _objects(topo) if o["metadata"]["name"] != "ext-a"]
    external.apply(objects)
    assert topo.probe(topo.client_ns, f"{EXT_IP}:80", count=3).errors == {"refused": 3}


def test_source_ranges_filter_the_lb_ip_only(external: Programmed):
    topo = external.topo
    allowed, denied = topo.client_sources[0], topo.client_sources[1]
    external.apply(_objects(topo, ranges=[f"{allowed}/32"]))
    ok = topo.probe(topo.client_ns, f"{LB_IP}:80", count=30, sources=[allowed])
    assert ok.errors == {} and set(ok.pods) == ALL
    dropped = topo.probe(topo.client_ns, f"{LB_IP}:80", count=2, sources=[denied], timeout=1)
    assert dropped.errors == {"timeout": 2}
    # Pods are subject to the ranges too.
    from_pod = topo.probe(topo.pod("pod3").ns, f"{LB_IP}:80", count=2, timeout=1)
    assert from_pod.errors == {"timeout": 2}
    # NodePorts and the ClusterIP bypass them.
    nodeport = topo.probe(topo.client_ns, f"{topo.node_ip}:{LB_NODEPORT}", count=6, sources=[denied])
    assert nodeport.errors == {}
    assert topo.probe(topo.pod("pod3").ns, f"{LB_CIP}:80", count=6).errors == {}


def test_source_ranges_of_a_port_without_endpoints(external: Programmed):
    # No endpoints: an allowed source is refused at once in every mode (pyproxy's iptables
    # firewall used to drop it; found by the differential test, seed 105). A source outside
    # the ranges is dropped by nftables mode and refused by iptables mode, as upstream's two
    # modes do (its iptables proxier writes no firewall for a port without endpoints).
    topo = external.topo
    allowed = topo.client_sources[0]
    objects = [o for o in _objects(topo, ranges=[f"{allowed}/32"]) if o["metadata"]["name"] != "lb-a"]
    external.apply(objects)
    ok = topo.probe(topo.client_ns, f"{LB_IP}:80", count=3, sources=[allowed])
    assert ok.errors == {"refused": 3}, ok
    outside = topo.probe(topo.pod("pod3").ns, f"{LB_IP}:80", count=2, timeout=1)
    assert outside.errors == ({"timeout": 2} if external.mode == "nftables" else {"refused": 2}), outside


def test_source_range_with_the_node_ip_admits_the_lb_ip_as_source(external: Programmed):
    topo = external.topo
    # The node holds the LB IP (as with an L2 announcement), so the node's own connections to
    # it leave with the LB IP as their source address.
    ns_exec(topo.node_ns, ["ip", "addr", "add", f"{LB_IP}/32", "dev", "lo"])
    try:
        external.apply(_objects(topo, ranges=[f"{topo.client_sources[0]}/32"]))
        assert topo.probe(topo.node_ns, f"{LB_IP}:80", count=2, timeout=1).errors == {"timeout": 2}
        external.apply(_objects(topo, ranges=[f"{topo.node_ip}/32"]))
        probe = topo.probe(topo.node_ns, f"{LB_IP}:80", count=12)
        assert probe.errors == {} and set(probe.pods) <= ALL
        # Only the node: an outside client stays out.
        outside = topo.probe(topo.client_ns, f"{LB_IP}:80", count=2, timeout=1,
                             sources=[topo.client_sources[0]])
        assert outside.errors == {"timeout": 2}
    finally:
        ns_exec(topo.node_ns, ["ip", "addr", "del", f"{LB_IP}/32", "dev", "lo"])


def test_external_traffic_policy_local(external: Programmed):
    topo = external.topo
    # pod0 and pod1 on this node, pod2 elsewhere.
    external.apply(_objects(topo, etp="Local", nodes=(NODE, NODE, "node-2")))
    for target in (LB_IP + ":80", f"{topo.node_ip}:{LB_NODEPORT}"):
        probe = topo.probe(topo.client_ns, target, count=40)
        assert probe.errors == {} and set(probe.pods) == {"pod0", "pod1"}, (target, probe)
        # The client's own address reaches the pod: no masquerade.
        assert probe.seen_ips == {topo.client_ip}, (target, probe.seen_ips)
    # A pod going to the LB IP is short-circuited to every endpoint, keeping its address.
    pod3 = topo.pod("pod3")
    from_pod = topo.probe(pod3.ns, f"{LB_IP}:80", count=45)
    assert from_pod.errors == {} and set(from_pod.pods) == ALL and from_pod.seen_ips == {pod3.ip}
    # The node itself: every endpoint, masqueraded.
    from_node = topo.probe(topo.node_ns, f"{topo.node_ip}:{LB_NODEPORT}", count=45)
    assert from_node.errors == {} and set(from_node.pods) == ALL
    assert topo.client_ip not in from_node.seen_ips

    # No endpoint on this node: external clients are dropped; pods still get through.
    external.apply(_objects(topo, etp="Local", nodes=("node-2", "node-2", "node-3")))
    for target in (LB_IP + ":80", f"{topo.node_ip}:{LB_NODEPORT}"):
        assert topo.probe(topo.client_ns, target, count=2, timeout=1).errors == {"timeout": 2}, target
    again = topo.probe(pod3.ns, f"{LB_IP}:80", count=12)
    assert again.errors == {} and set(again.pods) <= ALL


def test_external_traffic_policy_local_on_a_cluster_ip_service_with_external_ips(external: Programmed):
    # A ClusterIP Service with externalIPs is reachable from outside, so its
    # externalTrafficPolicy applies, as upstream's ExternallyAccessible says (found by the
    # differential test: pyproxy used to treat it as Cluster). pod0 is local, pod1 and pod2 not.
    topo = external.topo
    objects = _objects(topo)
    ext = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "ext")
    ext["spec"]["externalTrafficPolicy"] = "Local"
    ext_slice = next(o for o in objects if o["kind"] == "EndpointSlice" and o["metadata"]["name"] == "ext-a")
    for ep, node in zip(ext_slice["endpoints"], (NODE, "node-2", "node-2")):
        ep["nodeName"] = node
    external.apply(objects)
    probe = topo.probe(topo.client_ns, f"{EXT_IP}:80", count=20)
    assert probe.errors == {} and set(probe.pods) == {"pod0"} and probe.seen_ips == {topo.client_ip}, probe
    # A pod is short-circuited to every endpoint with its own address.
    pod3 = topo.pod("pod3")
    from_pod = topo.probe(pod3.ns, f"{EXT_IP}:80", count=45)
    assert from_pod.errors == {} and set(from_pod.pods) == ALL and from_pod.seen_ips == {pod3.ip}
    # No local endpoint: external clients are dropped; the ClusterIP still serves everyone.
    for ep in ext_slice["endpoints"]:
        ep["nodeName"] = "node-2"
    external.apply(objects)
    assert topo.probe(topo.client_ns, f"{EXT_IP}:80", count=2, timeout=1).errors == {"timeout": 2}
    assert topo.probe(pod3.ns, f"{EXT_CIP}:80", count=12).errors == {}


HC_PORT = 32100
FETCH = """
import json, sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=5)
except urllib.error.HTTPError as err:
    r = err
print(json.dumps({"status": r.status, "headers": dict(r.headers), "body": json.loads(r.read())}))
"""


def _health_check(topo) -> dict[str, Any]:
    import json
    import sys

    proc = ns_exec(topo.client_ns, [sys.executable, "-c", FETCH, f"http://{topo.node_ip}:{HC_PORT}/"])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_health_check_node_port(external: Programmed):
    topo = external.topo
    external.background = True  # the listener lives in the running pyproxy

    def objects(nodes, conditions=None):
        objs = _objects(topo, etp="Local", nodes=nodes)
        for obj in objs:
            if obj["metadata"]["name"] == "lb":
                obj["spec"]["healthCheckNodePort"] = HC_PORT
            if obj["metadata"]["name"] == "lb-a" and conditions:
                for ep, cond in zip(obj["endpoints"], conditions):
                    ep["conditions"] = cond
        return objs

    external.apply(objects((NODE, NODE, "node-2")))
    got = _health_check(topo)
    assert got["status"] == 200
    assert got["body"] == {"service": {"namespace": "test", "name": "lb"}, "localEndpoints": 2,
                           "serviceProxyHealthy": True}
    assert got["headers"]["Content-Type"] == "application/json"
    assert got["headers"]["X-Content-Type-Options"] == "nosniff"
    assert got["headers"]["X-Load-Balancing-Endpoint-Weight"] == "2"
    # A terminating endpoint no longer counts, even while it still serves.
    terminating = {"ready": False, "serving": True, "terminating": True}
    external.apply(objects((NODE, NODE, "node-2"), [{"ready": True}, terminating, {"ready": True}]))
    assert _health_check(topo)["body"]["localEndpoints"] == 1
    # Nothing local: 503, so the load balancer stops sending this node traffic.
    external.apply(objects(("node-2", "node-2", "node-3")))
    got = _health_check(topo)
    assert got["status"] == 503 and got["body"]["localEndpoints"] == 0
    assert got["headers"]["X-Load-Balancing-Endpoint-Weight"] == "0"
    # Back to Cluster policy: the listener goes away.
    external.apply(_objects(topo, etp="Cluster"))
    refused = topo.probe(topo.client_ns, f"{topo.node_ip}:{HC_PORT}", count=1)
    assert refused.errors == {"refused": 1}
