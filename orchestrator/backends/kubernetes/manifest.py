"""The PyTorchJob manifest's values and the objects that travel with it (ConfigMap, Helm values).

The template (templates/kubernetes/pytorchjob.yaml.j2) only lays values out; this module decides
them. validate.py checks the rendered manifest before anyone sees or sends it.

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
from typing import Any

from engine import run_contract as contract

from ...launch import rendezvous_id
from ...spec import JobSpec
from ...types import Placement
from .storage import check_storage, volumes_and_mounts

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

POD_IP_ENV = "ORCH_POD_IP"         # the downward API's status.podIP, for torchrun's --local-addr
POD_NAME_ENV = "ORCH_POD_NAME"     # the downward API's metadata.name: each pod's torchrun --log-dir
RDZV_STORE_SHARING = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"  # see container_env

# Where a pod finds its ds_config (the ConfigMap) and writes its run files.
CONFIG_MOUNT = "/etc/orch"
RUN_DIR = "/orch/run"
CHECKPOINT_DIR = "/orch/checkpoints"


def pod_placement(spec: JobSpec, job_token: str = "") -> Placement:
    """Where files live in the pods: the ConfigMap's mount, the pod's run dir, the checkpoint volume."""
    ds = f"{CONFIG_MOUNT}/ds_config.json" if spec.ds_config is not None else None
    return Placement(run_dir=RUN_DIR, ds_config_path=ds, checkpoint_dir=spec.checkpoint.dir or CHECKPOINT_DIR,
                     python=spec.python or "python", job_token=job_token)


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


def agent_log_dir(placement: Placement) -> str:
    """torchrun's ``--log-dir`` in a pod: ``<run dir>/torchelastic/<pod name>`` on the run volume.
    One directory per pod (the pod name is stable across container restarts and the operator's
    re-creation of a failed pod), in which every start of torchrun makes ``<rdzv id>_<random>/``
    with one ``attempt_<n>`` per start of its workers: restarts.py counts both from it."""
    return f"{contract.RunPaths(placement.run_dir).torchelastic}/$({POD_NAME_ENV})"


def container_command(spec: JobSpec, placement: Placement, program_argv: list[str]) -> list[str]:
    """torchrun reads PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR/PORT and, for elastic jobs,
    PET_RDZV_ENDPOINT/BACKEND/ID and PET_MAX_RESTARTS from the environment the operator injects
    (training-operator release-1.9, pkg/controller.v1/pytorch/envvar.go, master.go, elastic.go), so
    only per-job flags are given.

    torchrun names its rendezvous node ``<local addr>_<pid>_<n>``, and a node that finds its name
    among the participants of a completed round takes that round as its own. ``--local-addr`` is the
    pod's IP (``$(ORCH_POD_IP)``, expanded by the kubelet from the downward API), which keeps pods
    apart and is what the others reach this one at; the PID keeps container restarts within one pod
    apart, as the pod shares one PID namespace (``shareProcessNamespace``, see pod_values)."""
    return [placement.python, "-m", "torch.distributed.run",
            f"--nproc-per-node={spec.procs_per_node}", f"--max-restarts={spec.max_restarts}",
            f"--local-addr=$({POD_IP_ENV})", f"--log-dir={agent_log_dir(placement)}", *program_argv]


def container_env(spec: JobSpec, job_env: dict[str, str]) -> list[dict[str, str]]:
    """orch's variables first (in their fixed order), then the user's, sorted by name.

    Sorting the user's part makes the list the same as the Helm chart's, whose templates can
    only walk a map in key order. A user value for one of orch's names replaces it.

    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: torchrun's c10d rendezvous otherwise publishes the
    workers' store address (``MASTER_ADDR``) only in the first round an agent takes part in as
    rank 0 (torch/distributed/elastic/rendezvous/dynamic_rendezvous.py, ``next_rendezvous``). An
    agent that joins a running job later - a killed container restarted by the kubelet - then
    waits for that key in its first round, whose rank 0 never writes it again, until the store
    times out (60 s) and every agent of the job fails. Without the sharing, rank 0 publishes it
    every round and the workers start their own store, as torchrun did before it shared one.
    """
    base = {"PYTHONUNBUFFERED": "1", RDZV_STORE_SHARING: "1", **job_env}
    # On Kubernetes a CPU job simply requests no GPU; masking devices is the kubelet's job.
    base.pop("CUDA_VISIBLE_DEVICES", None)
    items = [(k, v) for k, v in base.items() if k not in spec.env] + sorted(spec.env.items())
    return [{"name": k, "value": v} for k, v in items]


def pod_values(spec: JobSpec, placement: Placement, program_argv: list[str],
               job_env: dict[str, str]) -> dict[str, Any]:
    """What every pod of the job looks like, whichever Kubernetes job kind runs it.

    The pod's containers share one PID namespace (its sandbox's, which outlives a container):
    a restarted container's torchrun then gets a new PID, hence a new rendezvous node name.
    In a PID namespace of its own it would be PID 1 again, named like the agent that was
    killed, and would take the dead agent's place in the finished round while the others
    start a new one: the rendezvous then waits on it until its store times out (60 s) and
    every agent of the job fails."""
    k = spec.kubernetes
    labels = {MANAGED_BY: "orch", JOB_LABEL: spec.name, **k.labels}
    resources: dict[str, dict[str, Any]] = {key: dict(val) for key, val in k.resources.items()}
    if spec.gpus_per_node:
        for section in ("limits", "requests"):
            resources.setdefault(section, {}).setdefault("nvidia.com/gpu", spec.gpus_per_node)
    volumes, mounts = volumes_and_mounts(spec, placement.checkpoint_dir, placement.run_dir,
                                         config_map_name(spec.name), CONFIG_MOUNT)
    return {
        "labels": labels,
        "image": k.image or DEFAULT_IMAGE,
        "command": container_command(spec, placement, program_argv),
        "container_env": container_env(spec, job_env),
        "field_env": [{"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                      {"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": PORT_NAME, "containerPort": spec.rdzv_port or MASTER_PORT, "protocol": "TCP"}],
        "resources": resources,
        "volume_mounts": mounts,
        "volumes": volumes,
    }


def manifest_context(spec: JobSpec, placement: Placement, files: dict[str, str],
                     program_argv: list[str], job_env: dict[str, str]) -> dict[str, Any]:
    """Values for the PyTorchJob template: the pod, plus the replica layout and rendezvous id.
    Refuses volumes that cannot work (storage.py): a multi-pod job without a shared volume."""
    del files  # the ConfigMap always exists (it carries job.json); see config_map()
    check_storage(spec, placement.checkpoint_dir)
    return {
        **pod_values(spec, placement, program_argv, job_env),
        "replicas": replica_counts(spec),
        "rdzv_id": rendezvous_id(spec, placement),
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
    data = spec.model_dump(mode="json", exclude={"slurm", "local", "ssh", "ds_config", "nodes"}, exclude_none=True)
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
