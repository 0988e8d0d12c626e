"""sbatch's refusals, turned into errors that name the spec key to change and how to check it."""
from __future__ import annotations

from ...errors import UserError
from ...spec import JobSpec
from . import commands as sc

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


def submit_error(spec: JobSpec, argv: list[str], stderr: str) -> UserError:
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
