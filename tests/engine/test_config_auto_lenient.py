"""Loading ds_configs from the wild: "auto" left for the job's program, lenient unknown keys,
and the optimizer types DeepSpeed has (Lamb, OneBitAdam, ZeroOneAdam, OneBitLamb) with its refusals.
Torch-free: this is what ``orch check`` runs."""
from __future__ import annotations

import warnings

import pytest

from engine.config import ConfigError, ConfigLenientWarning, load_config

HF_CONFIG = {   # what an HF Trainer script ships: "auto" wherever TrainingArguments decides
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": True},
}


def test_a_program_that_fills_auto_gets_the_rest_checked_and_the_list_of_what_it_must_fill():
    cfg = load_config(HF_CONFIG, world_size=4, program_fills_auto=True)
    assert "optimizer.params.lr" in cfg.auto_left and "train_micro_batch_size_per_gpu" in cfg.auto_left
    assert "zero_optimization.reduce_bucket_size" in cfg.auto_left
    assert cfg.zero_optimization.stage == 2 and cfg.batch is None     # sizes unknown until the program runs


def test_everything_that_is_not_auto_is_still_checked():
    bad = {**HF_CONFIG, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_com": True}}
    with pytest.raises(ConfigError, match="overlap_com.*did you mean 'overlap_comm'"):
        load_config(bad, world_size=2, program_fills_auto=True)


def test_the_batch_rule_is_checked_as_far_as_the_known_values_go():
    cfg = {**HF_CONFIG, "train_batch_size": 6, "gradient_accumulation_steps": 2}
    with pytest.raises(ConfigError, match="train_batch_size 6 is not divisible by gradient_accumulation_steps 2"):
        load_config(cfg, world_size=2, program_fills_auto=True)
    assert load_config(cfg, world_size=3, program_fills_auto=True).auto_left


def test_auto_left_unresolved_at_run_time_is_an_error_naming_each_key():
    with pytest.raises(ConfigError) as err:
        load_config(HF_CONFIG, world_size=2, auto_values={"train_micro_batch_size_per_gpu": 2})
    text = str(err.value)
    assert 'optimizer.params.lr: "auto" but no value was given for it' in text
    assert "gradient_clipping" in text and "train_micro_batch_size_per_gpu" not in text.split("problems")[1]


def test_auto_filled_from_the_trainers_values_runs():
    cfg = load_config(HF_CONFIG, world_size=2, auto_values={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "lr": 3e-4, "betas": [0.9, 0.95],
        "eps": 1e-8, "weight_decay": 0.1, "gradient_clipping": 1.0, "fp16.enabled": False, "bf16.enabled": True,
        "warmup_min_lr": 0.0, "warmup_num_steps": 10, "total_num_steps": 100, "reduce_bucket_size": 5e7})
    assert cfg.batch.train_batch_size == 12 and cfg.optimizer.params["lr"] == 3e-4 and cfg.precision == "bf16"
    assert cfg.scheduler.params["warmup_max_lr"] == 3e-4     # the HF Trainer's fallback: peak = lr


def test_unknown_keys_deepspeed_ignores_are_errors_by_default_with_the_way_out():
    with pytest.raises(ConfigError, match='cuda_visible_devices: unknown key.*"strict": false'):
        load_config({"train_batch_size": 8, "cuda_visible_devices": "0,1"}, world_size=2)


@pytest.mark.parametrize("how", ["argument", "strict-false"])
def test_lenient_loading_warns_about_harmless_keys_but_not_typos(how):
    raw = {"train_batch_size": 8, "cuda_visible_devices": "0,1", "zero_optimization": {"stage": 1, "wall": 1}}
    kwargs = {"lenient": True} if how == "argument" else {}
    if how == "strict-false":
        raw["strict"] = False
    with pytest.warns(ConfigLenientWarning, match="cuda_visible_devices"):
        cfg = load_config(raw, world_size=2, **kwargs)
    assert [line.split(":")[0] for line in cfg.ignored_unknown] == ["zero_optimization.wall", "cuda_visible_devices"] \
        or sorted(line.split(":")[0] for line in cfg.ignored_unknown) == ["cuda_visible_devices", "zero_optimization.wall"]
    typo = {**raw, "zero_optimization": {"stgae": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigLenientWarning)
        with pytest.raises(ConfigError, match="stgae: unknown key; did you mean 'stage'"):
            load_config(typo, world_size=2, **kwargs)
    params = {**raw, "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "foo": 1}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigLenientWarning)
        with pytest.raises(ConfigError, match="optimizer.params.foo"):
            load_config(params, world_size=2, **kwargs)


@pytest.mark.parametrize("name", ["Lamb", "OneBitAdam", "OnebitAdam", "onebitadam"])
def test_deepspeeds_optimizer_names_load_with_their_params(name):
    params = {"lr": 1e-3, "weight_decay": 0.01}
    if "bit" in name.lower():
        params.update(freeze_step=100, cuda_aware=False, comm_backend_name="nccl")
    else:
        params.update(max_coeff=0.3, min_coeff=0.01, bias_correction=False)
    cfg = load_config({"train_batch_size": 8, "optimizer": {"type": name, "params": params}}, world_size=2)
    assert cfg.optimizer.resolved_kind() in ("lamb", "onebitadam")


@pytest.mark.parametrize("name,key,kind", [("ZeroOneAdam", "var_freeze_step", "zerooneadam"),
                                            ("zerooneadam", "local_step_clipper", "zerooneadam"),
                                            ("OneBitLamb", "coeff_beta", "onebitlamb"),
                                            ("OnebitLamb", "factor_threshold", "onebitlamb")])
def test_zero_one_adam_and_one_bit_lamb_load_with_deepspeeds_defaults(name, key, kind):
    cfg = load_config({"train_batch_size": 8, "optimizer": {"type": name, "params": {key: 0.5 if "coeff" in key
                                                                                     or "factor" in key else 10}}},
                      world_size=1)
    assert cfg.optimizer.resolved_kind() == kind
    params = cfg.optimizer.params
    if kind == "zerooneadam":
        assert (params["var_update_scaler"], params["local_step_scaler"]) == (16, 32678)
    else:
        assert (params["max_coeff"], params["min_coeff"], params["factor_max"], params["factor_min"]) == (10.0, 0.01, 4.0, 0.5)
    with pytest.raises(ConfigError, match=f"optimizer.params.{key}x: unknown key; did you mean '{key}'"):
        load_config({"train_batch_size": 8, "optimizer": {"type": name, "params": {key + "x": 10}}}, world_size=1)


def test_one_bit_lamb_bounds_are_checked():
    with pytest.raises(ConfigError, match="optimizer.params.factor_min: is larger than factor_max"):
        load_config({"train_batch_size": 8, "optimizer": {"type": "OneBitLamb", "params": {"factor_min": 5.0}}},
                    world_size=1)
    with pytest.raises(ConfigError, match="optimizer.params.coeff_beta: must be in"):
        load_config({"train_batch_size": 8, "optimizer": {"type": "OneBitLamb", "params": {"coeff_beta": 1.0}}},
                    world_size=1)


@pytest.mark.parametrize("name,quote", [("OneBitAdam", "1bit-Adam"), ("onebitadam", "1bit-Adam"),
                                        ("ZeroOneAdam", "0/1 Adam"), ("OneBitLamb", "1bit-Lamb")])
def test_compressed_optimizers_with_zero_are_refused_as_deepspeed_does(name, quote):
    raw = {"train_batch_size": 8, "zero_optimization": {"stage": 1}, "optimizer": {"type": name}}
    with pytest.raises(ConfigError, match=f"{quote} is not compatible with ZeRO"):
        load_config(raw, world_size=2)
