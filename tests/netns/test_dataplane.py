"""Real rules, real packets: every test runs in nftables mode and in iptables mode on both the
nft and legacy backends (the ``programmed`` fixture), inside the namespaces of ``topo``."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.netns.conftest import (
    AFFINITY_TIMEOUT,
    DNS_IP,
    EMPTY_IP,
    EMPTY_NODEPORT,
    SELF_IP,
    STICKY_IP,
    WEB_IP,
    WEB_NODEPORT,
    Programmed,
    base_objects,
)
from tests import scenario as sc
from tests.stats import chi_square_uniform

pytestmark = pytest.mark.netns

BACKENDS = ["pod0", "pod1", "pod2"]
SAMPLES = 900
"""300 expected per backend. A fair split gives p > 1e-5 except once in 100,000 runs (the suite
runs this test in four modes, so p > 0.001 with 450 samples failed a CI run now and then: it
did once, at p = 0.00084). It still catches the classic bug of a 1/n probability on every rule of
the iptables chain instead of 1/(n-i) (a 1/3, 2/9, 4/9 split): chi2 about 67, p about 3e-15."""
P_MIN = 1e-5


def test_clusterip_spreads_uniformly_and_keeps_pod_source(programmed: Programmed):
    topo = programmed.topo
    client = topo.pod("pod3")
    probe = topo.probe(client.ns, f"{WEB_IP}:80", count=SAMPLES)
    assert probe.errors == {}
    counts = Counter(probe.pods)
    assert set(counts) == set(BACKENDS), counts
    stat, p = chi_square_uniform(counts, BACKENDS)
    assert p > P_MIN, f"split {dict(counts)} is not uniform (chi2={stat:.1f}, p={p:.2g})"
    # Pod to ClusterIP inside the cluster CIDR: no NAT of the source (Kubernetes network model);
    # the userspace mode cannot keep it: its relay makes the connection to the backend.
    assert probe.seen_ips == ({topo.bridge_ip} if programmed.userspace else {client.ip})


def test_udp_clusterip_reaches_every_backend(programmed: Programmed):
    topo = programmed.topo
    client = topo.pod("pod3")
    probe = topo.probe(client.ns, f"{DNS_IP}:53", proto="udp", count=60)
    assert probe.errors == {}
    assert set(probe.pods) == set(BACKENDS)
    assert probe.seen_ips == ({topo.bridge_ip} if programmed.userspace else {client.ip})


def test_nodeport_from_external_client_is_masqueraded(programmed: Programmed):
    topo = programmed.topo
    probe = topo.probe(topo.client_ns, f"{topo.node_ip}:{WEB_NODEPORT}", count=60)
    assert probe.errors == {}
    assert set(probe.pods) == set(BACKENDS)
    # NodePort traffic is masqueraded: backends see the node (its address on the pod bridge),
    # so replies return through the node that did the DNAT.
    assert probe.seen_ips == {topo.bridge_ip}


def test_clusterip_from_outside_cluster_cidr_is_masqueraded(programmed: Programmed):
    topo = programmed.topo
    from_client = topo.probe(topo.client_ns, f"{WEB_IP}:80", count=30)
    from_node = topo.probe(topo.node_ns, f"{WEB_IP}:80", count=30)
    for probe in (from_client, from_node):
        assert probe.errors == {}
        assert set(probe.pods) == set(BACKENDS)
        assert probe.seen_ips == {topo.bridge_ip}


def test_masquerade_all_masquerades_pod_traffic_too(programmed: Programmed):
    topo = programmed.topo
    programmed.apply(base_objects(topo), "--masquerade-all")
    probe = topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=20)
    assert probe.errors == {}
    assert probe.seen_ips == {topo.bridge_ip}


def test_hairpin_pod_reaches_itself_through_its_service(programmed: Programmed):
    topo = programmed.topo
    probe = topo.probe(topo.pod("pod0").ns, f"{SELF_IP}:80", count=10)
    assert probe.errors == {}
    assert set(probe.pods) == {"pod0"}
    # Without the hairpin masquerade the pod would answer itself directly and drop the reply.
    assert probe.seen_ips == {topo.bridge_ip}


@pytest.fixture
def node_listener(programmed: Programmed) -> Iterator[Programmed]:
    """An echo on the node itself, TCP and UDP, on the empty Service's NodePort: if pyproxy's
    reject rule were missing, that listener would answer (without it, nothing listens and the
    kernel refuses by itself: such a check cannot fail)."""
    topo = programmed.topo
    proc = subprocess.Popen(["ip", "netns", "exec", topo.node_ns, sys.executable, "-m", "lab.echo",
                             "--name", "node-listener", "--port", str(EMPTY_NODEPORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):  # up when it answers on an address that takes no NodePorts
            if topo.probe(topo.pod("pod3").ns, f"{topo.bridge_ip}:{EMPTY_NODEPORT}", timeout=0.5).pods:
                break
            time.sleep(0.1)
        yield programmed
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_service_without_endpoints_refuses_at_once(node_listener: Programmed):
    programmed = node_listener
    topo = programmed.topo
    objects = base_objects(topo)
    for obj in objects:
        if obj["metadata"]["name"] == "empty":  # its UDP port gets the same NodePort number
            obj["spec"]["ports"][1]["nodePort"] = EMPTY_NODEPORT
    programmed.apply(objects)
    client = topo.pod("pod3").ns
    tcp = topo.probe(client, f"{EMPTY_IP}:80", count=5, timeout=3)
    udp = topo.probe(client, f"{EMPTY_IP}:80", proto="udp", count=5, timeout=3)
    nodeport = topo.probe(topo.client_ns, f"{topo.node_ip}:{EMPTY_NODEPORT}", count=5, timeout=3)
    udp_nodeport = topo.probe(topo.client_ns, f"{topo.node_ip}:{EMPTY_NODEPORT}", proto="udp", count=5, timeout=3)
    for probe in (tcp, udp, nodeport, udp_nodeport):
        assert probe.errors == {"refused": 5}, probe
        # Refused by a REJECT rule, not a timeout: well under the 3 s probe timeout.
        assert max(probe.durations) < 0.5
    # The listener is there, and answers where the NodePort does not apply.
    for proto in ("tcp", "udp"):
        control = topo.probe(client, f"{topo.bridge_ip}:{EMPTY_NODEPORT}", proto=proto, count=2)
        assert control.pods == ["node-listener"] * 2


def test_wrong_port_on_clusterip(programmed: Programmed):
    """nftables layout (and the userspace mode, which uses it): a port the ClusterIP does not
    serve is refused at once. iptables mode, as upstream's, lets it pass un-NATed: no backend
    answers it."""
    topo = programmed.topo
    probe = topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:81", count=2, timeout=1)
    assert probe.answers == []
    if programmed.mode in ("nftables", "userspace"):
        assert probe.errors == {"refused": 2} and max(probe.durations) < 0.5, probe
    else:
        assert "refused" not in probe.errors, probe


def test_client_ip_affinity_pins_then_expires(programmed: Programmed):
    topo = programmed.topo
    sources = topo.client_sources
    first: dict[str, str] = {}
    for src in sources:
        probe = topo.probe(topo.client_ns, f"{STICKY_IP}:80", count=6, sources=[src])
        assert probe.errors == {}
        assert len(set(probe.pods)) == 1, f"{src} was not pinned: {probe.pods}"
        first[src] = probe.pods[0]
    # Twelve independent first choices: all equal with probability 3 * 3^-12.
    assert len(set(first.values())) > 1, first
    time.sleep(AFFINITY_TIMEOUT + 1.5)
    if programmed.userspace:
        # Round-robin, not random: twelve sources would land where they did before. One more
        # client takes a turn first, so every source that is no longer pinned moves.
        assert topo.probe(topo.client_ns, f"{STICKY_IP}:80", count=1).errors == {}
    after = {
        src: topo.probe(topo.client_ns, f"{STICKY_IP}:80", count=1, sources=[src]).pods[0]
        for src in sources
    }
    # Once expired each source picks at random again: all twelve keep their backend with
    # probability 3^-12 if affinity really expired, and always if it did not.
    assert any(after[s] != first[s] for s in sources), (first, after)


def test_userspace_retries_a_refusing_backend(programmed: Programmed):
    """The one thing the userspace mode does that the kernel modes cannot: a backend that refuses
    the connection is skipped and the next one tried, so clients never see the failure."""
    topo = programmed.topo
    objects = base_objects(topo)
    for obj in objects:
        if obj["metadata"]["name"] == "web-a":
            # pod1 answers on 8080 only: its endpoint on 9999 refuses every connection.
            obj["ports"] = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    objects.append(sc.endpoint_slice("web", [topo.pod("pod1").ip], [sc.port(9999, name="http")], suffix="b"))
    programmed.apply(objects)
    probe = topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=60)
    if programmed.userspace:
        assert probe.errors == {}
        assert set(probe.pods) == {"pod0", "pod1", "pod2"}
    else:
        # The kernel picks an endpoint before any packet reaches it: about 1 in 4 is refused.
        assert probe.errors.get("refused", 0) > 0


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        # pod0 ready, pod1 terminating but serving: only the ready one gets new connections.
        ([{"ready": True}, {"ready": False, "serving": True, "terminating": True}], {"pod0"}),
        # None ready: fall back to the serving, terminating ones (a rolling update's last pod).
        ([{"ready": False, "serving": True, "terminating": True}] * 2, {"pod0", "pod1"}),
        # Not serving at all: never used; the service has no usable endpoint and refuses.
        ([{"ready": False, "serving": False, "terminating": True}] * 2, set()),
    ],
    ids=["ready-first", "terminating-fallback", "not-serving-refused"],
)
def test_terminating_endpoints(programmed: Programmed, conditions, expected):
    topo = programmed.topo
    objects = base_objects(topo)
    for obj in objects:
        if obj["metadata"]["name"] == "web-a":
            obj["endpoints"] = [{"addresses": [topo.pod(f"pod{i}").ip], "conditions": c}
                                for i, c in enumerate(conditions)]
    programmed.apply(objects)
    probe = topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=40, timeout=2)
    if expected:
        assert probe.errors == {} and set(probe.pods) == expected
    else:
        assert probe.errors == {"refused": 40}


def _itp_local_objects(topo, nodes: list[str]) -> list[dict]:
    """The web Service with internalTrafficPolicy: Local; pod0..2 reported on ``nodes``."""
    objects = base_objects(topo)
    for obj in objects:
        if obj["metadata"]["name"] == "web":
            obj["spec"]["internalTrafficPolicy"] = "Local"
        if obj["metadata"]["name"] == "web-a":
            for ep, node in zip(obj["endpoints"], nodes):
                ep["nodeName"] = node
    return objects


def test_internal_traffic_policy_local(programmed: Programmed):
    if programmed.userspace:
        pytest.skip("internalTrafficPolicy is a kernel-mode feature here (README)")
    topo = programmed.topo
    # pod0 and pod1 run on this node (node-1), pod2 elsewhere.
    programmed.apply(_itp_local_objects(topo, ["node-1", "node-1", "node-2"]))
    client = topo.pod("pod3").ns
    probe = topo.probe(client, f"{WEB_IP}:80", count=60)
    assert probe.errors == {} and set(probe.pods) == {"pod0", "pod1"}
    # NodePorts are external traffic: the policy does not apply, every endpoint is used.
    nodeport = topo.probe(topo.client_ns, f"{topo.node_ip}:{WEB_NODEPORT}", count=60)
    assert nodeport.errors == {} and set(nodeport.pods) == {"pod0", "pod1", "pod2"}
    # Nothing on this node: ClusterIP traffic is dropped (a timeout), not refused.
    programmed.apply(_itp_local_objects(topo, ["node-2", "node-2", "node-3"]))
    dropped = topo.probe(client, f"{WEB_IP}:80", count=2, timeout=1)
    assert dropped.errors == {"timeout": 2}


def test_nodeport_addresses_primary(programmed: Programmed):
    topo = programmed.topo
    objects = base_objects(topo)
    for obj in objects:
        if obj["kind"] == "Node":  # the node reports its bridge address too
            obj["status"]["addresses"].append({"type": "InternalIP", "address": topo.bridge_ip})
    client = topo.pod("pod3").ns
    programmed.apply(objects)
    assert topo.probe(client, f"{topo.bridge_ip}:{WEB_NODEPORT}", count=3).errors == {}
    programmed.apply(objects, "--nodeport-addresses", "primary")
    assert topo.probe(client, f"{topo.node_ip}:{WEB_NODEPORT}", count=3).errors == {}
    # The second address no longer takes NodePorts: nothing listens there, the kernel refuses.
    assert topo.probe(client, f"{topo.bridge_ip}:{WEB_NODEPORT}", count=3).errors == {"refused": 3}
