"""A Hugging Face-style ds_config full of "auto" under the bundled trainer: its flags fill the
values (as the HF Trainer fills them from TrainingArguments), and an "auto" nothing fills is a
clear error naming the key, from the trainer and from engine.initialize in a user's program."""
from __future__ import annotations

import json

import pytest

from tests.engine.test_config_auto_lenient import HF_CONFIG
from tests.trainer_runs import records, run_trainer, write_config

pytestmark = pytest.mark.slow


def test_hf_style_config_runs_with_the_values_the_trainer_fills(tmp_path):
    config = write_config(tmp_path, HF_CONFIG)
    run_dir = tmp_path / "run"
    done = run_trainer("--deepspeed_config", str(config), "--steps", "3", "--micro-batch", "2", "--grad-accum", "2",
                       "--lr", "1e-3", "--precision", "bf16", "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout + done.stderr
    assert "micro-batch 2 x accumulation 2 -> global batch 4" in text
    steps = records(run_dir, "step") or records(run_dir)
    assert steps and all(r.get("lr") in (None, 0.0) or r.get("lr") <= 1e-3 for r in steps)


def test_a_flag_that_contradicts_a_written_value_is_refused(tmp_path):
    config = write_config(tmp_path, {**HF_CONFIG, "train_micro_batch_size_per_gpu": 4})
    done = run_trainer("--deepspeed_config", str(config), "--steps", "1", "--micro-batch", "2")
    assert done.returncode == 2
    assert "--micro-batch 2 contradicts the ds_config's train_micro_batch_size_per_gpu: 4" in done.stderr


def test_an_auto_batch_the_trainer_cannot_fill_names_the_keys(tmp_path):
    config = write_config(tmp_path, HF_CONFIG)                  # no --micro-batch: nothing sets a batch size
    done = run_trainer("--deepspeed_config", str(config), "--steps", "1")
    assert done.returncode != 0
    assert "train_micro_batch_size_per_gpu" in done.stderr and '"auto"' in done.stderr
    assert "Traceback" not in done.stderr


def test_engine_initialize_names_an_auto_the_program_left_unresolved():
    import engine
    from engine.config import ConfigError
    from tests.engine_zero_cases import make_model

    cfg = json.loads(json.dumps(HF_CONFIG))
    for key, value in (("train_micro_batch_size_per_gpu", 2), ("gradient_accumulation_steps", 1),
                       ("train_batch_size", 2), ("gradient_clipping", 1.0)):
        cfg[key] = value
    cfg["fp16"] = {"enabled": False}
    cfg["bf16"] = {"enabled": False}
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}
    cfg["zero_optimization"] = {"stage": 0}
    with pytest.raises(ConfigError, match='optimizer.params.lr: "auto" but no value was given for it'):
        engine.initialize(model=make_model(), config=cfg)
