"""The ds_config model: DeepSpeed's keys with DeepSpeed's meaning, validated strictly.

``EngineConfig`` is the validated top level of a ds_config (load.py builds it); field names are
DeepSpeed's key names, so code reads ``cfg.zero_optimization.stage`` or
``cfg.fp16.initial_scale_power``. The sections live in sections.py and optim.py.

This package must stay cheap to import: ``orch check`` uses it, so it never imports torch.

Defaults are DeepSpeed's (deepspeed/runtime/constants.py and the section configs). Two are
worth knowing: ``gradient_clipping`` defaults to 1.0 (DeepSpeed changed it from 0.0, i.e. off,
in PR #8068; its config-json docs say 1.0), and ``steps_per_print`` defaults to None (no
periodic progress report; DeepSpeed's docs still say 10, its code says None).
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, PrivateAttr

from .autotuning import AutotuningConfig
from .batch import BatchSizes, batch_for_world_size, resolve_batch
from .errors import Problem
from .features import IgnoredFeature, ignored_features, unsupported_problems
from .optim import OptimizerConfig, SchedulerConfig, optimizer_combination_problems
from .sections import (ActivationCheckpointingConfig, AmpConfig, BF16Config, CheckpointConfig, CometConfig,
                              CommsLoggerConfig, CSVMonitorConfig, DataTypesConfig, FlopsProfilerConfig, FP16Config,
                              TensorBoardConfig, TorchAutocastConfig, WandbConfig, ZeroConfig)
from .types import Bool, DType, NonNegFloat, Opaque, PosFloat, PosInt, Section, Str, choice

AllreduceOp = choice("mean", "sum")

class EngineConfig(Section):
    """A validated ds_config. Build it with ``load_config``; field names are DeepSpeed's keys.

    Batch keys keep what the user wrote (None when absent) so the batch rule can be applied for
    any world size (``resolve_batch``); ``batch`` holds the sizes resolved at load time when
    ``load_config`` was given a world size.
    """

    # batch size (see batch.py for the rule)
    train_batch_size: Optional[PosInt] = None
    train_micro_batch_size_per_gpu: Optional[PosInt] = None
    gradient_accumulation_steps: Optional[PosInt] = None
    managed_gradient_accumulation: Bool = True
    # optimisation
    optimizer: Optional[OptimizerConfig] = None
    scheduler: Optional[SchedulerConfig] = None
    gradient_clipping: NonNegFloat = 1.0
    zero_allow_untested_optimizer: Bool = False
    zero_force_ds_cpu_optimizer: Bool = True
    # precision
    fp16: FP16Config = Field(default_factory=FP16Config)
    bf16: BF16Config = Field(default_factory=BF16Config)
    amp: AmpConfig = Field(default_factory=AmpConfig)
    torch_autocast: TorchAutocastConfig = Field(default_factory=TorchAutocastConfig)
    data_types: DataTypesConfig = Field(default_factory=DataTypesConfig)
    # ZeRO and communication
    zero_optimization: ZeroConfig = Field(default_factory=ZeroConfig)
    communication_data_type: Optional[DType] = None
    seq_parallel_communication_data_type: Optional[DType] = None
    gradient_allreduce_op: AllreduceOp = "mean"
    prescale_gradients: Bool = False
    gradient_predivide_factor: PosFloat = 1.0
    sparse_gradients: Bool = False
    disable_allgather: Bool = False
    # memory
    activation_checkpointing: ActivationCheckpointingConfig = Field(default_factory=ActivationCheckpointingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    dataloader_drop_last: Bool = False
    # logging and monitoring
    steps_per_print: Optional[PosInt] = None
    wall_clock_breakdown: Bool = False
    memory_breakdown: Bool = False
    dump_state: Bool = False
    log_level: Optional[Str] = None
    flops_profiler: FlopsProfilerConfig = Field(default_factory=FlopsProfilerConfig)
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    csv_monitor: CSVMonitorConfig = Field(default_factory=CSVMonitorConfig)
    comet: CometConfig = Field(default_factory=CometConfig)
    comms_logger: CommsLoggerConfig = Field(default_factory=CommsLoggerConfig)
    # DeepSpeed features accepted so configs load; see features.py for what each does here
    vocabulary_size: Optional[PosInt] = None
    graph_harvesting: Bool = False
    use_data_before_expert_parallelism: Bool = False
    sequence_parallel_size: Optional[PosInt] = None
    autotuning: Optional[AutotuningConfig] = None
    elasticity: Optional[Opaque] = None
    eigenvalue: Optional[Opaque] = None
    progressive_layer_drop: Optional[Opaque] = None
    curriculum_learning: Optional[Opaque] = None
    data_efficiency: Optional[Opaque] = None
    compression_training: Optional[Opaque] = None
    sparse_attention: Optional[Opaque] = None
    pipeline: Optional[Opaque] = None
    aio: Optional[Opaque] = None
    hybrid_engine: Optional[Opaque] = None
    tensor_parallel: Optional[Opaque] = None
    expert_parallel: Optional[Opaque] = None
    compile: Optional[Opaque] = None
    weight_quantization: Optional[Opaque] = None
    nebula: Optional[Opaque] = None
    datastates: Optional[Opaque] = None
    timers: Optional[Opaque] = None

    _migrations: list[str] = PrivateAttr(default_factory=list)
    _auto_derived: frozenset[str] = PrivateAttr(default_factory=frozenset)
    _auto_left: frozenset[str] = PrivateAttr(default_factory=frozenset)
    _ignored_unknown: list[str] = PrivateAttr(default_factory=list)
    _batch: Optional[BatchSizes] = PrivateAttr(default=None)

    def _check(self) -> list[Problem]:
        # features that would silently change the training result, and optimizer combinations DeepSpeed refuses
        return unsupported_problems(self) + optimizer_combination_problems(self)

    # -- what the engine reads --------------------------------------------------------------
    @property
    def precision(self) -> str:
        """"fp16" | "bf16" | "fp32": the training precision the config asks for."""
        if self.fp16.enabled:
            return "fp16"
        return "bf16" if self.bf16.enabled else "fp32"

    @property
    def grad_accum_dtype(self) -> str:
        """"fp32" | "bf16" | "fp16": where gradients are accumulated and reduced
        (``data_types.grad_accum_dtype``; fp32 unless the config says otherwise)."""
        return self.data_types.grad_accum_dtype or "fp32"

    @property
    def migrations(self) -> list[str]:
        """One line per deprecated or aliased key that was rewritten while loading."""
        return list(self._migrations)

    @property
    def ignored_unknown(self) -> list[str]:
        """Unknown keys a lenient load ignored, one line each with the nearest valid keys."""
        return list(self._ignored_unknown)

    @property
    def auto_left(self) -> list[str]:
        """``"auto"`` paths left for the job's program to fill (``load_config(program_fills_auto=True)``)."""
        return sorted(self._auto_left)

    @property
    def batch(self) -> Optional[BatchSizes]:
        """Batch sizes resolved by ``load_config(..., world_size=N)``, else None."""
        return self._batch

    def ignored_features(self) -> list[IgnoredFeature]:
        """Keys this config sets that the engine accepts but does not act on, each with why."""
        return ignored_features(self)

    def resolve_batch(self, world_size: int) -> BatchSizes:
        """DeepSpeed's batch rule for ``world_size`` data-parallel ranks (ConfigError if impossible)."""
        return resolve_batch(self.train_batch_size, self.train_micro_batch_size_per_gpu,
                             self.gradient_accumulation_steps, world_size, self._auto_derived)

    def batch_for_world_size(self, world_size: int, keep_global: bool = True) -> BatchSizes:
        """Batch sizes after an elastic restart on ``world_size`` ranks.

        keep_global=True keeps ``train_batch_size`` by changing the accumulation steps (micro
        batch fixed); when no whole number of steps fits, the nearest valid alternative is
        returned and its ``note`` says why. The reference sizes are those resolved at load time
        (``load_config(world_size=...)``), else the config's own ``train_batch_size`` and micro batch.
        """
        ref = self._batch
        if ref is None:
            tb, mb = self.train_batch_size, self.train_micro_batch_size_per_gpu
            if tb is None or mb is None:
                return self.resolve_batch(world_size)
            return batch_for_world_size(tb, mb, world_size, keep_global, self.gradient_accumulation_steps or 1)
        return batch_for_world_size(ref.train_batch_size, ref.micro, world_size, keep_global,
                                    ref.gradient_accumulation_steps)

    def to_ds_dict(self) -> dict[str, Any]:
        """The resolved config as a DeepSpeed-style dict (JSON-ready), e.g. to write next to a job.

        Deprecated names appear under their new names, defaults are written out, and the batch
        keys hold the sizes resolved at load time when a world size was given.
        """
        out = self.model_dump(mode="json", exclude_none=True)
        if self._batch is not None:
            out.update({"train_batch_size": self._batch.train_batch_size,
                        "train_micro_batch_size_per_gpu": self._batch.micro,
                        "gradient_accumulation_steps": self._batch.gradient_accumulation_steps})
        return out
