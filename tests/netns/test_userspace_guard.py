"""The userspace mode's relays listen on every address of the node (a redirect from prerouting
goes to the incoming interface's address), so without a guard anyone who can reach the node
could use a relay port to reach the Service's backends directly, bypassing everything that
applies to the Service's own addresses (hardening issue, defect 8)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.netns import Topology, ns_exec
from tests.netns.conftest import WEB_IP, Programmed, _programmed

pytestmark = pytest.mark.netns


@pytest.fixture
def userspace(topo: Topology, tmp_path: Path) -> Iterator[Programmed]:
    yield from _programmed(topo, "userspace", tmp_path / "cluster.yaml")


def test_relay_ports_answer_only_redirected_connections(userspace: Programmed):
    topo = userspace.topo
    ruleset = ns_exec(topo.node_ns, ["nft", "list", "table", "ip", "pyproxy"]).stdout
    ports = sorted(set(re.findall(r"redirect to :(\d+)", ruleset)))
    assert ports, ruleset
    # Through the Service: redirected, relayed.
    assert topo.probe(topo.client_ns, f"{WEB_IP}:80", count=5).errors == {}
    assert topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=5).errors == {}
    # Straight at a relay port from off the node: dropped (a timeout, not an answer).
    for port in ports[:3]:
        probe = topo.probe(topo.client_ns, f"{topo.node_ip}:{port}", count=2, timeout=1)
        assert probe.answers == [], (port, probe)
