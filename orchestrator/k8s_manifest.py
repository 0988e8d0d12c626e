"""The PyTorchJob manifest's values, and the checks a manifest must pass before anyone sees or sends it.

The template (templates/kubernetes/pytorchjob.yaml.j2) only lays values out; this module decides
them and, after rendering, parses the YAML back to prove that no value changed the document's
structure, that the strict CRD schema accepts it (a misspelled field is an error, not silently
pruned by the API server) and that the training operator's admission webhook would accept it.

The values come in two layers so that another Kubernetes target can be added beside PyTorchJob:
``pod_values`` is target-neutral (image, torchrun command, env, resources, volumes, labels) and
``manifest_context`` adds what only a PyTorchJob has (Master/Worker replicas, ``elasticPolicy``).
A Kubeflow Trainer v2 ``TrainJob`` would reuse ``pod_values`` with a template of its own; PyTorchJob
v1 stays the elastic path, since v2 removed ``elasticPolicy``.

The same objects come out of the Helm chart (charts/orch-job) given ``chart_values(spec)``; a test
renders both and compares them.
"""
from __future__ import annotations

import json
import re
from typing import Any

import yaml

from .errors import UserError
from .render import K8S_CONFIG_MOUNT
from .spec import JobSpec

API_VERSION = "kubeflow.org/v1"
GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER_NAME = "pytorch"        # the training operator looks the container up by this name
PORT_NAME = "pytorchjob-port"     # ... and reads the rendezvous port from this container port
# the rendezvous port in the pod when the spec names none: each pod has its own network namespace, so
# jobs never share it (charts/orch-job/values.yaml has the same default)
MASTER_PORT = 29500
DEFAULT_IMAGE = "ghcr.io/orch-dev/orch:latest"
JOB_FILE = "job.json"             # the job spec, beside ds_config.json in the ConfigMap
MANAGED_BY = "app.kubernetes.io/managed-by"
JOB_LABEL = "orch.dev/job"
JOB_ID_ANNOTATION = "orch.dev/job-id"
# what the operator accepts in runPolicy.managedBy (pkg/common/util/webhooks.go, release-1.9)
MANAGERS = ("kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue")

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def config_map_name(job_name: str) -> str:
    """The ConfigMap beside job ``job_name`` (ds_config.json, job.json)."""
    return f"{job_name}-orch"


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


def container_env(spec: JobSpec, job_env: dict[str, str]) -> list[dict[str, str]]:
    """orch's variables first (in their fixed order), then the user's, sorted by name.

    Sorting the user's part makes the list the same as the Helm chart's, whose templates can
    only walk a map in key order. A user value for one of orch's names replaces it.
    """
    base = {"PYTHONUNBUFFERED": "1", **job_env}
    # On Kubernetes a CPU job simply requests no GPU; masking devices is the kubelet's job.
    base.pop("CUDA_VISIBLE_DEVICES", None)
    items = [(k, v) for k, v in base.items() if k not in spec.env] + sorted(spec.env.items())
    return [{"name": k, "value": v} for k, v in items]


def pod_values(spec: JobSpec, placement: Any, program_argv: list[str],
               job_env: dict[str, str]) -> dict[str, Any]:
    """What every pod of the job looks like, whichever Kubernetes job kind runs it."""
    k = spec.kubernetes
    labels = {MANAGED_BY: "orch", JOB_LABEL: spec.name, **k.labels}
    resources: dict[str, dict[str, Any]] = {key: dict(val) for key, val in k.resources.items()}
    if spec.gpus_per_node:
        for section in ("limits", "requests"):
            resources.setdefault(section, {}).setdefault("nvidia.com/gpu", spec.gpus_per_node)
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"},
              {"name": "checkpoints", "mountPath": placement.checkpoint_dir},
              {"name": "orch-config", "mountPath": K8S_CONFIG_MOUNT, "readOnly": True}]
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}},
        {"name": "checkpoints",
         **({"persistentVolumeClaim": {"claimName": k.checkpoint_pvc}} if k.checkpoint_pvc else {"emptyDir": {}})},
        # the ConfigMap orch creates beside the job: ds_config.json and job.json
        {"name": "orch-config", "configMap": {"name": config_map_name(spec.name)}},
    ]
    return {
        "labels": labels,
        "image": k.image or DEFAULT_IMAGE,
        "command": container_command(spec, placement, program_argv),
        "container_env": container_env(spec, job_env),
        "ports": [{"name": PORT_NAME, "containerPort": spec.rdzv_port or MASTER_PORT, "protocol": "TCP"}],
        "resources": resources,
        "volume_mounts": mounts,
        "volumes": volumes,
    }


def manifest_context(spec: JobSpec, placement: Any, files: dict[str, str],
                     program_argv: list[str], job_env: dict[str, str]) -> dict[str, Any]:
    """Values for the PyTorchJob template: the pod, plus the replica layout and rendezvous id."""
    del files  # the ConfigMap always exists (it carries job.json); see config_map()
    return {
        **pod_values(spec, placement, program_argv, job_env),
        "replicas": replica_counts(spec),
        "rdzv_id": f"{spec.name}-{placement.job_token}" if placement.job_token else spec.name,
        "config_map": config_map_name(spec.name),
    }


# --------------------------------------------------------------------------------------------
# The objects that travel with the job: ConfigMap, owner reference, Helm values
# --------------------------------------------------------------------------------------------

def chart_values(spec: JobSpec) -> dict[str, Any]:
    """The job spec as values for charts/orch-job (its keys mirror the spec's).

    The ds_config is inlined (the chart cannot read the user's file), the node count is written
    as the user would (``2`` or ``"1:3"``), and unset optional keys are left out so that Helm's
    defaults apply exactly as the spec's do.
    """
    data = spec.model_dump(mode="json", exclude={"slurm", "local", "ds_config", "nodes"}, exclude_none=True)
    data["nodes"] = spec.nodes.max if not spec.nodes.elastic else str(spec.nodes)
    data["rdzv_port"] = spec.rdzv_port or MASTER_PORT  # what the pods use; the chart's default too
    ds = spec.ds_config_dict()
    if ds is not None:
        data["ds_config"] = ds
    return data


def job_file_text(spec: JobSpec) -> str:
    """``job.json`` in the ConfigMap: the spec as the chart's values (usable as ``helm -f``)."""
    return json.dumps(chart_values(spec), indent=2, sort_keys=True) + "\n"


def config_map(spec: JobSpec, files: dict[str, str], *, namespace: str | None = None,
               owner: dict[str, Any] | None = None, job_id: str | None = None) -> dict[str, Any]:
    """The ConfigMap mounted at /etc/orch: the rendered side files plus ``job.json``.

    ``owner`` (the created PyTorchJob) makes Kubernetes' garbage collector delete the ConfigMap
    with the job, however the job is deleted (orch cancel, kubectl delete, ttlSecondsAfterFinished).
    """
    meta: dict[str, Any] = {"name": config_map_name(spec.name),
                            "labels": {MANAGED_BY: "orch", JOB_LABEL: spec.name, **spec.kubernetes.labels}}
    if namespace:
        meta["namespace"] = namespace
    if job_id:
        meta["annotations"] = {JOB_ID_ANNOTATION: job_id}
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {**files, JOB_FILE: job_file_text(spec)}}


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    """An ownerReference to a created object (it must carry the server-assigned uid)."""
    meta = obj["metadata"]
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"], "uid": meta["uid"],
            "blockOwnerDeletion": True}


# --------------------------------------------------------------------------------------------
# Validation: parse-back, strict CRD schema, the operator's webhook, Kubernetes metadata rules
# --------------------------------------------------------------------------------------------

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
              "resources": "kubernetes.resources", "volumes": "kubernetes.shm_size/checkpoint_pvc",
              "serviceAccountName": "kubernetes.service_account", "labels": "kubernetes.labels",
              "annotations": "kubernetes.annotations", "runPolicy": "kubernetes (run policy keys)"}


def _json_path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def schema_problems(job: dict[str, Any]) -> list[str]:
    """The strict PyTorchJob schema's objections, one line each, with the spec key behind it."""
    from .crd_schema import pytorchjob_schema, schema_errors

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
    if not isinstance(name, str) or len(name) > 63 or not DNS1035.match(name):
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


def label_problems(where: str, labels: Any) -> list[str]:
    problems = []
    for key, value in (labels or {}).items():
        prefix, _, name = str(key).rpartition("/")
        if (prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix))) \
                or len(name) > 63 or not LABEL_NAME.match(name):
            problems.append(f"{where}: key {key!r} is not a valid label key (optional DNS prefix and '/', then "
                            "at most 63 of A-Z a-z 0-9 - _ . starting and ending alphanumeric)")
        if not isinstance(value, str) or len(value) > 63 or (value and not LABEL_NAME.match(value)):
            problems.append(f"{where}.{key}: {value!r} is not a valid label value (at most 63 of "
                            "A-Z a-z 0-9 - _ . starting and ending alphanumeric)")
    return problems


def annotation_problems(where: str, annotations: Any) -> list[str]:
    """Annotation keys follow the label-key rules; values are free text."""
    problems = []
    for key in (annotations or {}):
        prefix, _, name = str(key).rpartition("/")
        if (prefix and not DNS1123_SUBDOMAIN.match(prefix)) or len(name) > 63 or not LABEL_NAME.match(name):
            problems.append(f"{where}: key {key!r} is not a valid annotation key")
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
