"""The local cluster (the embedded default): N simulated nodes on this machine.

Each node is a torchrun elastic agent in its own process group with ``procs_per_node`` workers
(gloo on CPU, NCCL when GPUs exist), joined by a c10d rendezvous whose store is hosted by a
detached supervisor (supervisor.py). The CLI can exit while the job runs; ``status``,
``logs`` and ``cancel`` find it again through the run directory.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from pathlib import Path

from engine.run_contract import RunPaths, read_status, recorded_restarts

from ...errors import UserError
from ...recovery import recovering, restarting_detail
from ...spec import JobSpec
from ...types import JobRef, JobState, JobStatus, Rendered, Submission
from .. import supervised
from ..base import RunDirBackend
from . import render as local_render
from .proctree import alive, stop_tree
from .render import local_rdzv_port
from .supervisor import read_state



def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBackend(RunDirBackend):
    cluster = "local"
    renderer = local_render

    def dryrun(self, spec: JobSpec, submission: Submission | None = None) -> Rendered:
        """The plan; for a submission with the rendezvous port it will really use (a free one
        unless the spec names one), and the supervisor's plan.json as the request."""
        if submission is not None and local_rdzv_port(spec) is None:
            spec = spec.model_copy(update={"local": spec.local.model_copy(update={"rdzv_port": free_port()})})
        rendered = super().dryrun(spec, submission)
        return dataclasses.replace(rendered, request=local_render.supervisor_plan(spec, rendered.placement))

    def schedule(self, rendered: Rendered) -> JobRef:
        submission, _ = self.submission_of(rendered)
        run = self.write_run_files(rendered)
        (run / "local").mkdir(exist_ok=True)
        (run / "local" / "plan.json").write_text(json.dumps(rendered.request, indent=1))
        with open(run / "local" / "supervisor.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "orchestrator.backends.local.supervisor",
                                     submission.run_dir],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, close_fds=True)
        self._wait_started(run, proc)
        return JobRef(submission.job_id, "local", f"pid:{proc.pid}", submission.run_dir)

    @staticmethod
    def _wait_started(run: Path, proc: subprocess.Popen[bytes]) -> None:
        """Return once the supervisor has bound the store and started the nodes (or say why not)."""
        def refuse_unstarted(state: dict[str, Any]) -> None:
            if state["state"] == "FAILED" and not state["nodes"]:
                raise UserError(f"local job could not start: {state['detail']}",
                                hint=f"see {run / 'local' / 'supervisor.log'}")
        supervised.wait_started("local", run, proc, read_state, refuse_unstarted)

    def status(self, refs: list[JobRef]) -> dict[str, JobStatus]:
        return {ref.job_id: self._status(ref) for ref in refs}

    def _status(self, ref: JobRef) -> JobStatus:
        run = Path(ref.run_dir)
        state = read_state(run)
        restarts = recorded_restarts(run)
        if state is None:
            return JobStatus(JobState.PENDING, "starting", restarts)
        nodes = {f"node-{k}": v["state"] for k, v in state["nodes"].items()}
        job_state = JobState(state["state"])
        if job_state.finished and alive(state["supervisor_pid"]):
            # finished means nothing of the job is left running; the supervisor is cleaning up
            return JobStatus(JobState.RUNNING, f"{job_state.value.lower()}, cleaning up", restarts, nodes)
        if not job_state.finished and not alive(state["supervisor_pid"]):
            return JobStatus(JobState.FAILED, "the local supervisor died; processes may need cleanup",
                             restarts, nodes)
        if job_state == JobState.RUNNING and any(v == "NODE_FAIL" for v in nodes.values()):
            lost = [k for k, v in nodes.items() if v == "NODE_FAIL"]
            if _trainer_progress_after(run, max(n["ended_at"] or 0 for n in state["nodes"].values())):
                return JobStatus(JobState.RUNNING, f"continuing without {', '.join(lost)}", restarts, nodes)
            return JobStatus(JobState.RESTARTING, restarting_detail(run, lost, node_word=""), restarts, nodes)
        if job_state == JobState.RUNNING and recovering(run, restarts):  # torchrun restarts the workers
            return JobStatus(JobState.RESTARTING, restarting_detail(run), restarts, nodes)
        return JobStatus(job_state, state.get("detail", ""), restarts, nodes)

    def logs(self, ref: JobRef, *, follow: bool = False, node: str | None = None) -> Iterator[str]:
        paths = RunPaths(ref.run_dir)
        wanted = None if node is None else paths.node_log(node.removeprefix("node-"))
        if wanted and not wanted.exists() and not follow:
            have = sorted(p.stem for p in paths.logs.glob("node-*.log"))
            raise UserError(f"no log for node {node!r}; this job has: {', '.join(have) or 'none yet'}")

        def streams() -> dict[str, Path]:
            files = sorted(paths.logs.glob("node-*.log")) if wanted is None else [wanted]
            return {path.stem: path for path in files}

        keep_going = (lambda: not self._status(ref).state.finished) if follow else None
        return self.follow_logs(streams, prefixed=wanted is None, keep_going=keep_going)

    def cancel(self, ref: JobRef) -> None:
        state = read_state(Path(ref.run_dir))
        pid = int(ref.native_id.removeprefix("pid:"))
        if state is not None and state["supervisor_pid"] != pid:
            raise UserError(f"run dir {ref.run_dir} belongs to another supervisor; not cancelling")
        if alive(pid):
            survivors = stop_tree(pid, grace_s=20.0)
            if survivors:
                raise UserError(f"processes {survivors} of job {ref.job_id} did not exit after SIGKILL")
        if state is not None:  # also any node process whose parent link was already broken
            for node in state["nodes"].values():
                if alive(node["pid"]):
                    stop_tree(node["pid"], grace_s=5.0)


def _trainer_progress_after(run: Path, when: float) -> bool:
    return float(read_status(run).get("time") or 0) > when


def make_backend() -> LocalBackend:
    return LocalBackend()
