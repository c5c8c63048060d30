"""iptables mode drops forwarded packets conntrack holds INVALID, and counts them, as upstream
does (kubernetes#74839), unless conntrack is liberal: real segments through the node namespace.

A pod sends the client a SYN+FIN segment (INVALID to conntrack: no TCP state has both flags)
and a plain SYN; a raw socket in the client's namespace reports which arrived (``lab.invalid``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.netns import Topology, ns_exec
from tests.netns.conftest import Programmed, base_objects

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
PORT = 40000
LIBERAL = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"


def _arrived(topo: Topology) -> list[str]:
    """Which of the two segments a pod sent reached the client."""
    pod = topo.pods[0]
    listener = subprocess.Popen(
        ["ip", "netns", "exec", topo.client_ns, sys.executable, "-m", "lab.invalid", "listen",
         "--source", pod.ip, "--port", str(PORT), "--seconds", "2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stderr is not None and listener.stderr.readline().strip() == "ready"
        sent = ns_exec(pod.ns, [sys.executable, "-m", "lab.invalid", "send", "--source", pod.ip,
                                "--to", topo.client_ip, "--port", str(PORT)], cwd=REPO)
        assert sent.returncode == 0, sent.stderr
        out, err = listener.communicate(timeout=15)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert listener.returncode == 0, err
    return json.loads(out)


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_forwarded_invalid_packets_are_dropped_and_counted_unless_conntrack_is_liberal(
        topo: Topology, tmp_path: Path, backend: str) -> None:
    from pyproxy.ipt.nfacct import Nfacct

    # Control: with no rules of ours, both segments cross the node.
    assert _arrived(topo) == ["syn", "synfin"]
    prog = Programmed(topo, f"iptables-{backend}", tmp_path / "cluster.yaml")
    try:
        prog.apply(base_objects(topo))
        assert _arrived(topo) == ["syn"]
        counter = Nfacct(netns=topo.node_ns).get("ct_state_invalid_dropped_pkts")
        assert counter is not None and counter.packets >= 1, counter
        # Liberal conntrack (read at start, as upstream reads it): no drop rule.
        ns_exec(topo.node_ns, ["sh", "-c", f"echo 1 > {LIBERAL}"])
        prog.apply(base_objects(topo))
        assert _arrived(topo) == ["syn", "synfin"]
    finally:
        prog.stop()
        ns_exec(topo.node_ns, ["sh", "-c", f"echo 0 > {LIBERAL}"])
        assert topo.pyproxy("cleanup").returncode == 0
        ns_exec(topo.node_ns, ["conntrack", "-F"])
