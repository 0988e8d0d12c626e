"""ZeRO stage 3 with frozen parameters: a frozen base model under small adapters is partitioned too.

The user: fine-tunes LoRA adapters on a frozen GPT (or trains the top half of a model whose bottom
half and embeddings are frozen) at stage 3 on 2 ranks, and expects what DeepSpeed gives: the frozen
weights are partitioned across ranks like the trainable ones (each rank keeps (Ψ + Φ)/N, not the
whole frozen model), training is unchanged (losses equal the single-process fp32 reference step by
step, frozen weights bit-for-bit unchanged), with activation checkpointing, with the parameters
offloaded to CPU, with the model built by ``engine.zero.Init``, and within tight gather budgets
(which only hold if frozen units are released during backward, not at its end). A stage-3
checkpoint with frozen parameters resumes the same run at stage 2 and stage 3 on 4 ranks, and
``save_16bit_model`` writes the frozen weights (or leaves them out when asked).

Two launches: 2 ranks train every case and save; 4 ranks load.
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.dist_utils import run_distributed
from tests.engine_zero_cases import MODELS, ds_config, full_weights, make_lora_gpt, reference_run, train_steps

pytestmark = pytest.mark.slow

CLIP = 0.1
GATHER_ALL = {"stage3_param_persistence_threshold": 0, "reduce_bucket_size": 300}
SMALL_KEPT = {"stage3_param_persistence_threshold": 40, "reduce_bucket_size": 300}   # LayerNorms, small biases
TIGHT = {"stage3_prefetch_bucket_size": 600, "stage3_max_live_parameters": 1500, "stage3_max_reuse_distance": 0}
OFFLOAD_BOTH = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}



# name -> (ds_config, model, built under engine.zero.Init?)
CASES: dict[str, tuple[dict[str, Any], str, bool]] = {
    "lora": (ds_config(3, 2, CLIP, **SMALL_KEPT), "lora-gpt", False),
    "lora-tight-budgets": (ds_config(3, 1, CLIP, **GATHER_ALL, **TIGHT), "lora-gpt", False),
    "lora-checkpointing-init": (ds_config(3, 2, CLIP, **GATHER_ALL), "lora-gpt-ckpt", True),
    "lora-offload": (ds_config(3, 1, CLIP, **GATHER_ALL, **OFFLOAD_BOTH), "lora-gpt", False),
    "half-frozen": (ds_config(3, 2, CLIP, **GATHER_ALL), "half-frozen-gpt", False),
    "frozen-applied-twice": (ds_config(3, 2, CLIP, **GATHER_ALL), "frozen-twice", False),
}
MOSTLY_FROZEN = sorted(set(CASES) - {"frozen-applied-twice"})   # the memory check needs Φ to dominate


def _frozen_and_trainable(model: nn.Module) -> tuple[int, int]:
    shape = {n: getattr(p, "ds_shape", p.shape) for n, p in model.named_parameters()}
    frozen = sum(torch.Size(shape[n]).numel() for n, p in model.named_parameters() if not p.requires_grad)
    return frozen, sum(torch.Size(shape[n]).numel() for n, p in model.named_parameters()) - frozen


def train_case(config: dict[str, Any], model_name: str, init: bool) -> dict[str, Any]:
    """Train 20 steps through the engine on this rank (the model built whole or under Init)."""
    import engine

    if init:
        with engine.zero.Init():
            model = MODELS[model_name]()
    else:
        model = MODELS[model_name]()
    eng, opt, _, _ = engine.initialize(model=model, config=copy.deepcopy(config))
    frozen, trainable = _frozen_and_trainable(model)
    threshold = config["zero_optimization"]["stage3_param_persistence_threshold"]
    whole_after_init = {n for n, p in model.named_parameters() if p.numel() > 0 and p.numel() > threshold}
    losses = train_steps(eng, 0, 20)
    memory, split = eng.model_state_bytes(), eng.model_state_split()   # before gathering everything below
    return {"losses": losses, "memory": memory, "split": split, "params": full_weights(model),
            "frozen": frozen, "trainable": trainable,
            "persistent": sum(p.numel() for p in model.parameters() if 0 < p.numel() <= threshold),
            "whole_after_initialize": sorted(whole_after_init),
            "largest_unit": max(u.nbytes for u in opt.store.units if not u.persistent),
            "frozen_names": sorted(n for n, p in model.named_parameters() if not p.requires_grad)}


CKPT_CONFIG = ds_config(3, 1, CLIP, **SMALL_KEPT, stage3_gather_16bit_weights_on_model_save=True)


def save_run(where: str) -> dict[str, Any]:
    """Train 5 steps, save a checkpoint and the 16-bit model (twice: with and without the frozen
    weights), train 5 more."""
    import engine

    model = make_lora_gpt()
    eng, _, _, _ = engine.initialize(model=model, config=copy.deepcopy(CKPT_CONFIG))
    train_steps(eng, 0, 5)
    eng.save_checkpoint(os.path.join(where, "ckpt"))
    saved_weights = full_weights(model)
    eng.save_16bit_model(where, "model.bin")
    eng.save_16bit_model(where, "trainable.bin", exclude_frozen_parameters=True)
    return {"weights": saved_weights, "after": train_steps(eng, 5, 10)}


def load_run(where: str, stage: int) -> dict[str, Any]:
    """A fresh engine (other seed) at ``stage`` on this world size loads the checkpoint and trains on."""
    import engine

    config = copy.deepcopy(CKPT_CONFIG)
    config["zero_optimization"]["stage"] = stage
    model = make_lora_gpt(seed=1)
    eng, _, _, _ = engine.initialize(model=model, config=config)
    path, _ = eng.load_checkpoint(os.path.join(where, "ckpt"))
    assert path is not None
    return {"weights": full_weights(model), "after": train_steps(eng, 5, 10)}


def launch_two(where: str) -> dict[str, Any]:
    out = {name: train_case(*case) for name, case in CASES.items()}
    out["save"] = save_run(where)
    return out


def launch_four(where: str) -> dict[str, Any]:
    return {stage: load_run(where, stage) for stage in (2, 3)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    where = str(tmp_path_factory.mktemp("zero3-frozen"))
    two = run_distributed(launch_two, 2, where, timeout=400)[0]
    four = run_distributed(launch_four, 4, where, timeout=300)[0]
    return {"two": two, "four": four, "where": where}


@functools.lru_cache(maxsize=None)
def reference(model: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    return reference_run(CLIP, model_name=model.removesuffix("-ckpt"))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _param_diff(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference, leaving out attention's key bias: its gradient is zero in exact arithmetic,
    so Adam turns rounding noise into its updates (as in test_engine_zero3.py)."""
    if name.endswith("attn.qkv.bias"):
        d = got.numel() // 3
        return max((got[:d] - ref[:d]).abs().max().item(), (got[2 * d:] - ref[2 * d:]).abs().max().item())
    return (got - ref).abs().max().item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_with_a_frozen_base_equals_the_single_process_reference(runs: dict, case: str) -> None:
    _, model, _ = CASES[case]
    run = runs["two"][case]
    ref_losses, ref_params = reference(model)
    worst = max(_rel(a, b) for a, b in zip(run["losses"], ref_losses))
    assert worst <= 1e-5, f"losses differ from the reference by {worst:.2e} (relative)"
    initial = dict(MODELS[model]().named_parameters())
    moved = 0.0
    for name, ref in ref_params.items():
        got = run["params"][name]
        if name in run["frozen_names"]:
            assert torch.equal(got, initial[name].detach()), f"frozen {name} changed"
        else:
            moved = max(moved, (got - initial[name].detach()).abs().max().item())
            diff = _param_diff(name, got, ref)
            assert diff <= 1e-5, f"{name} differs from the reference by {diff:.2e}"
    assert moved > 1e-2, "the trainable parameters did not move"


@pytest.mark.parametrize("case", MOSTLY_FROZEN)
def test_each_rank_keeps_its_share_of_the_frozen_weights(runs: dict, case: str) -> None:
    run = runs["two"][case]
    frozen, trainable, kept = run["frozen"], run["trainable"], run["persistent"]
    assert frozen > 2 * trainable or case == "half-frozen"
    # fp32 partition of trainable and frozen weights alike, plus the persistent ones whole
    expected = 4 * (trainable + frozen) / 2 + 4 * kept
    whole_frozen = 4 * trainable / 2 + 4 * frozen          # frozen weights kept whole on every rank
    got = run["memory"]["params"]
    assert abs(got - expected) / expected <= 0.05, f"params bytes {got} vs {expected:.0f} ((Ψ+Φ)/N + persistent)"
    assert got < 0.7 * whole_frozen
    assert run["whole_after_initialize"] == [], "parameters were left whole after initialize"


def test_offloaded_frozen_weights_live_in_host_memory(runs: dict) -> None:
    run = runs["two"]["lora-offload"]
    split, memory = run["split"], run["memory"]
    psi, phi = run["trainable"], run["frozen"]
    # host: fp32 partition of every weight (the master is a view of it), Adam m and v, gradients
    host = 4 * (psi + phi) / 2 + 12 * psi / 2
    assert abs(split["offloaded"] - host) / host <= 0.05, f"{split} vs host share {host:.0f}"
    assert split["device"] == memory["buffers"], "nothing but gather/reduce buffers should stay on the device"


def test_frozen_units_are_released_during_backward(runs: dict) -> None:
    """stage3_max_live_parameters bounds gathering in forward; in backward the frozen units must be
    released as each module's backward finishes (otherwise every frozen unit would be whole at the end)."""
    run = runs["two"]["lora-tight-budgets"]
    bound = 4 * TIGHT["stage3_max_live_parameters"] + 2 * run["largest_unit"]
    assert run["split"]["live_peak"] <= bound, (run["split"], bound)
    assert 4 * run["frozen"] > 2 * bound, "the model is too small for this check to mean anything"


def test_a_stage3_checkpoint_with_frozen_weights_resumes_at_stage_2_and_3_on_4_ranks(runs: dict) -> None:
    saved = runs["two"]["save"]
    for stage, run in runs["four"].items():
        for name, value in saved["weights"].items():
            assert torch.equal(run["weights"][name], value), f"stage {stage}: {name} differs after loading"
        worst = max(_rel(a, b) for a, b in zip(run["after"], saved["after"]))
        assert worst <= 1e-5, f"stage {stage} on 4 ranks continues differently: {worst:.2e}"


def test_save_16bit_model_includes_the_frozen_weights_unless_excluded(runs: dict) -> None:
    where = Path(runs["where"])
    weights = runs["two"]["save"]["weights"]
    state = torch.load(where / "model.bin", weights_only=True)
    plain = make_lora_gpt()
    assert sorted(state) == sorted(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    for name, value in plain.named_parameters():
        assert torch.equal(value.detach(), weights[name]), name
    frozen = {n for n, p in plain.named_parameters(remove_duplicate=False) if not p.requires_grad}
    assert "lm_head.weight" in frozen   # tied to the frozen token embedding
    trainable_only = torch.load(where / "trainable.bin", weights_only=True)
    assert set(trainable_only) == set(state) - frozen
    for name, value in trainable_only.items():
        assert torch.equal(value, state[name]), name
