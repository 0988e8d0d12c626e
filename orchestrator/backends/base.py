"""The Backend interface every cluster kind implements."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from ..spec import JobSpec
from ..types import Cluster, JobRef, JobStatus, Rendered


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
