"""The checks a rendered PyTorchJob must pass before anyone sees or sends it.

The YAML is parsed back to prove that no value changed the document's structure; the strict CRD
schema must accept it (a misspelled field is an error, not silently pruned by the API server);
the training operator's admission webhook rules must hold; and, before submitting, Kubernetes'
label and annotation rules.
"""
from __future__ import annotations

from typing import Any

import yaml

from ...errors import UserError
from ...k8s_names import annotation_problems, is_dns1035_label, label_problems
from ...spec import JobSpec
from .crd_schema import pytorchjob_schema, schema_errors
from .manifest import CONTAINER_NAME, MANAGERS, replica_counts

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
    problems = []
    if job.get("metadata", {}).get("name") != spec.name:
        problems.append("metadata.name does not equal the job name")
    expected = replica_counts(spec)
    got = {k: v.get("replicas") for k, v in job.get("spec", {}).get("pytorchReplicaSpecs", {}).items()}
    if got != expected:
        problems.append(f"replica counts {got} differ from the spec's {expected}")
    if problems:
        raise UserError("internal error: rendered PyTorchJob failed validation:\n  " + "\n  ".join(problems))
    check_job(job)
    return job


def check_job(job: dict[str, Any], *, metadata: bool = False) -> None:
    """Raise a UserError listing every reason the cluster would refuse ``job``.

    ``metadata`` adds Kubernetes' label and annotation rules (checked before submitting; the
    CRD schema does not cover metadata).
    """
    problems = schema_problems(job) + operator_rules(job)
    if metadata:
        problems += metadata_problems(job)
    if problems:
        name = (job.get("metadata") or {}).get("name", "?")
        raise UserError(f"PyTorchJob {name!r} would be refused by the cluster:\n  " + "\n  ".join(problems),
                        hint="values come from the job spec's kubernetes: section (see `orch render "
                             "--cluster kubernetes`)")


# which job-spec key a pod-spec field came from, to point users at what they wrote
_SPEC_KEYS = {"tolerations": "kubernetes.tolerations", "nodeSelector": "kubernetes.node_selector",
              "resources": "kubernetes.resources", "volumes": "kubernetes.volumes/shm_size/checkpoint_pvc",
              "volumeMounts": "kubernetes.volume_mounts",
              "serviceAccountName": "kubernetes.service_account", "labels": "kubernetes.labels",
              "annotations": "kubernetes.annotations", "runPolicy": "kubernetes (run policy keys)"}


def _json_path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def schema_problems(job: dict[str, Any]) -> list[str]:
    """The strict PyTorchJob schema's objections, one line each, with the spec key behind it."""
    problems = []
    for path, message in sorted(schema_errors(job, pytorchjob_schema()), key=lambda e: [str(p) for p in e[0]]):
        origin = next((_SPEC_KEYS[p] for p in reversed(path) if isinstance(p, str) and p in _SPEC_KEYS), None)
        problems.append(f"{_json_path(path)}: {message}" + (f" (from {origin})" if origin else ""))
    return problems


def operator_rules(job: dict[str, Any]) -> list[str]:
    """The Kubeflow training operator's admission rules for a PyTorchJob (its validating webhook,
    pkg/webhooks/pytorch/pytorchjob_webhook.go in release-1.9), plus orch's elastic layout rule."""
    problems: list[str] = []
    name = (job.get("metadata") or {}).get("name", "")
    if not is_dns1035_label(name):
        problems.append(f"metadata.name: {name!r} must be a DNS-1035 label (lowercase letters, digits, '-', "
                        "starting with a letter, at most 63 characters)")
    spec = job.get("spec") or {}
    manager = (spec.get("runPolicy") or {}).get("managedBy")
    if manager is not None and manager not in MANAGERS:
        problems.append(f"spec.runPolicy.managedBy: {manager!r} is not one of {', '.join(MANAGERS)}")
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        problems.append("spec.pytorchReplicaSpecs: is required")
    for rtype, rspec in replicas.items():
        where = f"spec.pytorchReplicaSpecs.{rtype}"
        rspec = rspec or {}
        if rtype not in ("Master", "Worker"):
            problems.append(f"{where}: replica type must be Master or Worker")
        containers = ((rspec.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            problems.append(f"{where}.template.spec.containers: must be specified")
        for i, c in enumerate(containers):
            if not c.get("image"):
                problems.append(f"{where}.template.spec.containers[{i}].image: is required")
        if containers and not any(c.get("name") == CONTAINER_NAME for c in containers):
            problems.append(f"{where}.template.spec.containers: a container named '{CONTAINER_NAME}' is required")
        count = rspec.get("replicas")
        if rtype == "Master" and count != 1:
            problems.append(f"{where}.replicas: must be 1")
        elif rtype != "Master" and count is not None and count < 1:
            problems.append(f"{where}.replicas: must be at least 1")
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if "Worker" not in replicas:
            problems.append("spec.pytorchReplicaSpecs.Worker: must be configured if elasticPolicy is used")
        if elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            problems.append("spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode")
        lo, hi = elastic.get("minReplicas"), elastic.get("maxReplicas")
        if lo is not None and hi is not None and lo > hi:
            problems.append("spec.elasticPolicy.minReplicas: must be <= maxReplicas")
        if "Master" in replicas:  # orch's rule: every elastic node is an equal Worker
            problems.append("spec.elasticPolicy: orch's elastic jobs use Worker replicas only")
    return problems


def metadata_problems(job: dict[str, Any]) -> list[str]:
    """Labels the API server (job) or the operator's pod creation (templates) would refuse."""
    meta = job.get("metadata") or {}
    problems = label_problems("metadata.labels", meta.get("labels"))
    for rtype, rspec in ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).items():
        tmeta = ((rspec or {}).get("template") or {}).get("metadata") or {}
        if tmeta.get("labels") != meta.get("labels"):
            problems += label_problems(f"spec.pytorchReplicaSpecs.{rtype}.template.metadata.labels",
                                        tmeta.get("labels"))
    problems += annotation_problems("metadata.annotations", meta.get("annotations"))
    return [p + " (from kubernetes.labels / kubernetes.annotations)" for p in problems]
