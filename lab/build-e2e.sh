#!/usr/bin/env bash
# Build what Kubernetes' own network e2e specs need, from Go modules, into the cache beside the
# control plane's build (issue 14):
#   e2e.test  the e2e suite of k8s.io/kubernetes (same version as the cluster), with only the
#             [sig-network] specs linked in (lab/e2e-specs/main_test.go: upstream's TestMain,
#             minus the other SIGs' imports: a third of the build)
#   agnhost   the test image's binary (k8s.io/kubernetes/test/images/agnhost); lab/images.py
#             wraps it in an image with the tools the specs exec (sh, nc, curl, ...)
#   coredns   the cluster DNS the specs resolve Service names with (github.com/coredns/coredns,
#             in a module of its own, as kubeadm's clusters run it)
# Keyed like build-k8s.sh (Kubernetes and Go versions); a second run takes a second. Prints the
# bin directory on stdout.
#
#   bash lab/build-e2e.sh
set -euo pipefail
K=${K8S_VERSION:-1.37.2}
COREDNS=${COREDNS_VERSION:-1.15.0}
here=$(cd "$(dirname "$0")" && pwd)
GOV=$(go env GOVERSION)
CACHE=${PYPROXY_CACHE_DIR:-/var/cache/pyproxy}
KEY="e2e-k8s-v$K-coredns-v$COREDNS-$GOV"
BIN="$CACHE/$KEY/bin"
stamp=$(sha256sum "$here/e2e-specs/main_test.go" | cut -c1-12)
if [ -x "$BIN/e2e.test" ] && [ -x "$BIN/agnhost" ] && [ -x "$BIN/coredns" ] && [ "$(cat "$CACHE/$KEY/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "$BIN"; exit 0
fi
log() { echo "build-e2e: $*" >&2; }
# The control plane's module: its go.mod pins every staging module to its published tag.
k8sbin=$(bash "$here/build-k8s.sh")
k8sdir=$(dirname "$k8sbin")
export GOTOOLCHAIN=local GOFLAGS="-trimpath -buildvcs=false" CGO_ENABLED=0
mkdir -p "$BIN"
work="$CACHE/$KEY/src"
rm -rf "$work"; mkdir -p "$work/netspecs"; cd "$work"
t0=$(date +%s)
cp "$k8sdir/go.mod" "$k8sdir/go.sum" .
sed -i 's#^module .*#module pyproxy.local/e2ebuild#' go.mod
cp "$here/e2e-specs/main_test.go" netspecs/
log "resolving the e2e suite's dependencies (k8s.io/kubernetes v$K)"
go get "k8s.io/kubernetes@v$K" >&2
go get -t ./netspecs >&2
# A tool directive keeps agnhost's own dependencies (sctp, ...) through go mod tidy.
go get -tool "k8s.io/kubernetes/test/images/agnhost@v$K" >&2
go mod tidy >&2
t1=$(date +%s); log "modules ready in $((t1-t0))s; building"
LD="$(cat "$k8sdir/ldflags" 2>/dev/null || echo "-s -w")"
go test -c -p 2 -ldflags "$LD" -o "$BIN/e2e.test.tmp" ./netspecs >&2
mv "$BIN/e2e.test.tmp" "$BIN/e2e.test"
log "built e2e.test at $(( $(date +%s) - t0 ))s"
go build -p 2 -ldflags "$LD" -o "$BIN/agnhost.tmp" "k8s.io/kubernetes/test/images/agnhost" >&2
mv "$BIN/agnhost.tmp" "$BIN/agnhost"
log "built agnhost at $(( $(date +%s) - t0 ))s"
dwork="$CACHE/$KEY/coredns-src"; rm -rf "$dwork"; mkdir -p "$dwork"; cd "$dwork"
GOBIN="$BIN" go install -ldflags "-s -w" "github.com/coredns/coredns@v$COREDNS" >&2
log "built coredns v$COREDNS at $(( $(date +%s) - t0 ))s"
echo "$stamp" > "$CACHE/$KEY/stamp"
echo "$BIN"
