#!/usr/bin/env bash
# The `kubernetes` tier's node (tests/clusters/k8s_node.sh), in two phases so that .ci/run can
# overlap the slow cold work with its other set-up:
#   .ci/k8s-node-up.sh prepare   Debian packages (foreground: apt must not race other apt users),
#                                then the Kubernetes 1.20 binaries from Debian's source (~25 min of
#                                2 CPUs the first time) and the torch base image (~5-15 min, mostly
#                                download and disk) side by side. Both are cached in
#                                /var/cache/orch-k8s; the build also leaves kube-apiserver where
#                                ../shared/k8s/apiserver.sh looks, so the API-server tier does not
#                                build it a second time.
#   .ci/k8s-node-up.sh [up]      orch's thin image layer from this tree, then etcd + API server +
#                                containerd + kubelet + scheduler + controller-manager + DNS (~1 min).
# .ci/run runs `prepare` in the background beside the test suite; the suite runs the node tier last
# and its k8s_node fixture (tests/shared_env.py) waits for that build, then builds the image layer
# and starts the node itself (and stops it at the end). Run `up` by hand to keep a node running. Without root or on another OS this does nothing and the tier skips with a reason.
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
node=tests/clusters/k8s_node.sh
start=$(date +%s)
case "${1:-up}" in
  prepare)
    bash "$node" install
    nice -n 10 bash "$node" build & build_pid=$!
    nice -n 10 bash "$node" base-image >/dev/null & base_pid=$!
    rc=0
    wait "$build_pid" || { echo "k8s-node-up: building the Kubernetes binaries failed" >&2; rc=1; }
    wait "$base_pid" || { echo "k8s-node-up: building the base image failed" >&2; rc=1; }
    echo "k8s-node-up: binaries and base image ready $(( $(date +%s) - start )) s after start"
    exit "$rc"
    ;;
  up)
    nice -n 10 bash "$node" up
    echo "k8s-node-up: node Ready $(( $(date +%s) - start )) s after start (KUBECONFIG=${ORCH_K8S_NODE:-/tmp/orch-k8s-node}/kubeconfig)"
    ;;
  *) echo "usage: $0 [prepare|up]" >&2; exit 2 ;;
esac
