"""`pyproxy explain` reads the model; these tests hold its answers against real traffic."""

from __future__ import annotations

import json

import pytest

from tests.netns.conftest import EMPTY_IP, NODE, SELF_IP, WEB_IP, WEB_NODEPORT, Programmed

pytestmark = pytest.mark.netns


def _explain(programmed: Programmed, packet: str, src: str) -> dict:
    proc = programmed.topo.pyproxy("explain", "--json", "--from", src, packet, "--source-file",
                                   str(programmed.path), "--hostname-override", NODE, "--cluster-cidr",
                                   programmed.topo.cluster_cidr, "--proxy-mode",
                                   "iptables" if programmed.mode.startswith("iptables") else "nftables")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", ["pod-to-clusterip", "external-to-nodeport", "hairpin", "no-endpoints"])
def test_explain_matches_traffic(programmed: Programmed, case: str):
    if programmed.userspace:
        pytest.skip("explain describes the kernel modes")
    topo = programmed.topo
    ip_of = {p.ip: p.name for p in topo.pods}
    if case == "pod-to-clusterip":
        src_ns, src, target = topo.pod("pod3").ns, topo.pod("pod3").ip, f"{WEB_IP}:80"
    elif case == "external-to-nodeport":
        src_ns, src, target = topo.client_ns, topo.client_ip, f"{topo.node_ip}:{WEB_NODEPORT}"
    elif case == "hairpin":
        src_ns, src, target = topo.pod("pod0").ns, topo.pod("pod0").ip, f"{SELF_IP}:80"
    else:
        src_ns, src, target = topo.pod("pod3").ns, topo.pod("pod3").ip, f"{EMPTY_IP}:80"
    said = _explain(programmed, f"{target}/tcp", src)
    probe = topo.probe(src_ns, target, count=45, timeout=2)
    if said["verdict"] == "reject":
        assert probe.errors == {"refused": 45}
        return
    assert said["verdict"] == "dnat" and probe.errors == {}
    predicted = {ip_of[c["endpoint"].split(":")[0]] for c in said["candidates"]}
    assert set(probe.pods) == predicted
    assert sum(c["probability"] for c in said["candidates"]) == pytest.approx(1.0)
    # Source NAT as predicted: the backend sees the node when masqueraded, the client otherwise
    # (hairpin: masqueraded exactly when the pod got itself).
    if said["masquerade"] or case == "hairpin":
        assert probe.seen_ips == {topo.bridge_ip}
    else:
        assert probe.seen_ips == {src}


@pytest.mark.parametrize("case", ["client-to-lb-local", "pod-to-lb-local", "denied-source", "external-ip"])
def test_explain_matches_external_traffic(kernel: Programmed, case: str):
    from tests.netns.test_external import EXT_IP, LB_IP, _objects

    topo = kernel.topo
    ip_of = {p.ip: p.name for p in topo.pods}
    allowed, denied = topo.client_sources[0], topo.client_sources[1]
    kernel.apply(_objects(topo, etp="Local", nodes=(NODE, "node-2", NODE), ranges=[f"{allowed}/32", topo.cluster_cidr]))
    src_ns, src, target = {
        "client-to-lb-local": (topo.client_ns, allowed, f"{LB_IP}:80"),
        "pod-to-lb-local": (topo.pod("pod3").ns, topo.pod("pod3").ip, f"{LB_IP}:80"),
        "denied-source": (topo.client_ns, denied, f"{LB_IP}:80"),
        "external-ip": (topo.client_ns, allowed, f"{EXT_IP}:80"),
    }[case]
    said = _explain(kernel, f"{target}/tcp", src)
    if said["verdict"] == "drop":
        assert case == "denied-source"
        assert topo.probe(src_ns, target, count=2, timeout=1, sources=[src] if src_ns == topo.client_ns else None
                          ).errors == {"timeout": 2}
        return
    probe = topo.probe(src_ns, target, count=45, sources=[src] if src_ns == topo.client_ns else None)
    assert said["verdict"] == "dnat" and probe.errors == {}
    assert set(probe.pods) == {ip_of[c["endpoint"].split(":")[0]] for c in said["candidates"]}
    assert probe.seen_ips == ({topo.bridge_ip} if said["masquerade"] else {src})
