"""The quick demo: a one-node cluster in network namespaces, pyproxy programming it, curl using it.

    sudo python -m lab.quickdemo     # no control plane: objects come from a file

It builds the lab (a node, three pods, an external client), loads ``examples/demo.yaml``
with ``pyproxy run --once`` in each proxy mode, and shows curl reaching a ClusterIP from a pod,
a NodePort from outside, ClientIP affinity, and a service without endpoints refusing at once.
Everything happens inside namespaces it creates and removes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lab.netns import Topology, ns_exec
from lab.preflight import missing

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "demo.yaml"


def _curl(topo: Topology, ns: str, url: str, *, source: str | None = None) -> str:
    argv = ["curl", "-sS", "--max-time", "2", url]
    if source:
        argv[1:1] = ["--interface", source]
    proc = ns_exec(ns, argv)
    return (proc.stdout or proc.stderr).strip()


def main() -> int:
    problem = missing()
    if problem:
        print(f"pyproxy demo: {problem}", file=sys.stderr)
        return 2
    source = os.environ.get("PYPROXY_DEMO_FILE", str(EXAMPLE))
    # pod0 and pod1 are the demo's backends (10.244.1.10, .11); pod2 is a client pod.
    with Topology.create(pods=3, client_sources=2) as topo:
        client_pod = topo.pod("pod2")
        for mode in ("nftables", "iptables"):
            print(f"\n=== proxy mode: {mode} ===")
            proc = topo.pyproxy("run", "--once", "--source-file", source, "--hostname-override",
                                "node-a", "--cluster-cidr", topo.cluster_cidr, "--proxy-mode", mode)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            print(proc.stderr.strip().splitlines()[-1])
            print(f"\n$ curl http://10.96.0.10/   (from {client_pod.name}, {client_pod.ip}; six new connections)")
            for _ in range(6):
                print("  answered by:", _curl(topo, client_pod.ns, "http://10.96.0.10/"))
            print(f"\n$ curl http://{topo.node_ip}:30080/   (NodePort, from the external client)")
            for _ in range(3):
                print("  answered by:", _curl(topo, topo.client_ns, f"http://{topo.node_ip}:30080/"))
            print("\n$ curl http://10.96.0.20/   (ClientIP affinity: one client keeps its backend)")
            for src in topo.client_sources:
                answers = {_curl(topo, topo.client_ns, "http://10.96.0.20/", source=src) for _ in range(4)}
                print(f"  client {src}: {' | '.join(sorted(answers))}")
            print("\n$ curl http://10.96.0.30/   (a service with no endpoints)")
            print("  ", _curl(topo, client_pod.ns, "http://10.96.0.30/"))
            cleanup = topo.pyproxy("cleanup")
            print(cleanup.stderr.strip().splitlines()[-1] if cleanup.stderr.strip() else "cleaned up")
    print("\nThe pod's own address reached the backends (no NAT inside the cluster); the NodePort and\n"
          "external traffic arrived from the node (10.244.1.1, masqueraded). See README.md.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
