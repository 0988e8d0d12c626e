"""The Slurm cluster: ``sbatch --parsable`` of the rendered script, states from squeue (and sacct
once squeue has forgotten a job), logs from the run directory, ``scancel``.

The run directory (created by jobs.py under ``$ORCH_RUN_ROOT``) must be on a filesystem that the
nodes and this machine share: the script, the ds_config, the logs, the trainer's status and its
checkpoints all live there. Like submitit's watcher, ``status`` asks Slurm about all the jobs it
is given in one squeue call (and one sacct call for those squeue no longer lists), never one
process per job.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from ...errors import UserError
from ...launch import job_token
from ...spec import JobSpec
from ...types import JobRef, JobState, JobStatus, Rendered
from . import commands as sc
from . import logs as slurm_logs
from .render import placement, render
from .state import SlurmJobInfo, infos_from_table, job_state, node_is_lost

SCRIPT_NAME = "job.sbatch"
CANCEL_WAIT_S = 120.0       # KillWait (30 s by default) plus epilogs and slow nodes
_SQUEUE = [("JobID", "JobID"), ("State", "State"), ("Reason", "Reason"), ("NodeList", "NodeList"),
           ("Restarts", "RestartCnt"), ("ExitCode", "exit_code")]
_SACCT = ["JobID", "State", "ExitCode", "NodeList"]
# Per SLURM_CONF: does sacct have accounting (slurmdbd), only the job-completion log (sacct -c),
# or nothing at all. Found out on first use: clusters without slurmdbd are common.
_SACCT_MODE: dict[str, str] = {}


class SlurmBackend:
    cluster = "slurm"

    def dryrun(self, spec: JobSpec) -> Rendered:
        return render(spec)

    # -- submit -----------------------------------------------------------------------------
    def submit(self, spec: JobSpec, job_id: str, run_dir: str) -> JobRef:
        sc.command("sbatch")  # before writing anything: say at once when Slurm is not installed
        run = Path(run_dir)
        rendered = render(spec, placement(spec, run_dir, job_token(job_id, spec.name)))
        for name, text in rendered.files.items():
            (run / name).write_text(text)
        script = run / SCRIPT_NAME
        script.write_text(rendered.text)
        (run / "logs").mkdir(exist_ok=True)
        # --chdir: relative paths in the spec (a script, a data file) are relative to the spec's
        # directory, as with the other clusters.
        argv = ["sbatch", "--parsable", f"--chdir={spec.base_dir}", str(script)]
        result = sc.run(argv, cwd=run)
        if result.returncode != 0:
            raise _submit_error(spec, argv, result.stderr or result.stdout)
        native = (result.stdout.strip().splitlines() or [""])[-1].split(";")[0].strip()
        if not native.isdigit():
            raise UserError(f"sbatch accepted {script} but printed {result.stdout.strip()!r} instead of a job id",
                            hint="is `sbatch` a wrapper script? orch needs `sbatch --parsable` to print the id")
        return JobRef(job_id, "slurm", native, run_dir)

    # -- status -----------------------------------------------------------------------------
    def status(self, refs: list[JobRef]) -> dict[str, JobStatus]:
        """One squeue call for all jobs (sacct for those it forgot, sinfo for their nodes'
        health). Slurm unreachable raises SlurmUnavailable: a record keeps its last known state."""
        wanted = sorted({r.native_id for r in refs if r.native_id.isdigit()}, key=int)
        infos = query_jobs(wanted)
        nodes = node_states([n for i in infos.values() if _active(i) for n in i.nodes])
        return {r.job_id: _job_status(r, infos.get(r.native_id), nodes) for r in refs}

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


# --- asking Slurm ------------------------------------------------------------------------------

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


# --- composing orch's view of a job ------------------------------------------------------------

def _active(info: SlurmJobInfo) -> bool:
    return job_state(info.state)[0] in (JobState.RUNNING, JobState.RESTARTING)


def _job_status(ref: JobRef, info: SlurmJobInfo | None, nodes: dict[str, str]) -> JobStatus:
    trainer = _trainer_status(Path(ref.run_dir))
    trainer_restarts = int(trainer.get("restart_count") or 0)
    if info is None:
        return _forgotten(ref, trainer, trainer_restarts)
    state, detail = job_state(info.state, info.restarts)
    restarts = max(info.restarts, trainer_restarts)
    per_node: dict[str, str] = {}
    if _active(info):
        per_node = {n: "NODE_FAIL" if node_is_lost(nodes.get(n, "")) else "RUNNING" for n in info.nodes}
        if state == JobState.RUNNING and not detail:
            detail = _running_detail(ref, info, [n for n, s in per_node.items() if s == "NODE_FAIL"])
    elif state in (JobState.PENDING, JobState.RESTARTING) and info.reason not in ("", "None"):
        hint = _REASON_HINTS.get(info.reason.split(",")[0])
        reason = info.reason + (f": {hint}" if hint else "")
        detail = f"{detail} (Slurm: {reason})" if detail else f"waiting: {reason}"
    elif state in (JobState.FAILED, JobState.NODE_FAIL, JobState.TIMEOUT):
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
    spec = _spec_record(ref)
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


def _spec_record(ref: JobRef) -> dict:
    """The spec as jobs.py keeps it in the run dir (job.json); {} if unreadable."""
    import json

    try:
        spec = json.loads((Path(ref.run_dir) / "job.json").read_text())
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


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
    from ...live import read_status

    return read_status(run_dir)


# --- errors at submit ----------------------------------------------------------------------------

# sbatch's refusals that point at one spec key: (text in sbatch's stderr, key, what to check)
_REFUSALS = [
    ("invalid partition", "slurm.partition", None),
    ("invalid account", "slurm.account", "`sacctmgr show assoc user=$USER` lists your accounts"),
    ("invalid qos", "slurm.qos", "`sacctmgr show assoc user=$USER format=qos` lists your QOS"),
    ("time limit", "slurm.time", "`sinfo -o '%P %l'` shows each partition's time limit"),
    ("invalid feature", "slurm.constraint", "`sinfo -o '%N %f'` lists node features"),
    ("node count specification invalid", "nodes", "`sinfo -s` shows how many nodes each partition has"),
    ("requested node configuration is not available", "nodes / procs_per_node / gpus_per_node / slurm.mem / "
     "slurm.cpus_per_task / slurm.constraint", "no node of the partition has that much: "
     "`sinfo -o '%P %D %c %m %G %f'` shows what the nodes have"),
]


def _submit_error(spec: JobSpec, argv: list[str], stderr: str) -> UserError:
    stderr = stderr.strip() or "(no message)"
    hint = sc.diagnose(stderr)
    if hint:
        return sc.SlurmUnavailable(f"sbatch could not submit {argv[-1]}:\n{stderr}", hint=hint)
    low = stderr.lower()
    for needle, key, check in _REFUSALS:
        if needle in low:
            if key == "slurm.partition":
                check = _partition_hint(spec)
            return UserError(f"sbatch rejected the job ({key}):\n{stderr}", hint=check)
    return UserError(f"sbatch rejected {argv[-1]}:\n{stderr}",
                     hint=f"the script is kept at {argv[-1]}; `orch render --cluster slurm` shows it")


def _partition_hint(spec: JobSpec) -> str:
    try:
        result = sc.run(["sinfo", "--noheader", "--format=%R"])
        names = sorted(set(result.stdout.split())) if result.returncode == 0 else []
    except sc.SlurmUnavailable:
        names = []
    have = f"this cluster has: {', '.join(names)}" if names else "`sinfo -s` lists the partitions"
    return (f"slurm.partition is {spec.slurm.partition!r}; {have} "
            "(set slurm.partition in the spec or --set slurm.partition=NAME)")


def make_backend() -> SlurmBackend:
    return SlurmBackend()
