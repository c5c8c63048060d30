"""The main demo: a real cluster in network namespaces, pyproxy on every node, curl through it.

    sudo python -m lab.demo       # or: bash demo.sh (installs what it needs first)

Builds (or reuses from the cache) upstream kube-apiserver, kube-controller-manager, kubectl,
etcd and helm; brings up a two-node lab (``python3 -m lab``); installs the Helm chart into the
API server; runs pyproxy on each node with the chart's ServiceAccount token, in nftables mode
and then in iptables mode; deploys three echo pods behind a NodePort Service and curls the
ClusterIP from a pod on each node, from each node, and the NodePort from an external client.
Everything is torn down at the end.
"""

from __future__ import annotations

import os
import sys
import time

from lab.preflight import CLUSTER_TOOLS, missing

NODES = 2


def main() -> int:
    problem = missing(CLUSTER_TOOLS)
    if problem:
        print(f"pyproxy demo: {problem}", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from e2e.harness import (
        ProxyFleet,
        answers,
        cluster_ip,
        curl,
        install_chart,
        pod,
        sa_kubeconfig,
        service,
        wait_for,
        wait_ready_endpoints,
    )
    from lab.cluster import ClusterLab, build_binaries, node_ip

    print("building (or reusing) upstream kube-apiserver, kube-controller-manager, kubectl, etcd, helm;\n"
          "the first time this takes ~15 minutes on 2 cores ...", flush=True)
    t0 = time.monotonic()
    bin_dir = build_binaries()
    print(f"  binaries in {bin_dir} ({time.monotonic() - t0:.0f}s)")
    lab = ClusterLab.up(name=f"demo{os.getpid()}", nodes=NODES, bin_dir=str(bin_dir))
    try:
        print(f"\nlab up: etcd, kube-apiserver, kube-controller-manager in {lab.cp_ns}; nodes "
              + ", ".join(f"{lab.node_name(i)} ({node_ip(i)})" for i in range(1, NODES + 1)))
        print(lab.kubectl("get", "nodes", "-o", "wide").stdout)
        lab.kubectl("create", "namespace", "e2e")
        install_chart(lab)
        print("helm install pyproxy charts/pyproxy -n kube-system: done")
        config = sa_kubeconfig(lab)
        objs = [service("web", {"app": "web"}, node_port=30080)]
        objs += [pod(f"web-{k}", lab.node_name(1 + k % NODES), labels={"app": "web"}) for k in range(3)]
        objs += [pod(f"client-{i}", lab.node_name(i), labels={"role": "client"}) for i in range(1, NODES + 1)]
        lab.kubectl_apply(objs)
        wait_ready_endpoints(lab, "web", 3)
        cip = cluster_ip(lab, "web")
        print(lab.kubectl("get", "pods,svc,endpointslices", "-n", "e2e", "-o", "wide").stdout)
        for mode in ("nftables", "iptables"):
            print(f"=== pyproxy in {mode} mode on every node (ServiceAccount token, as the DaemonSet) ===")
            fleet = ProxyFleet(lab=lab, mode=mode, kubeconfig=config)
            fleet.start_all()
            try:
                wait_for("the service", lambda: "web-" in curl(lab, f"http://{cip}/", node=1))
                for i in range(1, NODES + 1):
                    pid = lab.pod_pid("e2e", f"client-{i}")
                    print(f"$ curl http://{cip}/   from pod client-{i} on {lab.node_name(i)}:")
                    print("   " + "\n   ".join(curl(lab, f"http://{cip}/", pod_pid=pid) for _ in range(4)))
                for i in range(1, NODES + 1):
                    seen = sorted(set(answers(lab, f"http://{cip}/", 12, node=i)))
                    print(f"$ curl http://{cip}/   x12 from {lab.node_name(i)}: answered by {', '.join(seen)}")
                print(f"$ curl http://{node_ip(1)}:30080/   from the external client:")
                print("   " + curl(lab, f"http://{node_ip(1)}:30080/", ext=True))
            finally:
                fleet.stop_all()
        print("\npods saw each other's own addresses through the ClusterIP (no NAT inside the cluster);"
              "\nnode and external traffic arrived masqueraded. See README.md.")
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
