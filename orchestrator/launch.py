"""What every backend shares: the command a job runs, its environment, where its files go, and the
Jinja environment that renders it.

The command line of a job (torchrun plus the program and its arguments) is computed once here, in
Python, so that every backend runs the same command. Values never reach a shell or YAML raw: shell
words go through the ``shquote``/``shjoin`` filters (``shlex.quote``) and YAML scalars through
``toyaml`` (JSON, which is valid YAML). Each backend's ``render.py`` adds its own values to
``base_context`` and renders its template from ``templates/<kind>/``.
"""
from __future__ import annotations

import functools
import json
import shlex
from pathlib import Path
from typing import Any

import jinja2

from engine import run_contract as contract

from . import __version__
from .spec import ARG_PLACEHOLDERS, BUNDLED_TRAINER, JobSpec
from .types import Placement


def templates_dir() -> Path:
    """templates/: beside orchestrator/ in a source checkout, else the installed orch_templates."""
    root = Path(__file__).resolve().parent.parent
    checkout = root / "templates"
    if (root / "pyproject.toml").is_file() and (checkout / "__init__.py").is_file():
        return checkout
    try:
        import orch_templates
    except ModuleNotFoundError:
        raise RuntimeError(f"orch's templates are missing: neither {checkout} nor the orch_templates "
                           "package exists; reinstall orch (pip install orch)") from None
    return Path(orch_templates.__file__).parent


@functools.lru_cache(maxsize=None)
def template_environment(directory: str | None = None) -> jinja2.Environment:
    """The Jinja environment for templates in ``directory`` (default: orch's templates/), with the
    quoting filters. A backend from another package passes its own template directory."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory or str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["shquote"] = lambda value: shlex.quote(str(value))
    env.filters["shjoin"] = lambda values: " ".join(shlex.quote(str(v)) for v in values)
    env.filters["toyaml"] = to_yaml_flow
    env.filters["shvar"] = lambda name: "${" + str(name) + "}"  # a shell variable's value, braced
    return env


def render_template(name: str, context: dict[str, Any], directory: str | None = None) -> str:
    return template_environment(directory).get_template(name).render(context)


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


def run_dir_placement(spec: JobSpec, run_dir: str, python: str, job_token: str = "") -> Placement:
    """Placement of a job whose files all live in one run directory the nodes share (local, Slurm)."""
    return Placement(run_dir=run_dir,
                     ds_config_path=f"{run_dir}/ds_config.json" if spec.ds_config is not None else None,
                     checkpoint_dir=spec.checkpoint.dir or f"{run_dir}/checkpoints",
                     python=spec.python or python, job_token=job_token)


def preview_run_dir(spec: JobSpec) -> str:
    """The run directory ``orch render`` shows (a submit creates a new one per job id)."""
    return str(Path("~/.orch/runs").expanduser() / spec.name)


def job_token(job_id: str, job_name: str) -> str:
    """The part of orch's job id that is new per submission (``20261125-000000-ab12``)."""
    return job_id[len(job_name) + 1:] if job_id.startswith(job_name + "-") else job_id


def rendezvous_id(spec: JobSpec, placement: Placement) -> str:
    """The c10d rendezvous id: the job id on a submit (unique per submission), the name in a preview."""
    return f"{spec.name}-{placement.job_token}" if placement.job_token else spec.name


def placeholder_values(placement: Placement) -> dict[str, str]:
    """What ``{ds_config}``, ``{checkpoint_dir}`` and ``{run_dir}`` in a job's ``args`` become on the
    nodes: the paths this backend placed the files at (a Kubernetes pod's ConfigMap mount, the
    Slurm run directory ...), so one spec works on every cluster."""
    values = {"run_dir": placement.run_dir, "checkpoint_dir": placement.checkpoint_dir}
    if placement.ds_config_path is not None:
        values["ds_config"] = placement.ds_config_path
    return values


def expand_args(args: list[str], placement: Placement) -> list[str]:
    """The spec's ``args`` with each ``{name}`` of ``ARG_PLACEHOLDERS`` replaced; other braces stay."""
    values = placeholder_values(placement)
    expanded = []
    for arg in args:
        for name in ARG_PLACEHOLDERS:
            if name in values:
                arg = arg.replace("{" + name + "}", values[name])
        expanded.append(arg)
    return expanded


def program_argv(spec: JobSpec, placement: Placement) -> list[str]:
    """What torchrun starts on every rank: ``-m engine.train ...`` or ``script.py ...``.

    Only the bundled trainer gets ``--deepspeed_config <path>`` appended: a user's program decides
    how the ds_config reaches it (``{ds_config}`` in ``args``, or ``$ORCH_DS_CONFIG``), since an
    unexpected flag kills scripts that parse strictly (HfArgumentParser)."""
    argv = ["-m", spec.program] if spec.program_is_module else [spec.program]
    if spec.program == BUNDLED_TRAINER and placement.ds_config_path is not None:
        argv += ["--deepspeed_config", placement.ds_config_path]
    return argv + expand_args(list(spec.args), placement)


def torchrun_options(spec: JobSpec, placement: Placement | None = None) -> list[str]:
    """torchrun flags common to all clusters (node count, procs, restarts). With a placement, the
    agents also keep their attempt record (``--log-dir``, one ``attempt_<restart>`` directory per
    worker-group start) in the run directory, which is how orch counts worker restarts of any program."""
    options = [f"--nnodes={spec.nodes}", f"--nproc-per-node={spec.procs_per_node}",
               f"--max-restarts={spec.max_restarts}"]
    if placement is not None:
        options.append(f"--log-dir={contract.RunPaths(placement.run_dir).torchelastic}")
    return options


def job_environment(spec: JobSpec, placement: Placement) -> dict[str, str]:
    """Environment every rank gets: orch's contract with the trainer, then the user's env."""
    env = {
        contract.ENV_JOB_NAME: spec.name,
        contract.ENV_RUN_DIR: placement.run_dir,
        contract.ENV_CHECKPOINT_DIR: placement.checkpoint_dir,
        contract.ENV_CHECKPOINT_EVERY: str(spec.checkpoint.every_steps),
        contract.ENV_CHECKPOINT_KEEP: str(spec.checkpoint.keep),
    }
    if placement.ds_config_path is not None:
        env[contract.ENV_DS_CONFIG] = placement.ds_config_path
    if spec.checkpoint.async_save:
        env[contract.ENV_CHECKPOINT_ASYNC] = "1"
    if spec.gpus_per_node == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU jobs use gloo even on GPU nodes
    env.update(spec.env)
    return env


def side_files(spec: JobSpec) -> dict[str, str]:
    """Files that travel with every job: the ds_config, when the spec has one."""
    ds = spec.ds_config_dict()
    return {} if ds is None else {"ds_config.json": json.dumps(ds, indent=2, sort_keys=True) + "\n"}


def base_context(spec: JobSpec, placement: Placement) -> dict[str, Any]:
    """What every template gets: the spec, where files live, the job's command and env, and the
    run contract's names (``contract.ENV_RUN_DIR``, ``contract.RunPaths(...)``) for what it adds."""
    return {
        "contract": contract,
        "spec": spec,
        "placement": placement,
        "version": __version__,
        "torchrun_options": torchrun_options(spec, placement),
        "program_argv": program_argv(spec, placement),
        "job_env": job_environment(spec, placement),
    }
