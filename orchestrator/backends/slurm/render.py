"""A JobSpec as an sbatch script (templates/slurm/job.sbatch.j2): the ``#SBATCH`` options and srun's flags.

Every value that reaches the script is shell-quoted; the spec already refused values with line
breaks, which Slurm's line-based ``#SBATCH`` parser would split.
"""
from __future__ import annotations

import shlex

from engine.run_contract import RunPaths

from ...launch import base_context, preview_run_dir, render_template, run_dir_placement, side_files
from ...spec import JobSpec
from ...types import Placement, Rendered

TEMPLATE = "slurm/job.sbatch.j2"
NODE_PYTHON = "python3"  # the interpreter on the nodes when the spec names none


def placement(spec: JobSpec, run_dir: str | None = None, job_token: str = "") -> Placement:
    """Everything in the run directory, which the nodes and this machine share."""
    return run_dir_placement(spec, run_dir or preview_run_dir(spec), NODE_PYTHON, job_token)


def slurm_options(spec: JobSpec, placement: Placement) -> dict[str, str | None]:
    """The ``#SBATCH`` options, sorted by name so a change shows as a one-line diff."""
    s = spec.slurm
    opts: dict[str, str | None] = {
        "job-name": spec.name,
        "nodes": f"{spec.nodes.min}-{spec.nodes.max}" if spec.nodes.elastic else str(spec.nodes.max),
        "ntasks-per-node": "1",  # one torchrun agent per node; it starts procs_per_node workers
        "output": f"{placement.run_dir}/slurm-%j.out",
        "open-mode": "append",
        "signal": f"B:USR2@{s.signal_before_timeout_s}",
    }
    if s.requeue:
        opts["requeue"] = None
    if spec.nodes.elastic:
        opts["no-kill"] = None
    if spec.gpus_per_node:
        opts["gpus-per-node"] = str(spec.gpus_per_node)
    for key in ("partition", "account", "qos", "time", "constraint", "mem"):
        value = getattr(s, key)
        if value is not None:
            opts[key] = str(value)
    if s.cpus_per_task is not None:
        opts["cpus-per-task"] = str(s.cpus_per_task)
    if s.exclusive:
        opts["exclusive"] = None
    for key, value in s.sbatch_options.items():
        if value is False:
            opts.pop(key, None)
        else:
            opts[key] = None if value is True else str(value)
    return dict(sorted(opts.items()))


def _sbatch_lines(options: dict[str, str | None]) -> list[str]:
    return [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={shlex.quote(v)}" for k, v in options.items()]


def _srun_flags(spec: JobSpec, placement: Placement) -> list[str]:
    flags = [f"--nodes={spec.nodes.min}-{spec.nodes.max}" if spec.nodes.elastic else f"--nodes={spec.nodes.max}",
             "--ntasks-per-node=1", f"--output={RunPaths(placement.run_dir).node_log('%N')}", "--open-mode=append"]
    if spec.nodes.elastic:
        flags.append("--no-kill")
    else:
        flags.append("--kill-on-bad-exit=1")
    for key, value in spec.slurm.srun_options.items():
        if value is not False:
            flags.append(f"--{key}" if value is True else f"--{key}={value}")
    return flags


def render(spec: JobSpec, placement_: Placement | None = None) -> Rendered:
    """The sbatch script; ``placement_`` defaults to where ``orch render`` shows the files."""
    where = placement_ or placement(spec)
    context = base_context(spec, where)
    context["sbatch_lines"] = _sbatch_lines(slurm_options(spec, where))
    context["srun_flags"] = _srun_flags(spec, where)
    return Rendered("slurm", "sbatch", "job.sbatch", render_template(TEMPLATE, context), side_files(spec), where)
