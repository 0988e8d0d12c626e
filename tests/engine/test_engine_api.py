"""``engine.initialize`` and the Engine as a DeepSpeed user drives it, in one process (world size 1).

Multi-rank behaviour is in test_engine_zero.py; here: the training-step protocol, counters,
accumulation boundaries, fp16 overflow handling, user-supplied optimizers and schedulers,
command-line config arguments, and the errors a user gets for mistakes.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
import torch

import engine
from engine.config import ConfigError
from tests.engine_zero_cases import (LR, STEPS, TinyLM, ds_config, engine_run, global_batch, make_model,
                                     reference_run, train_steps)


def test_single_process_training_equals_plain_pytorch() -> None:
    """No process group at all: ZeRO-2 with accumulation still gives plain AdamW's result."""
    run = engine_run(ds_config(2, gas=2, clip=0.1, reduce_bucket_size=300, overlap_comm=True))
    ref_losses, ref_params = reference_run(0.1)
    assert max(abs(a - b) / b for a, b in zip(run["losses"], ref_losses)) <= 1e-6
    for name, ref in ref_params.items():
        assert torch.allclose(run["params"][name], ref, atol=1e-6), name


def test_plain_loss_backward_then_engine_step_still_reduces_and_updates() -> None:
    """Some scripts call loss.backward() themselves; ZeRO-2 must still see those gradients."""
    ref_losses, _ = reference_run(0.0, steps=3)
    eng, _, _, _ = engine.initialize(model=make_model(), config=ds_config(2, reduce_bucket_size=300))
    losses = []
    for step in range(3):
        loss = eng(*global_batch(step))
        loss.backward()
        eng.step()
        losses.append(loss.item())
    assert losses == pytest.approx(ref_losses, rel=1e-6)


def test_engine_exposes_deepspeed_counters_and_sizes() -> None:
    model = make_model()
    eng, optimizer, loader, scheduler = engine.initialize(model=model, config=ds_config(1, gas=2))
    assert loader is None and scheduler is None
    assert eng.module is model and eng.world_size == 1 and eng.local_rank == 0 and eng.device.type == "cpu"
    assert (eng.train_batch_size(), eng.train_micro_batch_size_per_gpu(), eng.gradient_accumulation_steps()) == (8, 4, 2)
    boundaries = []
    for micro in range(6):
        x, y = global_batch(micro, size=4)
        boundaries.append(eng.is_gradient_accumulation_boundary())
        eng.backward(eng(x, y))
        eng.step()
    assert boundaries == [False, True] * 3
    assert (eng.micro_steps, eng.global_steps, eng.global_samples, eng.skipped_steps) == (6, 3, 24, 0)
    assert eng.get_lr() == [LR] and eng.get_global_grad_norm() > 0 and eng.loss_scale == 1.0
    assert eng.counters.state_dict() == {"global_steps": 3, "global_samples": 24, "micro_steps": 6, "skipped_steps": 0}
    eng.eval()
    assert not model.training
    eng.train()
    assert model.training


def test_elastic_resume_changes_accumulation_keeping_the_global_batch() -> None:
    eng, _, _, _ = engine.initialize(model=make_model(), config=ds_config(1, gas=1))
    eng.set_gradient_accumulation_steps(4)
    assert eng.gradient_accumulation_steps() == 4 and eng.train_batch_size() == 4 * 8
    for micro in range(4):
        x, y = global_batch(micro)
        eng.backward(eng(x, y))
        eng.step()
    assert eng.global_steps == 1


def test_fp16_overflow_skips_the_step_and_follows_the_loss_scale_rules() -> None:
    config = ds_config(1, precision="fp16")
    config["fp16"].update(initial_scale_power=8, hysteresis=2)
    config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_type": "linear"}}
    model = make_model()
    eng, _, _, _ = engine.initialize(model=model, config=config)
    assert next(model.parameters()).dtype == torch.float16
    x, y = global_batch(0)
    train_steps(eng, 0, 1)
    assert not eng.was_step_skipped() and eng.loss_scale == 256
    weights, lr = [p.detach().clone() for p in model.parameters()], eng.get_lr()
    for expected_scale in (256, 128):           # hysteresis 2: the first overflow only uses it up
        eng.backward(eng(x, y) * float("inf"))
        eng.step()
        assert eng.was_step_skipped() and eng.loss_scale == expected_scale
    assert (eng.global_steps, eng.skipped_steps) == (3, 2)
    assert eng.get_lr() == lr, "a skipped step must not advance the LR schedule"
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    train_steps(eng, 1, 2)
    assert not eng.was_step_skipped() and eng.get_lr() != lr


def test_users_own_optimizer_and_scheduler_keep_working() -> None:
    """DeepSpeed's quick start: a torch optimizer built on model.parameters() before initialize."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    config = ds_config(2)
    del config["optimizer"]
    eng, zero, _, lr_scheduler = engine.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    assert zero.optimizer is opt and lr_scheduler is sched
    losses = train_steps(eng, 0, 3)
    assert eng.get_lr() == [LR / 8]
    assert losses[-1] < losses[0]


def test_config_arguments_from_the_command_line(tmp_path) -> None:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(ds_config(2)))
    parser = engine.add_config_arguments(argparse.ArgumentParser())
    for flag in ("--deepspeed_config", "--engine_config"):
        args = parser.parse_args(["--deepspeed", flag, str(path)])
        eng, _, _, _ = engine.initialize(args=args, model=make_model())
        assert eng.zero_optimization_stage() == 2


def test_gradient_checkpointing_alias_turns_on_activation_checkpointing(capsys) -> None:
    config = ds_config(1)
    config["gradient_checkpointing"] = True
    eng, _, _, _ = engine.initialize(model=make_model(), config=config)
    assert eng.activation_checkpointing_enabled
    assert "gradient_checkpointing" in capsys.readouterr().out
    eng, _, _, _ = engine.initialize(model=make_model(), config=ds_config(1))
    assert not eng.activation_checkpointing_enabled


def test_training_data_becomes_a_micro_batch_loader() -> None:
    data = torch.utils.data.TensorDataset(*global_batch(0, size=16))
    eng, _, loader, _ = engine.initialize(model=make_model(), training_data=data, config=ds_config(1))
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (8, 6)  # micro-batch = 8 / world 1


def test_model_state_bytes_counts_every_owned_tensor() -> None:
    eng, _, _, _ = engine.initialize(model=make_model(), config=ds_config(1, precision="bf16"))
    train_steps(eng, 0, 1)
    got = eng.model_state_bytes()
    psi = sum(p.numel() for p in eng.module.parameters())
    assert set(got) == {"params", "grads", "master", "optimizer_states", "buffers"}
    assert psi * 2 <= got["params"] < psi * 2 * 1.05 and got["master"] >= psi * 4
    assert got["optimizer_states"] >= psi * 8


def test_stage_2_never_stages_the_whole_gradient_at_deepspeeds_default_bucket_size() -> None:
    """DeepSpeed's default reduce_bucket_size (5e8) exceeds most models. Stage 2 stages gradients
    in bucket buffers on top of its gradient partition; a whole-model buffer would make it hold
    more gradient memory than stage 1. A bucket is at most a quarter of the model (or its largest
    parameter, which is never split)."""
    eng, _, _, _ = engine.initialize(model=make_model(), config=ds_config(2, reduce_bucket_size=500_000_000))
    train_steps(eng, 0, 2)
    sizes = [p.numel() for p in eng.module.parameters()]
    psi, bucket = sum(sizes), max(max(sizes), -(-sum(sizes) // 4))
    staging = eng.model_state_bytes()["buffers"]
    assert 0 < staging < 4 * psi, f"staging buffers {staging} B: a whole model's fp32 gradient (Ψ={psi})"
    assert staging <= 2 * 4 * bucket

@pytest.mark.parametrize("mistake, expected", [
    ("both optimizers", "optimizer"),
    ("no optimizer", "no optimizer"),
    ("offload_param below stage 3", "offload_param"),
    ("no config", "ds_config"),
])
def test_mistakes_get_a_clear_error(mistake: str, expected: str) -> None:
    model, config, kwargs = make_model(), ds_config(1), {}
    if mistake == "both optimizers":
        kwargs["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
    elif mistake == "no optimizer":
        del config["optimizer"]
    elif mistake == "offload_param below stage 3":
        config["zero_optimization"].update(stage=2, offload_param={"device": "cpu"})
    else:
        config = None
    with pytest.raises((ConfigError, ValueError)) as info:
        engine.initialize(model=model, config=config, **kwargs)
    assert expected in str(info.value)


def test_activation_checkpointing_helper_matches_plain_backward() -> None:
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    engine.checkpointing.checkpoint(lambda t: torch.tanh(layer(t)), x).sum().backward()
    grads = (x.grad.clone(), layer.weight.grad.clone())
    x.grad, layer.weight.grad = None, None
    torch.tanh(layer(x)).sum().backward()
    assert torch.allclose(grads[0], x.grad) and torch.allclose(grads[1], layer.weight.grad)
    engine.checkpointing.configure(deepspeed_config={"train_batch_size": 1,
                                                     "activation_checkpointing": {"cpu_checkpointing": True}})
    try:
        assert engine.checkpointing.is_configured() and engine.checkpointing.settings().cpu_checkpointing
        x.grad = None
        engine.checkpointing.checkpoint(lambda t: torch.tanh(layer(t)), x).sum().backward()
        assert torch.allclose(grads[0], x.grad)
    finally:
        engine.checkpointing.reset()


def _train_hf_gpt2(stage: int, **zero: Any) -> tuple[list[float], Any]:
    """A 2-layer GPT2 built from its config (no download), 10 steps of 2 micro-batches."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional "
                                       "dependency: pip install -e '.[hf]')")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    eng, _, _, _ = engine.initialize(model=model, config=ds_config(stage, gas=2, reduce_bucket_size=2000, **zero))
    ids = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        for m in range(2):
            out = eng(input_ids=ids[m * 4:(m + 1) * 4], labels=ids[m * 4:(m + 1) * 4])
            eng.backward(out.loss)
            eng.step()
        losses.append(out.loss.item())
    return losses, model


def test_hugging_face_gpt2_trains_under_the_engine() -> None:
    losses, model = _train_hf_gpt2(2)
    assert losses[-1] < losses[0] - 0.5
    assert model.lm_head.weight is model.transformer.wte.weight  # tied weights stay tied


def test_hugging_face_gpt2_at_stage_3_matches_stage_2() -> None:
    """Stage 3's hooks on HF's own modules (Conv1D, the tied wte/lm_head) change nothing."""
    reference, _ = _train_hf_gpt2(2)
    losses, model = _train_hf_gpt2(3, stage3_param_persistence_threshold=0)
    assert losses == pytest.approx(reference, rel=1e-5)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_tiny_model_is_what_the_tests_claim() -> None:
    model = TinyLM()
    assert sum(p.numel() for p in model.parameters()) % 4 != 0  # forces padding at 2 and 4 ranks
    assert STEPS == 20
