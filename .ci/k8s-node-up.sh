#!/usr/bin/env bash
# Build (once) and start the `kubernetes` tier's node: tests/clusters/k8s_node.sh up = Debian
# packages, Kubernetes 1.20 binaries from Debian's source (~25-45 min of 2 CPUs the first time),
# the offline images (~10 min the first time), then etcd + API server + containerd + kubelet +
# scheduler + controller-manager + the cluster DNS responder (~30 s). Binaries and the torch base
# image are cached in /var/cache/orch-k8s, so a second CI run only rebuilds orch's thin image layer
# and starts the node. The tests find it through tests/shared_env.py (k8s_node) and leave it up;
# .ci/k8s-down.sh stops it. Without root or on another OS this does nothing and the tier skips.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "k8s-node-up: the test node needs root; the node tests will skip"
  exit 0
fi
if ! grep -qs 'VERSION_CODENAME=bookworm' /etc/os-release; then
  echo "k8s-node-up: the node is built from Debian 12 (bookworm) packages; the node tests will skip"
  exit 0
fi
start=$(date +%s)
nice -n 10 bash tests/clusters/k8s_node.sh up
echo "k8s-node-up: node Ready $(( $(date +%s) - start )) s after start (KUBECONFIG=${ORCH_K8S_NODE:-/tmp/orch-k8s-node}/kubeconfig)"
