"""Reading Slurm's answers: job states in orch's vocabulary, and the tables squeue/sacct print.

Kept apart from the commands that produce the text so that the mapping, the part with the most
cases, can be read (and tested) on its own. The ``|``-separated tables are parsed with
submitit's sacct reader (it also knows job-array ids) and node lists like ``gpu[01-04,07],n3``
are expanded with submitit's hostlist parser.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...types import JobState

# Slurm's job states (squeue %T, scontrol JobState=, sacct State) -> orch's, with what to say.
# A job Slurm requeued (after a node failure, `scontrol requeue`, preemption) shows as PENDING
# again with a restart count: that is RESTARTING in orch's words (see ``job_state``).
_STATES: dict[str, tuple[JobState, str]] = {
    "PENDING": (JobState.PENDING, ""),
    "CONFIGURING": (JobState.PENDING, "nodes are being configured"),
    "REQUEUED": (JobState.RESTARTING, "requeued by Slurm"),
    "REQUEUE_FED": (JobState.RESTARTING, "requeued by Slurm (federation)"),
    "REQUEUE_HOLD": (JobState.PENDING, "requeued and held: `scontrol release JOBID` lets it run"),
    "RESV_DEL_HOLD": (JobState.PENDING, "held: its reservation was deleted"),
    "SUSPENDED": (JobState.PENDING, "suspended by Slurm"),
    "STOPPED": (JobState.PENDING, "stopped (SIGSTOP) by Slurm"),
    "RUNNING": (JobState.RUNNING, ""),
    "RESIZING": (JobState.RUNNING, "resizing"),
    "SIGNALING": (JobState.RUNNING, "being signalled"),
    "STAGE_OUT": (JobState.RUNNING, "staging out"),
    # COMPLETING: the job ended but processes or epilogs are still being cleaned up on some
    # node; it is not over until they are gone (orch cancel waits for this).
    "COMPLETING": (JobState.RUNNING, "completing: Slurm is cleaning up the nodes"),
    "COMPLETED": (JobState.SUCCEEDED, ""),
    "CANCELLED": (JobState.CANCELLED, ""),
    "REVOKED": (JobState.CANCELLED, "revoked (it ran on another cluster of the federation)"),
    "FAILED": (JobState.FAILED, ""),
    "OUT_OF_MEMORY": (JobState.FAILED, "out of memory (raise slurm.mem or lower the micro-batch)"),
    "BOOT_FAIL": (JobState.FAILED, "a node failed to boot"),
    "DEADLINE": (JobState.FAILED, "its deadline (--deadline) passed"),
    "SPECIAL_EXIT": (JobState.FAILED, "special exit (requeued and held by its epilog)"),
    # Slurm's PREEMPTED is final (a preempted job that Slurm requeues shows as PENDING again),
    # while orch's PREEMPTED means "will come back": so a finished preemption is a failure.
    "PREEMPTED": (JobState.FAILED, "preempted and not requeued (keep slurm.requeue: true)"),
    "NODE_FAIL": (JobState.NODE_FAIL, "a node of the job failed"),
    "TIMEOUT": (JobState.TIMEOUT, "reached its time limit (slurm.time)"),
}


def job_state(slurm_state: str, restarts: int = 0) -> tuple[JobState, str]:
    """orch's state and a short explanation for a Slurm state such as ``CANCELLED by 1000``."""
    word = (slurm_state.split() or ["UNKNOWN"])[0].rstrip("+").upper()
    state, detail = _STATES.get(word, (JobState.UNKNOWN, f"Slurm state {slurm_state!r}"))
    if state == JobState.PENDING and restarts > 0 and word == "PENDING":
        return JobState.RESTARTING, f"requeued (restart {restarts}), waiting to start again"
    return state, detail


@dataclass(frozen=True)
class SlurmJobInfo:
    """One job as squeue or sacct reported it."""

    job_id: str
    state: str                 # Slurm's word, e.g. RUNNING, CANCELLED
    reason: str = ""           # squeue's pending/held reason (None when nothing to say)
    nodes: tuple[str, ...] = ()
    restarts: int = 0
    exit_code: str = ""        # "1:0" (sacct) or the raw status (squeue)
    source: str = "squeue"


def read_table(header: list[str], text: str) -> dict[str, dict[str, str]]:
    """Rows of a ``|``-separated table (squeue -O ...:|, sacct -P) by job id; job steps skipped."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    lines = [line for line in text.splitlines() if line.strip()]
    return SlurmInfoWatcher().read_info("\n".join(["|".join(header), *lines]))


def expand_nodes(node_list: str) -> tuple[str, ...]:
    """``n[1-3],gpu07`` -> ``('n1', 'n2', 'n3', 'gpu07')``; Slurm's "(null)"/"None" -> ()."""
    node_list = node_list.strip()
    if not node_list or node_list in ("(null)", "None", "None assigned"):
        return ()
    from submitit.slurm.slurm import _parse_node_list

    return tuple(_parse_node_list(node_list))


def infos_from_table(header: list[str], text: str, source: str) -> dict[str, SlurmJobInfo]:
    """SlurmJobInfo per job id from a squeue or sacct table with the columns in ``header``."""
    out = {}
    for job_id, row in read_table(header, text).items():
        restarts = row.get("Restarts", "0")
        out[job_id] = SlurmJobInfo(
            job_id=job_id, state=row.get("State", "UNKNOWN"), reason=row.get("Reason", ""),
            nodes=expand_nodes(row.get("NodeList", "")),
            restarts=int(restarts) if restarts.isdigit() else 0,
            exit_code=row.get("ExitCode", ""), source=source)
    return out


def node_is_lost(node_state: str) -> bool:
    """A node state from sinfo (``down*``, ``idle*``, ``fail``...) that means the node is gone:
    Slurm marks a node it cannot reach with ``*`` and DOWN once SlurmdTimeout has passed."""
    s = node_state.lower()
    return s.endswith("*") or s.startswith(("down", "fail")) or "not_responding" in s
