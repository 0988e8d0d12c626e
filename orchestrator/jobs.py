"""Job lifecycle shared by every cluster: submit and record, refresh states, find logs, cancel.

The CLI calls these; backends only talk to their cluster. Keeping the registry bookkeeping here
means a job is recorded the same way whether it runs on processes, Slurm or Kubernetes, and a
submit that the cluster refuses still leaves a FAILED record saying why (nothing is lost).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from .backends import get_backend
from .errors import UserError
from .registry import JobRecord, Registry, new_job_id, orch_home
from .spec import JobSpec
from .types import Cluster, JobRef, JobState, JobStatus, Submission


def run_root() -> Path:
    """Where run directories are created (must be on a filesystem the nodes share)."""
    return Path(os.environ.get("ORCH_RUN_ROOT", orch_home() / "runs")).expanduser()


def spec_record(spec: JobSpec) -> dict:
    """The spec as stored in the registry and the run dir (absolute ds_config path)."""
    data = spec.model_dump(mode="json")
    path = spec.ds_config_path()
    if path is not None:
        data["ds_config"] = str(path)
    return data


def submit(spec: JobSpec, cluster: Cluster, registry: Registry | None = None) -> JobRecord:
    """Create the run dir, record the job, submit it; a refused submit is recorded as FAILED."""
    registry = registry or Registry()
    backend = get_backend(cluster)
    job_id = new_job_id(spec.name)
    run_dir = run_root() / job_id
    run_dir.mkdir(parents=True, exist_ok=False)  # a new id per submit: never clobber a run dir
    (run_dir / "job.json").write_text(json.dumps(spec_record(spec), indent=2) + "\n")
    registry.add(job_id, spec.name, cluster, str(run_dir), spec_record(spec))
    try:
        ref = backend.submit(spec, Submission(job_id, str(run_dir)))
    except UserError as exc:
        registry.update_state(job_id, JobState.FAILED, f"submit refused: {exc}")
        raise
    except Exception as exc:
        registry.update_state(job_id, JobState.FAILED, f"submit failed: {exc.__class__.__name__}: {exc}")
        raise
    registry.set_native_id(job_id, ref.native_id)
    return registry.get(job_id)


def refresh(records: list[JobRecord], registry: Registry | None = None) -> list[JobRecord]:
    """Ask each cluster once for the states of all its unfinished jobs, record them."""
    registry = registry or Registry()
    by_cluster: dict[str, list[JobRecord]] = {}
    for rec in records:
        if not rec.state.finished:
            by_cluster.setdefault(rec.cluster, []).append(rec)
    for cluster, recs in by_cluster.items():
        try:
            statuses = get_backend(cluster).status([r.ref for r in recs])
        except UserError:  # one unreachable cluster must not hide the others' jobs
            continue
        for rec in recs:
            st = statuses.get(rec.job_id)
            if st is not None:
                registry.update_state(rec.job_id, st.state, st.detail, st.restarts)
    return [registry.get(r.job_id) for r in records]


def status(job: str, registry: Registry | None = None) -> tuple[JobRecord, JobStatus]:
    registry = registry or Registry()
    rec = registry.get(job)
    if rec.state.finished:
        return rec, JobStatus(rec.state, rec.detail, rec.restarts, recorded_nodes(rec))
    st = get_backend(rec.cluster).status([rec.ref]).get(rec.job_id, JobStatus(JobState.UNKNOWN))
    registry.update_state(rec.job_id, st.state, st.detail, st.restarts)
    return registry.get(rec.job_id), st


def recorded_nodes(record: JobRecord) -> dict[str, str]:
    """A finished job's per-node lines from its run directory's records, where its backend keeps
    any (Kubernetes: each pod's restarts, after the pods are gone); none otherwise."""
    try:
        recorded = getattr(get_backend(record.cluster), "recorded_nodes", None)
    except UserError:  # the cluster's backend is no longer installed: the record still shows
        return {}
    return recorded(record.ref) if recorded is not None else {}


def logs(job: str, *, follow: bool = False, node: str | None = None,
         registry: Registry | None = None) -> Iterator[str]:
    rec = (registry or Registry()).get(job)
    return get_backend(rec.cluster).logs(rec.ref, follow=follow, node=node)


def cancel(job: str, registry: Registry | None = None) -> JobRecord:
    registry = registry or Registry()
    rec = registry.get(job)
    if rec.state.finished:
        raise UserError(f"job {rec.job_id} already finished ({rec.state.value}); nothing to cancel")
    get_backend(rec.cluster).cancel(rec.ref)
    registry.update_state(rec.job_id, JobState.CANCELLED, "cancelled by user")
    return registry.get(rec.job_id)


def sync_run_files(record: JobRecord) -> int:
    """Copy a run's files (status, metrics, hang dumps) into its local run directory when they live
    on the cluster (Kubernetes: the shared volume, read through a reader pod); the number of files
    copied, 0 for backends whose run directory is already readable here."""
    fetch = getattr(get_backend(record.cluster), "fetch_run_files", None)
    return fetch(record.ref) if fetch is not None else 0


def ref_of(job: str, registry: Registry | None = None) -> JobRef:
    return (registry or Registry()).get(job).ref
