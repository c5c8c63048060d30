#!/usr/bin/env bash
# Try pyproxy on a laptop with kind (Docker or Podman needed; not run in this project's CI,
# which has no container engine and uses the namespace lab instead).
#   bash e2e/kind/run.sh            # create the cluster, install pyproxy, run the curl Job
#   kind delete cluster --name pyproxy
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in docker kind helm kubectl; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is required (see the README's kind section)" >&2; exit 2; }
done
kind create cluster --name pyproxy --config e2e/kind/kind-config.yaml
docker build -t pyproxy:dev .
kind load docker-image pyproxy:dev --name pyproxy
# pyproxy must reach the API server directly, not through the kubernetes ClusterIP it programs.
API_HOST=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' pyproxy-control-plane)
helm upgrade --install pyproxy charts/pyproxy -n kube-system \
  --set apiServer.host="$API_HOST" --set apiServer.port=6443 --set config.clusterCIDR=10.244.0.0/16
kubectl -n kube-system rollout status daemonset/pyproxy --timeout=180s
kubectl apply -f e2e/kind/workload.yaml
kubectl rollout status deployment/web --timeout=180s
kubectl wait --for=condition=complete job/curl-test --timeout=180s
kubectl logs job/curl-test
