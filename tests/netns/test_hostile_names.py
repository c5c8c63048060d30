"""Names a tenant controls never break the node's ruleset (hardening issue, defects 1, 4, 5).

The longest names the API server accepts (namespace, Service and port name of 63 characters
each) on a Service that uses every chain with a comment (NodePort, external IP, LB IP with
source ranges, ClientIP affinity) are programmed in every mode and reached by real traffic.
Next to it, names the API server would refuse (a space, a quote, a line break carrying an
iptables-restore command, non-ASCII) are skipped as invalid objects: they must neither stop
the valid Services nor write anything outside our own table and chains.
"""

from __future__ import annotations

import pytest

from lab.netns import ns_exec
from tests import scenario as sc
from tests.netns.conftest import WEB_IP, WEB_NODEPORT, Programmed, base_objects

pytestmark = pytest.mark.netns

LONG_NS = "n" * 62 + "1"
LONG_NAME = "s" * 62 + "2"
LONG_PORT = "p" * 62 + "3"
LONG_IP, LONG_NODEPORT, LONG_EXT_IP = "10.96.0.40", 30090, "203.0.113.40"
LONG_LB_IP = "203.0.113.41"
BACKENDS = {"pod0", "pod1", "pod2"}
INJECTED = "x\n-I INPUT 1 -j ACCEPT\nCOMMIT\n*filter\n-F INPUT"


def _long_service(topo) -> list[dict]:  # type: ignore[no-untyped-def]
    svc = sc.service(LONG_NAME, LONG_IP, [sc.port(80, name=LONG_PORT, node_port=LONG_NODEPORT)],
                     namespace=LONG_NS, svc_type="LoadBalancer", affinity_timeout=30)
    svc["spec"]["externalIPs"] = [LONG_EXT_IP]
    svc["spec"]["loadBalancerSourceRanges"] = ["0.0.0.0/0"]
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": LONG_LB_IP}]}}
    sl = sc.endpoint_slice(LONG_NAME, [p.ip for p in topo.pods[:3]], [sc.port(8080, name=LONG_PORT)],
                           namespace=LONG_NS, suffix="x" * 189)  # a name of 253, the most
    return [svc, sl]


def _hostile() -> list[dict]:
    """Objects the API server refuses, each with a name that would escape its field."""
    out = []
    for i, (ns, name, port) in enumerate([
        ("test", "has space", "http"),
        ("test", 'quote"d', "http"),
        ("test", "bad-port", INJECTED),
        ("test", INJECTED, "http"),
        (INJECTED, "web", "http"),
        ("test", "caf\u00e9", "http"),
        ("test", "semi;colon}{", "http"),
    ]):
        ip = f"10.96.1.{i + 1}"
        out.append(sc.service(name, ip, [sc.port(80, name=port)], namespace=ns))
        sl = sc.endpoint_slice("web", ["10.244.0.250"], [sc.port(8080, name=port)], namespace=ns,
                               suffix=f"h{i}")
        sl["metadata"]["labels"]["kubernetes.io/service-name"] = name
        out.append(sl)
    return out


def _input_rules(topo, mode: str) -> str:  # type: ignore[no-untyped-def]
    if mode == "nftables" or mode == "userspace":
        return ns_exec(topo.node_ns, ["nft", "list", "ruleset"]).stdout
    backend = mode.split("-", 1)[1]
    return ns_exec(topo.node_ns, [f"iptables-{backend}-save", "-t", "filter"]).stdout


def test_longest_valid_names_are_programmed_and_hostile_ones_skipped(programmed: Programmed):
    topo = programmed.topo
    log = programmed.apply([*base_objects(topo), *_long_service(topo), *_hostile()])
    # Each hostile object is reported with the field that is wrong; the valid ones all work.
    for reason in ("metadata.name must be a DNS-1123", "metadata.namespace must be a DNS-1123",
                   "spec.ports[0].name must be a DNS-1123", "ports[0].name must be a DNS-1123",
                   "label kubernetes.io/service-name must be a DNS-1123"):
        assert reason in log, log

    client = topo.pod("pod3").ns
    probe = topo.probe(client, f"{LONG_IP}:80", count=20)
    assert probe.errors == {} and set(probe.pods) <= BACKENDS and probe.pods
    probe = topo.probe(topo.client_ns, f"{topo.node_ip}:{LONG_NODEPORT}", count=20)
    assert probe.errors == {} and probe.pods
    # The Services next to it are untouched.
    probe = topo.probe(client, f"{WEB_IP}:80", count=30)
    assert probe.errors == {} and set(probe.pods) == BACKENDS
    probe = topo.probe(topo.client_ns, f"{topo.node_ip}:{WEB_NODEPORT}", count=10)
    assert probe.errors == {}

    rules = _input_rules(topo, programmed.mode)
    assert "-A INPUT -j ACCEPT" not in rules and "INPUT 1" not in rules
    assert "10.96.1." not in rules  # no hostile Service was programmed at all
    if programmed.mode in ("nftables", "userspace"):
        # The kernel keeps the comments we wrote: none over its 128 characters, and the long
        # Service's own comment cut to fit.
        comments = [part.split('"', 1)[0] for part in rules.split('comment "')[1:]]
        assert comments and max(map(len, comments)) <= 128
        assert any(c.startswith(f"{LONG_NS}/s") and c.endswith("...") and len(c) == 128 for c in comments), comments
