"""SCTP through real rules. The kernel here has no SCTP sockets, but netfilter tracks, DNATs
and masquerades SCTP: raw sockets send INIT chunks from many source ports and each backend
reports what reached it (``lab.sctp``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from lab.netns import ns_exec
from tests import scenario as sc
from tests.netns.conftest import Programmed, base_objects

pytestmark = pytest.mark.netns

SCTP_IP, SCTP_NODEPORT = "10.96.0.50", 30150


def _send_and_collect(topo, src_ns: str, target: str, count: int) -> list[dict]:
    listeners = []
    try:
        for pod in topo.pods[:3]:
            proc = subprocess.Popen(["ip", "netns", "exec", pod.ns, sys.executable, "-m", "lab.sctp",
                                     "listen", "--name", pod.name, "--port", "8080", "--seconds", "30"],
                                    stdout=subprocess.PIPE, text=True)
            listeners.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        sent = ns_exec(src_ns, [sys.executable, "-m", "lab.sctp", "send", "--target", target,
                                "--count", str(count)])
        assert sent.returncode == 0, sent.stderr
        time.sleep(0.5)
    finally:
        for proc in listeners:
            proc.terminate()
    seen = []
    for proc in listeners:
        out, _ = proc.communicate(timeout=10)
        seen += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return seen


def test_sctp_clusterip_and_nodeport(kernel: Programmed):
    topo = kernel.topo
    svc = sc.service("sctp", SCTP_IP, [sc.port(80, name="s", protocol="SCTP", node_port=SCTP_NODEPORT)],
                     svc_type="NodePort")
    sl = sc.endpoint_slice("sctp", [p.ip for p in topo.pods[:3]], [sc.port(8080, name="s", protocol="SCTP")])
    kernel.apply([*base_objects(topo), svc, sl])
    pod3 = topo.pod("pod3")
    seen = _send_and_collect(topo, pod3.ns, f"{SCTP_IP}:80", 45)
    assert len(seen) == 45
    assert {s["pod"] for s in seen} == {"pod0", "pod1", "pod2"}  # spread over every backend
    assert all(s["dport"] == 8080 and s["checksum_ok"] for s in seen)  # DNAT fixed port and CRC
    assert {s["src"] for s in seen} == {pod3.ip}  # pod traffic keeps its address
    outside = _send_and_collect(topo, topo.client_ns, f"{topo.node_ip}:{SCTP_NODEPORT}", 15)
    assert len(outside) == 15 and all(s["checksum_ok"] for s in outside)
    assert {s["src"] for s in outside} == {topo.bridge_ip}  # NodePort traffic is masqueraded
