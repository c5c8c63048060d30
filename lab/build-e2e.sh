#!/usr/bin/env bash
# Build what Kubernetes' own network e2e specs need, from Go modules, into the cache beside the
# control plane's build (issue 14):
#   e2e.test  the e2e suite of k8s.io/kubernetes (same version as the cluster), with only the
#             [sig-network] specs linked in (lab/e2e-specs/main_test.go: upstream's TestMain,
#             minus the other SIGs' imports: a third of the build)
#   agnhost   the test image's binary (k8s.io/kubernetes/test/images/agnhost); lab/images.py
#             wraps it in an image with the tools the specs exec (sh, nc, curl, ...)
#   regression-issue-74839  the server of the conntrack "invalid state" spec (test/images)
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
# Each binary is built when missing, so adding one to the list does not rebuild the others; a
# changed main_test.go (the stamp) rebuilds e2e.test.
if [ "$(cat "$CACHE/$KEY/stamp" 2>/dev/null)" != "$stamp" ]; then rm -f "$BIN/e2e.test"; fi
if [ -x "$BIN/e2e.test" ] && [ -x "$BIN/agnhost" ] && [ -x "$BIN/regression-issue-74839" ] && [ -x "$BIN/coredns" ]; then
  echo "$BIN"; exit 0
fi
log() { echo "build-e2e: $*" >&2; }
# The control plane's module: its go.mod pins every staging module to its published tag.
k8sbin=$(bash "$here/build-k8s.sh")
k8sdir=$(dirname "$k8sbin")
export GOTOOLCHAIN=local GOFLAGS="-trimpath -buildvcs=false" CGO_ENABLED=0
mkdir -p "$BIN"
work="$CACHE/$KEY/src"
t0=$(date +%s)
if [ ! -f "$work/ready" ]; then
  rm -rf "$work"; mkdir -p "$work/netspecs"; cd "$work"
  cp "$k8sdir/go.mod" "$k8sdir/go.sum" .
  sed -i 's#^module .*#module pyproxy.local/e2ebuild#' go.mod
  cp "$here/e2e-specs/main_test.go" netspecs/
  log "resolving the e2e suite's dependencies (k8s.io/kubernetes v$K)"
  go get "k8s.io/kubernetes@v$K" >&2
  go get -t ./netspecs >&2
  # A tool directive keeps agnhost's own dependencies (sctp, ...) through go mod tidy.
  go get -tool "k8s.io/kubernetes/test/images/agnhost@v$K" >&2
  go mod tidy >&2
  touch ready
  log "modules ready in $(( $(date +%s) - t0 ))s"
fi
cd "$work"
cp "$here/e2e-specs/main_test.go" netspecs/
LD="$(cat "$k8sdir/ldflags" 2>/dev/null || echo "-s -w")"
if [ ! -x "$BIN/e2e.test" ]; then
  go test -c -p 2 -ldflags "$LD" -o "$BIN/e2e.test.tmp" ./netspecs >&2
  mv "$BIN/e2e.test.tmp" "$BIN/e2e.test"
  log "built e2e.test at $(( $(date +%s) - t0 ))s"
fi
for img in agnhost regression-issue-74839; do
  if [ ! -x "$BIN/$img" ]; then
    go build -p 2 -ldflags "$LD" -o "$BIN/$img.tmp" "k8s.io/kubernetes/test/images/$img" >&2
    mv "$BIN/$img.tmp" "$BIN/$img"
    log "built $img at $(( $(date +%s) - t0 ))s"
  fi
done
if [ ! -x "$BIN/coredns" ]; then
  dwork="$CACHE/$KEY/coredns-src"; rm -rf "$dwork"; mkdir -p "$dwork"; cd "$dwork"
  GOBIN="$BIN" go install -ldflags "-s -w" "github.com/coredns/coredns@v$COREDNS" >&2
  log "built coredns v$COREDNS at $(( $(date +%s) - t0 ))s"
fi
echo "$stamp" > "$CACHE/$KEY/stamp"
echo "$BIN"
