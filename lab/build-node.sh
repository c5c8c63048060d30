#!/usr/bin/env bash
# Build what a real lab node runs, from Go modules and upstream sources, into a cache outside the
# work tree (the real-nodes issue): kubelet and kube-scheduler (the same Kubernetes version as the
# control plane, from build-k8s.sh's module), containerd + containerd-shim-runc-v2 + ctr, runc,
# the CNI plugins the lab's bridge network uses, and a static pause binary.
# The cache key holds every version and the Go version; a second run only checks the files
# (seconds). Prints the bin directory on stdout; the CNI plugins are in its cni/ subdirectory.
#
#   bash lab/build-node.sh
#
# Why these builds and not Debian's packages: Debian's runc 1.1.5 and crun 1.8.1 both fail with
# containerd 2.4's runtime specs (crun: "unknown version specified"; runc: init dies), and
# Debian has no containerd 2. runc is built with cgo and libseccomp: without seccomp support
# runc refuses the CRI's default seccomp profile.
set -euo pipefail
CONTAINERD=${CONTAINERD_VERSION:-2.4.2}
RUNC=${RUNC_VERSION:-1.5.3}
CNI=${CNI_VERSION:-1.10.0}
here=$(cd "$(dirname "$0")" && pwd)
log() { echo "build-node: $*" >&2; }
CP_BIN=$(bash "$here/build-k8s.sh")   # the control plane's build: its module pins kubelet's deps
CP=$(dirname "$CP_BIN")
GOV=$(go env GOVERSION)
CACHE=${PYPROXY_CACHE_DIR:-/var/cache/pyproxy}
KEY="node-$(basename "$CP")-containerd-v$CONTAINERD-runc-v$RUNC-cni-v$CNI"
BIN="$CACHE/$KEY/bin"
want="kubelet kube-scheduler containerd containerd-shim-runc-v2 ctr runc pause cni/bridge cni/host-local cni/loopback cni/portmap"
have=1
for b in $want; do [ -x "$BIN/$b" ] || have=0; done
if [ "$have" = 1 ]; then echo "$BIN"; exit 0; fi

if [ ! -f /usr/include/seccomp.h ] || ! command -v pkg-config >/dev/null; then
  log "runc needs libseccomp's headers and pkg-config: run scripts/setup.sh (or apt-get install libseccomp-dev pkg-config)"
  exit 2
fi
export GOTOOLCHAIN=local GOFLAGS="-trimpath -buildvcs=false"
mkdir -p "$BIN/cni"
t0=$(date +%s)
step() { log "$1 at $(( $(date +%s) - t0 ))s"; }

# kubelet and kube-scheduler: in a copy of the control plane's module (same replaces, same pins).
K=$(sed -n 's/^k8s-v\([^-]*\)-.*/\1/p' <<<"$(basename "$CP")")
work="$CACHE/$KEY/k8s-src"; rm -rf "$work"; mkdir -p "$work"; cd "$work"
cp "$CP/go.mod" "$CP/go.sum" .
go get -tool "k8s.io/kubernetes/cmd/kubelet@v$K" "k8s.io/kubernetes/cmd/kube-scheduler@v$K" >&2
for cmd in kubelet kube-scheduler; do
  CGO_ENABLED=0 go build -p 2 -ldflags "$(cat "$CP/ldflags")" -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" >&2
  mv "$BIN/$cmd.tmp" "$BIN/$cmd"; step "built $cmd"
done

# pause: upstream's own pause.c, static, from the Kubernetes module.
PAUSE_C="$(go env GOMODCACHE)/k8s.io/kubernetes@v$K/build/pause/linux/pause.c"
[ -f "$PAUSE_C" ] || go mod download "k8s.io/kubernetes@v$K" >&2
gcc -Os -static -DVERSION="v$K-pyproxy-lab" -o "$BIN/pause.tmp" "$PAUSE_C"
strip "$BIN/pause.tmp"; mv "$BIN/pause.tmp" "$BIN/pause"; step "built pause"

# containerd: no cgo, no snapshotters that need kernel modules or C libraries.
cwork="$CACHE/$KEY/containerd-src"; rm -rf "$cwork"; mkdir -p "$cwork"; cd "$cwork"
for cmd in containerd containerd-shim-runc-v2 ctr; do
  CGO_ENABLED=0 GOBIN="$cwork" go install -tags "no_btrfs no_devmapper no_zfs" -ldflags "-s -w" \
    "github.com/containerd/containerd/v2/cmd/$cmd@v$CONTAINERD" >&2
  mv "$cwork/$cmd" "$BIN/$cmd"; step "built $cmd"
done

# runc: its go.mod has replace directives, so `go install …@v` refuses; build in a copy of the module.
DIR=$(go mod download -json "github.com/opencontainers/runc@v$RUNC" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
rwork="$CACHE/$KEY/runc-src"; rm -rf "$rwork"; cp -r "$DIR" "$rwork"; chmod -R u+w "$rwork"; cd "$rwork"
CGO_ENABLED=1 go build -tags seccomp -ldflags "-s -w -X main.version=$RUNC" -o "$BIN/runc.tmp" . >&2
mv "$BIN/runc.tmp" "$BIN/runc"; step "built runc"

# CNI plugins: the bridge with host-local IPAM (each node's podCIDR), loopback, portmap.
nwork="$CACHE/$KEY/cni-src"; rm -rf "$nwork"; mkdir -p "$nwork"
for p in main/bridge ipam/host-local main/loopback meta/portmap; do
  CGO_ENABLED=0 GOBIN="$nwork" go install -ldflags "-s -w" \
    "github.com/containernetworking/plugins/plugins/$p@v$CNI" >&2
  mv "$nwork/$(basename "$p")" "$BIN/cni/"
done
step "built the CNI plugins"
rm -rf "$work" "$cwork" "$rwork" "$nwork"
echo "$BIN"
