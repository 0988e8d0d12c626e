"""orch's view of a Slurm job: Slurm's state and reason, its nodes' health, and the trainer's own
status file, composed into one JobStatus with a detail a user can act on.

Pure functions of what the queries returned (and the run directory), so they are tested on
recorded squeue/sacct/sinfo output as well as on a real cluster.
"""
from __future__ import annotations

from pathlib import Path

from engine.run_contract import agent_restarts, read_status

from ...recovery import recovering, restarting_detail, resuming_phrase, spec_record
from ...types import JobRef, JobState, JobStatus
from .state import SlurmJobInfo, job_state, node_is_lost

def is_active(info: SlurmJobInfo) -> bool:
    return job_state(info.state)[0] in (JobState.RUNNING, JobState.RESTARTING)


def job_status(ref: JobRef, info: SlurmJobInfo | None, nodes: dict[str, str]) -> JobStatus:
    trainer = _trainer_status(Path(ref.run_dir))
    trainer_restarts = max(int(trainer.get("restart_count") or 0), agent_restarts(ref.run_dir))
    if info is None:
        return _forgotten(ref, trainer, trainer_restarts)
    state, detail = job_state(info.state, info.restarts)
    # Slurm counts requeues; the torchrun agents' record adds worker restarts within each incarnation
    restarts = max(info.restarts + agent_restarts(ref.run_dir), trainer_restarts)
    per_node: dict[str, str] = {}
    if is_active(info):
        per_node = {n: "NODE_FAIL" if node_is_lost(nodes.get(n, "")) else "RUNNING" for n in info.nodes}
        lost = [n for n, s in per_node.items() if s == "NODE_FAIL"]
        # the trainer's "failed" while torchrun still has restarts is a recovery, not the job's end
        if state == JobState.RUNNING and recovering(ref.run_dir, restarts - info.restarts, info.restarts + 1):
            state, detail = JobState.RESTARTING, restarting_detail(ref.run_dir, lost)
        elif state == JobState.RUNNING and not detail:
            detail = _running_detail(ref, info, lost)
    else:
        if state in (JobState.PENDING, JobState.RESTARTING) and info.reason not in ("", "None"):
            hint = _REASON_HINTS.get(info.reason.split(",")[0])
            reason = info.reason + (f": {hint}" if hint else "")
            detail = f"{detail} (Slurm: {reason})" if detail else f"waiting: {reason}"
        if state == JobState.RESTARTING:  # requeued: it starts again from the latest checkpoint
            detail = f"{detail}; {resuming_phrase(ref.run_dir, later=True)}"
    if state in (JobState.FAILED, JobState.NODE_FAIL, JobState.TIMEOUT):
        code = _exit_code(info)
        detail = ", ".join(p for p in (detail, code, f"Slurm job {ref.native_id}; see `orch logs {ref.job_id}`") if p)
    return JobStatus(state, detail or f"Slurm job {ref.native_id}", restarts, per_node)


# Pending reasons that never resolve by waiting, and what the user can change.
_REASON_HINTS = {
    "PartitionConfig": "the job asks for more than the partition offers; check nodes, gpus_per_node, "
                       "slurm.partition",
    "PartitionNodeLimit": "more nodes than the partition allows; lower nodes or pick another partition",
    "PartitionTimeLimit": "slurm.time exceeds the partition's limit (`sinfo -o '%P %l'`)",
    "AssocGrpNodeLimit": "your account's node limit is reached; wait, or use fewer nodes",
    "QOSMaxNodePerJobLimit": "more nodes than slurm.qos allows per job",
}


def _running_detail(ref: JobRef, info: SlurmJobInfo, lost: list[str]) -> str:
    """Where the job runs, and what a lost node means for it (elastic: it lives on)."""
    spec = spec_record(ref.run_dir)
    nodes = spec.get("nodes") if isinstance(spec.get("nodes"), dict) else {}
    high = nodes.get("max") or 0
    elastic = nodes.get("min") != nodes.get("max")
    survivors = [n for n in info.nodes if n not in lost]
    if lost and elastic:
        return f"node {', '.join(lost)} lost; elastic job continuing on {', '.join(survivors) or 'no node'}"
    if lost and (spec.get("slurm") or {}).get("requeue", True):
        return f"node {', '.join(lost)} not responding; Slurm requeues the job once it declares the node down"
    if lost:
        return (f"node {', '.join(lost)} not responding; the job fails once Slurm declares it down "
                "(slurm.requeue is false)")
    if elastic and len(info.nodes) < high:
        return f"Slurm job {ref.native_id} on {', '.join(info.nodes)} ({len(info.nodes)} of up to {high} nodes)"
    return f"Slurm job {ref.native_id} on {', '.join(info.nodes)}"


def _exit_code(info: SlurmJobInfo) -> str:
    code = info.exit_code.strip()
    if not code or code in ("0", "0:0"):
        return ""
    if ":" in code:
        status, sig = code.split(":", 1)
        return f"exit code {status}" + (f", signal {sig}" if sig not in ("", "0") else "")
    if code.isdigit():  # squeue prints the raw wait status
        raw = int(code)
        return f"exit code {raw >> 8}" if raw & 0x7F == 0 else f"killed by signal {raw & 0x7F}"
    return f"exit code {code}"


def _forgotten(ref: JobRef, trainer: dict, restarts: int) -> JobStatus:
    """Neither squeue nor sacct knows the job (no accounting, record purged): the trainer's own
    status file is the last word on how it ended."""
    said = trainer.get("state")
    gone = f"Slurm no longer knows job {ref.native_id} (no accounting database to ask)"
    if said == "finished":
        return JobStatus(JobState.SUCCEEDED, f"{gone}; the trainer reported it finished", restarts)
    if said == "failed":
        return JobStatus(JobState.FAILED, f"{gone}; the trainer reported a failure: {trainer.get('error', '')}",
                         restarts)
    return JobStatus(JobState.UNKNOWN, gone, restarts)


def _trainer_status(run_dir: Path) -> dict:
    return read_status(run_dir)
