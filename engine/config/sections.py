"""The ds_config sections other than optimizer/scheduler, with DeepSpeed's keys and defaults.

Defaults follow DeepSpeed's code (deepspeed/runtime/zero/config.py, zero/offload_config.py,
precision_config.py, activation_checkpointing/config.py, monitor/config.py); where its
documentation disagrees with its code, the code wins and the field's comment says so.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

from pydantic import Field

from .errors import Problem
from .types import AliasedDType, Bool, DType, Fraction, Int, NonNegFloat, NonNegInt, PosInt, Section, Str, choice

OffloadDevice = choice("none", "cpu", "nvme", case_insensitive=False)
CheckpointHash = choice("xxh3_128", "sha256", case_insensitive=False)
TagValidation = choice("Warn", "Ignore", "Fail")   # DeepSpeed upper-cases it, so any case works


class FP16Config(Section):
    """``fp16``: mixed precision with a loss scaler (``loss_scale`` 0 = dynamic scaling)."""

    enabled: Bool = False
    auto_cast: Bool = False
    loss_scale: NonNegFloat = 0.0
    initial_scale_power: NonNegInt = Field(16, le=127)   # 2**128 overflows fp32
    loss_scale_window: NonNegInt = 1000
    hysteresis: NonNegInt = 2
    consecutive_hysteresis: Bool = False
    min_loss_scale: NonNegInt = 1
    fp16_master_weights_and_grads: Bool = False

    def _check(self) -> list[Problem]:
        # As in DeepSpeed: these only matter (and must be > 0) when dynamic scaling runs.
        if not (self.enabled and self.loss_scale == 0):
            return []
        return [(k, "must be > 0 when dynamic loss scaling is on (loss_scale 0), got 0", "")
                for k in ("loss_scale_window", "min_loss_scale", "hysteresis") if getattr(self, k) == 0]

    @property
    def dynamic_loss_scale(self) -> bool:
        return self.loss_scale == 0

    @property
    def initial_dynamic_scale(self) -> float:
        return float(2 ** self.initial_scale_power)


class BF16Config(Section):
    """``bf16`` (DeepSpeed's old name ``bfloat16`` is migrated): bfloat16 training, no loss scaling."""

    enabled: Bool = False
    immediate_grad_update: Bool = False
    check_grad_overflow: Bool = True
    bf16_master_weights_and_grads: Bool = False
    bf16_optimizer_states: Bool = False


class AmpConfig(Section):
    """``amp``: NVIDIA Apex AMP. Accepted so configs load; enabling it is an error (use bf16/fp16)."""

    model_config = Section.model_config | {"extra": "allow"}  # other keys go to apex.amp.initialize

    enabled: Bool = False


class TorchAutocastConfig(Section):
    """``torch_autocast``: accepted so configs load; enabling it is an error (use bf16/fp16)."""

    enabled: Bool = False
    dtype: Optional[Str] = None
    lower_precision_safe_modules: Optional[list[Str]] = None


class OffloadParamConfig(Section):
    """``zero_optimization.offload_param`` (ZeRO-3 only). DeepSpeed's default device is "none"."""

    device: OffloadDevice = "none"
    nvme_path: Optional[Str] = None
    pin_memory: Bool = True
    buffer_count: NonNegInt = 5
    buffer_size: NonNegInt = 100_000_000
    max_in_cpu: NonNegInt = 1_000_000_000


class OffloadOptimizerConfig(Section):
    """``zero_optimization.offload_optimizer``: optimizer states and step on the CPU (stages 1-3)."""

    device: OffloadDevice = "none"
    nvme_path: Optional[Str] = None
    pin_memory: Bool = True
    buffer_count: NonNegInt = 4
    pipeline_read: Bool = False
    pipeline_write: Bool = False
    fast_init: Bool = False
    ratio: Fraction = 1.0
    super_offload: Bool = False
    cpuadam_cores_perc: Fraction = 0.8


class ZeroConfig(Section):
    """``zero_optimization``: which ZeRO stage and its communication/offload knobs.

    ``stage3_prefetch_bucket_size`` defaults to 5e7 as in DeepSpeed's code (its docs say 5e8).
    ``overlap_comm`` unset means DeepSpeed's dynamic default: on for stage 3, off otherwise.
    Deprecated keys (``cpu_offload``, ``cpu_offload_param``, ``cpu_offload_use_pin_memory``,
    ``stage3_gather_fp16_weights_on_model_save``) are migrated before validation.
    """

    stage: NonNegInt = Field(0, le=3)
    contiguous_gradients: Bool = True
    reduce_scatter: Bool = True
    reduce_bucket_size: NonNegInt = 500_000_000
    use_multi_rank_bucket_allreduce: Bool = True
    allgather_partitions: Bool = True
    allgather_bucket_size: NonNegInt = 500_000_000
    overlap_comm: Optional[Bool] = None
    load_from_fp32_weights: Bool = True
    elastic_checkpoint: Bool = False
    offload_param: OffloadParamConfig = Field(default_factory=OffloadParamConfig)
    offload_optimizer: OffloadOptimizerConfig = Field(default_factory=OffloadOptimizerConfig)
    sub_group_size: NonNegInt = 1_000_000_000
    stage3_prefetch_bucket_size: NonNegInt = 50_000_000
    stage3_param_persistence_threshold: NonNegInt = 100_000
    stage3_model_persistence_threshold: NonNegInt = sys.maxsize
    stage3_max_live_parameters: NonNegInt = 1_000_000_000
    stage3_max_reuse_distance: NonNegInt = 1_000_000_000
    stage3_hold_tied_params: Bool = False     # orch's key (docs/ds_config.md): gather a tied unit once a step
    stage3_gather_16bit_weights_on_model_save: Bool = False
    stage3_module_granularity_threshold: Int = 0
    stage3_use_all_reduce_for_fetch_params: Bool = False
    stage3_allgather_sequential: Bool = False
    ignore_unused_parameters: Bool = True
    legacy_stage1: Bool = False
    round_robin_gradients: Bool = False
    grad_hooks: Bool = True
    zero_hpz_partition_size: NonNegInt = 1
    zero_quantized_weights: Bool = False
    zero_quantized_nontrainable_weights: Bool = False
    zero_quantized_gradients: Bool = False
    zeropp_loco_param: Optional[dict[str, Any]] = None
    mics_shard_size: Int = -1
    mics_hierarchical_params_gather: Bool = False
    memory_efficient_linear: Bool = True
    pipeline_loading_checkpoint: Bool = False
    override_module_apply: Bool = True
    log_trace_cache_warnings: Bool = False
    enable_sanity_checks: Bool = False
    save_muon_momentum_buffer_in_memory: Bool = False
    leaf_module: Optional[dict[str, Any]] = None
    zenflow: Optional[dict[str, Any]] = None

    def _check(self) -> list[Problem]:
        if self.overlap_comm is None:
            self.overlap_comm = self.stage == 3
        problems: list[Problem] = []
        if self.offload_param.device != "none" and self.stage != 3:
            problems.append(("offload_param.device",
                             f"offload_param works only with ZeRO stage 3, but stage is {self.stage}",
                             "set stage to 3, or use offload_optimizer for stages 1-2"))
        if self.offload_optimizer.device != "none" and self.stage == 0:
            problems.append(("offload_optimizer.device", "offload_optimizer needs ZeRO stage 1, 2 or 3, "
                             "but stage is 0", "set stage to 1 or higher"))
        if self.offload_optimizer.ratio < 1.0 and self.stage != 3:
            problems.append(("offload_optimizer.ratio", "partial offload (ratio < 1) works only with "
                             f"ZeRO stage 3, but stage is {self.stage}", "remove ratio or set stage to 3"))
        for key in ("offload_param", "offload_optimizer"):
            section = getattr(self, key)
            if section.device == "nvme" and not section.nvme_path:
                problems.append((f"{key}.nvme_path", "device is \"nvme\" but nvme_path is not set",
                                 "set nvme_path to a directory on the NVMe drive, or use device \"cpu\""))
        return problems


class ActivationCheckpointingConfig(Section):
    """``activation_checkpointing``: how checkpointed activations are handled.

    As in DeepSpeed, these options tune ``engine.checkpointing`` for models that call it.
    ``enabled`` is ours: it tells the bundled trainer to checkpoint its transformer blocks.
    The top-level ``"gradient_checkpointing": true`` some guides use (DeepSpeed ignores it)
    is migrated to ``enabled: true``.
    """

    partition_activations: Bool = False
    cpu_checkpointing: Bool = False
    contiguous_memory_optimization: Bool = False
    number_checkpoints: Optional[PosInt] = None
    synchronize_checkpoint_boundary: Bool = False
    profile: Bool = False
    enabled: Bool = False


class ParallelWriteConfig(Section):
    pipeline_stage: Bool = False


class CheckpointConfig(Section):
    """``checkpoint``: DeepSpeed's checkpoint options, plus ``async_save`` and ``hash`` (ours).

    ``hash``: the checksum every checkpoint file gets while it is written and is verified with at
    load, ``xxh3_128`` (fast, the default) or ``sha256`` (cryptographic, ~1.4 GB/s per core)."""

    tag_validation: TagValidation = "Warn"
    load_universal: Bool = False
    use_node_local_storage: Bool = False
    parallel_write: ParallelWriteConfig = Field(default_factory=ParallelWriteConfig)
    checkpoint_serialization: Bool = True
    writer: Optional[dict[str, Any]] = None
    async_save: Bool = False
    hash: CheckpointHash = "xxh3_128"


class DataTypesConfig(Section):
    """``data_types``: dtype of gradient accumulation (and DeepSpeed's newer param/buffer dtypes).

    ``grad_accum_dtype`` is where bf16/fp16 gradients are summed over micro-steps and ranks.
    Unset means fp32 here (DeepSpeed's unset means the model dtype): every gradient bucket, and
    the gradient partition or buffer the optimizer reads, are fp32, which costs 2 extra bytes per
    gradient element the rank holds (2Ψ/N at stages 2-3, 2Ψ at stages 0-1). ``"bf16"``/``"fp16"``
    (the model dtype) keep the low-precision sums DeepSpeed uses by default."""

    grad_accum_dtype: Optional[AliasedDType] = None
    param_dtype: Optional[DType] = None
    buffer_dtype: Optional[DType] = None


class FlopsProfilerConfig(Section):
    enabled: Bool = False
    recompute_fwd_factor: NonNegFloat = 0.0
    profile_step: PosInt = 1
    module_depth: Int = -1
    top_modules: PosInt = 1
    detailed: Bool = True
    output_file: Optional[Str] = None


class TensorBoardConfig(Section):
    enabled: Bool = False
    output_path: Str = ""
    job_name: Str = "DeepSpeedJobName"


class CSVMonitorConfig(Section):
    enabled: Bool = False
    output_path: Str = ""
    job_name: Str = "DeepSpeedJobName"


class WandbConfig(Section):
    enabled: Bool = False
    group: Optional[Str] = None
    team: Optional[Str] = None
    project: Str = "deepspeed"


class CometConfig(Section):
    enabled: Bool = False
    samples_log_interval: PosInt = 100
    project: Optional[Str] = None
    workspace: Optional[Str] = None
    api_key: Optional[Str] = None
    experiment_name: Optional[Str] = None
    experiment_key: Optional[Str] = None
    online: Optional[Bool] = None
    mode: Optional[Str] = None


class CommsLoggerConfig(Section):
    enabled: Bool = False
    prof_all: Bool = True
    prof_ops: list[Str] = Field(default_factory=list)
    verbose: Bool = False
    debug: Bool = False


__all__ = [
    "FP16Config", "BF16Config", "AmpConfig", "TorchAutocastConfig", "OffloadParamConfig",
    "OffloadOptimizerConfig", "ZeroConfig", "ActivationCheckpointingConfig", "CheckpointConfig",
    "DataTypesConfig", "FlopsProfilerConfig", "TensorBoardConfig", "CSVMonitorConfig", "WandbConfig",
    "CometConfig", "CommsLoggerConfig",
]
