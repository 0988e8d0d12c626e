"""``communication_data_type``: gradients travel in that dtype and accumulate in ``grad_accum_dtype``.

A DeepSpeed user who sets ``"communication_data_type": "bf16"`` on a bf16 run with fp32 gradient
accumulation (orch's default) expects half the gradient bytes on the wire while the micro-steps
still add up in fp32. On one process that is visible in the gradient the optimizer reads: stage 1
accumulates in its fp32 flat buffer and reduces once, so the fp32 sum is rounded to bf16 once;
stages 2-3 reduce every micro-step's (bf16) gradient and add the result into their fp32
partition, so nothing is rounded. At 2 gloo ranks with the NCCL plan's collectives every stage
still tracks the fp32 reference and the ledger shows the reductions in bf16, the partition in fp32.
"""
from __future__ import annotations

import functools

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.engine.test_grad_accum_dtype import GAS, _micro_batches, _names, _reference_gradients
from tests.engine_zero_cases import cached_reference, check_against_reference, ds_config, make_model, nccl_plan_run


def _config(stage: int, comm: str) -> dict:
    cfg = ds_config(stage, GAS, 0.0, precision="bf16", reduce_bucket_size=300)
    cfg["communication_data_type"] = comm
    return cfg


def _reduced_gradient(stage: int, comm: str) -> tuple[torch.Tensor, torch.dtype]:
    """The gradient the optimizer would step on after GAS micro-steps (canonical order), and its dtype."""
    import engine

    eng, opt, _, _ = engine.initialize(model=make_model(), config=_config(stage, comm))
    for i, (x, y) in enumerate(_micro_batches()):
        eng.backward(eng(x, y))
        if i < GAS - 1:
            eng.step()
    opt.reduce_gradients()
    own = opt._own_grads()
    local = torch.cat([g.double() for g in own])
    full = torch.empty(opt.layout.numel, dtype=torch.float64)
    for seg in opt.layout.segments(0):
        full[seg.canonical_start:seg.canonical_end] = local[seg.local_start:seg.local_start + seg.numel]
    return full, own[0].dtype


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_reduction_is_in_bf16_and_the_accumulation_stays_fp32(stage: int) -> None:
    exact, _ = _reference_gradients(_names())
    got, dtype = _reduced_gradient(stage, "bf16")
    assert dtype == torch.float32                         # what the optimizer reads: the fp32 partition
    scale = exact.abs().max().item()
    error = (got - exact).abs().max().item() / scale
    if stage == 1:    # the fp32 sum of the micro-steps, rounded to bf16 once for the reduction
        assert torch.equal(got, exact.float().to(torch.bfloat16).double()) or 1e-6 < error <= 2 ** -8, error
        assert error > 1e-6, "stage 1 reduced in fp32 although communication_data_type is bf16"
    else:             # each micro-step's bf16 gradient reduced as is, summed in the fp32 partition
        assert error <= 1e-6, f"stage {stage}: {error:.1e} off the exact sum"


def test_fp32_communication_changes_nothing() -> None:
    for stage in (1, 2, 3):
        with_key, _ = _reduced_gradient(stage, "fp32")
        exact, _ = _reference_gradients(_names())
        assert (with_key - exact).abs().max().item() <= 1e-6 * exact.abs().max().item()


def _nccl_plan_runs() -> dict:
    """Every stage with bf16 communication, under the NCCL plan's collectives carried out by gloo."""
    from engine.comm import ledger

    out = {}
    for stage in (1, 2, 3):
        ledger.reset()
        run = nccl_plan_run(_config(stage, "bf16") | {"gradient_clipping": 0.1})
        out[stage] = run | {"ops": sorted(ledger.by_op())}
    return out


@functools.lru_cache(maxsize=None)
def _two_ranks() -> dict:
    return run_distributed(_nccl_plan_runs, 2, timeout=400)[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_communication_trains_like_the_reference_with_the_nccl_plan(stage: int) -> None:
    run = _two_ranks()[stage]
    assert "reduce_scatter/bfloat16" in run["ops"] and "reduce_scatter/float32" not in run["ops"], run["ops"]
    check_against_reference(run, cached_reference(0.1, False), loss_tol=3e-3, param_tol=0.1, label=f"stage {stage}: ")


def test_stage_0_says_the_key_does_not_apply() -> None:
    from engine.config import load_config

    cfg = load_config({"train_batch_size": 8, "bf16": {"enabled": True}, "communication_data_type": "bf16"},
                      world_size=1)
    assert any(str(f).startswith("communication_data_type") for f in cfg.ignored_features())
