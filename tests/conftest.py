"""Fixtures shared by all test modules."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml

from tests.shared_env import REPO, pytorchjob_crd_path


@pytest.fixture(autouse=True)
def _isolated_orch_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the real ~/.orch."""
    home = tmp_path_factory.mktemp("orch-home")
    monkeypatch.setenv("ORCH_HOME", str(home))
    return home


@functools.lru_cache(maxsize=1)
def _crd_schema(path: str) -> dict:
    from orchestrator.crd_schema import crd_version_schema

    return crd_version_schema(yaml.safe_load(Path(path).read_text()))


@pytest.fixture
def pytorchjob_schema() -> dict:
    """Strict JSON Schema of kubeflow.org/v1 PyTorchJob from the real CRD (skips if absent)."""
    return _crd_schema(str(pytorchjob_crd_path()))


@pytest.fixture
def examples_dir() -> Path:
    return REPO / "examples"
