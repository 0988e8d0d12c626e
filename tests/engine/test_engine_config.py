"""ds_config loading as a DeepSpeed user meets it: their configs load with DeepSpeed's meaning,
mistakes come back as one readable error naming every bad key, and the batch rule is DeepSpeed's."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from engine.config import BatchSizes, ConfigDeprecationWarning, ConfigError, EngineConfig, load_config
from tests.shared_env import REPO, shared_file

DS_CONFIGS = REPO / "examples" / "ds_configs"
SEED_FILES = ["zero2_fp16_offload.json", "zero2_recommended.json", "zero3_offload.json",
              "memory_efficient_finetune.json", "max_throughput_bf16.json"]


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return {p.path: str(p) for p in excinfo.value.problems}


# ---------------------------------------------------------------- the seed guide's configs


def test_every_json_block_of_the_seed_guide_is_an_example_file_and_loads():
    guide = shared_file("seed/deepspeed-training.md", "ORCH_SEED_GUIDE", "the seed DeepSpeed guide")
    blocks = re.findall(r"```json\n(.*?)```", guide.read_text(), flags=re.S)
    assert len(blocks) == 5
    examples = {name: json.loads((DS_CONFIGS / name).read_text()) for name in SEED_FILES}
    for block in blocks:
        config = json.loads(block)
        assert config in examples.values(), f"seed config not in examples/ds_configs: {config}"
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigDeprecationWarning)   # none of them is deprecated
            load_config(config)


def test_zero2_fp16_offload_resolves_as_deepspeed_would():
    cfg = load_config(DS_CONFIGS / "zero2_fp16_offload.json", world_size=4)
    assert cfg.zero_optimization.stage == 2
    assert cfg.zero_optimization.offload_optimizer.device == "cpu"
    assert cfg.zero_optimization.offload_optimizer.pin_memory is True       # DeepSpeed's default
    assert cfg.zero_optimization.offload_param.device == "none"
    assert cfg.precision == "fp16" and cfg.fp16.loss_scale == 0 and cfg.fp16.dynamic_loss_scale
    assert cfg.fp16.initial_dynamic_scale == 2.0 ** 16
    assert cfg.batch == BatchSizes(32, 8, 1, 4)          # only train_batch_size and gas given
    assert cfg.optimizer is None and cfg.scheduler is None  # the client brings its own
    assert cfg.migrations == [] and cfg.ignored_features() == []


def test_zero3_offload_offloads_params_and_optimizer_and_overlaps_comm():
    cfg = load_config(str(DS_CONFIGS / "zero3_offload.json"))
    zero = cfg.zero_optimization
    assert (zero.stage, zero.offload_param.device, zero.offload_optimizer.device) == (3, "cpu", "cpu")
    assert zero.overlap_comm is True                     # DeepSpeed turns it on for stage 3 only
    assert load_config(DS_CONFIGS / "zero2_recommended.json").zero_optimization.overlap_comm is False


def test_configs_without_a_batch_size_take_it_from_the_job():
    cfg = load_config(DS_CONFIGS / "zero2_recommended.json")
    assert (cfg.zero_optimization.allgather_partitions, cfg.zero_optimization.reduce_scatter) == (True, True)
    with pytest.raises(ConfigError, match="neither train_batch_size nor train_micro_batch_size_per_gpu is set"):
        cfg.resolve_batch(2)
    cfg = load_config(DS_CONFIGS / "zero2_recommended.json", world_size=2,
                      auto_values={"train_micro_batch_size_per_gpu": 4})
    assert cfg.batch == BatchSizes(8, 4, 1, 2)


def test_memory_efficient_finetune_turns_gradient_checkpointing_into_activation_checkpointing():
    cfg = load_config(DS_CONFIGS / "memory_efficient_finetune.json", world_size=2)
    assert cfg.activation_checkpointing.enabled is True
    assert len(cfg.migrations) == 1 and "gradient_checkpointing" in cfg.migrations[0]
    assert "activation_checkpointing.enabled" in cfg.migrations[0]
    assert cfg.batch == BatchSizes(16, 8, 1, 2)
    assert cfg.precision == "fp16" and cfg.zero_optimization.offload_optimizer.device == "cpu"
    assert "gradient_checkpointing" not in cfg.to_ds_dict()


@pytest.mark.parametrize("world_size, micro", [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)])
def test_max_throughput_resolves_micro_batch_for_world_sizes_that_divide_it(world_size, micro):
    cfg = load_config(DS_CONFIGS / "max_throughput_bf16.json", world_size=world_size)
    assert cfg.batch == BatchSizes(64, micro, 4, world_size)
    assert cfg.precision == "bf16" and cfg.zero_optimization.stage == 1


@pytest.mark.parametrize("world_size", [3, 5, 32])
def test_max_throughput_explains_world_sizes_that_do_not_divide_it(world_size):
    with pytest.raises(ConfigError) as excinfo:
        load_config(DS_CONFIGS / "max_throughput_bf16.json", world_size=world_size)
    text = str(excinfo.value)
    assert text.startswith(str(DS_CONFIGS / "max_throughput_bf16.json"))
    assert f"train_batch_size 64 is not divisible by gradient_accumulation_steps 4 × world size {world_size}" in text
    assert "run on a world size that divides 16: 1, 2, 4, 8, 16" in text


@pytest.mark.parametrize("name, stage", [("zero1_tiny_cpu.json", 1), ("zero2_tiny_cpu.json", 2)])
def test_tiny_cpu_configs_are_fp32_adamw_warmup_and_fit_every_small_world(name, stage):
    cfg = load_config(DS_CONFIGS / name)
    assert cfg.precision == "fp32" and cfg.zero_optimization.stage == stage
    assert cfg.optimizer.type == "AdamW" and cfg.optimizer.resolved_kind() == "adamw"
    assert cfg.optimizer.params["lr"] == 1e-3
    assert cfg.scheduler.type == "WarmupLR" and cfg.scheduler.params["warmup_max_lr"] == 1e-3
    for world, accumulation in [(1, 12), (2, 6), (3, 4), (4, 3)]:   # the elastic example runs 1-3 nodes
        assert cfg.resolve_batch(world) == BatchSizes(24, 2, accumulation, world)


# ---------------------------------------------------------------- DeepSpeed's defaults and meaning


def test_defaults_are_deepspeeds():
    cfg = load_config({"train_micro_batch_size_per_gpu": 1})
    assert cfg.gradient_clipping == 1.0          # DeepSpeed >= PR #8068 (was 0.0 before)
    assert cfg.steps_per_print is None and cfg.wall_clock_breakdown is False
    assert cfg.prescale_gradients is False and cfg.gradient_predivide_factor == 1.0
    fp16 = cfg.fp16
    assert (fp16.enabled, fp16.loss_scale, fp16.initial_scale_power, fp16.loss_scale_window, fp16.hysteresis,
            fp16.consecutive_hysteresis, fp16.min_loss_scale) == (False, 0, 16, 1000, 2, False, 1)
    zero = cfg.zero_optimization
    assert (zero.stage, zero.reduce_bucket_size, zero.allgather_bucket_size, zero.contiguous_gradients,
            zero.reduce_scatter, zero.allgather_partitions) == (0, 500_000_000, 500_000_000, True, True, True)
    assert (zero.stage3_max_live_parameters, zero.stage3_param_persistence_threshold,
            zero.stage3_prefetch_bucket_size, zero.sub_group_size) == (10**9, 10**5, 5 * 10**7, 10**9)
    assert cfg.activation_checkpointing.partition_activations is False
    assert cfg.checkpoint.tag_validation == "Warn" and cfg.checkpoint.async_save is False
    assert cfg.precision == "fp32"


def test_deepspeed_number_spellings_load():
    cfg = load_config({"train_batch_size": 8, "zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8,
                                                                    "stage3_max_live_parameters": 1e9},
                       "checkpoint": {"tag_validation": "FAIL"}, "communication_data_type": "FP16"})
    assert cfg.zero_optimization.reduce_bucket_size == 500_000_000
    assert isinstance(cfg.zero_optimization.stage3_max_live_parameters, int)
    assert cfg.checkpoint.tag_validation == "Fail" and cfg.communication_data_type == "fp16"


@pytest.mark.parametrize("optimizer, kind", [
    ({"type": "Adam"}, "adamw"),
    ({"type": "adam", "params": {"adam_w_mode": True}}, "adamw"),
    ({"type": "Adam", "params": {"adam_w_mode": False, "weight_decay": 0.1}}, "adam_l2"),
    ({"type": "AdamW", "params": {"lr": 3e-4}}, "adamw"),
    ({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}}, "sgd"),
    ({"type": "Lion", "params": {"lr": 1e-4, "betas": [0.9, 0.99]}}, "lion"),
])
def test_adam_means_adamw_unless_adam_w_mode_is_false(optimizer, kind):
    cfg = load_config({"train_batch_size": 4, "optimizer": optimizer})
    assert cfg.optimizer.resolved_kind() == kind
    assert cfg.optimizer.type in ("Adam", "AdamW", "SGD", "Lion")   # canonical spelling
    assert "adam_w_mode" not in cfg.optimizer.torch_kwargs()


def test_optimizer_params_are_filled_with_deepspeed_defaults():
    cfg = load_config({"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {"lr": 2e-4}}})
    assert cfg.optimizer.params == {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                    "bias_correction": True, "amsgrad": False, "adam_w_mode": True,
                                    "torch_adam": False, "fp32_optimizer_states": True, "set_grad_none": True}
    assert cfg.optimizer.torch_kwargs() == {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}


def test_adamw_with_adam_w_mode_false_still_runs_adamw_and_says_so():
    cfg = load_config({"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}})
    assert cfg.optimizer.resolved_kind() == "adamw"
    assert [f.path for f in cfg.ignored_features()] == ["optimizer.params.adam_w_mode"]


@pytest.mark.parametrize("scheduler, expected", [
    ({"type": "WarmupLR", "params": {"warmup_num_steps": 50}},
     {"warmup_min_lr": 0.0, "warmup_max_lr": None, "warmup_num_steps": 50, "warmup_type": "log"}),
    ({"type": "WarmupDecayLR", "params": {"total_num_steps": 1000, "warmup_type": "linear"}},
     {"total_num_steps": 1000, "warmup_max_lr": 0.001, "warmup_type": "linear"}),
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": 500, "warmup_min_ratio": 0.1}},
     {"cos_min_ratio": 0.0001, "warmup_min_ratio": 0.1, "warmup_num_steps": 1000}),
    ({"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3}},
     {"cycle_first_step_size": 2000, "cycle_momentum": True, "cycle_min_mom": 0.8, "cycle_max_mom": 0.9}),
    ({"type": "LRRangeTest", "params": {}},
     {"lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 2000, "lr_range_test_staircase": False}),
])
def test_every_deepspeed_schedule_loads_with_its_defaults(scheduler, expected):
    cfg = load_config({"train_batch_size": 4, "scheduler": scheduler})
    assert cfg.scheduler.type == scheduler["type"]
    assert {k: cfg.scheduler.params[k] for k in expected} == expected


# ---------------------------------------------------------------- the batch rule


@pytest.mark.parametrize("given, world, expected", [
    ({"train_batch_size": 32}, 4, (32, 8, 1)),                                     # micro = tb / world, gas 1
    ({"train_micro_batch_size_per_gpu": 4}, 3, (12, 4, 1)),                         # gas 1
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4)),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
    ({"train_batch_size": 1, "gradient_accumulation_steps": 1}, 1, (1, 1, 1)),
])
def test_batch_rule_fills_the_missing_value(given, world, expected):
    cfg = load_config(given, world_size=world)
    assert cfg.batch == BatchSizes(*expected, world)
    assert cfg.resolve_batch(world) == cfg.batch
    written = cfg.to_ds_dict()
    assert (written["train_batch_size"], written["train_micro_batch_size_per_gpu"],
            written["gradient_accumulation_steps"]) == expected


@pytest.mark.parametrize("given, world, message, fix", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 2,
     "train_batch_size 32 != train_micro_batch_size_per_gpu 4 × gradient_accumulation_steps 2 × world size 2 = 16",
     "set train_batch_size to 16"),
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 2,
     "train_batch_size 30 is not divisible by train_micro_batch_size_per_gpu 4 × world size 2 = 8",
     "set train_batch_size to 24 or 32"),
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 3,
     "gradient_accumulation_steps = 30 / 12 is not a whole number",
     "or set train_micro_batch_size_per_gpu to a divisor of 10: 1, 2, 5, 10"),
    ({"train_batch_size": 10}, 4, "train_batch_size 10 is not divisible by world size 4",
     "set train_batch_size to 8 or 12"),
    ({"gradient_accumulation_steps": 4}, 2, "neither train_batch_size nor train_micro_batch_size_per_gpu is set",
     "auto_values"),
    ({}, 1, "neither train_batch_size nor train_micro_batch_size_per_gpu is set", "set train_micro_batch_size_per_gpu"),
])
def test_batch_rule_errors_show_the_arithmetic_and_a_fix(given, world, message, fix):
    with pytest.raises(ConfigError) as excinfo:
        load_config(given, world_size=world)
    text = str(excinfo.value)
    assert message in text and fix in text
    assert isinstance(excinfo.value, ValueError)


def test_world_size_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match="world_size: must be a positive integer, got 0"):
        load_config({"train_batch_size": 8}, world_size=0)


def test_elastic_restart_keeps_the_global_batch_by_changing_accumulation():
    cfg = load_config(DS_CONFIGS / "zero2_tiny_cpu.json", world_size=3)
    for world, accumulation in [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)]:
        b = cfg.batch_for_world_size(world)
        assert (b.train_batch_size, b.micro, b.gradient_accumulation_steps) == (24, 2, accumulation)
        assert b.exact and b.note == ""


def test_elastic_restart_keeps_the_global_batch_with_a_smaller_micro_when_it_must():
    cfg = load_config({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4}, world_size=2)
    b = cfg.batch_for_world_size(4)            # 24 / (4 × 4) is not whole; 24 / (3 × 4) = 2 is
    assert (b.train_batch_size, b.micro, b.gradient_accumulation_steps) == (24, 3, 2)
    assert not b.exact and "smaller micro batch 3" in b.note and "not divisible" in b.note


def test_elastic_restart_falls_back_to_the_nearest_global_batch_and_says_why():
    cfg = load_config({"train_batch_size": 64, "gradient_accumulation_steps": 4}, world_size=4)  # micro 4
    b = cfg.batch_for_world_size(3)            # no micro <= 4 makes 3 ranks divide 64
    assert b.train_batch_size == b.micro * b.gradient_accumulation_steps * 3
    assert abs(b.train_batch_size - 64) == 1 and not b.exact
    assert "64" in b.note and "nearest global batch" in b.note


def test_elastic_restart_without_keeping_the_global_batch_scales_it():
    cfg = load_config({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, world_size=2)
    assert cfg.batch_for_world_size(5, keep_global=False) == BatchSizes(30, 2, 3, 5)


# ---------------------------------------------------------------- "auto"

HF_CONFIG = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                          "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}
JOB_VALUES = {"fp16": False, "bf16": True, "lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
              "warmup_min_lr": 0.0, "warmup_num_steps": 100, "total_num_steps": 1000,
              "reduce_bucket_size": 4096 * 4096, "stage3_prefetch_bucket_size": int(0.9 * 4096 * 4096),
              "stage3_param_persistence_threshold": 10 * 4096, "gradient_clipping": 1.0,
              "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}


def test_hf_trainer_auto_values_are_resolved_from_the_job():
    cfg = load_config(HF_CONFIG, world_size=4, auto_values=JOB_VALUES)
    assert cfg.batch == BatchSizes(32, 4, 2, 4)               # train_batch_size "auto": computed by the rule
    assert cfg.precision == "bf16"
    assert cfg.optimizer.params["lr"] == 3e-4 and cfg.optimizer.params["betas"] == [0.9, 0.95]
    assert cfg.scheduler.params["warmup_max_lr"] == 3e-4      # as the HF Trainer does: the peak is lr
    assert cfg.zero_optimization.reduce_bucket_size == 4096 * 4096
    again = load_config(cfg.to_ds_dict(), world_size=4)        # the written config has no "auto" left
    assert '"auto"' not in json.dumps(cfg.to_ds_dict()) and again.to_ds_dict() == cfg.to_ds_dict()


def test_auto_values_can_name_the_full_key_path():
    cfg = load_config({"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"lr": "auto"}},
                       "fp16": {"enabled": "auto"}},
                      auto_values={"optimizer.params.lr": 0.01, "fp16.enabled": True})
    assert cfg.optimizer.params["lr"] == 0.01 and cfg.precision == "fp16"


def test_unresolved_auto_names_every_key_and_how_to_supply_it():
    with pytest.raises(ConfigError) as excinfo:
        load_config(HF_CONFIG, world_size=4, auto_values={"train_micro_batch_size_per_gpu": 4})
    problems = problems_of(excinfo)
    assert set(problems) == {"fp16.enabled", "bf16.enabled", "optimizer.params.lr", "optimizer.params.betas",
                             "optimizer.params.eps", "optimizer.params.weight_decay", "scheduler.params.warmup_min_lr",
                             "scheduler.params.warmup_max_lr", "scheduler.params.warmup_num_steps",
                             "scheduler.params.total_num_steps", "zero_optimization.reduce_bucket_size",
                             "zero_optimization.stage3_prefetch_bucket_size",
                             "zero_optimization.stage3_param_persistence_threshold", "gradient_clipping"}
    assert "pass auto_values={'lr' or 'optimizer.params.lr': ...}" in problems["optimizer.params.lr"]


def test_auto_batch_sizes_without_values_name_the_auto_key():
    with pytest.raises(ConfigError, match='train_micro_batch_size_per_gpu is "auto" but auto_values had no value'):
        load_config({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2}, world_size=2)


def test_auto_where_the_hf_trainer_never_fills_it_is_an_error():
    with pytest.raises(ConfigError) as excinfo:
        load_config({"train_batch_size": 8, "steps_per_print": "auto", "zero_optimization": {"stage": "auto"}},
                    auto_values={"stage": 2})
    problems = problems_of(excinfo)
    assert set(problems) == {"steps_per_print", "zero_optimization.stage"}
    assert '"auto" is accepted only where the HF Trainer fills values' in problems["steps_per_print"]


def test_a_bad_auto_value_is_reported_at_the_key_it_fills():
    with pytest.raises(ConfigError) as excinfo:
        load_config({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
                    auto_values={"lr": "fast"})
    assert problems_of(excinfo) == {"optimizer.params.lr": 'optimizer.params.lr: expected a number, got "fast" '
                                                           "(a string) (the value of auto_values['lr'] for \"auto\")"}


# ---------------------------------------------------------------- deprecated keys


@pytest.mark.parametrize("config, check", [
    ({"zero_optimization": {"stage": 2, "cpu_offload": True}},
     lambda c: c.zero_optimization.offload_optimizer.device == "cpu"),
    ({"zero_optimization": {"stage": 3, "cpu_offload_param": True, "cpu_offload_use_pin_memory": False}},
     lambda c: (c.zero_optimization.offload_param.device, c.zero_optimization.offload_param.pin_memory) == ("cpu", False)),
    ({"zero_optimization": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": True}},
     lambda c: c.zero_optimization.stage3_gather_16bit_weights_on_model_save is True),
    ({"bfloat16": {"enabled": True}}, lambda c: c.precision == "bf16"),
    ({"zero_optimization": True}, lambda c: c.zero_optimization.stage == 1),
    ({"zero_optimization": False, "allgather_size": 2e8},
     lambda c: (c.zero_optimization.stage, c.zero_optimization.allgather_bucket_size) == (0, 200_000_000)),
])
def test_deprecated_keys_migrate_with_a_warning(config, check):
    with pytest.warns(ConfigDeprecationWarning) as record:
        cfg = load_config({"train_batch_size": 8, **config})
    assert check(cfg)
    assert issubclass(ConfigDeprecationWarning, DeprecationWarning)
    assert cfg.migrations and all("deprecated" in m for m in cfg.migrations)
    assert [str(w.message) for w in record] == cfg.migrations
    assert record[0].filename == __file__                 # points at the caller, not at engine/
    for old in ("cpu_offload", "bfloat16", "stage3_gather_fp16", "allgather_size"):
        assert old not in json.dumps(cfg.to_ds_dict())


def test_a_deprecated_key_next_to_its_replacement_is_an_error():
    with pytest.raises(ConfigError) as excinfo, warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDeprecationWarning)
        load_config({"bf16": {"enabled": True}, "bfloat16": {"enabled": True}, "train_batch_size": 8,
                     "zero_optimization": {"stage": 2, "cpu_offload": True, "offload_optimizer": {"device": "cpu"}}})
    problems = problems_of(excinfo)
    assert set(problems) == {"bfloat16", "zero_optimization.cpu_offload"}
    assert "remove 'cpu_offload'" in problems["zero_optimization.cpu_offload"]


def test_gradient_checkpointing_alias_is_not_a_deprecation_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config({"train_batch_size": 8, "gradient_checkpointing": True,
                           "activation_checkpointing": {"cpu_checkpointing": False}})
    assert cfg.activation_checkpointing.enabled is True
    assert "DeepSpeed ignores it" in cfg.migrations[0]


# ---------------------------------------------------------------- unknown keys and bad values


@pytest.mark.parametrize("config, path, nearest", [
    ({"train_batch_sise": 8}, "train_batch_sise", "train_batch_size"),
    ({"gradient_clip": 1.0}, "gradient_clip", "gradient_clipping"),
    ({"zero_optimization": {"stage3_prefetch_bucket_sise": 1}}, "zero_optimization.stage3_prefetch_bucket_sise",
     "stage3_prefetch_bucket_size"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memroy": True}}},
     "zero_optimization.offload_param.pin_memroy", "pin_memory"),
    ({"fp16": {"enabled": True, "initial_scale_pow": 12}}, "fp16.initial_scale_pow", "initial_scale_power"),
    ({"optimizer": {"type": "AdamW", "params": {"weight_decy": 0.1}}}, "optimizer.params.weight_decy", "weight_decay"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 10}}}, "scheduler.params.warmup_num_step",
     "warmup_num_steps"),
    ({"checkpoint": {"parallel_write": {"pipeline_stages": True}}}, "checkpoint.parallel_write.pipeline_stages",
     "pipeline_stage"),
    ({"activation_checkpointing": {"partition_activation": True}}, "activation_checkpointing.partition_activation",
     "partition_activations"),
    ({"zero_optimization": {"stage3MaxLiveParameters": 1}}, "zero_optimization.stage3MaxLiveParameters",
     "stage3_max_live_parameters"),
])
def test_unknown_keys_at_any_depth_name_the_path_and_the_nearest_key(config, path, nearest):
    with pytest.raises(ConfigError) as excinfo:
        load_config({"train_batch_size": 8, **config})
    problems = problems_of(excinfo)
    assert problems == {path: f"{path}: unknown key; did you mean '{nearest}'?"}


def test_every_problem_is_reported_at_once_one_line_each():
    with pytest.raises(ConfigError) as excinfo:
        load_config({"train_batch_size": 0, "fp16": {"enabled": "yes"}, "zero_optimization": {"stage": 4},
                     "optimizer": {"type": "AdamW", "params": {"betas": [0.9]}}, "bogus": 1})
    text = str(excinfo.value)
    assert text.splitlines()[0] == "5 problems in the ds_config:"
    assert "  - train_batch_size: must be >= 1, got 0" in text
    assert '  - fp16.enabled: expected true or false, got "yes" (a string)' in text
    assert "  - zero_optimization.stage: must be <= 3, got 4" in text
    assert "  - optimizer.params.betas: expected a list of 2 numbers, got a list [...] of 1" in text
    assert "  - bogus: unknown key" in text
    assert "Traceback" not in text and "pydantic" not in text.lower()


@pytest.mark.parametrize("config, path, words", [
    ({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}, "zero_optimization.offload_optimizer.device",
     ["\"gpu\"", "'none', 'cpu', 'nvme'", "did you mean 'cpu'?"]),
    ({"optimizer": {"type": "Adagrad"}}, "optimizer.type",
     ["'Adagrad' is accepted by DeepSpeed but not implemented", "Adam, AdamW, SGD, Lion, Lamb, OneBitAdam"]),
    ({"optimizer": {"type": "Adan"}}, "optimizer.type", ["unknown optimizer type", "supported: Adam, AdamW, SGD, Lion"]),
    ({"optimizer": {"type": "AdamW", "params": {"max_grad_norm": 1.0}}}, "optimizer.params.max_grad_norm",
     ["gradient_clipping"]),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 1.5]}}}, "optimizer.params.betas[1]",
     ["must be in [0, 1), got 1.5"]),
    ({"optimizer": {"type": "SGD", "params": {"nesterov": True}}}, "optimizer.params.nesterov", ["momentum > 0"]),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, "scheduler.params.total_num_steps",
     ["required key is missing"]),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}}, "scheduler.params.warmup_type",
     ["'log', 'linear'"]),
    ({"scheduler": {"type": "CosineAnnealingLR"}}, "scheduler.type", ["not implemented", "WarmupCosineLR"]),
    ({"fp16": {"enabled": True, "loss_scale_window": 0}}, "fp16.loss_scale_window", ["dynamic loss scaling"]),
    ({"fp16": {"loss_scale": -1}}, "fp16.loss_scale", ["must be >= 0, got -1"]),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "bf16.enabled", ["fp16 and bf16 cannot both"]),
    ({"amp": {"enabled": True, "opt_level": "O1"}}, "amp.enabled", ["not supported, use bf16/fp16"]),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "zero_optimization.offload_param.device",
     ["only with ZeRO stage 3", "set stage to 3"]),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
     "zero_optimization.offload_optimizer.nvme_path", ["nvme_path is not set"]),
    ({"zero_optimization": {"stage": 2.5}}, "zero_optimization.stage", ["expected a whole number, got 2.5"]),
    ({"gradient_clipping": True}, "gradient_clipping", ["expected a number, got true"]),
    ({"elasticity": {"enabled": True, "max_train_batch_size": 2000}}, "elasticity",
     ["would change the training result", "MIN:MAX"]),
    ({"compression_training": {"weight_quantization": {"shared_parameters": {"enabled": True}}}},
     "compression_training", ["would change the training result"]),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing", ["expected true or false"]),
])
def test_bad_values_name_the_path_what_was_given_and_what_is_allowed(config, path, words):
    with pytest.raises(ConfigError) as excinfo:
        load_config({"train_batch_size": 8, **config})
    problems = problems_of(excinfo)
    assert path in problems, str(excinfo.value)
    for word in words:
        assert word in problems[path]


def test_accepted_but_unimplemented_sections_are_listed_not_rejected():
    cfg = load_config({
        "train_batch_size": 8, "amp": {"enabled": False, "opt_level": "O1"},
        "tensorboard": {"enabled": True, "output_path": "tb/", "job_name": "run"},  # implemented
        "wandb": {"enabled": True}, "csv_monitor": {"enabled": True}, "comet": {"enabled": True},  # implemented
        "comms_logger": {"enabled": True}, "flops_profiler": {"enabled": True, "profile_step": 5},  # implemented
        "activation_checkpointing": {"partition_activations": True, "number_checkpoints": 4},
        "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}},
        "autotuning": {"enabled": True, "metric": "throughput"}, "aio": {"block_size": 1048576},
        "checkpoint": {"load_universal": True},
    })
    listed = {f.path: f.reason for f in cfg.ignored_features()}
    # offload_param nvme is implemented (engine/zero/nvme_params.py), and aio's block_size drives its I/O
    assert set(listed) == {"activation_checkpointing.partition_activations",
                           "activation_checkpointing.number_checkpoints", "autotuning.enabled",
                           "checkpoint.load_universal"}
    assert all(str(f).startswith(f.path + ": ") for f in cfg.ignored_features())


# ---------------------------------------------------------------- files


def test_invalid_json_names_the_file_line_and_column(tmp_path: Path):
    path = tmp_path / "ds_config.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": true,}\n}\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    (problem,) = excinfo.value.problems
    assert problem.path == f"{path}:3:28" and problem.message.startswith("invalid JSON")
    assert "hjson" in problem.hint                             # DeepSpeed tolerated the trailing comma


def test_a_missing_file_names_the_path(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"nope\.json: file not found"):
        load_config(tmp_path / "nope.json")


@pytest.mark.parametrize("text, message", [
    ('{"train_batch_size": 8, "train_batch_size": 16}', "duplicate key 'train_batch_size'"),
    ("[1, 2]", "must be a JSON object"),
    ('{"gradient_clipping": NaN}', "NaN is not valid JSON"),
])
def test_json_that_is_not_a_config_object_is_rejected(tmp_path: Path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_inline_json_text_and_the_written_dict_round_trip(tmp_path: Path):
    cfg = load_config(json.dumps({"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
                                  "zero_optimization": {"stage": 2}}), world_size=3)
    path = tmp_path / "resolved.json"
    path.write_text(json.dumps(cfg.to_ds_dict(), indent=2))
    again = load_config(path, world_size=3)
    assert again.batch == cfg.batch == BatchSizes(6, 2, 1, 3)
    assert again.to_ds_dict() == cfg.to_ds_dict() and isinstance(again, EngineConfig)


def test_importing_the_config_does_not_import_torch():
    # every module of the engine.config package, not only what its __init__ pulls in
    code = ("import sys, pkgutil, importlib, engine.config, engine; engine.load_config\n"
            "for m in pkgutil.iter_modules(engine.config.__path__): importlib.import_module('engine.config.' + m.name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
