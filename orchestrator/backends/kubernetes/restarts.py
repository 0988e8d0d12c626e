"""How often each pod of a PyTorchJob restarted, and the job's restart count.

Three things restart on Kubernetes, and each leaves its trace in another place:

* the kubelet restarts the ``pytorch`` container in place (restartPolicy OnFailure/Always): the
  pod's ``restartCount`` and ``lastState.terminated`` say so, for as long as the pod exists;
* the operator re-creates a pod that failed (same name, a new pod whose count starts at 0);
* torchrun restarts the workers inside the container (``--max-restarts``): only its record shows it.

The record is torchrun's ``--log-dir``, which orch puts on the run volume per pod
(``<run dir>/torchelastic/<pod name>``, manifest.agent_log_dir): every start of torchrun in the pod
makes one agent directory there, with one ``attempt_<n>`` per start of its workers. So a pod's
container starts beyond the first are its agent directories less one (this also covers a
re-created pod, and outlives the pod), and its worker restarts are the sum of each agent's
highest ``n``. A pod's restarts are its container restarts (the larger of the pod's count and the
record's) plus its worker restarts.

The job's count is the largest of its pods' counts, not their sum: one failure restarts the job
once, but shows on several pods (the pod whose container died counts a container restart, the
others' agents restart their workers because their collectives failed), and summing would count
that one failure once per pod.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.run_contract import RunPaths, agent_attempts

from .manifest import CONTAINER_NAME

REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"


@dataclass(frozen=True)
class PodRestarts:
    container: int = 0  # starts of the pytorch container beyond the first
    workers: int = 0    # torchrun's restarts of the workers within those starts
    last_exit: str = ""  # how the container last ended, while the pod exists ("exit 137 (SIGKILL)")

    @property
    def total(self) -> int:
        return self.container + self.workers

    def describe(self) -> str:
        """``restarts 2: container restarted 1 (last exit 137 (SIGKILL)), workers restarted 1 by torchrun``."""
        if not self.total:
            return "no restarts"
        parts = []
        if self.container:
            parts.append(f"container restarted {self.container}" + (f" (last {self.last_exit})" if self.last_exit else ""))
        if self.workers:
            parts.append(f"workers restarted {self.workers} by torchrun")
        return f"restarts {self.total}: " + ", ".join(parts)


def node_name(pod: dict[str, Any]) -> str:
    """``worker-2`` for the operator's pod ``<job>-worker-2`` (from its replica labels)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return f"{labels.get(REPLICA_TYPE_LABEL, 'pod').lower()}-{labels.get(REPLICA_INDEX_LABEL, '?')}"


def exit_text(terminated: dict[str, Any]) -> str:
    """``exit 137 (SIGKILL)``, ``exit 137 (OOMKilled)``, ``exit 1``: a container's last ending."""
    code = terminated.get("exitCode")
    if code is None:
        return ""
    why = terminated.get("reason") if terminated.get("reason") not in (None, "Error", "Completed") else ""
    if not why and code > 128:
        try:
            why = signal.Signals(code - 128).name
        except ValueError:
            why = ""
    return f"exit {code}" + (f" ({why})" if why else "")


def from_pod(pod: dict[str, Any]) -> PodRestarts:
    """What a pod's status (API JSON) shows: its pytorch container's restarts and last ending."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER_NAME:
            last = (status.get("lastState") or {}).get("terminated") or {}
            return PodRestarts(container=int(status.get("restartCount") or 0), last_exit=exit_text(last))
    return PodRestarts()


def recorded(run_dir: str | Path, job_name: str) -> dict[str, PodRestarts]:
    """Each pod's restarts from its torchrun record in (a copy of) the run directory, by node name."""
    root = RunPaths(run_dir).torchelastic
    try:
        pod_dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(f"{job_name}-")]
    except OSError:
        return {}
    out = {}
    for pod_dir in pod_dirs:
        agents = agent_attempts(pod_dir)
        if agents:
            out[pod_dir.name.removeprefix(f"{job_name}-")] = PodRestarts(
                container=len(agents) - 1, workers=sum(agents.values()))
    return out


def merged(live: dict[str, PodRestarts], record: dict[str, PodRestarts]) -> dict[str, PodRestarts]:
    """Per node: container restarts as the larger count of the two, worker restarts from the record."""
    out = {}
    for node in sorted(set(live) | set(record)):
        seen, kept = live.get(node, PodRestarts()), record.get(node, PodRestarts())
        out[node] = PodRestarts(max(seen.container, kept.container), kept.workers, seen.last_exit)
    return out


def job_restarts(per_node: dict[str, PodRestarts]) -> int:
    """The job's restarts: the most any one pod went through (see the module docstring)."""
    return max((r.total for r in per_node.values()), default=0)


def node_lines(phases: dict[str, str], per_node: dict[str, PodRestarts]) -> dict[str, str]:
    """``{"worker-2": "Running, restarts 1: container restarted 1 (last exit 137 (SIGKILL))"}``;
    a node without a phase (its pod is gone) shows its recorded restarts only."""
    out = {}
    for node in sorted(set(phases) | set(per_node)):
        counts = per_node.get(node, PodRestarts())
        phase = phases.get(node)
        if phase is None:
            out[node] = counts.describe()
        else:
            out[node] = phase + (f", {counts.describe()}" if counts.total else "")
    return out
