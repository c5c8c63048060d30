#!/usr/bin/env bash
# The main job in one command: install what is needed, build a one-node cluster out of network
# namespaces, let pyproxy program it (nftables, then iptables) and show curl going through it.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec python3 -m pyproxy.lab.demo "$@"
