"""Fixtures shared by all test modules."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml

from tests.shared_env import REPO, pytorchjob_crd_path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The real-node tier runs last: CI builds that node beside the rest of the suite (the fixture
    waits for the build), so every other test runs while Kubernetes compiles."""
    items.sort(key=lambda item: "k8s_node" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def _session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache (CPU peak probe, kernel autotune) for the whole session: measured once."""
    return tmp_path_factory.mktemp("orch-cache")


@pytest.fixture(autouse=True)
def _isolated_orch_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                        _session_cache_dir: Path) -> Path:
    """No test reads or writes the real ~/.orch or ~/.cache/orch."""
    home = tmp_path_factory.mktemp("orch-home")
    monkeypatch.setenv("ORCH_HOME", str(home))
    monkeypatch.setenv("ORCH_CACHE_DIR", str(_session_cache_dir))
    return home


@functools.lru_cache(maxsize=1)
def _crd_schema(path: str) -> dict:
    from orchestrator.backends.kubernetes.crd_schema import crd_version_schema

    return crd_version_schema(yaml.safe_load(Path(path).read_text()))


@pytest.fixture
def pytorchjob_schema() -> dict:
    """Strict JSON Schema of kubeflow.org/v1 PyTorchJob from the real CRD (skips if absent)."""
    return _crd_schema(str(pytorchjob_crd_path()))


@pytest.fixture
def examples_dir() -> Path:
    return REPO / "examples"


# -- the kubernetes tier: a namespace of its own per test, on the real API server ----------------
from tests.shared_env import kube_apiserver  # noqa: E402,F401  (session fixture)


class K8sNamespace:
    """A fresh namespace on the test API server, and a kubeconfig whose context defaults to it."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        from kubernetes import client, config

        self.kubeconfig, self.namespace = kubeconfig, namespace
        self.api_client = config.new_client_from_config(str(kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    def pytorchjob(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object("kubeflow.org", "v1", self.namespace, "pytorchjobs", name)

    def set_status(self, name: str, status: dict) -> dict:
        """Replace the status subresource as the training operator does (UpdateStatus: the whole
        status, not a merge, so counts that dropped to zero disappear)."""
        obj = self.pytorchjob(name)
        obj["status"] = status
        return self.custom.replace_namespaced_custom_object_status(
            "kubeflow.org", "v1", self.namespace, "pytorchjobs", name, obj)


@pytest.fixture
def k8s(kube_apiserver: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """KUBECONFIG points at the test API server with the current context's namespace set to a new
    namespace; everything in it is removed afterwards (there is no garbage collector to do it)."""
    import secrets

    from kubernetes.client.exceptions import ApiException

    namespace = f"orch-test-{secrets.token_hex(4)}"
    kc = yaml.safe_load(kube_apiserver.read_text())
    current = next(c for c in kc["contexts"] if c["name"] == kc["current-context"])
    current["context"]["namespace"] = namespace
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(kc))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("ORCH_KUBE_CONTEXT", raising=False)
    # No kubelet serves this API server, so a run-directory reader pod never runs: orch gives up on
    # it after 1 s instead of waiting out its 1-3 min default each time (the same give-up path).
    monkeypatch.setenv("ORCH_K8S_READER_TIMEOUT_S", "1")
    ns = K8sNamespace(kubeconfig, namespace)
    ns.core.create_namespace({"metadata": {"name": namespace, "labels": {"orch.dev/test": "true"}}})
    yield ns
    try:
        jobs = ns.custom.list_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs")["items"]
        for job in jobs:  # foreground deletion waits for a garbage collector this server lacks
            name = job["metadata"]["name"]
            ns.custom.patch_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", name,
                                                     {"metadata": {"finalizers": None}})
            if not job["metadata"].get("deletionTimestamp"):
                ns.custom.delete_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", name)
        ns.core.delete_collection_namespaced_config_map(namespace)
        ns.core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
        ns.core.delete_namespace(namespace)
    except ApiException:
        pass


from tests.shared_env import slurm_cluster  # noqa: E402,F401  (session fixture: a real Slurm cluster)
