"""Stale UDP conntrack: a client that never stops sending follows its service to a new backend
within one sync, because pyproxy deletes the entries the new rules orphaned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from lab.netns import ns_exec
from tests.netns.conftest import DNS_IP, Programmed, _programmed, base_objects

pytestmark = pytest.mark.netns


def _with_dns_backends(objects: list[dict], ips: list[str]) -> list[dict]:
    for obj in objects:
        if obj["metadata"]["name"] == "dns-a":
            obj["endpoints"] = [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]
    return objects


def _udp_stream(topo, *, seconds: float) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    """One UDP socket in pod3 sending to the dns Service every 50 ms; a JSON line per reply."""
    return subprocess.Popen(
        ["ip", "netns", "exec", topo.pod("pod3").ns, sys.executable, "-m", "lab.client",
         "--target", f"{DNS_IP}:53", "--udp-stream", str(seconds), "--interval", "0.05"],
        stdout=subprocess.PIPE, text=True)


def _replies(stream: subprocess.Popen[str]) -> list[dict]:
    """The stream's replies once it ends (it is killed if the test failed before)."""
    try:
        out, _ = stream.communicate(timeout=30)
    finally:
        if stream.poll() is None:
            stream.kill()
    return [json.loads(line) for line in out.splitlines()]


def test_udp_client_follows_a_replaced_backend_within_one_sync(programmed: Programmed):
    topo = programmed.topo
    pod0, pod1 = topo.pod("pod0").ip, topo.pod("pod1").ip
    programmed.apply(_with_dns_backends(base_objects(topo), [pod0]))
    stream = _udp_stream(topo, seconds=6)
    try:
        time.sleep(1.5)  # the flow is established, to pod0
        programmed.apply(_with_dns_backends(base_objects(topo), [pod1]))  # sync + conntrack cleanup
        switched_at = time.monotonic()
    finally:
        replies = _replies(stream)
    before = [r["pod"] for r in replies if r["t"] < switched_at - 1.0]
    after = [r["pod"] for r in replies if r["t"] > switched_at + 0.2]
    assert before and set(before) == {"pod0"}, before
    # The same socket, the same source port: without the cleanup its conntrack entry would keep
    # the old DNAT to pod0 for as long as it keeps sending (it would time out after 10 s idle).
    assert after and set(after) == {"pod1"}, after


SHIM = '''
import os
FLAG = os.environ.get("PYPROXY_TEST_CONNTRACK_FAIL", "")
if FLAG:
    import pyroute2
    from pyroute2.netlink.exceptions import NetlinkError

    _delete = pyroute2.Conntrack.delete

    def delete(self, *args, **kwargs):
        if os.path.exists(FLAG):
            raise NetlinkError(2, "injected: the entry vanished between dump and delete")
        return _delete(self, *args, **kwargs)

    pyroute2.Conntrack.delete = delete
'''


@pytest.fixture
def nftables(topo, tmp_path):  # type: ignore[no-untyped-def]
    """The cleanup does not depend on the mode: nftables is enough."""
    yield from _programmed(topo, "nftables", tmp_path / "cluster.yaml")


def test_a_netlink_error_mid_cleanup_keeps_the_daemon_and_the_next_change_cleans(
        nftables: Programmed, tmp_path, monkeypatch):
    """The real daemon, with pyroute2's conntrack delete made to fail (a sitecustomize shim) as
    it does for an entry that expired between the dump and the delete: that NetlinkError used to
    escape and stop pyproxy with exit code 0. Now the rules are applied, the daemon goes on, and
    the cleanup after the next change deletes the stale entry."""
    kernel = nftables
    topo = kernel.topo
    pod0, pod1, pod2 = (topo.pod(p).ip for p in ("pod0", "pod1", "pod2"))
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "sitecustomize.py").write_text(SHIM)
    flag = tmp_path / "fail-conntrack"
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'shim'}:{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("PYPROXY_TEST_CONNTRACK_FAIL", str(flag))
    kernel.background = True
    kernel.apply(_with_dns_backends(base_objects(topo), [pod0]))
    stream = _udp_stream(topo, seconds=9)
    try:
        time.sleep(1.5)
        flag.touch()
        kernel.apply(_with_dns_backends(base_objects(topo), [pod1]))  # cleanup fails
        time.sleep(2.5)
        assert kernel.proc is not None and kernel.proc.poll() is None, kernel.log.read_text()[-2000:]
        assert "Traceback" not in kernel.log.read_text()
        flag.unlink()
        kernel.apply(_with_dns_backends(base_objects(topo), [pod2]))  # this one cleans
        switched_at = time.monotonic()
    finally:
        replies = _replies(stream)
    stuck = [r["pod"] for r in replies if switched_at - 2.0 < r["t"] < switched_at - 0.2]
    after = [r["pod"] for r in replies if r["t"] > switched_at + 0.2]
    # While the cleanup failed, the old flow kept its NAT to pod0 (the rules are right, the
    # entry is stale); after the next change's cleanup it moves to the new backend.
    assert stuck and set(stuck) == {"pod0"}, stuck
    assert after and set(after) == {"pod2"}, after


def test_udp_client_follows_a_target_port_change_to_the_same_pod(nftables: Programmed):
    """Upstream's e2e spec "cleanup conntrack entries when UDP service target port changes": the
    Service's targetPort moves, the endpoint IPs stay. The flow was DNATed to pod0's old port (no
    listener: ICMP unreachable); its entry must go although pod0's IP still serves."""
    topo = nftables.topo
    pod0 = topo.pod("pod0").ip

    def on_port(port: int) -> list[dict]:
        objects = _with_dns_backends(base_objects(topo), [pod0])
        for obj in objects:
            if obj["metadata"]["name"] == "dns-a":
                obj["ports"][0]["port"] = port
        return objects

    nftables.apply(on_port(9999))  # nothing listens on 9999 in the pods
    stream = _udp_stream(topo, seconds=6)
    try:
        time.sleep(1.5)
        nftables.apply(on_port(8080))  # the echo's UDP port: sync + conntrack cleanup
        switched_at = time.monotonic()
    finally:
        replies = _replies(stream)
    before = [r["pod"] for r in replies if r["t"] < switched_at - 1.0]
    after = [r["pod"] for r in replies if r["t"] > switched_at + 0.2]
    assert before and set(before) == {None}, before
    # Keyed on the endpoint IP alone, the cleanup kept the entry to pod0:9999 and the client
    # heard nothing for as long as it kept sending.
    assert after and set(after) == {"pod0"}, after


DNS_NODEPORT = 30053


def _dns_nodeport(objects: list[dict], ips: list[str]) -> list[dict]:
    """The dns Service as a NodePort (30053), with ``ips`` as its endpoints."""
    for obj in objects:
        if obj["kind"] == "Service" and obj["metadata"]["name"] == "dns":
            obj["spec"]["type"] = "NodePort"
            obj["spec"]["ports"][0]["nodePort"] = DNS_NODEPORT
    return _with_dns_backends(objects, ips)


def test_a_nodeport_flow_stops_when_its_last_endpoint_goes_and_other_hosts_flows_stay(nftables: Programmed):
    """A client streaming UDP to the node's NodePort keeps reaching its backend, which still
    runs, through the flow's old DNAT unless the entry goes; once the Service has no endpoint,
    pyproxy deletes it (upstream skips a NodePort without endpoints), so the client is refused.
    A flow of the node to another host's port 30053 is not a NodePort flow: it stays (upstream,
    matching the port alone, takes it whenever the Service has endpoints)."""
    topo = nftables.topo
    nftables.apply(_dns_nodeport(base_objects(topo), [topo.pod("pod0").ip]))
    # The unrelated flow: from the node, source port 41234, to the client's port 30053 (nothing
    # listens there; the entry stays unreplied for the kernel's 30 s).
    sent = ns_exec(topo.node_ns, [sys.executable, "-c",
                                  "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                                  f"s.bind(('0.0.0.0', 41234)); s.sendto(b'x', ('{topo.client_ip}', {DNS_NODEPORT}))"])
    assert sent.returncode == 0, sent.stderr
    stream = subprocess.Popen(
        ["ip", "netns", "exec", topo.client_ns, sys.executable, "-m", "lab.client",
         "--target", f"{topo.node_ip}:{DNS_NODEPORT}", "--udp-stream", "6", "--interval", "0.05"],
        stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # the flow is established, to pod0
        nftables.apply(_dns_nodeport(base_objects(topo), []))  # no endpoint: sync + cleanup
        switched_at = time.monotonic()
    finally:
        replies = _replies(stream)
    before = [r["pod"] for r in replies if r["t"] < switched_at - 1.0]
    after = [r["pod"] for r in replies if r["t"] > switched_at + 0.2]
    assert set(before) - {None} == {"pod0"}, before  # (None: a reply later than 50 ms, on a busy CPU)
    assert after and set(after) == {None}, after  # refused: the old DNAT is gone
    kept = ns_exec(topo.node_ns, ["conntrack", "-L", "-p", "udp", "--orig-port-dst", str(DNS_NODEPORT),
                                  "--orig-dst", topo.client_ip])
    assert "sport=41234" in kept.stdout, (kept.stdout, kept.stderr)
