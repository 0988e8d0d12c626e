"""bf16 gradients are summed in fp32 unless ``data_types.grad_accum_dtype`` says otherwise.

A user training in bf16 with 4 accumulation steps expects the optimizer to see the sum of the
micro-steps' gradients, not that sum rounded to 8 mantissa bits after every addition. The
engine's reduced gradient is compared here with the exact (float64) sum of the same bf16 model's
micro-step gradients: fp32 accumulation matches it to fp32 rounding, bf16 accumulation is off
by bf16 rounding, and ``"bf16"`` gives bit for bit what autograd accumulating in ``.grad`` gives
(the engine's behaviour before fp32 became the default). At 2 gloo ranks, every way of
pre-dividing (``gradient_predivide_factor``, ``prescale_gradients``, fp16's own) still trains
exactly like the single-process reference, with the NCCL plan's collectives too.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.dist_utils import run_distributed
from tests.engine_zero_cases import (cached_reference, check_against_reference, ds_config, engine_run,
                                     full_weights, global_batch, make_model, train_steps)

GAS = 4


def _bf16_config(stage: int, accum: str | None) -> dict:
    cfg = ds_config(stage, GAS, 0.0, precision="bf16", reduce_bucket_size=300)
    if accum is not None:
        cfg["data_types"] = {"grad_accum_dtype": accum}
    return cfg


def _micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = global_batch(0)
    return [(x[i::GAS], y[i::GAS]) for i in range(GAS)]


def _engine_gradient(stage: int, accum: str | None) -> torch.Tensor:
    """The reduced gradient the optimizer would step on, after GAS micro-steps (canonical order)."""
    import engine

    model = make_model()
    eng, opt, _, _ = engine.initialize(model=model, config=_bf16_config(stage, accum))
    for i, (x, y) in enumerate(_micro_batches()):
        eng.backward(eng(x, y))
        if i < GAS - 1:
            eng.step()
    opt.reduce_gradients()
    local = torch.cat([g.float() for g in opt._own_grads()])
    full = torch.empty(opt.layout.numel)
    for seg in opt.layout.segments(0):
        full[seg.canonical_start:seg.canonical_end] = local[seg.local_start:seg.local_start + seg.numel]
    return full


def _reference_gradients(layout_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 sum of the bf16 model's micro-step gradients, autograd's own bf16 accumulation)."""
    model = make_model().to(torch.bfloat16)
    exact = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    for x, y in _micro_batches():
        model.zero_grad(set_to_none=True)
        (model(x, y) / GAS).backward()
        for n, p in model.named_parameters():
            exact[n] += p.grad.double()
    model.zero_grad(set_to_none=True)
    for x, y in _micro_batches():
        (model(x, y) / GAS).backward()      # autograd adds into .grad in bf16
    lowp = dict(model.named_parameters())
    return (torch.cat([exact[n].reshape(-1) for n in layout_names]),
            torch.cat([lowp[n].grad.float().reshape(-1) for n in layout_names]))


def _names() -> list[str]:
    return [n for n, _ in make_model().named_parameters()]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp32_accumulation_keeps_the_exact_sum_that_bf16_rounds(stage: int) -> None:
    exact, _ = _reference_gradients(_names())
    scale = exact.abs().max().item()
    fp32 = (_engine_gradient(stage, None).double() - exact).abs().max().item() / scale     # the default
    bf16 = (_engine_gradient(stage, "bf16").double() - exact).abs().max().item() / scale
    assert fp32 <= 1e-6, f"stage {stage}: fp32 accumulation is {fp32:.1e} (of the largest gradient) off the exact sum"
    assert bf16 >= 1e-4, f"stage {stage}: bf16 accumulation unexpectedly exact ({bf16:.1e})"
    assert fp32 * 100 <= bf16


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_accumulation_is_what_autograd_accumulates_in_bf16(stage: int) -> None:
    _, autograd_bf16 = _reference_gradients(_names())
    assert torch.equal(_engine_gradient(stage, "bf16"), autograd_bf16)


def test_the_accumulation_buffers_are_fp32_where_zero_keeps_them() -> None:
    """Stage 3 keeps the rank's partition (and its buckets) in fp32, not a full fp32 gradient."""
    import engine

    model = make_model()
    _, opt, _, _ = engine.initialize(model=model, config=_bf16_config(3, None))
    assert opt.grad_partition.dtype == torch.float32 and opt.grad_partition.numel() == opt.layout.partition_numel
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in opt.params)
    _, old, _, _ = engine.initialize(model=make_model(), config=_bf16_config(3, "bf16"))
    assert opt.model_state_bytes()["grads"] == 2 * old.model_state_bytes()["grads"]


# -- the key -----------------------------------------------------------------------------------
def test_the_key_takes_deepspeeds_spellings_and_refuses_a_lossy_choice() -> None:
    from engine.config import ConfigError, load_config

    base = {"train_batch_size": 8, "bf16": {"enabled": True}}
    assert load_config(base, world_size=1).grad_accum_dtype == "fp32"
    for spelling, meant in (("bf16", "bf16"), ("bfloat16", "bf16"), ("torch.float32", "fp32"), ("FP32", "fp32")):
        cfg = load_config({**base, "data_types": {"grad_accum_dtype": spelling}}, world_size=1)
        assert cfg.grad_accum_dtype == meant
    with pytest.raises(ConfigError, match=r'data_types.grad_accum_dtype: "fp16" gradient accumulation does not '
                                          r'fit bf16 training; set it to "fp32" \(the default\) or "bf16"'):
        load_config({**base, "data_types": {"grad_accum_dtype": "fp16"}}, world_size=1)
    with pytest.raises(ConfigError, match=r"data_types.grad_accum_dtype: got \"int8\".*allowed: 'fp32', 'fp16', 'bf16'"):
        load_config({**base, "data_types": {"grad_accum_dtype": "int8"}}, world_size=1)
    with pytest.raises(ConfigError, match="data_types.grad_accum_dtype"):
        load_config({"train_batch_size": 8, "data_types": {"grad_accum_dtype": "bf16"}}, world_size=1)


def test_orch_check_counts_fp32_gradients_in_the_memory_estimate(tmp_path: Path) -> None:
    from orchestrator.check import check_job
    from orchestrator.spec import load_spec

    def report(accum: str | None):
        ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3}}
        if accum:
            ds["data_types"] = {"grad_accum_dtype": accum}
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(
            {"name": "acc", "nodes": 1, "procs_per_node": 2, "program": "engine.train",
             "args": ["--model", "tiny"], "ds_config": "ds.json"}))
        return check_job(load_spec(tmp_path / "job.yaml"), num_parameters=1_000_000)

    fp32, bf16 = report(None), report("bf16")
    assert (fp32.grad_accum_dtype, bf16.grad_accum_dtype) == ("fp32", "bf16")
    # stage 3 at 2 ranks: the fp32 gradient partition is 2 bytes x Ψ/2 larger
    assert fp32.estimates[3].gpu_bytes - bf16.estimates[3].gpu_bytes == pytest.approx(2 * 1_000_000 / 2)


# -- pre-division at 2 ranks ---------------------------------------------------------------------
STEPS = 5
PREDIVIDE = {
    "stage2-predivide-2": {**ds_config(2, 2, 0.1, reduce_bucket_size=300), "gradient_predivide_factor": 2.0},
    "stage1-prescale": {**ds_config(1, 2, 0.1, reduce_bucket_size=300), "prescale_gradients": True},
    "stage3-predivide-8": {**ds_config(3, 2, 0.1, reduce_bucket_size=300), "gradient_predivide_factor": 8.0},
}
LOW = {f"bf16-stage{s}-nccl-plan": _bf16_config(s, None) | {"gradient_clipping": 0.1} for s in (1, 2, 3)}


def _with_norms(cfg: dict) -> dict:
    """``engine_run`` plus the gradient norm of every step (it sees the pre-division's scale: Adam
    would hide a wrong factor, the norm does not)."""
    import engine

    model = make_model()
    eng, _, _, _ = engine.initialize(model=model, config=copy.deepcopy(cfg))
    losses, norms = [], []
    for step in range(STEPS):
        losses += train_steps(eng, step, step + 1)
        norms.append(float(eng.get_global_grad_norm()))
    return {"losses": losses, "norms": norms, "skipped": eng.skipped_steps, "params": full_weights(model)}


def _runs() -> dict:
    from engine import comm

    out = {name: _with_norms(cfg) for name, cfg in PREDIVIDE.items()}
    saved = comm.PLANS["gloo"]
    comm.PLANS["gloo"] = comm.PLANS["nccl"]          # the collectives NCCL uses, carried out by gloo
    try:
        out |= {name: engine_run(cfg, steps=STEPS) for name, cfg in LOW.items()}
    finally:
        comm.PLANS["gloo"] = saved
    return out


@functools.lru_cache(maxsize=None)
def _two_ranks() -> dict:
    return run_distributed(_runs, 2, timeout=300)[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PREDIVIDE))
def test_predividing_by_any_factor_trains_like_the_single_process_reference(case: str) -> None:
    run = _two_ranks()[case]
    ref_losses, _ = cached_reference(0.1, False)
    check_against_reference(run, (ref_losses[:STEPS], _reference_at(STEPS)), loss_tol=1e-5, param_tol=1e-5)
    single = _with_norms(PREDIVIDE[case])["norms"]          # one process: nothing is pre-divided
    assert run["norms"] == pytest.approx(single, rel=1e-5) and run["skipped"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LOW))
def test_fp32_summed_bf16_tracks_the_reference_with_the_nccl_plan(case: str) -> None:
    run = _two_ranks()[case]
    ref_losses, _ = cached_reference(0.1, False)
    check_against_reference(run, (ref_losses[:STEPS], _reference_at(STEPS)), loss_tol=3e-3, param_tol=0.1,
                            label=f"{case}: ")


@functools.lru_cache(maxsize=None)
def _reference_at(steps: int) -> dict[str, torch.Tensor]:
    from tests.engine_zero_cases import reference_run

    return reference_run(0.1, steps=steps)[1]
