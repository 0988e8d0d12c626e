"""Where a Kubernetes job's files live: the volume every pod shares, and the user's own volumes.

A multi-pod job needs one directory that every pod sees: each rank writes its checkpoint shard
into the same ``step-N.tmp/`` and rank 0 renames it, and a restarted pod resumes from ``latest``.
A per-pod ``emptyDir`` is none of that (rank 2's shard goes to its own empty directory, and the
rename on rank 0 finds no shards), so orch refuses multi-pod jobs without shared storage instead
of failing at the first checkpoint. The shared volume is either

* ``kubernetes.checkpoint_pvc: NAME`` - a ReadWriteMany PersistentVolumeClaim, or
* ``kubernetes.shared_volume: NAME`` - one of ``kubernetes.volumes`` (hostPath on a one-node
  cluster, NFS, a CSI driver with ReadWriteMany...).

Checkpoints go to ``<job name>/checkpoints`` and the run directory (status, metrics, hang dumps) to
``<job name>/run`` on it (subPath mounts), so a resubmitted job resumes and ``orch status
--metrics`` / ``orch plot`` can read the run (see run_files.py). A single-pod job may keep a
per-pod ``emptyDir``; orch warns that a rescheduled pod starts from scratch.

``kubernetes.volumes`` are core/v1 Volumes and ``kubernetes.volume_mounts`` core/v1 VolumeMounts
of the ``pytorch`` container, checked against the same strict schema the cluster uses (from the
PyTorchJob CRD) with errors that name the spec key.
"""
from __future__ import annotations

from typing import Any

from ...errors import UserError
from ...spec import JobSpec
from .crd_schema import pytorchjob_schema, schema_errors

SHARED = "orch-shared"          # the volume checkpoint_pvc becomes
ORCH_VOLUMES = ("dshm", "checkpoints", "run", "orch-config", SHARED)  # names orch's own volumes use
SUBDIR_CHECKPOINTS, SUBDIR_RUN = "checkpoints", "run"


def _pod_schema() -> dict[str, Any]:
    replica = pytorchjob_schema()["properties"]["spec"]["properties"]["pytorchReplicaSpecs"]["additionalProperties"]
    return replica["properties"]["template"]["properties"]["spec"]["properties"]


def _where(key: str, index: int, path: tuple[Any, ...]) -> str:
    out = f"{key}[{index}]"
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def volume_problems(spec: JobSpec) -> list[str]:
    """kubernetes.volumes / volume_mounts / shared_volume / checkpoint_pvc checked against the
    Kubernetes schema and against each other, one line per problem naming the spec key."""
    k = spec.kubernetes
    pod = _pod_schema()
    problems = []
    volume_schema = pod["volumes"]["items"]
    mount_schema = pod["containers"]["items"]["properties"]["volumeMounts"]["items"]
    names: list[str] = []
    for i, volume in enumerate(k.volumes):
        problems += [f"{_where('kubernetes.volumes', i, path)}: {msg}"
                     for path, msg in schema_errors(volume, volume_schema)]
        name = volume.get("name") if isinstance(volume, dict) else None
        sources = [key for key in (volume if isinstance(volume, dict) else {}) if key != "name"]
        if isinstance(volume, dict) and len(sources) != 1:
            problems.append(f"kubernetes.volumes[{i}]: needs exactly one volume source (persistentVolumeClaim, "
                            f"hostPath, nfs, csi, secret, configMap, ...), found {sources or 'none'}")
        if name in ORCH_VOLUMES:
            problems.append(f"kubernetes.volumes[{i}].name: {name!r} is used by orch's own volumes; pick another name")
        elif name in names:
            problems.append(f"kubernetes.volumes[{i}].name: {name!r} is defined twice")
        if isinstance(name, str):
            names.append(name)
    for i, mount in enumerate(k.volume_mounts):
        problems += [f"{_where('kubernetes.volume_mounts', i, path)}: {msg}"
                     for path, msg in schema_errors(mount, mount_schema)]
        if isinstance(mount, dict) and mount.get("name") not in names:
            problems.append(f"kubernetes.volume_mounts[{i}].name: {mount.get('name')!r} is not one of "
                            f"kubernetes.volumes ({', '.join(names) or 'none defined'})")
    if k.shared_volume is not None and k.shared_volume not in names:
        problems.append(f"kubernetes.shared_volume: {k.shared_volume!r} is not one of kubernetes.volumes "
                        f"({', '.join(names) or 'none defined'})")
    if k.shared_volume is not None and k.checkpoint_pvc is not None:
        problems.append("kubernetes.shared_volume and kubernetes.checkpoint_pvc: set one of them (both name "
                        "the volume every pod shares)")
    return problems


def shared_volume(spec: JobSpec) -> dict[str, Any] | None:
    """The volume every pod of the job shares (checkpoints and run directory), if the spec has one."""
    k = spec.kubernetes
    if k.checkpoint_pvc:
        return {"name": SHARED, "persistentVolumeClaim": {"claimName": k.checkpoint_pvc}}
    if k.shared_volume:
        return next((v for v in k.volumes if v.get("name") == k.shared_volume), None)
    return None


def storage_problems(spec: JobSpec, checkpoint_dir: str) -> list[str]:
    """Why the job's checkpoints would not survive or not be shared; empty when they are fine."""
    if spec.nodes.max <= 1 or shared_volume(spec) is not None:
        return []
    return [f"kubernetes: a job of {spec.nodes} nodes writes one sharded checkpoint from every pod into "
            f"{checkpoint_dir}, which would be a per-pod emptyDir (each pod sees only its own shards, the "
            "first checkpoint fails and a restarted pod cannot resume). Set kubernetes.checkpoint_pvc to a "
            "ReadWriteMany PersistentVolumeClaim, or kubernetes.shared_volume to the name of one of "
            "kubernetes.volumes that every pod shares (nfs, csi, or hostPath on a one-node cluster)"]


def storage_warnings(spec: JobSpec) -> list[str]:
    if spec.nodes.max > 1 or shared_volume(spec) is not None:
        return []
    return ["kubernetes: checkpoints and the run directory are on the pod's emptyDir: a pod that is "
            "rescheduled starts from step 0 and `orch status --metrics`/`orch plot` cannot read the run; "
            "set kubernetes.checkpoint_pvc or kubernetes.shared_volume to keep them"]


def check_storage(spec: JobSpec, checkpoint_dir: str) -> None:
    problems = volume_problems(spec) + storage_problems(spec, checkpoint_dir)
    if problems:
        raise UserError("the job's Kubernetes volumes cannot work:\n  " + "\n  ".join(problems),
                        hint="volumes are core/v1 Volumes, volume_mounts core/v1 VolumeMounts of the "
                             "pytorch container; a single-node job may keep the pod's own emptyDir")


def volumes_and_mounts(spec: JobSpec, checkpoint_dir: str, run_dir: str, config_map: str, config_mount: str
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the pytorch container's mounts: orch's (shm, config, checkpoints,
    run directory) and then the user's, in the order the spec lists them."""
    k = spec.kubernetes
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}}]
    shared = shared_volume(spec)
    if shared is not None:
        if k.checkpoint_pvc:
            volumes.append(shared)
        mounts += [{"name": shared["name"], "mountPath": checkpoint_dir,
                    "subPath": f"{spec.name}/{SUBDIR_CHECKPOINTS}"},
                   {"name": shared["name"], "mountPath": run_dir, "subPath": f"{spec.name}/{SUBDIR_RUN}"}]
    else:
        volumes.append({"name": "checkpoints", "emptyDir": {}})
        mounts.append({"name": "checkpoints", "mountPath": checkpoint_dir})
    mounts.append({"name": "orch-config", "mountPath": config_mount, "readOnly": True})
    volumes.append({"name": "orch-config", "configMap": {"name": config_map}})
    return volumes + list(k.volumes), mounts + list(k.volume_mounts)
