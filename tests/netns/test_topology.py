"""Topology-aware routing with real packets: ``hints.forZones`` (what the EndpointSlice
controller writes for ``trafficDistribution: PreferClose``) and ``hints.forNodes``, matched
against the Node's ``topology.kubernetes.io/zone`` label, with upstream's fallbacks. Every
mode: userspace mode picks from the same endpoint list."""

from __future__ import annotations

import pytest

from tests.netns.conftest import WEB_IP, Programmed, base_objects

pytestmark = pytest.mark.netns

ZONE_LABEL = "topology.kubernetes.io/zone"


def _objects(topo, *, node_zone: str | None, zone_hints: list[list[str]] | None = None,
             node_hints: list[list[str]] | None = None) -> list[dict]:
    objects = base_objects(topo)
    for obj in objects:
        if obj["kind"] == "Node" and node_zone:
            obj["metadata"]["labels"] = {ZONE_LABEL: node_zone}
        if obj["metadata"]["name"] == "web-a":
            for i, ep in enumerate(obj["endpoints"]):
                hints = {}
                if zone_hints is not None and zone_hints[i]:
                    hints["forZones"] = [{"name": z} for z in zone_hints[i]]
                if node_hints is not None and node_hints[i]:
                    hints["forNodes"] = [{"name": n} for n in node_hints[i]]
                if hints:
                    ep["hints"] = hints
    return objects


def _pods(programmed: Programmed) -> set[str]:
    topo = programmed.topo
    probe = topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=45)
    assert probe.errors == {}
    return set(probe.pods)


@pytest.mark.parametrize(
    ("node_zone", "zone_hints", "node_hints", "expected"),
    [
        # Every endpoint hinted, two for our zone: only those two.
        ("zone-a", [["zone-a"], ["zone-a"], ["zone-b"]], None, {"pod0", "pod1"}),
        # Our zone changes: the other endpoint.
        ("zone-b", [["zone-a"], ["zone-a"], ["zone-b"]], None, {"pod2"}),
        # No endpoint is hinted for our zone: hints ignored, every endpoint.
        ("zone-c", [["zone-a"], ["zone-a"], ["zone-b"]], None, {"pod0", "pod1", "pod2"}),
        # One endpoint lacks hints (the controller is mid-update): hints ignored.
        ("zone-a", [["zone-a"], ["zone-a"], []], None, {"pod0", "pod1", "pod2"}),
        # The node has no zone label: hints ignored.
        (None, [["zone-a"], ["zone-a"], ["zone-b"]], None, {"pod0", "pod1", "pod2"}),
        # PreferSameNode: node hints win over zone hints.
        ("zone-a", [["zone-a"], ["zone-a"], ["zone-b"]], [["node-1"], ["node-2"], ["node-3"]], {"pod0"}),
    ],
    ids=["same-zone", "other-zone", "no-hint-for-zone", "incomplete-hints", "no-zone-label",
         "same-node"],
)
def test_topology_hints(programmed: Programmed, node_zone, zone_hints, node_hints, expected):
    programmed.apply(_objects(programmed.topo, node_zone=node_zone, zone_hints=zone_hints,
                              node_hints=node_hints))
    assert _pods(programmed) == expected


def test_zone_label_change_reroutes(programmed: Programmed):
    hints = [["zone-a"], ["zone-a"], ["zone-b"]]
    programmed.apply(_objects(programmed.topo, node_zone="zone-a", zone_hints=hints))
    assert _pods(programmed) == {"pod0", "pod1"}
    programmed.apply(_objects(programmed.topo, node_zone="zone-b", zone_hints=hints))
    assert _pods(programmed) == {"pod2"}
