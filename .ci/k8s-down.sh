#!/usr/bin/env bash
# Stop what .ci/k8s-up.sh started (etcd + kube-apiserver, by their pid files).
set -euo pipefail
cd "$(dirname "$0")/.."
script=${ORCH_K8S_APISERVER_SH:-../shared/k8s/apiserver.sh}
dir=${ORCH_K8S_DIR:-/tmp/orch-k8s}
[ -f "$script" ] && [ -d "$dir" ] && bash "$script" stop "$dir" || true
# the test node of .ci/k8s-node-up.sh (its caches stay for the next run)
[ -x tests/clusters/k8s_node.sh ] && bash tests/clusters/k8s_node.sh stop >/dev/null 2>&1 || true
