"""Localhost NodePorts (iptables mode, opt-in) and the CVE-2020-8558 guard, with real packets.

A neighbour's SYN to 127.0.0.1 is sent as a hand-built frame (``lab.martian``): with
route_localnet=1 and no guard the node answers it (the control case proves the probe can see
the hole); with pyproxy's localnet firewall it does not.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time

import pytest

from lab.netns import ns_exec
from tests.netns.conftest import WEB_NODEPORT, Programmed, base_objects

pytestmark = pytest.mark.netns

LOOPBACK_PORT = 9555
FLAG = "--iptables-localhost-nodeports"
ROUTE_LOCALNET = "/proc/sys/net/ipv4/conf/all/route_localnet"


def _martian_answered(topo) -> bool:
    mac = ns_exec(topo.node_ns, ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    # The node must know the neighbour's MAC already (as after any earlier traffic): its own
    # ARP request would ask "tell 127.0.0.1", which the neighbour rightly ignores.
    client_mac = ns_exec(topo.client_ns, ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    neigh = ns_exec(topo.node_ns, ["ip", "neigh", "replace", topo.client_ip, "lladdr", client_mac,
                                   "dev", "eth0", "nud", "reachable"])
    assert neigh.returncode == 0, neigh.stderr
    proc = ns_exec(topo.client_ns, [sys.executable, "-m", "lab.martian", "--iface", "eth0",
                                    "--dst-mac", mac, "--src", topo.client_ip, "--port", str(LOOPBACK_PORT)])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["syn_ack"]


@pytest.fixture
def loopback_listener(kernel: Programmed):
    """Something on the node listening on 127.0.0.1 only; route_localnet restored afterwards."""
    topo = kernel.topo
    code = ("import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind(('127.0.0.1', {LOOPBACK_PORT})); s.listen(); print('ready', flush=True); time.sleep(120)")
    proc = subprocess.Popen(["ip", "netns", "exec", topo.node_ns, sys.executable, "-c", code],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield kernel
    finally:
        proc.kill()
        proc.wait()
        ns_exec(topo.node_ns, ["sh", "-c", f"echo 0 > {ROUTE_LOCALNET}"])


def test_localhost_nodeports(loopback_listener: Programmed):
    prog = loopback_listener
    topo = prog.topo
    target = f"127.0.0.1:{WEB_NODEPORT}"
    # Off by default: nothing listens on 127.0.0.1 at the NodePort.
    assert topo.probe(topo.node_ns, target, count=2).errors == {"refused": 2}
    prog.apply(base_objects(topo), FLAG)
    if prog.mode == "nftables":
        # Upstream's nftables mode has no localhost NodePorts; neither has ours.
        assert topo.probe(topo.node_ns, target, count=2).errors == {"refused": 2}
        return
    assert ns_exec(topo.node_ns, ["cat", ROUTE_LOCALNET]).stdout.strip() == "1"
    probe = topo.probe(topo.node_ns, target, count=30)
    assert probe.errors == {} and set(probe.pods) == {"pod0", "pod1", "pod2"}
    # Localhost traffic is always masqueraded (the pod could not answer 127.0.0.1).
    assert probe.seen_ips == {topo.bridge_ip}
    # The guard: a neighbour's packet to 127.0.0.1 gets no answer.
    assert not _martian_answered(topo)


def test_martian_probe_sees_the_hole_without_the_guard(loopback_listener: Programmed):
    """The control case: route_localnet=1 without the drop rule answers the neighbour."""
    topo = loopback_listener.topo
    ns_exec(topo.node_ns, ["sh", "-c", f"echo 1 > {ROUTE_LOCALNET}"])
    assert _martian_answered(topo)


METRIC = "kubeproxy_iptables_localhost_nodeports_accepted_packets_total"
METRICS_ADDRESS = "127.0.0.1:10249"


def _scrape(topo) -> float | None:
    """The counter as the daemon's /metrics serves it in the node namespace (None: absent)."""
    proc = ns_exec(topo.node_ns, ["curl", "--silent", "--fail", "--max-time", "5",
                                  f"http://{METRICS_ADDRESS}/metrics"])
    assert proc.returncode == 0, f"scrape failed: {proc.returncode} {proc.stderr}"
    values = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith(METRIC + " ")]
    assert len(values) <= 1, values
    return values[0] if values else None


def test_localhost_nodeport_connections_are_counted(kernel: Programmed):
    """Upstream's e2e spec "should update metric for tracking accepted packets destined for
    localhost nodeports": the daemon (iptables mode, localhost NodePorts on) exports the nfacct
    counter, which grows with each connection to 127.0.0.1:<NodePort> and with nothing else.
    nftables mode has no localhost NodePorts and exports nothing; it removes an object an
    iptables run left, as it removes that run's chains; `cleanup` removes it after the rules
    that count in it (the kernel refuses before: EBUSY)."""
    from pyproxy.cleanup import cleanup_all
    from pyproxy.ipt.nfacct import Nfacct, NfacctError

    prog, topo = kernel, kernel.topo
    prog.background = True  # the metric is the daemon's: `pyproxy run` follows the file
    try:
        if prog.mode == "nftables":
            # The object exists in the namespace (a previous iptables run left it): nftables
            # mode exports nothing and removes it at start, with the other mode's leftovers.
            Nfacct(netns=topo.node_ns).ensure("localhost_nps_accepted_pkts")
            prog.apply(base_objects(topo), FLAG, "--metrics-bind-address", METRICS_ADDRESS)
            assert _scrape(topo) is None
            # Removed once the first sync is in (the old mode's rules serve until then).
            deadline = time.monotonic() + 10
            while Nfacct(netns=topo.node_ns).get("localhost_nps_accepted_pkts") is not None:
                assert time.monotonic() < deadline, "nftables mode kept iptables mode's nfacct object"
                time.sleep(0.1)
            return
        prog.apply(base_objects(topo), FLAG, "--metrics-bind-address", METRICS_ADDRESS)
        backend = prog.mode.split("-", 1)[1]
        nat = ns_exec(topo.node_ns, [f"iptables-{backend}-save", "-t", "nat"]).stdout
        assert f"--dport {WEB_NODEPORT} -m nfacct --nfacct-name" in " ".join(nat.split()), nat
        before = _scrape(topo)
        # Exported before any localhost traffic: the spec reads it first.
        assert before is not None
        # Connections to the node's own address on the NodePort are not localhost ones.
        probe = topo.probe(topo.node_ns, f"{topo.node_ip}:{WEB_NODEPORT}", count=5)
        assert probe.errors == {}
        assert _scrape(topo) == before
        connections = 20
        probe = topo.probe(topo.node_ns, f"127.0.0.1:{WEB_NODEPORT}", count=connections)
        assert probe.errors == {} and len(probe.answers) == connections
        after = _scrape(topo)
        assert after is not None and after - before >= connections, (before, after)
        prog.stop()  # the rules stay (never removed on exit), and use the object
        nfacct = Nfacct(netns=topo.node_ns)
        with pytest.raises(NfacctError) as busy:
            nfacct.delete("localhost_nps_accepted_pkts")
        assert busy.value.errno == errno.EBUSY
        removed = cleanup_all(netns=topo.node_ns)
        assert "nfacct object localhost_nps_accepted_pkts" in removed, removed
        assert nfacct.get("localhost_nps_accepted_pkts") is None
    finally:
        prog.stop()
        ns_exec(topo.node_ns, ["sh", "-c", f"echo 0 > {ROUTE_LOCALNET}"])
