"""Dual-stack with real packets: IPv6 Services through ``ip6 pyproxy`` / ip6tables, dual-stack
Services reachable on both families, and each family programmed on its own, so a family the
kernel refuses does not take the other down."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from tests import scenario as sc
from tests.netns.conftest import NODE, Programmed, base_objects, mode_flags

pytestmark = pytest.mark.netns

DS_IP, DS_IP6, V6_ONLY_IP6, EMPTY_IP6 = "10.96.0.40", "fd00:96::40", "fd00:96::41", "fd00:96::42"
DS_NODEPORT = 30140
ALL = {"pod0", "pod1", "pod2"}


def _objects(topo) -> list[dict]:
    tcp = [sc.port(8080, name="http")]
    udp = [sc.port(8080, name="dns", protocol="UDP")]
    objects = base_objects(topo)
    for obj in objects:
        if obj["kind"] == "Node":
            obj["status"]["addresses"].append({"type": "InternalIP", "address": topo.node_ip6})
    ds = sc.service("ds", DS_IP, [sc.port(80, name="http", node_port=DS_NODEPORT),
                                  sc.port(53, name="dns", protocol="UDP")], svc_type="NodePort")
    ds["spec"]["clusterIPs"] = [DS_IP, DS_IP6]
    ds["spec"]["ipFamilies"] = ["IPv4", "IPv6"]
    v4 = sc.endpoint_slice("ds", [p.ip for p in topo.pods[:3]], [*tcp, *udp], suffix="v4")
    v6 = sc.endpoint_slice("ds", [p.ip6 for p in topo.pods[:3]], [*tcp, *udp], suffix="v6")
    v6["addressType"] = "IPv6"
    only6 = sc.service("only6", V6_ONLY_IP6, [sc.port(80, name="http")])
    only6_slice = sc.endpoint_slice("only6", [topo.pods[0].ip6], tcp)
    only6_slice["addressType"] = "IPv6"
    empty6 = sc.service("empty6", EMPTY_IP6, [sc.port(80, name="http")])
    return [*objects, ds, v4, v6, only6, only6_slice, empty6]


def _flags(topo) -> list[str]:
    return ["--cluster-cidr", f"{topo.cluster_cidr},{topo.cluster_cidr6}"]


def test_ipv6_and_dual_stack_services(kernel: Programmed):
    topo = kernel.topo
    kernel.apply(_objects(topo), *_flags(topo))
    pod3 = topo.pod("pod3")
    for target, source in ((f"[{DS_IP6}]:80", pod3.ip6), (f"{DS_IP}:80", pod3.ip)):
        probe = topo.probe(pod3.ns, target, count=45)
        assert probe.errors == {} and set(probe.pods) == ALL, (target, probe)
        assert probe.seen_ips == {source}  # pod traffic keeps its address in both families
    udp = topo.probe(pod3.ns, f"[{DS_IP6}]:53", proto="udp", count=30)
    assert udp.errors == {} and set(udp.pods) == ALL
    only = topo.probe(pod3.ns, f"[{V6_ONLY_IP6}]:80", count=6)
    assert only.errors == {} and set(only.pods) == {"pod0"}
    assert topo.probe(pod3.ns, f"[{EMPTY_IP6}]:80", count=3).errors == {"refused": 3}
    # An IPv6 NodePort from outside is masqueraded to the node's bridge address.
    nodeport = topo.probe(topo.client_ns, f"[{topo.node_ip6}]:{DS_NODEPORT}", count=30)
    assert nodeport.errors == {} and set(nodeport.pods) == ALL
    assert nodeport.seen_ips == {topo.bridge_ip6}
    # The external client reaches the IPv6 ClusterIP through the node: masqueraded too.
    outside = topo.probe(topo.client_ns, f"[{DS_IP6}]:80", count=6)
    assert outside.errors == {} and outside.seen_ips == {topo.bridge_ip6}


def _failing_ipv6_path(tmp_path: Path, mode: str) -> str:
    """A PATH whose IPv6 tool refuses everything, the IPv4 one untouched: nft gets a wrapper
    that fails any script touching ``ip6 pyproxy``; ip6tables-*-restore always fails."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if mode == "nftables":
        real = shutil.which("nft")
        script = (f'#!/bin/sh\nin=$(mktemp); cat > "$in"\n'
                  f'if grep -q "ip6 pyproxy" "$in"; then rm -f "$in"; echo "refused for the test" >&2; exit 1; fi\n'
                  f'{real} "$@" < "$in"; rc=$?; rm -f "$in"; exit $rc\n')
        names = ["nft"]
    else:
        script = '#!/bin/sh\necho "refused for the test" >&2\nexit 1\n'
        names = ["ip6tables-nft-restore", "ip6tables-legacy-restore"]
    for name in names:
        path = bindir / name
        path.write_text(script)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return f"{bindir}:{os.environ['PATH']}"


def test_one_family_failing_leaves_the_other_programmed(kernel: Programmed, tmp_path: Path):
    topo = kernel.topo
    kernel.path.write_text(sc.dump(_objects(topo)))
    env = {**os.environ, "PATH": _failing_ipv6_path(tmp_path, kernel.mode)}
    from lab.netns import ns_exec
    import sys

    proc = ns_exec(topo.node_ns, [sys.executable, "-m", "pyproxy", "run", "--once", "--retries", "1",
                                  "--source-file", str(kernel.path), "--hostname-override", NODE,
                                  *_flags(topo), *mode_flags(kernel.mode)], env=env)
    assert proc.returncode == 1, proc.stderr  # the IPv6 family failed, and says so
    assert "refused for the test" in proc.stderr
    pod3 = topo.pod("pod3")
    probe = topo.probe(pod3.ns, f"{DS_IP}:80", count=12)
    assert probe.errors == {} and set(probe.pods) <= ALL  # IPv4 is programmed all the same
    # IPv6 has no rules now (the fixture's cleanup ran before): the ClusterIP goes nowhere.
    assert topo.probe(pod3.ns, f"[{DS_IP6}]:80", count=1, timeout=1).errors != {}
