"""What a backend is, and the base that backends keeping their job in a run directory share.

Like TorchX's schedulers, a backend separates materialising a job from acting on it:
``dryrun(spec, submission)`` renders everything that will be sent (and nothing is sent),
``schedule(rendered)`` sends exactly that, and ``submit`` is ``schedule(dryrun(spec, submission))``.
``orch render`` shows ``dryrun(spec)``, so what a user reviews is what a submit sends.
``status``/``logs``/``cancel`` mean the same on every cluster.

A new cluster kind is one package with a ``make_backend()`` factory returning such an object,
found by name through ``orchestrator.backends`` (built-ins, or the ``orch.backends`` entry points).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import ClassVar, Protocol, runtime_checkable

from engine.run_contract import RunPaths

from .. import logtail
from ..launch import job_token, preview_run_dir
from ..spec import JobSpec
from ..types import Cluster, JobRef, JobStatus, Rendered, Submission


@runtime_checkable
class Backend(Protocol):
    """What ``orch render/submit/status/logs/cancel`` need from a cluster kind."""

    cluster: Cluster

    def dryrun(self, spec: JobSpec, submission: Submission | None = None) -> Rendered:
        """Everything a submit would send, without side effects; without a submission, the preview."""

    def schedule(self, rendered: Rendered) -> JobRef:
        """Send a dryrun made for a submission; returns once the cluster has accepted it."""

    def submit(self, spec: JobSpec, submission: Submission) -> JobRef:
        """``schedule(dryrun(spec, submission))``."""

    def status(self, refs: list[JobRef]) -> dict[str, JobStatus]:
        """States of many jobs in one query (batched like submitit's watcher)."""

    def logs(self, ref: JobRef, *, follow: bool = False, node: str | None = None) -> Iterator[str]:
        """Log lines of the job (all nodes, or one)."""

    def cancel(self, ref: JobRef) -> None:
        """Stop the job and everything it started."""


class BackendBase:
    """``submit`` as the composition of ``dryrun`` and ``schedule``; subclasses write those two."""

    cluster: ClassVar[str]

    def submit(self, spec: JobSpec, submission: Submission) -> JobRef:
        return self.schedule(self.dryrun(spec, submission))  # type: ignore[attr-defined]

    @staticmethod
    def submission_of(rendered: Rendered) -> tuple[Submission, JobSpec]:
        """The submission a dryrun was made for, and its spec; a preview cannot be scheduled."""
        if rendered.submission is None or rendered.spec is None:
            raise ValueError("schedule() needs a dryrun made for a submission, not an `orch render` preview")
        return rendered.submission, rendered.spec


class RunDirBackend(BackendBase):
    """A backend whose job lives in one run directory that this machine and the nodes share
    (local, Slurm, ssh): the rendered files are written there, the nodes write their logs to
    ``logs/`` and the trainer its status there, and ``status``/``logs``/``cancel`` start from it."""

    # The backend's render module: ``placement(spec, run_dir, job_token) -> Placement`` and
    # ``render(spec, placement) -> Rendered``.
    renderer: ClassVar[ModuleType]

    def dryrun(self, spec: JobSpec, submission: Submission | None = None) -> Rendered:
        if submission is None:
            where = self.renderer.placement(spec, preview_run_dir(spec), "")
        else:
            where = self.renderer.placement(spec, submission.run_dir, job_token(submission.job_id, spec.name))
        return dataclasses.replace(self.renderer.render(spec, where), submission=submission, spec=spec)

    def write_run_files(self, rendered: Rendered) -> Path:
        """The rendered text and its side files, written into the run directory (plus its logs dir)."""
        run = Path(self.submission_of(rendered)[0].run_dir)
        for name, text in rendered.files.items():
            (run / name).write_text(text)
        (run / rendered.filename).write_text(rendered.text)
        RunPaths(run).logs.mkdir(exist_ok=True)
        return run

    @staticmethod
    def follow_logs(streams: Callable[[], dict[str, Path]], *, prefixed: bool,
                    keep_going: Callable[[], bool] | None) -> Iterator[str]:
        """Lines of the job's log files (see ``logtail.follow``)."""
        return logtail.follow(streams, prefixed=prefixed, keep_going=keep_going)
