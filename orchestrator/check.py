"""``orch check``: validate a job before submitting it, and estimate its model-state memory.

The estimate follows the ZeRO paper (arXiv:1910.02054, section 3): with mixed-precision Adam
every parameter costs 2 bytes (fp16/bf16 weights) + 2 (gradients) + 12 (fp32 master, momentum,
variance) = 16 bytes; stage 1 partitions the 12, stage 2 also the gradient, stage 3 everything
across the N data-parallel ranks. fp32 training has 4 + 4 + 8. Offloading moves the optimizer
states (and, at stage 3, the parameters) to CPU memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .spec import BUNDLED_TRAINER, JobSpec


@dataclass(frozen=True)
class MemoryEstimate:
    stage: int
    gpu_bytes: float      # model states per GPU (params + grads + optimizer states)
    cpu_bytes: float      # per rank, when offloaded


@dataclass
class CheckReport:
    spec: JobSpec
    world_size: int
    batch: Any | None = None                 # engine.config.BatchSizes
    precision: str = "fp32"
    stage: int = 0
    num_parameters: int | None = None
    estimates: list[MemoryEstimate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def bytes_per_parameter(precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states incl. fp32 master) bytes per parameter for Adam."""
    return (4, 4, 8) if precision == "fp32" else (2, 2, 12)


def estimate_model_states(num_parameters: int, world_size: int, stage: int, precision: str,
                          offload_optimizer: bool = False, offload_param: bool = False) -> MemoryEstimate:
    """Per-GPU (and per-rank CPU) bytes of model states for one ZeRO stage."""
    w, g, o = bytes_per_parameter(precision)
    n = max(world_size, 1)
    weights = w / n if stage >= 3 else w
    grads = g / n if stage >= 2 else g
    states = o / n if stage >= 1 else o
    gpu, cpu = weights + grads + states, 0.0
    if offload_optimizer:
        gpu, cpu = gpu - states, cpu + states
    if offload_param and stage >= 3:
        gpu, cpu = gpu - weights, cpu + weights
    return MemoryEstimate(stage, gpu * num_parameters, cpu * num_parameters)


def model_parameters_from_args(spec: JobSpec) -> int | None:
    """Parameter count of the bundled trainer's ``--model`` preset, without importing torch."""
    if spec.program != BUNDLED_TRAINER:
        return None
    args = list(spec.args)
    name = "tiny"
    for i, a in enumerate(args):
        if a == "--model" and i + 1 < len(args):
            name = args[i + 1]
        elif a.startswith("--model="):
            name = a.split("=", 1)[1]
    try:
        from engine.models.presets import preset_num_parameters
    except ImportError:
        return None
    try:
        return int(preset_num_parameters(name))
    except (KeyError, ValueError) as exc:
        raise UserError(f"args: --model {name!r}: {exc}") from None


def check_job(spec: JobSpec, *, num_parameters: int | None = None) -> CheckReport:
    """Validate the ds_config for the job's world size and estimate memory for every stage."""
    from engine.config import ConfigError, load_config

    report = CheckReport(spec=spec, world_size=spec.world_size)
    offload_opt = offload_par = False
    ds = spec.ds_config_dict()
    if ds is None:
        report.notes.append("no ds_config: the trainer uses its defaults (fp32, ZeRO stage 0)")
    else:
        source = str(spec.ds_config_path() or "ds_config (inline)")
        try:
            cfg = load_config(ds, world_size=spec.world_size)
        except ConfigError as exc:
            raise UserError(f"{source}:\n{exc}") from None
        report.batch = cfg.resolve_batch(spec.world_size)
        report.precision = cfg.precision
        report.stage = cfg.zero_optimization.stage
        report.notes.extend(cfg.migrations)
        if spec.nodes.elastic:
            report.notes.extend(_elastic_notes(cfg, spec))
        offload_opt = _offloaded(cfg.zero_optimization.offload_optimizer)
        offload_par = _offloaded(cfg.zero_optimization.offload_param)
        if offload_opt or offload_par:
            report.notes.append(f"offload: optimizer={'cpu' if offload_opt else 'none'}, "
                                f"param={'cpu' if offload_par else 'none'}")
    report.num_parameters = num_parameters or model_parameters_from_args(spec)
    if report.num_parameters:
        report.estimates = [
            estimate_model_states(report.num_parameters, spec.world_size, stage, report.precision,
                                  offload_opt, offload_par)
            for stage in range(4)
        ]
    if spec.kubernetes.checkpoint_pvc is None and spec.kubernetes.image:
        report.notes.append("kubernetes: no checkpoint_pvc, so checkpoints do not survive a pod restart")
    return report


def _offloaded(section: Any) -> bool:
    return section is not None and getattr(section, "device", "none") not in (None, "none")


def _elastic_notes(cfg: Any, spec: JobSpec) -> list[str]:
    notes = []
    for nodes in range(spec.nodes.min, spec.nodes.max + 1):
        ws = nodes * spec.procs_per_node
        try:
            b = cfg.batch_for_world_size(ws, keep_global=True)
            line = (f"elastic: on {nodes} node(s) ({ws} ranks): micro {b.micro} x accumulation "
                    f"{b.gradient_accumulation_steps} x {ws} = {b.train_batch_size}")
            notes.append(line if b.exact else f"{line} ({b.note})")
        except Exception as exc:  # the config explains why the global batch cannot be kept
            notes.append(f"elastic: on {nodes} node(s) ({ws} ranks): {exc}")
    return notes


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"
