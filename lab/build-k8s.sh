#!/usr/bin/env bash
# Build the upstream binaries the lab runs, from Go modules, into a cache outside the work tree:
#   kube-apiserver, kube-controller-manager, kube-proxy (the reference), kubectl, etcd, helm.
# The cache key is the Kubernetes, etcd and helm versions plus the Go version, so a second run
# only checks that the binaries are there (seconds). Prints the bin directory on stdout.
#
#   bash lab/build-k8s.sh            # build (or reuse) and print the bin dir
#   K8S_VERSION=1.36.3 bash lab/build-k8s.sh
set -euo pipefail
K=${K8S_VERSION:-1.37.2}
HELM=${HELM_VERSION:-3.22.0}
here=$(cd "$(dirname "$0")" && pwd)
GOV=$(go env GOVERSION)
CACHE=${PYPROXY_CACHE_DIR:-/var/cache/pyproxy}
KEY="k8s-v$K-helm-v$HELM-$GOV"
BIN="$CACHE/$KEY/bin"
# The version stamped into every Kubernetes binary; kept beside the bin dir for build-node.sh.
MINOR=${K#1.}; MINOR=${MINOR%%.*}
LD="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LD="$LD -X $p.gitVersion=v$K -X $p.gitMajor=1 -X $p.gitMinor=$MINOR -X $p.gitTreeState=clean"
  LD="$LD -X $p.buildDate=1970-01-01T00:00:00Z"
done
want="kube-apiserver kube-controller-manager kube-proxy kubectl etcd helm"
have=1
for b in $want; do [ -x "$BIN/$b" ] || have=0; done
if [ "$have" = 1 ]; then
  [ -f "$CACHE/$KEY/ldflags" ] || echo "$LD" > "$CACHE/$KEY/ldflags"
  echo "$BIN"; exit 0
fi

log() { echo "build-k8s: $*" >&2; }
free_kb=$(df -Pk "$(dirname "$CACHE")" 2>/dev/null | awk 'NR==2{print $4}')
if [ -n "${free_kb:-}" ] && [ "$free_kb" -lt 8000000 ]; then
  log "need about 8 GB free for module downloads and the build; $((free_kb/1024)) MB free. Free some space and retry."
  exit 2
fi
export GOTOOLCHAIN=local GOFLAGS="-trimpath -buildvcs=false" CGO_ENABLED=0
mkdir -p "$BIN"
work="$CACHE/$KEY/src"
rm -rf "$work"; mkdir -p "$work"; cd "$work"
S=0.${K#1.}
t0=$(date +%s)
go mod init pyproxy.local/k8sbuild >/dev/null 2>&1
# Upstream's go.mod, fetched through the module proxy: it names every staging module (required at
# v0.0.0 and replaced by a local path upstream), and we pin each to its published v0.Y.Z tag.
GOMOD=$(go mod download -json "k8s.io/kubernetes@v$K" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
[ -f "$GOMOD" ] || { log "module k8s.io/kubernetes@v$K is not served; pick another K8S_VERSION"; exit 1; }
go mod edit -go="$(sed -n 's/^go //p' "$GOMOD")"
D=$(sed -n 's/^godebug default=//p' "$GOMOD"); [ -n "$D" ] && go mod edit -godebug=default="$D"
for m in $(sed -nE 's#^[[:space:]]*(k8s\.io/[a-z0-9-]+) => \./staging/.*#\1#p' "$GOMOD" | sort -u); do
  go mod edit -replace="$m=$m@v$S"
done
log "resolving k8s.io/kubernetes v$K (staging v$S)"
go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@v$K" "k8s.io/kubernetes/cmd/kube-controller-manager@v$K" \
  "k8s.io/kubernetes/cmd/kube-proxy@v$K" "k8s.io/kubernetes/cmd/kubectl@v$K" >&2
# etcd at exactly the version this Kubernetes pins.
ETCD=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
go get -tool "go.etcd.io/etcd/server/v3@$ETCD" >&2
go mod tidy >&2
t1=$(date +%s); log "modules ready in $((t1-t0))s; building (etcd $ETCD)"
for cmd in kube-apiserver kube-controller-manager kube-proxy kubectl; do
  go build -p 2 -ldflags "$LD" -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" >&2
  mv "$BIN/$cmd.tmp" "$BIN/$cmd"
  log "built $cmd at $(( $(date +%s) - t0 ))s"
done
go build -p 2 -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3 >&2
mv "$BIN/etcd.tmp" "$BIN/etcd"
log "built etcd $ETCD at $(( $(date +%s) - t0 ))s"
# helm in its own module: the staging pins above would force its client-go.
hwork="$CACHE/$KEY/helm-src"; rm -rf "$hwork"; mkdir -p "$hwork"; cd "$hwork"
GOBIN="$BIN" go install "helm.sh/helm/v3/cmd/helm@v$HELM" >&2
log "built helm v$HELM at $(( $(date +%s) - t0 ))s"
cp "$work/go.mod" "$work/go.sum" "$CACHE/$KEY/" 2>/dev/null || true
echo "$LD" > "$CACHE/$KEY/ldflags"
echo "$BIN"
