"""The PyTorchJob manifest's values, and the checks a rendered manifest must pass before use.

The template (templates/kubernetes/pytorchjob.yaml.j2) only lays values out; this module
decides them (replica types, command, env, volumes) and, after rendering, parses the YAML back
to prove that no value changed the document's structure and that the operator's own
admission rules hold (container ``pytorch`` with an image, at most one Master, ...).
"""
from __future__ import annotations

from typing import Any

import yaml

from .errors import UserError
from .spec import JobSpec

CONTAINER_NAME = "pytorch"  # the Kubeflow training operator looks the container up by this name


def config_map_name(spec: JobSpec) -> str:
    return f"{spec.name}-orch"


def replica_counts(spec: JobSpec) -> dict[str, int]:
    """Master/Worker replica counts. Elastic jobs are Worker-only (the operator's elastic mode)."""
    if spec.nodes.elastic:
        return {"Worker": spec.nodes.max}
    counts = {"Master": 1}
    if spec.nodes.max > 1:
        counts["Worker"] = spec.nodes.max - 1
    return counts


def container_command(spec: JobSpec, placement: Any, program_argv: list[str]) -> list[str]:
    """torchrun reads PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR/PORT and, for elastic jobs,
    PET_RDZV_* from the environment the operator injects, so only per-job flags are given."""
    return [placement.python, "-m", "torch.distributed.run",
            f"--nproc-per-node={spec.procs_per_node}", f"--max-restarts={spec.max_restarts}",
            *program_argv]


def manifest_context(spec: JobSpec, placement: Any, files: dict[str, str],
                     program_argv: list[str], job_env: dict[str, str]) -> dict[str, Any]:
    """Values for the PyTorchJob template."""
    k = spec.kubernetes
    labels = {"app.kubernetes.io/managed-by": "orch", "orch.dev/job": spec.name, **k.labels}
    resources: dict[str, dict[str, Any]] = {key: dict(val) for key, val in k.resources.items()}
    if spec.gpus_per_node:
        for section in ("limits", "requests"):
            resources.setdefault(section, {}).setdefault("nvidia.com/gpu", spec.gpus_per_node)
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"},
              {"name": "checkpoints", "mountPath": placement.checkpoint_dir}]
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}},
        {"name": "checkpoints",
         **({"persistentVolumeClaim": {"claimName": k.checkpoint_pvc}} if k.checkpoint_pvc else {"emptyDir": {}})},
    ]
    if files:
        mounts.append({"name": "orch-config", "mountPath": "/etc/orch", "readOnly": True})
        volumes.append({"name": "orch-config", "configMap": {"name": config_map_name(spec)}})
    env = [{"name": key, "value": value} for key, value in
           {"PYTHONUNBUFFERED": "1", **_without_cuda_mask(spec, job_env)}.items()]
    return {
        "labels": labels,
        "replicas": replica_counts(spec),
        "command": container_command(spec, placement, program_argv),
        "container_env": env,
        "resources": resources,
        "volume_mounts": mounts,
        "volumes": volumes,
        "rdzv_id": f"{spec.name}-{placement.job_token}" if placement.job_token else spec.name,
        "image": k.image or "ghcr.io/orch-dev/orch:latest",
    }


def _without_cuda_mask(spec: JobSpec, env: dict[str, str]) -> dict[str, str]:
    # On Kubernetes a CPU job simply requests no GPU; masking devices is the kubelet's job.
    return {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES" or spec.env.get(k) is not None}


def validate_manifest_text(text: str, spec: JobSpec) -> dict[str, Any]:
    """Parse the rendered manifest back and check it is the document we meant to produce.

    A value that smuggled in structure (a newline and ``command:``, a ``: {}``) would change
    the parsed object; here it fails loudly instead of reaching the API server.
    """
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:  # a template bug, not a user mistake, but say it clearly
        raise UserError(f"internal error: rendered PyTorchJob is not valid YAML: {exc}") from None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise UserError("internal error: rendered PyTorchJob must be exactly one YAML mapping")
    job = docs[0]
    problems = operator_rules(job)
    if job.get("metadata", {}).get("name") != spec.name:
        problems.append("metadata.name does not equal the job name")
    expected = replica_counts(spec)
    got = {k: v.get("replicas") for k, v in job.get("spec", {}).get("pytorchReplicaSpecs", {}).items()}
    if got != expected:
        problems.append(f"replica counts {got} differ from the spec's {expected}")
    if problems:
        raise UserError("rendered PyTorchJob failed validation:\n  " + "\n  ".join(problems))
    return job


def operator_rules(job: dict[str, Any]) -> list[str]:
    """The Kubeflow training operator's admission rules for a PyTorchJob (its webhook)."""
    problems: list[str] = []
    name = job.get("metadata", {}).get("name", "")
    if not isinstance(name, str) or len(name) > 63:
        problems.append("metadata.name must be a DNS-1035 label of at most 63 characters")
    spec = job.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        problems.append("spec.pytorchReplicaSpecs must not be empty")
    for rtype, rspec in replicas.items():
        where = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in ("Master", "Worker"):
            problems.append(f"{where}: replica type must be Master or Worker")
        if rtype == "Master" and rspec.get("replicas", 1) != 1:
            problems.append(f"{where}.replicas must be 1")
        containers = (rspec.get("template") or {}).get("spec", {}).get("containers") or []
        named = [c for c in containers if c.get("name") == CONTAINER_NAME]
        if not named:
            problems.append(f"{where}: a container named '{CONTAINER_NAME}' is required")
        for c in named:
            if not c.get("image"):
                problems.append(f"{where}: container '{CONTAINER_NAME}' needs an image")
    elastic = spec.get("elasticPolicy")
    if elastic:
        lo, hi = elastic.get("minReplicas"), elastic.get("maxReplicas")
        if lo is not None and hi is not None and lo > hi:
            problems.append("spec.elasticPolicy.minReplicas must be <= maxReplicas")
        if "Master" in replicas:
            problems.append("spec.elasticPolicy: elastic jobs use Worker replicas only")
    return problems
