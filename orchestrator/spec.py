"""JobSpec: the one validated description of a job, loaded from YAML plus ``--set`` overrides.

Every backend renders from a JobSpec, so everything a user can get wrong is caught here, with
a message that names the key (``slurm.partiton: unknown key, did you mean `partition`?``),
before anything reaches a shell script or a manifest.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from engine.run_contract import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_KEEP

from . import yamlio
from .errors import UserError, did_you_mean
from .k8s_names import annotation_problems, is_dns1035_label, label_problems

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# what str.splitlines() and Slurm's line-based #SBATCH parser treat as line breaks, and the rest
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+$")
BUNDLED_TRAINER = "engine.train"
# ``{name}`` in a job's args that every backend replaces with where it placed the file (launch.py)
ARG_PLACEHOLDERS = ("ds_config", "checkpoint_dir", "run_dir")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NodeRange(_Strict):
    """How many nodes: fixed (min == max) or an elastic range ``MIN:MAX``."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @property
    def elastic(self) -> bool:
        return self.min != self.max

    def __str__(self) -> str:
        return f"{self.min}:{self.max}" if self.elastic else str(self.max)


def _parse_nodes(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a node count like 2 or an elastic range like \"1:3\"")
    if isinstance(value, int):
        return {"min": value, "max": value}
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", value)
        if not m:
            raise ValueError(f"{value!r} is not a node count; write 2 or an elastic range \"1:3\"")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi:
            raise ValueError(f"elastic range {value!r} has MIN > MAX; write \"{hi}:{lo}\"")
        return {"min": lo, "max": hi}
    return value


class CheckpointSpec(_Strict):
    """Where the trainer writes sharded checkpoints and how often (it always resumes from latest)."""

    dir: str | None = Field(None, description="checkpoint directory; default <run dir>/checkpoints")
    every_steps: int = Field(DEFAULT_CHECKPOINT_EVERY, ge=0,
                             description="save every N optimizer steps (0 = only at the end)")
    keep: int = Field(DEFAULT_CHECKPOINT_KEEP, ge=1, description="newest complete checkpoints kept")
    async_save: bool = False


class SlurmSpec(_Strict):
    """The sbatch options of a job; ``sbatch_options`` carries anything not modelled here."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = Field(None, description="walltime: MM, HH:MM:SS or D-HH:MM:SS")
    constraint: str | None = None
    exclusive: bool = False
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = Field(None, description="memory per node, e.g. 64G")
    signal_before_timeout_s: int = Field(120, ge=10, description="USR2 this long before the time limit")
    requeue: bool = True
    sbatch_options: dict[str, str | int | bool] = Field(default_factory=dict)
    setup: list[str] = Field(default_factory=list, description="shell lines run before srun")
    srun_options: dict[str, str | int | bool] = Field(default_factory=dict)

    @field_validator("time")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None and not SLURM_TIME.match(v):
            raise ValueError(f"{v!r} is not a Slurm time; write e.g. 30, 04:00:00 or 1-12:00:00")
        return v

    @field_validator("partition", "account", "qos", "constraint", "mem")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or CONTROL_CHARS.search(v)):
            raise ValueError(f"{v!r}: must be a non-empty value without control characters or line breaks")
        return v

    @field_validator("sbatch_options", "srun_options")
    @classmethod
    def _option_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
                raise ValueError(f"option name {key!r} must look like 'mail-type' (no leading dashes)")
            if isinstance(v[key], str) and CONTROL_CHARS.search(v[key]):
                raise ValueError(f"{key}: value must not contain control characters or line breaks")
        return v


class KubernetesSpec(_Strict):
    """PyTorchJob fields; values go into the manifest through a YAML dumper, never pasted."""

    namespace: str | None = Field(None, description="default: the kubeconfig context's namespace")
    image: str | None = Field(None, min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account: str | None = None
    checkpoint_pvc: str | None = Field(None, description="ReadWriteMany PVC every pod shares: checkpoints in "
                                                         "<job name>/checkpoints, the run dir in <job name>/run")
    shared_volume: str | None = Field(None, description="or: the name of one of `volumes` every pod shares "
                                                        "(nfs, csi, hostPath on one node), used the same way")
    volumes: list[dict[str, Any]] = Field(default_factory=list,
                                          description="core/v1 Volumes of every pod (PVC, hostPath, nfs, csi, ...)")
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list,
                                                description="core/v1 VolumeMounts of the pytorch container")
    shm_size: str = "8Gi"
    resources: dict[str, dict[str, str | int]] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    clean_pod_policy: Literal["None", "All", "Running"] = "None"
    backoff_limit: int | None = Field(None, ge=0)
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    active_deadline_seconds: int | None = Field(None, ge=1)

    @field_validator("labels", "annotations")
    @classmethod
    def _metadata(cls, v: dict[str, str], info: Any) -> dict[str, str]:
        check = label_problems if info.field_name == "labels" else annotation_problems
        problems = check(info.field_name, v)
        if problems:
            raise ValueError("; ".join(p.removeprefix(f"{info.field_name}: ") for p in problems))
        return v

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key not in ("requests", "limits"):
                raise ValueError(f"resources.{key}: unknown key, {did_you_mean(key, ['requests', 'limits'])}")
        return v


class LocalSpec(_Strict):
    """Options of the local (single machine, simulated nodes) backend."""

    rdzv_port: int | None = Field(None, ge=1024, le=65535, description="default: a free port")


class SshSpec(_Strict):
    """Bare machines reached over the system ssh client (``--cluster ssh``), DeepSpeed-style."""

    hostfile: str | None = Field(None, description="DeepSpeed hostfile (`host slots=N` a line), relative to the spec")
    include: str = Field("", description="DeepSpeed's --include: HOST[:SLOT,SLOT]@HOST...")
    exclude: str = Field("", description="DeepSpeed's --exclude, same syntax (not with include)")
    ssh_options: list[str] = Field(default_factory=list, description="extra ssh client arguments, e.g. [-p, '2222']")
    workdir: str | None = Field(None, description="directory the job runs in on every host; default: the spec's")
    python: str | None = Field(None, description="interpreter on the hosts; default: the spec's python, else orch's")
    master_addr: str | None = Field(None, description="rendezvous address of the first host; default: its `hostname -I`")

    @field_validator("hostfile", "include", "exclude", "workdir", "python", "master_addr")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        if v is not None and CONTROL_CHARS.search(v):
            raise ValueError(f"{v!r}: must not contain control characters or line breaks")
        return v

    @field_validator("ssh_options")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        for i, option in enumerate(v):
            if "\x00" in option or "\n" in option:
                raise ValueError(f"ssh_options[{i}]: must not contain NUL or line breaks")
        return v

    @model_validator(mode="after")
    def _filters(self) -> SshSpec:
        if self.include and self.exclude:
            raise ValueError("include and exclude are mutually exclusive (as in DeepSpeed); keep one")
        return self


class JobSpec(_Strict):
    """A job: what to run, on how many nodes, with which ds_config, and per-cluster options."""

    name: str = Field(description="DNS-1035 label: lowercase letters, digits, '-'")
    nodes: NodeRange = Field(default_factory=lambda: NodeRange(min=1, max=1))
    procs_per_node: int = Field(1, ge=1, le=1024)
    gpus_per_node: int = Field(0, ge=0, le=1024, description="0 = CPU with gloo")
    program: str = Field(BUNDLED_TRAINER, description="python module (engine.train) or script path (.py)")
    args: list[str] = Field(default_factory=list)
    ds_config: str | dict[str, Any] | None = Field(None, description="path to ds_config.json or inline")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    max_restarts: int = Field(3, ge=0)
    rdzv_port: int | None = Field(None, ge=1024, le=65535,
                                  description="default: chosen per job (local: a free port; Slurm: from the job id; "
                                              "Kubernetes: 29500 in the pod)")
    python: str | None = Field(None, description="interpreter on the nodes; default per backend")
    env: dict[str, str] = Field(default_factory=dict)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    kubernetes: KubernetesSpec = Field(default_factory=KubernetesSpec)
    local: LocalSpec = Field(default_factory=LocalSpec)
    ssh: SshSpec = Field(default_factory=SshSpec)
    # Where the spec came from (relative paths in it are relative to this directory).
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not is_dns1035_label(v):
            raise ValueError(
                f"{v!r} is not a DNS-1035 label: use 1-63 lowercase letters, digits and '-', "
                "starting with a letter and not ending with '-' (e.g. 'gpt-tiny')")
        return v

    @field_validator("nodes", mode="before")
    @classmethod
    def _nodes(cls, v: Any) -> Any:
        return _parse_nodes(v)

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for key in v:
                if not isinstance(key, str) or not ENV_NAME.match(key):
                    raise ValueError(f"{key!r} is not a valid environment variable name")
            values = {k: (str(val).lower() if isinstance(val, bool) else str(val)) for k, val in v.items()}
            for key, val in values.items():
                if "\x00" in val:
                    raise ValueError(f"{key}: a NUL character cannot be passed in the environment")
            return values
        return v

    @field_validator("args", mode="before")
    @classmethod
    def _args(cls, v: Any) -> Any:
        if isinstance(v, str):
            raise ValueError("args must be a list of strings, e.g. [\"--model\", \"tiny\"]")
        if isinstance(v, list):
            v = [str(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else a for a in v]
            for i, a in enumerate(v):
                if isinstance(a, str) and "\x00" in a:
                    raise ValueError(f"args[{i}]: a NUL character cannot be passed on a command line")
        return v

    @field_validator("program")
    @classmethod
    def _program(cls, v: str) -> str:
        if not v.strip() or "\n" in v or "\x00" in v:
            raise ValueError("program must be a module name like 'engine.train' or a script path")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.nodes.elastic and self.max_restarts == 0:
            raise ValueError("nodes: an elastic range needs max_restarts >= 1 to re-form after a "
                             "node failure; set max_restarts: 3")
        if self.ds_config is None and any("{ds_config}" in arg for arg in self.args):
            raise ValueError("args: {ds_config} names the job's ds_config, but the spec has none; add "
                             "ds_config: ds_config.json (or drop the argument)")
        return self

    # -- derived values used by every backend -------------------------------------------------
    @property
    def world_size(self) -> int:
        """Ranks at the full node count (elastic jobs may run with fewer)."""
        return self.nodes.max * self.procs_per_node

    @property
    def program_is_module(self) -> bool:
        return not self.program.endswith(".py") and "/" not in self.program

    def ds_config_path(self) -> Path | None:
        """The ds_config file, resolved against the spec's directory (None if inline/absent)."""
        if isinstance(self.ds_config, str):
            p = Path(self.ds_config).expanduser()
            return p if p.is_absolute() else (self.base_dir / p)
        return None

    def ds_config_dict(self) -> dict[str, Any] | None:
        """The ds_config as a dict, reading the file if it is a path."""
        import json

        if isinstance(self.ds_config, dict):
            return self.ds_config
        path = self.ds_config_path()
        if path is None:
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"ds_config: file {path} not found",
                            hint="paths are relative to the job spec's directory") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None


# --------------------------------------------------------------------------------------------
# Loading: YAML + --set overrides, and readable validation errors
# --------------------------------------------------------------------------------------------

def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set slurm.partition=gpu")
        parts = key.split(".")
        if any(not p for p in parts):
            raise UserError(f"--set {item!r}: empty path segment in {key!r}")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = child
        node[parts[-1]] = yamlio.parse_scalar(raw)
    return data


def _model_for_path(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (for 'did you mean' suggestions)."""
    model: type[BaseModel] | None = JobSpec
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _public_fields(model: type[BaseModel]) -> list[str]:
    return [n for n, f in model.model_fields.items() if not f.exclude]


def format_errors(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: key.path: what is wrong (and the fix)``."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "union["))))
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            model = _model_for_path(loc)
            hint = did_you_mean(str(loc[-1]), _public_fields(model)) if model else ""
            msg = f"unknown key; {hint}" if hint else "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            given = err.get("input")
            if err["type"] not in ("value_error", "assertion_error") and not isinstance(given, (dict, list)):
                msg += f" (got {given!r})"
        lines.append(f"{source}: {path}: {msg}")
    # pydantic reports each failing branch of a union; keep one line per distinct message
    return "\n".join(dict.fromkeys(lines))


def spec_from_dict(data: Any, *, source: str = "<spec>", base_dir: Path | None = None) -> JobSpec:
    """Validate a parsed spec; every problem is reported, each naming its key."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a job spec must be a YAML mapping of keys (name:, nodes:, ...)")
    try:
        return JobSpec.model_validate({**data, "base_dir": base_dir or Path.cwd()})
    except ValidationError as exc:
        raise UserError(format_errors(exc, source)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Load a job spec file and apply ``--set`` overrides."""
    p = Path(path)
    data = yamlio.load_file(p)
    if data is None:
        raise UserError(f"{p}: the file is empty; a job spec needs at least `name:`")
    if isinstance(data, dict) and "base_dir" in data:
        raise UserError(f"{p}: base_dir: unknown key")
    if isinstance(data, dict):
        data = apply_overrides(data, list(overrides or []))
    return spec_from_dict(data, source=str(p), base_dir=p.resolve().parent)


