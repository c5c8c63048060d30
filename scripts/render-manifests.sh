#!/usr/bin/env bash
# Render manifests/pyproxy.yaml from the Helm chart (the plain-kubectl install path).
#   bash scripts/render-manifests.sh [helm binary]
set -euo pipefail
cd "$(dirname "$0")/.."
HELM=${1:-$(command -v helm || echo "$(bash lab/build-k8s.sh)/helm")}
{
  echo "# Rendered from charts/pyproxy by scripts/render-manifests.sh; do not edit by hand."
  echo "# kubectl apply -f manifests/pyproxy.yaml  (set the API server address first: see README)"
  "$HELM" template pyproxy charts/pyproxy --namespace kube-system --kube-version 1.37.2 \
    --set apiServer.host=API_SERVER_HOST
} > manifests/pyproxy.yaml
