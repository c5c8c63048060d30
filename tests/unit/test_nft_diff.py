"""Phases.diff from nothing (a full sync's fragments, a new service port's) takes a shorter way:
it must queue exactly what the general comparison against an empty fragment queues."""

from __future__ import annotations

import pytest

from pyproxy.config import ProxyConfig
from pyproxy.proxier.nft_diff import EMPTY, Phases
from pyproxy.render import nftables as r
from pyproxy.render.slots import SlotAllocator
from tests.unit.helpers import build, service_objects
from tests import scenario as sc

QUEUES = ("declare_sets", "declare_chains", "del_elements", "rewrite", "add_elements", "gone_chains",
          "gone_sets", "gone_shared", "named", "specs", "ref_deltas")


def _fragments():
    objs = [sc.node("node-1", ["192.168.1.1"])]
    for i in range(10):
        objs += service_objects(i, endpoints=i % 4, node_port=30100 + i if i % 3 == 0 else None,
                                affinity=30 if i % 4 == 1 else None)
    # Two Services with the same pod: shared hairpin elements.
    for name, cip in (("twin-a", "10.96.9.1"), ("twin-b", "10.96.9.2")):
        objs += [sc.service(name, cip, [sc.port(80, name="http")]),
                 sc.endpoint_slice(name, ["10.244.9.9"], [sc.port(8080, name="http")])]
    state = build(objs, nodeport_ips=("192.168.1.1",))
    cfg = ProxyConfig(cluster_cidrs=("10.244.0.0/16",), hostname="node-1")
    alloc = SlotAllocator()
    frags = [r.render_service(cfg, st, place=lambda local, size, k=k: alloc.place((k, local), size))
             for k, st in sorted(state.services.items())]
    return [*frags, r.render_base(cfg, state, endpoint_maps=alloc.maps())]


@pytest.mark.parametrize("refs", [None, "some"], ids=["full", "over-the-kernel's"])
def test_a_fragment_from_nothing_queues_what_the_general_diff_queues(refs):
    frags = _fragments()
    held = {("hairpin", "10.244.9.9 . 10.244.9.9"): 2, ("cluster-ips", "10.96.0.2"): 1} if refs else None
    fast = Phases(shared_sets=r.SHARED_SETS, refs=dict(held) if held else None)
    general = Phases(shared_sets=r.SHARED_SETS, refs=dict(held) if held else None)
    for frag in frags + frags[:3]:  # a fragment again: its shared elements counted twice
        assert fast.diff(None, frag) == general.diff(EMPTY, frag)
    for name in QUEUES:
        assert getattr(fast, name) == getattr(general, name), name
    assert fast.add_elements and fast.named
    assert fast.ref_deltas[("hairpin", "10.244.9.9 . 10.244.9.9")] == 2
    added = [e for e in fast.add_elements if e[:2] == ("hairpin", "10.244.9.9 . 10.244.9.9")]
    assert len(added) == (0 if refs else 1)  # held by the kernel already, or added once
