#!/usr/bin/env bash
# Install what pyproxy, its tests and its demo need: kernel tools from Debian, Python deps.
# Safe to run again; skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in nft:nftables iptables-nft-restore:iptables iptables-legacy-restore:iptables conntrack:conntrack ip:iproute2 curl:curl openssl:openssl nsenter:util-linux wrk:wrk mmdebstrap:mmdebstrap; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
# The real-node lab builds runc with seccomp support (lab/build-node.sh): headers and pkg-config.
[ -f /usr/include/seccomp.h ] || need+=(libseccomp-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install ${need[*]} (apt-get); run: sudo bash scripts/setup.sh" >&2
    exit 2
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi
command -v go >/dev/null 2>&1 || echo "setup: go not found: the real-cluster lab (e2e, demo) builds upstream binaries with Go >= 1.26" >&2
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test,bench]'
