"""The ssh cluster: bare machines from a DeepSpeed hostfile, one torchrun elastic agent per host.

A submission's dryrun checks every host first (preflight: reachable, known host key, python with
orch and torch, the shared run directory, a free rendezvous port on the first host) and renders
the plan with the rendezvous address found there; if any host fails, nothing is started. Then
``schedule`` starts a detached supervisor (supervisor.py) that runs one ssh client per host and
records what happens; ``status``, ``logs`` and ``cancel`` find the job through the run directory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from engine.run_contract import read_status, recorded_restarts

from ...errors import UserError
from ...launch import job_token
from ...recovery import recovering, restarting_detail
from ...spec import JobSpec
from ...types import JobRef, JobState, JobStatus, Rendered, Submission
from .. import supervised
from ..base import RunDirBackend
from ..local.proctree import alive, stop_tree
from . import render as ssh_render
from .preflight import preflight
from .supervisor import CANCEL_GRACE_S, PLAN_FILE, read_state



class SshBackend(RunDirBackend):
    cluster = "ssh"
    renderer = ssh_render

    def dryrun(self, spec: JobSpec, submission: Submission | None = None) -> Rendered:
        """The preview, or for a submission the plan after every host passed the preflight, with
        the rendezvous on the first host's address and the job's own port."""
        if submission is None:
            return super().dryrun(spec)
        where = ssh_render.placement(spec, submission.run_dir, job_token(submission.job_id, spec.name))
        hosts = ssh_render.job_hosts(spec)
        port = spec.rdzv_port or ssh_render.default_rdzv_port(submission.job_id)
        facts = preflight([h.name for h in hosts], list(spec.ssh.ssh_options), ssh_render.workdir_of(spec),
                          where.python, submission.run_dir, port)
        addr = spec.ssh.master_addr or facts[0].address or hosts[0].name.rpartition("@")[2]
        rendered = ssh_render.render(spec, where, rdzv_addr=addr, rdzv_port=port, hosts=hosts)
        return dataclasses.replace(rendered, submission=submission, spec=spec)

    def schedule(self, rendered: Rendered) -> JobRef:
        submission, _ = self.submission_of(rendered)
        run = self.write_run_files(rendered)
        (run / "ssh").mkdir(exist_ok=True)
        (run / PLAN_FILE).write_text(json.dumps(rendered.request, indent=1))
        with open(run / "ssh" / "supervisor.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "orchestrator.backends.ssh.supervisor", submission.run_dir],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, close_fds=True)
        supervised.wait_started("ssh", run, proc, read_state)
        return JobRef(submission.job_id, "ssh", f"pid:{proc.pid}", submission.run_dir)

    def status(self, refs: list[JobRef]) -> dict[str, JobStatus]:
        return {ref.job_id: _status(ref) for ref in refs}

    def logs(self, ref: JobRef, *, follow: bool = False, node: str | None = None) -> Iterator[str]:
        """Each host's output (``[host] line``), or one host's (``node`` = a host name)."""
        logs_dir = Path(ref.run_dir) / "logs"
        if node is not None and not (logs_dir / f"{node}.log").exists() and not follow:
            have = sorted(p.stem for p in logs_dir.glob("*.log"))
            raise UserError(f"no log for host {node!r}; this job has: {', '.join(have) or 'none yet'}")

        def streams() -> dict[str, Path]:
            files = sorted(logs_dir.glob("*.log")) if node is None else [logs_dir / f"{node}.log"]
            return {path.stem: path for path in files}

        keep_going = (lambda: not _status(ref).state.finished) if follow else None
        return self.follow_logs(streams, prefixed=node is None, keep_going=keep_going)

    def cancel(self, ref: JobRef) -> None:
        """SIGTERM the supervisor (it closes every host's connection, so each host agent stops its
        process tree, and kills over a new connection where that does not work) and wait for it."""
        pid = int(ref.native_id.removeprefix("pid:"))
        state = read_state(Path(ref.run_dir))
        if state is not None and state["supervisor_pid"] != pid:
            raise UserError(f"run dir {ref.run_dir} belongs to another supervisor; not cancelling")
        if not alive(pid):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + CANCEL_GRACE_S + 90
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if alive(pid):
            stop_tree(pid, grace_s=5.0)
            raise UserError(f"the ssh supervisor of job {ref.job_id} did not stop in time; its ssh clients were "
                            "killed, so every host agent stops its processes when it sees the connection close",
                            hint=f"see {ref.run_dir}/ssh/supervisor.log")


def _status(ref: JobRef) -> JobStatus:
    run = Path(ref.run_dir)
    state = read_state(run)
    restarts = recorded_restarts(run)
    if state is None:
        return JobStatus(JobState.PENDING, "starting", restarts)
    hosts = {name: h["state"] for name, h in state["hosts"].items()}
    job_state = JobState(state["state"])
    if job_state.finished and alive(state["supervisor_pid"]):
        return JobStatus(JobState.RUNNING, f"{job_state.value.lower()}, cleaning up", restarts, hosts)
    if not job_state.finished and not alive(state["supervisor_pid"]):
        return JobStatus(JobState.FAILED, "the ssh supervisor died; the host agents stop their processes "
                         "when their connections close", restarts, hosts)
    lost = [name for name, s in hosts.items() if s == "NODE_FAIL"]
    if job_state == JobState.RUNNING and lost:
        lost_at = max(h["ended_at"] or 0 for h in state["hosts"].values())
        if float(read_status(run).get("time") or 0) > lost_at:
            return JobStatus(JobState.RUNNING, f"continuing without lost host {', '.join(lost)}", restarts, hosts)
        return JobStatus(JobState.RESTARTING, restarting_detail(run, lost, node_word="host"), restarts, hosts)
    if job_state == JobState.RUNNING and recovering(run, restarts):  # torchrun restarts the workers
        return JobStatus(JobState.RESTARTING, restarting_detail(run), restarts, hosts)
    return JobStatus(job_state, state.get("detail", ""), restarts, hosts)


def make_backend() -> SshBackend:
    return SshBackend()
