"""Golden-file tests of generated sbatch scripts and PyTorchJob manifests (as submitit does for
sbatch text): a change to generated text shows up as a reviewable diff.

Regenerate after an intended change with: ORCH_UPDATE_GOLDEN=1 pytest tests/orchestrator/test_render_golden.py
"""
from __future__ import annotations

import os
import subprocess

import jsonschema
import pytest
import yaml

from orchestrator.backends.kubernetes import render as kubernetes_render
from orchestrator.backends.local import render as local_render
from orchestrator.backends.slurm import render as slurm_render
from orchestrator.spec import load_spec
from orchestrator.types import Placement
from tests.shared_env import REPO

GOLDEN = REPO / "tests" / "orchestrator" / "golden"
EXAMPLES = ["tiny-gpt-zero2", "tiny-gpt-elastic", "gpt-1b-gpu"]


def fixed_placement(cluster: str, name: str) -> Placement | None:
    """Paths that do not depend on the machine running the test."""
    if cluster == "kubernetes":
        return None  # the Kubernetes placement is already machine-independent
    run = f"/scratch/orch/runs/{name}-20261125-000000"
    return Placement(run_dir=run, ds_config_path=f"{run}/ds_config.json",
                     checkpoint_dir=f"{run}/checkpoints", python="/opt/venv/bin/python")


def rendered(example: str, cluster: str) -> str:
    spec = load_spec(REPO / "examples" / f"{example}.yaml")
    render = {"slurm": slurm_render, "kubernetes": kubernetes_render, "local": local_render}[cluster].render
    return render(spec, fixed_placement(cluster, spec.name)).text


@pytest.mark.parametrize("example", EXAMPLES)
@pytest.mark.parametrize("cluster,suffix", [("slurm", "sbatch"), ("kubernetes", "yaml"), ("local", "sh")])
def test_rendered_text_matches_golden_file(example: str, cluster: str, suffix: str) -> None:
    text = rendered(example, cluster)
    golden = GOLDEN / f"{example}.{suffix}"
    if os.environ.get("ORCH_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}; run with ORCH_UPDATE_GOLDEN=1 to create it"
    assert text == golden.read_text(), f"{golden.name} changed; review the diff, then ORCH_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("example", EXAMPLES)
def test_sbatch_script_is_valid_bash(example: str, tmp_path) -> None:
    script = tmp_path / "job.sbatch"
    script.write_text(rendered(example, "slurm"))
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("example", EXAMPLES)
def test_manifest_is_valid_against_the_pytorchjob_crd(example: str, pytorchjob_schema: dict) -> None:
    job = yaml.safe_load(rendered(example, "kubernetes"))
    jsonschema.validate(job, pytorchjob_schema)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "pytorch" and container["image"]


def test_strict_crd_schema_rejects_a_misspelled_field(pytorchjob_schema: dict) -> None:
    job = yaml.safe_load(rendered("gpt-1b-gpu", "kubernetes"))
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["nodeSelecter"] = {"a": "b"}
    with pytest.raises(jsonschema.ValidationError, match="nodeSelecter"):
        jsonschema.validate(job, pytorchjob_schema)


def test_elastic_job_renders_elastic_everywhere() -> None:
    sbatch = rendered("tiny-gpt-elastic", "slurm")
    assert "#SBATCH --no-kill" in sbatch and "#SBATCH --nodes=1-3" in sbatch
    assert "--nnodes=1:3" in sbatch and "--no-kill" in sbatch.split("srun ", 1)[1]
    job = yaml.safe_load(rendered("tiny-gpt-elastic", "kubernetes"))
    policy = job["spec"]["elasticPolicy"]
    assert (policy["minReplicas"], policy["maxReplicas"], policy["rdzvBackend"]) == (1, 3, "c10d")
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Worker"}


def test_fixed_size_job_has_one_master_and_workers() -> None:
    job = yaml.safe_load(rendered("gpt-1b-gpu", "kubernetes"))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    master = replicas["Master"]["template"]["spec"]
    assert master["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    mounts = {m["mountPath"]: (m["name"], m.get("subPath")) for m in master["containers"][0]["volumeMounts"]}
    assert mounts["/shared/checkpoints/gpt-1b"] == ("orch-shared", "gpt-1b/checkpoints")
    assert mounts["/orch/run"] == ("orch-shared", "gpt-1b/run") and mounts["/dev/shm"] == ("dshm", None)
    assert mounts["/data"] == ("data", None)  # the token file of --data /data/tokens.bin
    claims = [v["persistentVolumeClaim"]["claimName"] for v in master["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["gpt-1b-checkpoints", "gpt-1b-tokens"]
