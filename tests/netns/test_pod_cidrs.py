"""Several --cluster-cidr: the pod network is a comparison per CIDR in one shared chain
(``mark-for-masquerade-unless-pod``), real traffic decides by it: a pod in any of the CIDRs
keeps its address, a source outside them is masqueraded (real kernel, real packets)."""

from __future__ import annotations

import pytest

from lab.netns import Topology, ns_exec
from pyproxy.config import ProxyConfig
from pyproxy.model.state import StateBuilder
from pyproxy.nft.executor import NftCli
from pyproxy.proxier.nftables import NftProxier
from tests.netns.conftest import WEB_IP, base_objects

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("pods_in", ["first", "second"])
def test_several_pod_cidrs_keep_pod_sources_and_masquerade_the_rest(topo: Topology, pods_in: str) -> None:
    # The lab's pods are in topo.cluster_cidr; it is listed first or second of three.
    others = ["172.16.0.0/12", "10.250.0.0/16"]
    cidrs = (topo.cluster_cidr, *others) if pods_in == "first" else (others[0], topo.cluster_cidr, others[1])
    assert topo.pyproxy("cleanup").returncode == 0
    proxier = NftProxier(config=ProxyConfig(hostname="node-1", cluster_cidrs=cidrs), executor=NftCli(netns=topo.node_ns))
    builder = StateBuilder(node_name="node-1")
    builder.replace_all(base_objects(topo))
    try:
        proxier.sync(builder.build(nodeport_ips=(topo.node_ip,)))
        listing = ns_exec(topo.node_ns, ["nft", "list", "chain", "ip", "pyproxy",
                                          "mark-for-masquerade-unless-pod"]).stdout
        assert all(f"ip saddr {c} return" in listing for c in cidrs), listing
        pod3 = topo.pod("pod3")
        # A pod inside one of the CIDRs keeps its address (a comparison that matched nothing
        # would masquerade it to the bridge address).
        inside = topo.probe(pod3.ns, f"{WEB_IP}:80", count=20)
        assert inside.errors == {} and inside.seen_ips == {pod3.ip}
        # The external client is outside every CIDR: masqueraded to the node's bridge address (a
        # comparison that matched everything would let the backend see the client's own address).
        outside = topo.probe(topo.client_ns, f"{WEB_IP}:80", count=20)
        assert outside.errors == {} and outside.seen_ips == {topo.bridge_ip}
    finally:
        assert topo.pyproxy("cleanup").returncode == 0
