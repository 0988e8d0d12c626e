"""The values every part of orch passes around: clusters, job states, references, rendered jobs.

This module imports nothing of orch, so the spec, the backends, the registry and the CLI can all
use these names without importing each other.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for annotations only: the spec module imports this one
    from .spec import JobSpec

# A backend's name: the built-ins (local, slurm, kubernetes) or one registered under the
# ``orch.backends`` entry-point group. A plain string, so a new backend needs no edit here.
Cluster = str


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


@dataclass(frozen=True)
class Submission:
    """What a submit fixes before anything is rendered: orch's job id and the job's run directory.

    ``dryrun`` without one renders the preview that ``orch render`` shows; with one it renders
    exactly what ``schedule`` will send.
    """

    job_id: str
    run_dir: str


@dataclass(frozen=True)
class Placement:
    """Where the job's files live on the nodes; chosen by the backend at submit time."""

    run_dir: str
    ds_config_path: str | None
    checkpoint_dir: str
    python: str
    job_token: str = ""  # makes rendezvous ids unique per submission; empty in `orch render`


@dataclass(frozen=True)
class Rendered:
    """A backend's dryrun: the text it submits, the side files that travel with it (the ds_config,
    the job spec), and, for a submission, what ``schedule`` needs to send exactly that.

    ``request`` is the backend's own payload (a parsed manifest, a process plan), derived from
    the same values as ``text``; ``orch render`` shows ``text`` and ``files``.
    """

    cluster: Cluster
    kind: str                     # "sbatch", "manifest", "plan", or a new backend's own word
    filename: str                 # what ``text`` is saved as (run directory, `orch render --output-dir`)
    text: str
    files: dict[str, str] = field(default_factory=dict)
    placement: Placement | None = None
    submission: Submission | None = None          # None: the preview `orch render` shows
    spec: JobSpec | None = field(default=None, compare=False, repr=False)
    request: Any = field(default=None, compare=False, repr=False)
