"""Element changes over netlink leave exactly the ruleset nft -f leaves (real kernel).

Three fresh namespaces get the same states in turn: one proxier sends element-only changes over
netlink, one sends everything through ``nft -f``, and a third rebuilds the table from scratch
for each state. After every step the three ``nft list table`` outputs must be identical.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from lab.preflight import missing
from pyproxy.config import ProxyConfig
from pyproxy.model.state import StateBuilder
from pyproxy.nft.executor import NftCli, NftError
from pyproxy.proxier.nftables import NftProxier
from tests import scenario as sc
from tests.nftlayout import canonical_listing
from pyproxy.render.slots import SLOTS


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    why = missing()
    if why:
        if os.environ.get("CI") or os.environ.get("PYPROXY_ALL_TIERS"):
            pytest.fail(f"netns tests cannot run here: {why}")
        pytest.skip(why)
    names = [f"pxt-nl{os.getpid()}-{k}" for k in ("netlink", "nft", "fresh")]
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def _listing(ns: str, family: str) -> list[str]:
    """The table's sets, maps and chains as sorted blocks of text (nft lists objects in the order
    they were created, which an incremental sync changes), each rule's endpoint lookup shown as
    the pool's own slots (where a pool sits in the shared maps depends on history; see
    tests.nftlayout); no map element may be left that no rule reaches."""
    text = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", family, "pyproxy"],
                          check=True, capture_output=True, text=True).stdout
    blocks, orphans = canonical_listing(text)
    assert orphans == [], f"map elements no rule reaches in {ns}: {orphans}"
    return blocks


def _objects(family: int, *, web: list[str], sticky: list[str], shared: bool, nodeport_ip: str,
             empty_has_one: bool) -> list[dict]:
    def ip(k: int) -> str:
        return f"fd00:244:1::{k:x}" if family == 6 else f"10.244.1.{k}"

    def slice_(name: str, ks: list[str], port: int = 8080, proto: str = "TCP") -> dict:
        s = sc.endpoint_slice(name, [ip(int(k)) for k in ks], [sc.port(port, name="http", protocol=proto)])
        if family == 6:
            s["addressType"] = "IPv6"
        return s

    def svc(name: str, n: int, **kw) -> dict:
        s = sc.service(name, f"fd00:96::{n:x}" if family == 6 else f"10.96.0.{n}",
                       [sc.port(80, name="http", protocol=kw.pop("protocol", "TCP"),
                                node_port=kw.pop("node_port", None))], **kw)
        return s

    objs = [
        sc.node("node-1", [nodeport_ip]),
        svc("web", 10, node_port=30080, svc_type="NodePort"), slice_("web", web),
        svc("dns", 11, protocol="UDP"), slice_("dns", ["7", "8"], 5353, "UDP"),
        svc("sticky", 12, affinity_timeout=30), slice_("sticky", sticky),
        svc("twin", 13), slice_("twin", ["1"] if shared else ["9"]),  # pod 1 also backs web
        svc("empty", 14), slice_("empty", ["20"] if empty_has_one else []),
    ]
    return objs


STEPS = [
    dict(web=["1", "2", "3"], sticky=["4", "5"], shared=True, nodeport_ip="192.168.1.1", empty_has_one=False),
    dict(web=["1", "2", "6"], sticky=["4", "5"], shared=True, nodeport_ip="192.168.1.1", empty_has_one=False),
    dict(web=["1", "2", "6", "3"], sticky=["4", "5"], shared=True, nodeport_ip="192.168.1.1", empty_has_one=False),
    dict(web=["2", "6", "3"], sticky=["4", "5"], shared=True, nodeport_ip="192.168.1.1", empty_has_one=False),
    dict(web=["2", "6", "3"], sticky=["4", "5"], shared=False, nodeport_ip="192.168.1.2", empty_has_one=False),
    dict(web=["1", "2", "3"], sticky=["4"], shared=True, nodeport_ip="192.168.1.2", empty_has_one=True),
    dict(web=["11", "12"], sticky=["4"], shared=True, nodeport_ip="192.168.1.2", empty_has_one=False),
    dict(web=["11"], sticky=["4"], shared=True, nodeport_ip="192.168.1.2", empty_has_one=False),  # a pool of one
    dict(web=["11", "2"], sticky=["4"], shared=True, nodeport_ip="192.168.1.2", empty_has_one=False),
]


@pytest.mark.parametrize(("family", "cidrs"), [
    (4, ("10.244.0.0/16",)), (6, ("fd00:244::/32",)),
    # Two pod CIDRs are a named interval set (its elements go over netlink on a cold start).
    (4, ("10.244.0.0/16", "10.245.0.0/16", "172.16.0.0/12")), (6, ("fd00:244::/32", "fd00:245::/48")),
], ids=["ipv4", "ipv6", "ipv4-three-cidrs", "ipv6-two-cidrs"])
def test_netlink_and_nft_leave_the_same_ruleset(namespaces: list[str], family: int, cidrs: tuple[str, ...]) -> None:
    a_ns, b_ns, fresh_ns = namespaces
    table_family = "ip6" if family == 6 else "ip"
    config = ProxyConfig(hostname="node-1", family=family, ip_families=(family,), cluster_cidrs=cidrs)
    via_netlink, via_nft = NftCli(netns=a_ns), NftCli(netns=b_ns, netlink=False)
    a = NftProxier(config=config, executor=via_netlink, gc_period=0)
    b = NftProxier(config=config, executor=via_nft, gc_period=0)
    a.cold_start_part = 1  # the first sync's chains in one nft -f per service port
    builders = [StateBuilder(node_name="node-1", family=family) for _ in range(2)]
    for step, params in enumerate(STEPS):
        nodeport_ip = params["nodeport_ip"] if family == 4 else params["nodeport_ip"].replace("192.168.1.", "fd00:1::")
        objects = _objects(family, **{**params, "nodeport_ip": nodeport_ip})
        states = []
        for builder in builders:
            builder.replace_all(objects)
            states.append(builder.build(nodeport_ips=(nodeport_ip,)))
        a.sync(states[0])
        b.sync(states[1])
        fresh = NftProxier(config=config, executor=NftCli(netns=fresh_ns, netlink=False))
        # A cold start in parts (its chains in several nft -f runs, each part declaring the
        # maps its rules name) leaves what the other paths leave.
        fresh.cold_start_part = 2
        fresh.cleanup()  # every step's reference is a cold start
        fresh.sync(states[0])
        want = _listing(fresh_ns, table_family)
        assert _listing(a_ns, table_family) == want, f"netlink path differs after step {step}"
        assert _listing(b_ns, table_family) == want, f"nft path differs after step {step}"
    # Steps 1-3 change web's endpoints (map elements) and the hairpin set only, and so do
    # steps 7 and 8 (a pool of one is data too).
    assert via_netlink.paths["netlink"] >= 5 and via_nft.paths["netlink"] == 0
    assert any(f"numgen random mod {SLOTS} map {{ 0-" in b for b in _listing(a_ns, table_family))


def test_a_refused_batch_changes_nothing(namespaces: list[str]) -> None:
    a_ns = namespaces[0]
    config = ProxyConfig(hostname="node-1", ip_families=(4,), cluster_cidrs=("10.244.0.0/16",))
    cli = NftCli(netns=a_ns)
    proxier = NftProxier(config=config, executor=cli)
    builder = StateBuilder(node_name="node-1")
    builder.replace_all(_objects(4, **STEPS[0]))
    proxier.sync(builder.build(nodeport_ips=("192.168.1.1",)))
    before = _listing(a_ns, "ip")
    applied = dict(cli.paths)  # the first sync's elements went over netlink (a cold start)
    from pyproxy.nft.transaction import Transaction
    from pyproxy.render import nftables as r

    tx = Transaction(set_specs=r.sets_for(4))
    tx.add_element("hairpin", "10.9.9.9 . 10.9.9.9")           # would apply...
    tx.delete_element("nodeport-ips", "192.168.77.77")         # ...but this one is not there
    with pytest.raises(NftError, match="No such file or directory"):
        cli.run(tx)
    assert _listing(a_ns, "ip") == before
    assert cli.paths == applied  # the refused batch is not counted as applied
