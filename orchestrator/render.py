"""Render a JobSpec into what a cluster runs: an sbatch script, a PyTorchJob manifest, a local plan.

Values never reach a shell or YAML raw: shell words go through the ``shquote`` filter
(``shlex.quote``) and YAML scalars through ``toyaml`` (JSON, which is valid YAML), and a manifest
is parsed back and validated before anyone sees it. The command line of the job (torchrun plus
the program and its arguments) is computed once here, in Python, so that every backend runs
the same command.
"""
from __future__ import annotations

import functools
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2

from . import __version__
from .spec import JobSpec

Cluster = Literal["local", "slurm", "kubernetes"]
CLUSTERS: tuple[Cluster, ...] = ("local", "slurm", "kubernetes")

# Where a Kubernetes pod finds its ds_config (a ConfigMap) and writes its run files.
K8S_CONFIG_MOUNT = "/etc/orch"
K8S_RUN_DIR = "/orch/run"
K8S_CHECKPOINT_DIR = "/orch/checkpoints"


@dataclass(frozen=True)
class Rendered:
    """The text a backend submits, plus side files (e.g. the ds_config) that travel with it."""

    cluster: Cluster
    kind: Literal["sbatch", "manifest", "plan"]
    text: str
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    """Where the job's files live on the nodes; chosen by the backend at submit time."""

    run_dir: str
    ds_config_path: str | None
    checkpoint_dir: str
    python: str
    job_token: str = ""  # makes rendezvous ids unique per submission; empty in `orch render`


def templates_dir() -> Path:
    """The templates/ directory, from a source checkout or the installed orch_templates package."""
    import orch_templates

    return Path(orch_templates.__file__).parent


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["shquote"] = lambda value: shlex.quote(str(value))
    env.filters["shjoin"] = lambda values: " ".join(shlex.quote(str(v)) for v in values)
    env.filters["toyaml"] = to_yaml_flow
    return env


def _yaml_escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _yaml_printable(ch: str) -> bool:
    """Characters a YAML double-quoted scalar may hold raw (no line breaks such as U+2028)."""
    code = ord(ch)
    return (0x20 <= code <= 0x7E or 0xA0 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD
            or code >= 0x10000) and ch not in "\u2028\u2029\ufeff"


def yaml_string(text: str) -> str:
    """A double-quoted YAML scalar that parses back to exactly ``text``, whatever it holds."""
    body = "".join(
        "\\\"" if ch == '"' else "\\\\" if ch == "\\" else ch if _yaml_printable(ch) else _yaml_escape(ch)
        for ch in text)
    return f'"{body}"'


def to_yaml_flow(value: Any) -> str:
    """Any JSON-like value as YAML flow text; the only way values enter a manifest template."""
    if isinstance(value, str):
        return yaml_string(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{yaml_string(str(k))}: {to_yaml_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(to_yaml_flow(v) for v in value) + "]"
    return json.dumps(value)  # numbers, booleans, null


def default_placement(spec: JobSpec, cluster: Cluster, run_dir: str | None = None) -> Placement:
    """Where files go when the backend has not decided (``orch render`` without submitting)."""
    if cluster == "kubernetes":
        ds = f"{K8S_CONFIG_MOUNT}/ds_config.json" if spec.ds_config is not None else None
        return Placement(run_dir=K8S_RUN_DIR, ds_config_path=ds,
                         checkpoint_dir=spec.checkpoint.dir or K8S_CHECKPOINT_DIR,
                         python=spec.python or "python")
    run = run_dir or str(Path("~/.orch/runs").expanduser() / spec.name)
    ds = f"{run}/ds_config.json" if spec.ds_config is not None else None
    python = spec.python or ("python3" if cluster == "slurm" else _local_python())
    return Placement(run_dir=run, ds_config_path=ds,
                     checkpoint_dir=spec.checkpoint.dir or f"{run}/checkpoints", python=python)


def _local_python() -> str:
    import sys

    return sys.executable


def program_argv(spec: JobSpec, placement: Placement) -> list[str]:
    """What torchrun starts on every rank: ``-m engine.train ...`` or ``script.py ...``."""
    argv = ["-m", spec.program] if spec.program_is_module else [spec.program]
    if placement.ds_config_path is not None:
        argv += ["--deepspeed_config", placement.ds_config_path]
    return argv + list(spec.args)


def torchrun_options(spec: JobSpec) -> list[str]:
    """torchrun flags common to all clusters (node count, procs, restarts)."""
    return [f"--nnodes={spec.nodes}", f"--nproc-per-node={spec.procs_per_node}",
            f"--max-restarts={spec.max_restarts}"]


def job_environment(spec: JobSpec, placement: Placement) -> dict[str, str]:
    """Environment every rank gets: orch's contract with the trainer, then the user's env."""
    env = {
        "ORCH_JOB_NAME": spec.name,
        "ORCH_RUN_DIR": placement.run_dir,
        "ORCH_CHECKPOINT_DIR": placement.checkpoint_dir,
        "ORCH_CHECKPOINT_EVERY": str(spec.checkpoint.every_steps),
        "ORCH_CHECKPOINT_KEEP": str(spec.checkpoint.keep),
    }
    if spec.checkpoint.async_save:
        env["ORCH_CHECKPOINT_ASYNC"] = "1"
    if spec.gpus_per_node == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU jobs use gloo even on GPU nodes
    env.update(spec.env)
    return env


@dataclass(frozen=True)
class NodeCommand:
    """One simulated node of the local cluster: a torchrun agent and the env it adds."""

    rank: int
    argv: list[str]
    env: dict[str, str]


# What `orch render --cluster local` shows when the spec fixes no port: the local backend picks a
# free one at submit (and writes the plan it runs, with that port, to the run directory).
PREVIEW_RDZV_PORT = 29500


def local_rdzv_port(spec: JobSpec) -> int | None:
    """The rendezvous port a local job must use (``local.rdzv_port``, else ``rdzv_port``); None: any free one."""
    return spec.local.rdzv_port or spec.rdzv_port


def local_node_commands(spec: JobSpec, placement: Placement, rdzv_port: int) -> list[NodeCommand]:
    """The torchrun agents of a local job. The rendezvous store is hosted by orch's supervisor
    (``is_host=false`` on every agent), so any simulated node can die without taking it along."""
    rdzv_id = f"{spec.name}-{placement.job_token}" if placement.job_token else spec.name
    nodes = []
    for rank in range(spec.nodes.max):
        argv = [placement.python, "-m", "torch.distributed.run", *torchrun_options(spec),
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{rdzv_port}", f"--rdzv-id={rdzv_id}",
                "--rdzv-conf=is_host=false,join_timeout=120,last_call_timeout=5,close_timeout=10",
                *program_argv(spec, placement)]
        # torch caches a non-rank-0 node's view of the workers' bootstrap store across rendezvous
        # rounds; after a node loss changes the membership, that view can be stale and the new
        # worker group never forms. Rebuilding it every round avoids that.
        env = {"ORCH_NODE_RANK": str(rank), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        if spec.gpus_per_node:
            first = rank * spec.gpus_per_node
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(first, first + spec.gpus_per_node))
        nodes.append(NodeCommand(rank, argv, env))
    return nodes


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
             "--ntasks-per-node=1", f"--output={placement.run_dir}/logs/node-%N.log", "--open-mode=append"]
    if spec.nodes.elastic:
        flags.append("--no-kill")
    else:
        flags.append("--kill-on-bad-exit=1")
    for key, value in spec.slurm.srun_options.items():
        if value is not False:
            flags.append(f"--{key}" if value is True else f"--{key}={value}")
    return flags


def render(spec: JobSpec, cluster: Cluster, placement: Placement | None = None) -> Rendered:
    """Render ``spec`` for ``cluster``; ``placement`` defaults to where ``orch render`` shows it."""
    placement = placement or default_placement(spec, cluster)
    env = _environment()
    context: dict[str, Any] = {
        "spec": spec,
        "placement": placement,
        "version": __version__,
        "torchrun_options": torchrun_options(spec),
        "program_argv": program_argv(spec, placement),
        "job_env": job_environment(spec, placement),
    }
    files: dict[str, str] = {}
    ds = spec.ds_config_dict()
    if ds is not None:
        files["ds_config.json"] = json.dumps(ds, indent=2, sort_keys=True) + "\n"
    if cluster == "slurm":
        context["sbatch_lines"] = _sbatch_lines(slurm_options(spec, placement))
        context["srun_flags"] = _srun_flags(spec, placement)
        text = env.get_template("slurm/job.sbatch.j2").render(context)
        return Rendered(cluster, "sbatch", text, files)
    if cluster == "kubernetes":
        from .k8s_manifest import manifest_context, validate_manifest_text

        context.update(manifest_context(spec, placement, files, context["program_argv"],
                                        context["job_env"]))
        text = env.get_template("kubernetes/pytorchjob.yaml.j2").render(context)
        validate_manifest_text(text, spec)
        return Rendered(cluster, "manifest", text, files)
    port = local_rdzv_port(spec)
    context["rdzv_port"] = port or PREVIEW_RDZV_PORT
    context["port_chosen_at_submit"] = port is None
    context["nodes"] = local_node_commands(spec, placement, context["rdzv_port"])
    text = env.get_template("local/plan.sh.j2").render(context)
    return Rendered(cluster, "plan", text, files)
