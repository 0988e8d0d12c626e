"""What a PyTorchJob's status says, in orch's job states.

The Kubeflow training operator (release-1.9, pkg/util/status.go and the PyTorch controller)
keeps one condition per type: ``Created``, then ``Running`` (which replaces ``Restarting`` and
vice versa), and finally ``Succeeded`` or ``Failed`` (which set ``Running`` to False). A job that
ran past ``activeDeadlineSeconds`` is ``Failed`` with a message about the deadline; a suspended
job has ``Suspended`` True. ``replicaStatuses`` counts active/succeeded/failed pods per replica type.
"""
from __future__ import annotations

from typing import Any

from ...types import JobState, JobStatus
from .restarts import PodRestarts, from_pod, node_name

# checked in this order: a finished job may still carry an old Running=True condition
_PRECEDENCE: tuple[tuple[str, JobState], ...] = (
    ("Failed", JobState.FAILED),
    ("Succeeded", JobState.SUCCEEDED),
    ("Suspended", JobState.PENDING),
    ("Restarting", JobState.RESTARTING),
    ("Running", JobState.RUNNING),
    ("Created", JobState.PENDING),
)


def true_conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Conditions whose status is "True", by type (the last one of a type wins)."""
    return {c.get("type", ""): c for c in status.get("conditions") or [] if c.get("status") == "True"}


def replica_summary(status: dict[str, Any]) -> dict[str, str]:
    """``{"Worker": "2 active, 1 failed"}`` from replicaStatuses (only non-zero counts)."""
    out = {}
    for rtype, counts in sorted((status.get("replicaStatuses") or {}).items()):
        parts = [f"{counts[k]} {k}" for k in ("active", "succeeded", "failed") if (counts or {}).get(k)]
        out[rtype] = ", ".join(parts) or "no pods yet"
    return out


def job_status(obj: dict[str, Any]) -> JobStatus:
    """The orch state of one PyTorchJob object as read from the API server."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    nodes = replica_summary(status)
    if meta.get("deletionTimestamp"):
        return JobStatus(JobState.CANCELLED, "being deleted: waiting for its pods to stop", nodes=nodes)
    conditions = true_conditions(status)
    for ctype, state in _PRECEDENCE:
        cond = conditions.get(ctype)
        if cond is None:
            continue
        detail = cond.get("message") or cond.get("reason") or ctype
        if ctype == "Failed" and _deadline(cond):
            state = JobState.TIMEOUT
        elif ctype == "Suspended":
            detail = f"suspended: {detail}"
        return JobStatus(state, _with_counts(detail, nodes), nodes=nodes)
    return JobStatus(JobState.PENDING,
                     "accepted; no status from the training operator yet (is it running in the cluster?)",
                     nodes=nodes)


def _deadline(cond: dict[str, Any]) -> bool:
    text = f"{cond.get('reason', '')} {cond.get('message', '')}".lower()
    return "deadline" in text


def _with_counts(detail: str, nodes: dict[str, str]) -> str:
    if not nodes:
        return detail
    return f"{detail} ({'; '.join(f'{k}: {v}' for k, v in nodes.items())})"


def pod_states(pods: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, PodRestarts]]:
    """Per node (``worker-0``): its pod's phase, and the restarts its status shows (API JSON)."""
    phases, seen = {}, {}
    for pod in pods:
        node = node_name(pod)
        phases[node] = (pod.get("status") or {}).get("phase") or "Pending"
        seen[node] = from_pod(pod)
    return phases, seen
