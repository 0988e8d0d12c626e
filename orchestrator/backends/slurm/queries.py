"""Asking Slurm about jobs and nodes: one squeue call for many jobs, sacct for the ones squeue has
forgotten, sinfo for the health of their nodes. Like submitit's watcher, never one process per job."""
from __future__ import annotations

import os

from . import commands as sc
from .state import SlurmJobInfo, infos_from_table

_SQUEUE = [("JobID", "JobID"), ("State", "State"), ("Reason", "Reason"), ("NodeList", "NodeList"),
           ("Restarts", "RestartCnt"), ("ExitCode", "exit_code")]
_SACCT = ["JobID", "State", "ExitCode", "NodeList"]
# Per SLURM_CONF: does sacct have accounting (slurmdbd), only the job-completion log (sacct -c),
# or nothing at all. Found out on first use: clusters without slurmdbd are common.
_SACCT_MODE: dict[str, str] = {}


def query_jobs(job_ids: list[str], *, use_sacct: bool = True) -> dict[str, SlurmJobInfo]:
    """What Slurm knows about these jobs: one squeue call, then one sacct call for the ones
    squeue no longer lists (finished longer than MinJobAge ago)."""
    if not job_ids:
        return {}
    fmt = ",".join(f"{field}:|" for _, field in _SQUEUE)
    argv = ["squeue", "--noheader", "--states=all", f"--jobs={','.join(job_ids)}", f"--Format={fmt}"]
    result = sc.run(argv)
    if result.returncode != 0 and "invalid job id" not in (result.stderr or "").lower():
        raise sc.failure(argv, result)
    infos = infos_from_table([h for h, _ in _SQUEUE], result.stdout if result.returncode == 0 else "", "squeue")
    missing = [j for j in job_ids if j not in infos]
    if missing and use_sacct:
        infos.update(query_sacct(missing))
    return {j: infos[j] for j in job_ids if j in infos}


def query_sacct(job_ids: list[str]) -> dict[str, SlurmJobInfo]:
    """Finished jobs from sacct: the accounting database when there is one, else the job
    completion log (``sacct -c``, jobcomp/filetxt), else nothing."""
    key = os.environ.get("SLURM_CONF", "")
    modes = [_SACCT_MODE[key]] if key in _SACCT_MODE else ["accounting", "jobcomp"]
    for mode in modes:
        if mode == "none":
            return {}
        argv = ["sacct", *(["-c"] if mode == "jobcomp" else []), "--noheader", "--parsable2",
                "--allocations", f"--jobs={','.join(job_ids)}", f"--format={','.join(_SACCT)}"]
        try:
            result = sc.run(argv)
        except sc.SlurmUnavailable:
            return {}  # sacct missing or hanging: squeue's answer stands
        if result.returncode == 0:
            _SACCT_MODE[key] = mode
            return infos_from_table(_SACCT, result.stdout, "sacct")
    _SACCT_MODE[key] = "none"
    return {}


def node_states(nodes: list[str]) -> dict[str, str]:
    """Slurm's state of each node (``allocated``, ``down*``...), in one sinfo call."""
    if not nodes:
        return {}
    try:
        result = sc.run(["sinfo", "--noheader", "--Node", f"--nodes={','.join(sorted(set(nodes)))}",
                         "--format=%N|%T"])
    except sc.SlurmUnavailable:
        return {}
    states = {}
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        name, _, state = line.partition("|")
        if name.strip():
            states[name.strip()] = state.strip()
    return states
