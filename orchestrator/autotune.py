"""The ``autotuning`` section answered without trials: ZeRO stage, offload and micro-batch.

DeepSpeed's autotuner (deepspeed/autotuning/autotuner.py) first computes, per ZeRO stage, the
memory the model states need (``get_instantiation_memory_required_per_gpu``: Adam, 2+2+12
bytes per parameter in fp16, 4+4+8 in fp32, divided by the ranks as the stage partitions them)
and the activation memory of micro-batch 1 (from a profiling run); a stage is feasible when
both fit, and its largest micro-batch is ``(GPU memory - states) // activations``. It then
launches trial runs over micro-batches in that range and keeps the fastest by ``metric``.

orch does the first part the same way, from ``orch check``'s memory estimate (offload
included), with activations from the model's shape instead of a profiling run, and replaces
the trials by the choice they would make on the memory-bound side:

* ``throughput`` / ``flops`` (the default): the largest micro-batch that fits, up to
  ``max_train_micro_batch_size_per_gpu`` and ``max_train_batch_size / ranks``; among stages that
  reach it, the lowest (ZeRO-0/1/2 move 2Ψ per step, ZeRO-3 3Ψ; fewer partitions, less work);
* ``latency`` / ``forward`` / ``step``: ``min_train_micro_batch_size_per_gpu`` at the lowest stage
  that fits;
* offload only when no stage fits without it (optimizer states first, then parameters).

Activations per sample of a GPT (Korthikanti et al. 2022, arXiv:2205.05198, §4.1, no tensor
parallelism): ``s·h·(34 + 5·a·s/h)`` bytes per layer in 16-bit, twice that in fp32, plus the
logits (``s·V`` values, kept for the loss and its gradient); with activation checkpointing,
``2·s·h`` per layer plus one layer recomputed. The figures are estimates: the answer says so,
and ``orch submit`` prints it before the job starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .check import estimate_model_states, human_bytes
from .errors import UserError

HEADROOM = 0.9   # leave a tenth of the device for the framework, buffers and fragmentation


@dataclass(frozen=True)
class StageFit:
    stage: int
    offload_optimizer: bool
    offload_param: bool
    state_bytes: float
    max_micro_batch: int          # 0: does not fit even micro-batch 1

    def describe(self) -> str:
        off = [k for k, on in (("optimizer", self.offload_optimizer), ("param", self.offload_param)) if on]
        where = f" + offload {'/'.join(off)} to CPU" if off else ""
        fit = f"micro-batch <= {self.max_micro_batch}" if self.max_micro_batch else "does not fit"
        return f"ZeRO-{self.stage}{where}: states {human_bytes(self.state_bytes)}/GPU, {fit}"


@dataclass
class AutotuneAnswer:
    stage: int
    offload_optimizer: bool
    offload_param: bool
    micro_batch: int
    gradient_accumulation_steps: int
    metric: str
    device_bytes: float
    activation_bytes: float
    candidates: list[StageFit] = field(default_factory=list)

    def summary(self) -> str:
        off = [k for k, on in (("optimizer", self.offload_optimizer), ("param", self.offload_param)) if on]
        where = f", offload {'+'.join(off)} to CPU" if off else ", no offload"
        return (f"ZeRO-{self.stage}{where}, micro-batch {self.micro_batch} x accumulation "
                f"{self.gradient_accumulation_steps} (metric {self.metric}; from the memory estimate for "
                f"{human_bytes(self.device_bytes)} per device and ~{human_bytes(self.activation_bytes)} of "
                "activations per sample, no trials)")

    def apply(self, ds: dict[str, Any], args: list[str], arg_mappings: Optional[dict[str, str]] = None
              ) -> tuple[dict[str, Any], list[str]]:
        """The ds_config and program args with the answer written in: stage and offload in the
        ds_config; each batch size as the program argument ``arg_mappings`` names for it (as
        DeepSpeed's autotuner passes it, so a script that fills "auto" from its own arguments gets
        it), else in the ds_config."""
        out, args = dict(ds), list(args)
        batch = {"train_micro_batch_size_per_gpu": self.micro_batch,
                 "gradient_accumulation_steps": self.gradient_accumulation_steps}
        for key, value in batch.items():
            flag = (arg_mappings or {}).get(key)
            if flag:
                args = _with_arg(args, flag, str(value))
            else:
                out[key] = value
        if "train_micro_batch_size_per_gpu" not in (arg_mappings or {}) and out.get("train_batch_size") != "auto":
            out.pop("train_batch_size", None)
        zero = dict(out.get("zero_optimization") or {})
        zero["stage"] = self.stage
        for key, on in (("offload_optimizer", self.offload_optimizer), ("offload_param", self.offload_param)):
            if on:
                zero[key] = {**(zero.get(key) or {}), "device": "cpu"}
            else:
                zero.pop(key, None)
        out["zero_optimization"] = zero
        return out, args


def _with_arg(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag value`` (replacing ``flag X`` or ``flag=X`` when present)."""
    out, i = [], 0
    while i < len(args):
        if args[i] == flag and i + 1 < len(args):
            i += 2
            continue
        if not args[i].startswith(flag + "="):
            out.append(args[i])
        i += 1
    return [*out, flag, value]


def activation_bytes_per_sample(preset: Any, precision: str, checkpointing: bool) -> float:
    """Activation memory of one sample of a bundled GPT preset (see the module docstring)."""
    s, h, a, layers, vocab = preset.seq_len, preset.d_model, preset.n_head, preset.n_layer, preset.vocab_size
    scale = 2.0 if precision == "fp32" else 1.0
    full_layer = s * h * (34 + 5 * a * s / h) * scale
    logits = s * vocab * 4 * 2          # fp32 logits and their gradient
    if checkpointing:
        return layers * 2 * s * h * scale + full_layer + logits
    return layers * full_layer + logits


def autotune(cfg: Any, *, world_size: int, num_parameters: Optional[int], activation_bytes: Optional[float],
             device_bytes: float, gas: int = 1) -> AutotuneAnswer:
    """Stage, offload and micro-batch for ``cfg`` (a loaded EngineConfig with an autotuning section)."""
    tuning = cfg.autotuning
    if not num_parameters:
        raise UserError("autotuning: the model's parameter count is unknown; set autotuning.model_info.num_params "
                        "(or pass --params to orch check)")
    if not activation_bytes:
        raise UserError("autotuning: the activation memory per sample is unknown for this program; run the bundled "
                        "trainer, or give the micro-batch yourself (the stage alone: orch check --gpu-memory-gb)")
    usable = device_bytes * HEADROOM
    fits = [_fit(num_parameters, world_size, stage, cfg.precision, oo, op, usable, activation_bytes)
            for oo, op in ((False, False), (True, False), (True, True)) for stage in range(4)
            if (not oo or stage >= 1) and (not op or stage == 3)]
    limit = tuning.max_train_micro_batch_size_per_gpu
    if tuning.max_train_batch_size:
        limit = min(limit, max(1, tuning.max_train_batch_size // (world_size * gas)))
    feasible = [f for f in fits if f.max_micro_batch >= tuning.min_train_micro_batch_size_per_gpu]
    if not feasible:
        raise UserError(f"autotuning: nothing fits {human_bytes(device_bytes)} per device, even with offload: "
                        + "; ".join(f.describe() for f in fits))
    best = _choose(feasible, tuning.metric, limit, tuning.min_train_micro_batch_size_per_gpu)
    micro = _micro(best, tuning.metric, limit, tuning.min_train_micro_batch_size_per_gpu)
    return AutotuneAnswer(best.stage, best.offload_optimizer, best.offload_param, micro, gas, tuning.metric,
                          device_bytes, activation_bytes, fits)


def _fit(params: int, world: int, stage: int, precision: str, offload_opt: bool, offload_par: bool,
         usable: float, activations: float) -> StageFit:
    states = estimate_model_states(params, world, stage, precision, offload_opt, offload_par).gpu_bytes
    room = usable - states
    return StageFit(stage, offload_opt, offload_par, states, max(0, int(room // activations)) if room > 0 else 0)


def _micro(fit: StageFit, metric: str, limit: int, minimum: int) -> int:
    if metric in ("latency", "forward", "step"):
        return minimum
    return max(minimum, min(fit.max_micro_batch, limit))


def _choose(feasible: list[StageFit], metric: str, limit: int, minimum: int) -> StageFit:
    """Least offload first; then the largest micro-batch (throughput) and the lowest stage."""
    def key(f: StageFit) -> tuple:
        offload = int(f.offload_optimizer) + int(f.offload_param)
        return (offload, -_micro(f, metric, limit, minimum), f.stage)
    return min(feasible, key=key)


def device_memory_bytes(spec: Any, gpu_memory_gb: Optional[float]) -> float:
    """Memory of one device: ``--gpu-memory-gb``, else ``ORCH_GPU_MEMORY_GB``, else (CPU jobs) the
    job's memory per node (``slurm.mem``) or this machine's, shared by the node's ranks."""
    if gpu_memory_gb:
        return gpu_memory_gb * 1e9
    env = os.environ.get("ORCH_GPU_MEMORY_GB", "").strip()
    if env:
        try:
            return float(env) * 1e9
        except ValueError:
            raise UserError(f"ORCH_GPU_MEMORY_GB={env!r} must be a number of GB") from None
    if spec.gpus_per_node:
        raise UserError("autotuning: orch needs the memory of one GPU to answer without trials; pass "
                        "--gpu-memory-gb (e.g. 80) or set ORCH_GPU_MEMORY_GB")
    node = _slurm_mem_bytes(getattr(getattr(spec, "slurm", None), "mem", None)) or _host_memory_bytes()
    return node / max(1, spec.procs_per_node)


def _slurm_mem_bytes(mem: Optional[str]) -> float:
    if not mem:
        return 0.0
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = mem.strip().upper()
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text) * 2**20
    except ValueError:
        return 0.0


def _host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def answer_for_report(report: Any, gpu_memory_bytes: Optional[float]) -> AutotuneAnswer:
    """The answer for a checked job (``check_job(..., autotune=True)``): its ds_config's
    ``autotuning`` section (DeepSpeed's defaults when absent), the bundled preset's shape or
    ``autotuning.model_info``, and one device's memory."""
    spec, cfg, num_parameters, preset = report.spec, report.config, report.num_parameters, report.preset
    if cfg is None:
        raise UserError("autotuning needs a ds_config (the answer is written into it)")
    if cfg.autotuning is None:
        from engine.config.autotuning import AutotuningConfig

        cfg = cfg.model_copy(update={"autotuning": AutotuningConfig()})
    info = cfg.autotuning.model_info
    params = num_parameters or (info.num_params if info is not None else None)
    checkpointing = bool(preset is not None and preset.activation_checkpointing)
    activations = activation_bytes_per_sample(preset, cfg.precision, checkpointing) if preset is not None else None
    gas = cfg.gradient_accumulation_steps if isinstance(cfg.gradient_accumulation_steps, int) else 1
    return autotune(cfg, world_size=spec.world_size, num_parameters=params, activation_bytes=activations,
                    device_bytes=device_memory_bytes(spec, gpu_memory_bytes / 1e9 if gpu_memory_bytes else None),
                    gas=gas)


def autotuned_spec(spec: Any) -> tuple[Any, AutotuneAnswer]:
    """``spec`` with its ds_config replaced by the answered one (inline), and the answer."""
    from .check import check_job

    answer = answer_for_report(check_job(spec, autotune=True), None)
    ds = spec.ds_config_dict()
    mappings = (ds.get("autotuning") or {}).get("arg_mappings")
    tuned, args = answer.apply(ds, list(spec.args), mappings)
    return spec.model_copy(update={"ds_config": tuned, "args": args}), answer
