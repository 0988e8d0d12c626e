"""The one place tests reach outside the repository (../shared: Slurm and API-server scripts,
the Kubeflow CRD), and say how to enable a tier when it is absent.

In a user's clone there is no ../shared: those tiers skip, each with a message naming the
environment variable that points them at a real resource instead.
"""
from __future__ import annotations

import os
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
