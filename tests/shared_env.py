"""The one place tests reach outside the repository (../shared: Slurm and API-server scripts,
the Kubeflow CRD), and say how to enable a tier when it is absent.

In a user's clone there is no ../shared: those tiers skip, each with a message naming the
environment variable that points them at a real resource instead.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ORCH_SHARED_DIR", REPO.parent / "shared"))


def shared_file(relative: str, env_var: str, what: str) -> Path:
    """A file from ../shared (or the path in ``env_var``), or skip the test saying how to get it."""
    override = os.environ.get(env_var)
    path = Path(override) if override else SHARED / relative
    if not path.exists():
        pytest.skip(f"{what} not found at {path}: set {env_var}=/path/to/it "
                    f"(or ORCH_SHARED_DIR to a checkout of the shared test tools)")
    return path


def pytorchjob_crd_path() -> Path:
    return shared_file("k8s/kubeflow.org_pytorchjobs.yaml", "ORCH_PYTORCHJOB_CRD",
                       "the Kubeflow PyTorchJob CRD (kubeflow.org_pytorchjobs.yaml)")


def slurm_cluster_script() -> Path:
    return shared_file("slurm/cluster.sh", "ORCH_SLURM_CLUSTER_SH", "the test Slurm cluster script")


def apiserver_script() -> Path:
    return shared_file("k8s/apiserver.sh", "ORCH_K8S_APISERVER_SH", "the test kube-apiserver script")


# --------------------------------------------------------------------------------------------
# A real kube-apiserver with the PyTorchJob CRD (the `kubernetes` tier)
# --------------------------------------------------------------------------------------------

K8S_DIR = Path(os.environ.get("ORCH_K8S_DIR", "/tmp/orch-k8s"))  # where .ci/k8s-up.sh starts it too
K8S_ENABLE = ("set ORCH_TEST_KUBECONFIG=/path/to/kubeconfig of a disposable test cluster (no training "
              "operator running; allowed to install CRDs), or provide ../shared/k8s/apiserver.sh")


def _api_reachable(kubeconfig: Path) -> bool:
    from kubernetes import client, config

    if not kubeconfig.exists():
        return False
    try:
        api = config.new_client_from_config(str(kubeconfig))
        client.VersionApi(api).get_code(_request_timeout=5)
        return True
    except Exception:
        return False


def install_pytorchjob_crd(kubeconfig: Path) -> None:
    """Install the Kubeflow PyTorchJob CRD (if absent) with the Python client and wait until it
    is served (`kubectl apply` refuses this CRD: its last-applied annotation is too large)."""
    import time

    import yaml
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    ext = client.ApiextensionsV1Api(config.new_client_from_config(str(kubeconfig)))
    name = "pytorchjobs.kubeflow.org"
    try:
        ext.read_custom_resource_definition(name)  # installed already (an earlier session, or CI)
    except ApiException as exc:
        if exc.status != 404:
            raise
        ext.create_custom_resource_definition(yaml.safe_load(pytorchjob_crd_path().read_text()))
    for _ in range(200):
        conds = ext.read_custom_resource_definition(name).status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conds):
            return
        time.sleep(0.05)
    raise RuntimeError(f"CRD {name} was not established within 10 s")


@pytest.fixture(scope="session")
def kube_apiserver() -> Iterator[Path]:
    """The kubeconfig of a real kube-apiserver that serves kubeflow.org/v1 PyTorchJobs.

    ORCH_TEST_KUBECONFIG points at an existing test cluster; otherwise ../shared/k8s/apiserver.sh
    is started (unless it already runs in ORCH_K8S_DIR, e.g. from .ci/k8s-up.sh) and stopped again
    at the end of the session if this fixture started it.
    """
    import subprocess

    given = os.environ.get("ORCH_TEST_KUBECONFIG")
    script: Path | None = None
    if given:
        kubeconfig = Path(given)
        if not _api_reachable(kubeconfig):
            pytest.skip(f"ORCH_TEST_KUBECONFIG={given}: no API server answers with that kubeconfig")
    else:
        override = os.environ.get("ORCH_K8S_APISERVER_SH")
        candidate = Path(override) if override else SHARED / "k8s" / "apiserver.sh"
        if not candidate.exists():
            pytest.skip(f"no Kubernetes API server for the kubernetes tier: {K8S_ENABLE}")
        kubeconfig = K8S_DIR / "kubeconfig"
        if not _api_reachable(kubeconfig):
            try:
                result = subprocess.run(["bash", str(candidate), "start", str(K8S_DIR)], capture_output=True,
                                        text=True, timeout=1800)
            except subprocess.TimeoutExpired:
                pytest.skip(f"{candidate} start {K8S_DIR} did not finish in 30 min; {K8S_ENABLE}")
            if result.returncode != 0 or not _api_reachable(kubeconfig):
                pytest.skip(f"{candidate} start failed (exit {result.returncode}): "
                            f"{(result.stderr or result.stdout)[-800:]}; {K8S_ENABLE}")
            script = candidate
    install_pytorchjob_crd(kubeconfig)
    try:
        yield kubeconfig
    finally:
        if script is not None:
            subprocess.run(["bash", str(script), "stop", str(K8S_DIR)], capture_output=True, timeout=120)
