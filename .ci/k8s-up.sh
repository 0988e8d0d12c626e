#!/usr/bin/env bash
# Start the test kube-apiserver (etcd + kube-apiserver 1.20 on loopback, from ../shared/k8s) and
# install the Kubeflow PyTorchJob CRD, for the `kubernetes` test tier. The tests' kube_apiserver
# fixture (tests/shared_env.py) finds it in $ORCH_K8S_DIR and leaves it running; without this
# script the fixture starts it itself. The first start builds kube-apiserver (~8 min, cached).
set -euo pipefail
cd "$(dirname "$0")/.."
script=${ORCH_K8S_APISERVER_SH:-../shared/k8s/apiserver.sh}
dir=${ORCH_K8S_DIR:-/tmp/orch-k8s}
if [ ! -f "$script" ]; then
  echo "k8s-up: $script not found; the kubernetes tier will skip" >&2
  exit 0
fi
if [ -f "$dir/kubeconfig" ] && curl -skf "https://127.0.0.1:${ORCH_K8S_PORT:-16443}/readyz" >/dev/null 2>&1; then
  echo "k8s-up: kube-apiserver already running (KUBECONFIG=$dir/kubeconfig)"
else
  bash "$script" start "$dir"
fi
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=.venv/bin/python
if ! "$python" -c "import kubernetes, yaml" 2>/dev/null; then
  echo "k8s-up: the kubernetes client is not installed yet; the test fixture installs the CRD" >&2
  exit 0
fi
"$python" - "$dir/kubeconfig" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.shared_env import install_pytorchjob_crd
install_pytorchjob_crd(Path(sys.argv[1]))
print("k8s-up: PyTorchJob CRD installed")
PY
