"""Reading a Kubernetes run's directory (status.json, metrics.jsonl, hang dumps) through the API.

The pods write the run directory onto the job's shared volume (storage.py: ``<job>/run`` on the
``checkpoint_pvc`` or ``shared_volume``), which the machine running orch cannot mount. To show
``orch status --metrics`` and draw ``orch plot``, orch starts a short-lived *reader pod* in the
job's namespace that mounts that directory read-only (same volume, same subPath, the job's image)
and prints it as a base64 tar on stdout; orch reads the pod's log, unpacks the files into the
job's local run directory and deletes the pod. The ordinary readers then read the copy.

Why a pod and not ``exec``: a finished job's pods cannot be exec'ed into, and a reader pod needs
no rights on the training pods. RBAC needed in the job's namespace (beside what submit/status
use): ``pods: create, get, delete`` and ``pods/log: get``. The pod carries an ownerReference to
the PyTorchJob, so deleting the job also removes a reader left behind by an interrupted orch.
"""
from __future__ import annotations

import base64
import io
import os
import tarfile
import time
from pathlib import Path
from typing import Any

from ...errors import UserError
from .manifest import CONTAINER_NAME, JOB_LABEL, MANAGED_BY, RUN_DIR, owner_reference

READER_ROLE = "orch.dev/role"
FINAL_COPY_MARK = ".copied-after-end"  # in the local run dir: the finished job's files were copied
# tar of the run directory without checkpoints (they are not on this mount) nor the big trace files
READ_COMMAND = "cd /orch/run && tar -czf - --exclude='./tensorboard' . | base64"
# The first start of a reader on a node may pull the job's image (gigabytes): minutes, not seconds.
READER_TIMEOUT_S = 180.0
READER_TIMEOUT_ENV = "ORCH_K8S_READER_TIMEOUT_S"


def reader_timeout(default: float = READER_TIMEOUT_S) -> float:
    """How long to wait for a reader pod: ``$ORCH_K8S_READER_TIMEOUT_S`` if set (a cluster whose
    image pulls are slow needs longer; one that cannot run the pod at all is told sooner), else ``default``."""
    raw = os.environ.get(READER_TIMEOUT_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{READER_TIMEOUT_ENV}={raw!r} is not a number of seconds above 0",
                        hint=f"e.g. export {READER_TIMEOUT_ENV}=600, or unset it for the default {default:.0f} s")
    return value


def run_mount(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
    """(pod template spec, the run dir's volumeMount, its volume) of a PyTorchJob, if the run
    directory is on a volume at all (a single-pod job on emptyDir keeps it in the container)."""
    for replica in (job.get("spec", {}).get("pytorchReplicaSpecs") or {}).values():
        pod = replica.get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            if container.get("name") != CONTAINER_NAME:
                continue
            for mount in container.get("volumeMounts") or []:
                if mount.get("mountPath") == RUN_DIR:
                    volume = next((v for v in pod.get("volumes", []) if v.get("name") == mount["name"]), None)
                    if volume is not None:
                        return pod, mount, volume
    return None


def reader_pod(job: dict[str, Any]) -> dict[str, Any] | None:
    """The pod that prints the job's run directory, or None when it is on no volume."""
    found = run_mount(job)
    if found is None:
        return None
    pod, mount, volume = found
    container = next(c for c in pod["containers"] if c.get("name") == CONTAINER_NAME)
    meta = job["metadata"]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [{"name": "reader", "image": container["image"],
                        "imagePullPolicy": container.get("imagePullPolicy", "IfNotPresent"),
                        "command": ["sh", "-c", READ_COMMAND],
                        "volumeMounts": [{**mount, "readOnly": True}]}],
        "volumes": [volume],
    }
    for key in ("serviceAccountName", "nodeSelector", "tolerations", "imagePullSecrets"):
        if pod.get(key):
            spec[key] = pod[key]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": f"{meta['name'][:40]}-run-reader-",
                         "labels": {MANAGED_BY: "orch", JOB_LABEL: meta["name"], READER_ROLE: "run-reader"},
                         "ownerReferences": [owner_reference(job)]},
            "spec": spec}


def unpack(text: str, dest: Path) -> int:
    """Unpack the reader's base64 tar into ``dest``; the number of files. Only plain files and
    directories inside ``dest`` are written (the tar comes from a pod: trust nothing in it)."""
    data = base64.b64decode("".join(text.split()))
    count = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            if not (member.isfile() or member.isdir()):
                continue
            target = (dest / member.name).resolve()
            if target != dest.resolve() and dest.resolve() not in target.parents:
                continue
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            if source is not None:
                target.write_bytes(source.read())
                count += 1
    return count


def fetch_run_dir(core: Any, namespace: str, job: dict[str, Any], dest: Path, *,
                  timeout: float | None = None, poll: float = 1.0) -> int:
    """Copy the job's run directory into ``dest`` through a reader pod; the number of files.
    ``timeout``: how long the pod may take (None: ``reader_timeout()``)."""
    timeout = reader_timeout() if timeout is None else timeout
    body = reader_pod(job)
    if body is None:
        raise UserError(f"PyTorchJob {job['metadata']['name']} keeps its run directory inside its pods (no "
                        "shared volume)", hint="set kubernetes.checkpoint_pvc or kubernetes.shared_volume; "
                                               "`orch logs` shows the trainer's step lines meanwhile")
    pod = core.create_namespaced_pod(namespace, body)
    name = pod.metadata.name
    try:
        deadline = time.monotonic() + timeout
        while True:
            phase = core.read_namespaced_pod(name, namespace).status.phase
            if phase in ("Succeeded", "Failed"):
                break
            if time.monotonic() > deadline:
                raise UserError(f"the run-directory reader pod {namespace}/{name} did not finish in "
                                f"{timeout:.0f} s (phase {phase})",
                                hint="check that the job's image can be pulled and the volume mounted")
            time.sleep(poll)
        text = core.read_namespaced_pod_log(name, namespace, container="reader")
        if phase != "Succeeded":
            raise UserError(f"reading the run directory failed in pod {namespace}/{name}: {text[-500:]}")
        dest.mkdir(parents=True, exist_ok=True)
        return unpack(text, dest)
    finally:
        try:
            core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        except Exception:  # the job's deletion collects it (ownerReference)
            pass
