"""The main demo: pyproxy installed as users install it, on a real two-node cluster in network
namespaces, and curl through it from real pods.

    sudo python3 -m lab.demo       # or: bash demo.sh (installs what it needs first)

Builds (or reuses from the cache) upstream kube-apiserver, kube-controller-manager,
kube-scheduler, kubelet, kubectl, etcd and helm, containerd and runc, the CNI plugins, and the
images (pyproxy's, from the Dockerfile's recipe; pause; the lab's tools). Brings up the lab with
containerd and the real kubelet on each node (``python3 -m lab up --real-nodes``), then
``helm install``s charts/pyproxy: the DaemonSet runs pyproxy on every node, in nftables mode and
then, after a ``helm upgrade``, in iptables mode. A Deployment of three echo pods sits behind a
NodePort Service; curl runs from a client pod on each node, from each node, and from an external
client. Everything is torn down at the end.
"""

from __future__ import annotations

import os
import sys
import time

from lab.preflight import CLUSTER_TOOLS, missing

NODES = 2
NODE_PORT = 30080


def main() -> int:
    problem = missing(CLUSTER_TOOLS)
    if problem:
        print(f"pyproxy demo: {problem}", file=sys.stderr)
        return 2
    from lab.cluster import ClusterLab, build_binaries, lab_images, node_ip
    from lab.workloads import (NAMESPACE, SA_NAMESPACE, answers, client_pod, cluster_ip, curl, echo_deployment,
                               install_chart, pod_netns_pid, wait_for, wait_pods_running, wait_ready_endpoints)

    print("building (or reusing) the control plane, the node components and the images;\n"
          "the first time this takes ~25 minutes on 2 cores ...", flush=True)
    t0 = time.monotonic()
    bin_dir = build_binaries()
    build_binaries("build-node.sh")
    lab_images()
    print(f"  ready in {time.monotonic() - t0:.0f}s (binaries in {bin_dir.parent})")
    t0 = time.monotonic()
    lab = ClusterLab.up(name=f"demo{os.getpid()}", nodes=NODES, bin_dir=str(bin_dir), real_nodes=True)
    try:
        print(f"\nlab up in {time.monotonic() - t0:.0f}s: etcd, kube-apiserver, kube-controller-manager, "
              f"kube-scheduler in {lab.cp_ns}; containerd and kubelet in "
              + ", ".join(f"{lab.node_ns(i)} ({node_ip(i)})" for i in range(1, NODES + 1)))
        print("$ kubectl get nodes -o wide")
        print(lab.kubectl("get", "nodes", "-o", "wide").stdout)
        lab.kubectl("create", "namespace", NAMESPACE)
        web = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NAMESPACE},
               "spec": {"type": "NodePort", "selector": {"app": "web"},
                        "ports": [{"port": 80, "targetPort": "http", "nodePort": NODE_PORT}]}}
        lab.kubectl_apply([web, echo_deployment("web", 3),
                           *(client_pod(f"client-{i}", lab.node_name(i)) for i in range(1, NODES + 1))])
        for mode in ("nftables", "iptables"):
            verb = "install" if mode == "nftables" else f"upgrade --set config.proxyMode={mode}"
            took = install_chart(lab, mode=mode)
            print(f"$ helm {verb} pyproxy charts/pyproxy -n {SA_NAMESPACE}   (rolled out in {took:.0f}s)")
            print(f"$ kubectl -n {SA_NAMESPACE} get daemonset,pods -o wide")
            print(lab.kubectl("-n", SA_NAMESPACE, "get", "daemonset,pods", "-o", "wide").stdout)
            if mode == "nftables":
                wait_pods_running(lab, "app=web", 3)
                clients = sorted(wait_pods_running(lab, "role=client", NODES), key=lambda p: p["spec"]["nodeName"])
                wait_ready_endpoints(lab, "web", 3)
                print(f"$ kubectl -n {NAMESPACE} get pods,svc,endpointslices -o wide")
                print(lab.kubectl("-n", NAMESPACE, "get", "pods,svc,endpointslices", "-o", "wide").stdout)
            cip = cluster_ip(lab, "web")
            print(f"=== {mode} mode: every answer is '<pod that answered> <client address it saw>' ===")
            wait_for("the service", lambda: "web-" in curl(lab, f"http://{cip}/", node=1))
            for client in clients:
                pid = pod_netns_pid(lab, client)
                print(f"$ curl http://{cip}/   from pod {client['metadata']['name']} ({client['status']['podIP']}) "
                      f"on {client['spec']['nodeName']}:")
                print("   " + "\n   ".join(curl(lab, f"http://{cip}/", pod_pid=pid) for _ in range(4)))
            for i in range(1, NODES + 1):
                seen = sorted(set(answers(lab, f"http://{cip}/", 12, node=i)))
                print(f"$ curl http://{cip}/   x12 from {lab.node_name(i)}: answered by {', '.join(seen)}")
            print(f"$ curl http://{node_ip(1)}:{NODE_PORT}/   from the external client:")
            print("   " + curl(lab, f"http://{node_ip(1)}:{NODE_PORT}/", ext=True) + "\n")
        print("pods saw each other's own addresses through the ClusterIP (no NAT inside the cluster);"
              "\nnode and external traffic arrived masqueraded. See README.md.")
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
