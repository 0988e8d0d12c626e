"""The Slurm cluster: ``sbatch --parsable`` of the rendered script, states from squeue (and sacct
once squeue has forgotten a job), logs from the run directory, ``scancel``.

The run directory (created by jobs.py under ``$ORCH_RUN_ROOT``) must be on a filesystem that the
nodes and this machine share: the script, the ds_config, the logs, the trainer's status and its
checkpoints all live there. Like submitit's watcher, ``status`` asks Slurm about all the jobs it
is given in one squeue call (and one sacct call for those squeue no longer lists), never one
process per job.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from ...errors import UserError
from ...types import JobRef, JobState, JobStatus, Rendered
from ..base import RunDirBackend
from . import commands as sc
from . import logs as slurm_logs
from . import render as slurm_render
from .queries import node_states, query_jobs
from .refusals import submit_error
from .state import job_state
from .status import is_active, job_status

CANCEL_WAIT_S = 120.0       # KillWait (30 s by default) plus epilogs and slow nodes


class SlurmBackend(RunDirBackend):
    cluster = "slurm"
    renderer = slurm_render

    # -- submit -----------------------------------------------------------------------------
    def schedule(self, rendered: Rendered) -> JobRef:
        submission, spec = self.submission_of(rendered)
        sc.command("sbatch")  # before writing anything: say at once when Slurm is not installed
        run = self.write_run_files(rendered)
        script = run / rendered.filename
        # --chdir: relative paths in the spec (a script, a data file) are relative to the spec's
        # directory, as with the other clusters.
        argv = ["sbatch", "--parsable", f"--chdir={spec.base_dir}", str(script)]
        result = sc.run(argv, cwd=run)
        if result.returncode != 0:
            raise submit_error(spec, argv, result.stderr or result.stdout)
        native = (result.stdout.strip().splitlines() or [""])[-1].split(";")[0].strip()
        if not native.isdigit():
            raise UserError(f"sbatch accepted {script} but printed {result.stdout.strip()!r} instead of a job id",
                            hint="is `sbatch` a wrapper script? orch needs `sbatch --parsable` to print the id")
        return JobRef(submission.job_id, "slurm", native, submission.run_dir)

    # -- status -----------------------------------------------------------------------------
    def status(self, refs: list[JobRef]) -> dict[str, JobStatus]:
        """One squeue call for all jobs (sacct for those it forgot, sinfo for their nodes'
        health). Slurm unreachable raises SlurmUnavailable: a record keeps its last known state."""
        wanted = sorted({r.native_id for r in refs if r.native_id.isdigit()}, key=int)
        infos = query_jobs(wanted)
        nodes = node_states([n for i in infos.values() if is_active(i) for n in i.nodes])
        return {r.job_id: job_status(r, infos.get(r.native_id), nodes) for r in refs}

    # -- logs -------------------------------------------------------------------------------
    def logs(self, ref: JobRef, *, follow: bool = False, node: str | None = None) -> Iterator[str]:
        checked = {"at": 0.0, "running": True}

        def still_running() -> bool:  # ask Slurm at most every 2 s while following
            if time.monotonic() - checked["at"] >= 2.0:
                checked["at"] = time.monotonic()
                try:
                    st = self.status([ref])[ref.job_id]
                except sc.SlurmUnavailable:
                    return True  # a controller hiccup does not end `orch logs -f`
                checked["running"] = not st.state.finished and st.state != JobState.UNKNOWN
            return checked["running"]

        return slurm_logs.follow(Path(ref.run_dir), ref.native_id, node,
                                 keep_going=still_running if follow else None)

    # -- cancel -----------------------------------------------------------------------------
    def cancel(self, ref: JobRef) -> None:
        """scancel, then wait until Slurm reports the job ended and its nodes cleaned up."""
        argv = ["scancel", ref.native_id]
        result = sc.run(argv)
        if result.returncode != 0 and "invalid job id" not in (result.stderr or "").lower():
            raise sc.failure(argv, result)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline:
            info = query_jobs([ref.native_id], use_sacct=False).get(ref.native_id)
            if info is None or (job_state(info.state)[0].finished and info.state != "COMPLETING"):
                return
            time.sleep(0.5)
        raise UserError(f"Slurm job {ref.native_id} was cancelled but is still {info.state} after "
                        f"{CANCEL_WAIT_S:.0f} s: processes may remain on {', '.join(info.nodes) or 'its nodes'}",
                        hint=f"`scontrol show job {ref.native_id}`; a node that does not finish killing a job "
                             "is drained by Slurm and needs an administrator")


def make_backend() -> SlurmBackend:
    return SlurmBackend()
