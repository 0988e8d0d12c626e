"""The Backend interface every cluster kind implements, and the job states shared by all.

Like TorchX's schedulers, ``dryrun`` (materialise and show) is separate from ``submit`` (act),
and ``status``/``logs``/``cancel`` mean the same on every cluster.
"""
from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..render import Cluster, Rendered
from ..spec import JobSpec


class JobState(str, enum.Enum):
    """One vocabulary of job states across local processes, Slurm and PyTorchJobs."""

    PENDING = "PENDING"          # accepted, not running yet (queued, pods not started)
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"    # workers or the whole job are being restarted after a failure
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    NODE_FAIL = "NODE_FAIL"      # a node died and the job could not continue
    TIMEOUT = "TIMEOUT"
    PREEMPTED = "PREEMPTED"
    UNKNOWN = "UNKNOWN"          # the cluster no longer knows the job (e.g. purged records)

    @property
    def finished(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED,
                             JobState.NODE_FAIL, JobState.TIMEOUT})


@dataclass(frozen=True)
class JobRef:
    """How orch finds a submitted job again: its registry id and the cluster's own id."""

    job_id: str            # orch's id (registry key)
    cluster: Cluster
    native_id: str         # Slurm job id, PyTorchJob namespace/name, local process-group ids
    run_dir: str


@dataclass
class JobStatus:
    state: JobState
    detail: str = ""
    restarts: int = 0
    nodes: dict[str, str] = field(default_factory=dict)   # node name -> its state, when known


@runtime_checkable
class Backend(Protocol):
    """What ``orch submit/status/logs/cancel`` need from a cluster kind."""

    cluster: Cluster

    def dryrun(self, spec: JobSpec) -> Rendered:
        """What would be submitted, without side effects."""

    def submit(self, spec: JobSpec, job_id: str, run_dir: str) -> JobRef:
        """Submit the job; returns once the cluster has accepted it."""

    def status(self, refs: list[JobRef]) -> dict[str, JobStatus]:
        """States of many jobs in one query (batched like submitit's watcher)."""

    def logs(self, ref: JobRef, *, follow: bool = False, node: str | None = None) -> Iterator[str]:
        """Log lines of the job (all nodes, or one)."""

    def cancel(self, ref: JobRef) -> None:
        """Stop the job and everything it started."""
