"""``autotuning``: DeepSpeed's autotuner section, with its keys and defaults
(deepspeed/autotuning/constants.py), validated strictly.

DeepSpeed's autotuner launches trial runs to pick the ZeRO stage and micro-batch. orch answers
the same question without trials, before the job starts (``orch check --autotune``, and
``orch submit`` when ``enabled``), from the memory estimate; the engine itself ignores the
section at run time. Keys that only steer trials (``results_dir``, ``tuner_type``, profile
steps, ...) are accepted so configs load, and have no effect.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from .errors import Problem
from .types import Bool, NonNegInt, PosInt, Section, Str, choice

Metric = choice("throughput", "latency", "flops", "forward", "step")
TunerType = choice("gridsearch", "random", "model_based")


class ModelInfo(Section):
    """``autotuning.model_info``: what the autotuner knows of a user's model without profiling it."""

    profile: Bool = False
    num_params: Optional[PosInt] = None
    hidden_size: Optional[PosInt] = None
    num_layers: Optional[PosInt] = None


class AutotuningConfig(Section):
    enabled: Bool = False
    fast: Bool = True
    results_dir: Str = "autotuning_results"
    exps_dir: Str = "autotuning_exps"
    overwrite: Bool = True
    start_profile_step: NonNegInt = 3
    end_profile_step: NonNegInt = 5
    metric_path: Optional[Str] = None
    metric: Metric = "throughput"
    tuner_type: TunerType = "gridsearch"
    tuner_early_stopping: PosInt = 5
    tuner_num_trials: PosInt = 50
    arg_mappings: Optional[dict[str, Str]] = None
    max_train_batch_size: Optional[PosInt] = None
    min_train_batch_size: PosInt = 1
    max_train_micro_batch_size_per_gpu: PosInt = 1024
    min_train_micro_batch_size_per_gpu: PosInt = 1
    num_tuning_micro_batch_sizes: PosInt = 3
    mp_size: PosInt = 1
    model_info: Optional[ModelInfo] = None
    model_info_path: Optional[Str] = None
    zero_optimization: Optional[dict[str, Any]] = Field(None, description="a tuning space DeepSpeed accepts here")

    def _check(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.min_train_micro_batch_size_per_gpu > self.max_train_micro_batch_size_per_gpu:
            problems.append(("min_train_micro_batch_size_per_gpu", "is larger than max_train_micro_batch_size_per_gpu",
                             "swap them"))
        if self.max_train_batch_size is not None and self.min_train_batch_size > self.max_train_batch_size:
            problems.append(("min_train_batch_size", "is larger than max_train_batch_size", "swap them"))
        if self.mp_size != 1:
            problems.append(("mp_size", f"model parallelism ({self.mp_size}) is not supported by orch's engine",
                             "remove mp_size or set 1"))
        return problems
