#!/usr/bin/env bash
# The main job in one command: install what is needed, build (or reuse) the upstream control
# plane, kubelet, containerd and the images, bring up a two-node cluster in network namespaces
# with a real kubelet and containerd per node, helm install pyproxy's chart (its DaemonSet
# replaces kube-proxy) and show curl from real pods reaching a ClusterIP and a NodePort, in
# nftables mode and then in iptables mode.
#   bash demo.sh                               # the real-cluster demo (needs root, Linux)
#   python3 -m lab.quickdemo           # one node, objects from a file, no control plane
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(uname -s)" != Linux ]; then echo "demo.sh: needs Linux (network namespaces)" >&2; exit 2; fi
if [ "$(id -u)" -ne 0 ]; then echo "demo.sh: needs root to create network namespaces: sudo bash demo.sh" >&2; exit 2; fi
bash scripts/setup.sh
exec python3 -m lab.demo "$@"
