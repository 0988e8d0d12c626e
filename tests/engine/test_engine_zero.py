"""ZeRO stages 0/1/2 on 2 and 4 real gloo ranks against a single-process fp32 reference.

A user's promise: switching ZeRO stage, world size, gradient accumulation or bucket sizes
changes memory and speed, never the training result. So every run below trains the same tiny
model on the same global batch for 20 steps and must reproduce the reference losses and final
weights (fp32: relative 1e-5; bf16/fp16: the tolerances stated next to them). Per-rank model
memory must match the ZeRO paper's formulas.

All cases for one world size run in one launch of N processes (start-up dominates the cost).
"""
from __future__ import annotations

import functools

import pytest

from tests.dist_utils import run_distributed
from tests.engine_zero_cases import (cached_reference, check_against_reference, check_resumed_in_another_layout,
                                     ds_config, nccl_plan_run, reduction_timing_run, reentrant_twice_run,
                                     run_cases)

pytestmark = pytest.mark.slow

CLIP = 0.1  # below the gradient norms of this model, so clipping really happens
SMALL = {"reduce_bucket_size": 300, "allgather_bucket_size": 100}  # many buckets, chunked gathers

# name -> (ds_config, use two parameter groups); every (stage, accumulation, clipping) combination
CASES = {
    f"stage{stage}-gas{gas}-clip{clip}": (ds_config(stage, gas, clip, **SMALL, overlap_comm=stage > 0), False)
    for stage in (0, 1, 2) for gas in (1, 2) for clip in (0.0, CLIP)
}
CASES.update({
    "stage1-sync": (ds_config(1, 2, CLIP, **SMALL, overlap_comm=False), False),
    "stage2-sync": (ds_config(2, 2, CLIP, **SMALL, overlap_comm=False), False),
    "stage2-default-buckets": (ds_config(2, 2, CLIP), False),
    "stage2-groups": (ds_config(2, 2, CLIP, **SMALL, overlap_comm=True), True),
    "stage1-groups": (ds_config(1, 1, 0.0, **SMALL), True),
})
# Low precision against the fp32 reference: bf16 keeps 8 mantissa bits, fp16 11.
LOW_PRECISION = {f"{prec}-stage{stage}": (ds_config(stage, 2, CLIP, precision=prec, **SMALL, overlap_comm=True), False)
                 for prec in ("bf16", "fp16") for stage in (0, 1, 2)}
TOLERANCE = {"bf16": {"loss": 3e-3, "param": 0.1}, "fp16": {"loss": 5e-4, "param": 1e-2}}
# name -> (stage, hidden width, reduce_bucket_size): Ψ ≈ 44k, buckets of 20k elements
# The collectives a GPU run uses (one reduce-scatter per bucket into the owner's piece, one in-place
# all-gather per bucket, chunked past allgather_bucket_size), carried out by gloo: same training.
NCCL_PLAN = {f"nccl-stage{stage}-gas2-clip": ds_config(stage, 2, CLIP, **SMALL, overlap_comm=True) for stage in (1, 2)}
NCCL_PLAN["nccl-stage2-sync-default-buckets"] = ds_config(2, 2, CLIP)
# DeepSpeed's default buckets (5e8) and overlap_comm (false): stages 0/1 still start each bucket's
# reduction under backward (in place, there is nothing to trade for it: stage12.py)
UNDER_BACKWARD = {f"timing-stage{stage}": ds_config(stage, 2, CLIP) for stage in (0, 1)}
MEMORY = {"memory-stage1": (1, 512, 20_000), "memory-stage2": (2, 512, 20_000)}
RESHARD = {"reshard-2to0": (2, 0), "reshard-0to1": (0, 1)}


@functools.lru_cache(maxsize=None)
def results(world: int) -> dict:
    """Rank 0's results for every case (module-level cache: one launch per world size)."""
    extra = {name: (nccl_plan_run, (cfg,)) for name, cfg in NCCL_PLAN.items()}
    extra |= {name: (reduction_timing_run, (cfg,)) for name, cfg in UNDER_BACKWARD.items()}
    extra["reentrant-twice-stage1"] = (reentrant_twice_run, (1,))   # last: it ends in an error
    return run_distributed(run_cases, world, {**CASES, **LOW_PRECISION}, MEMORY, RESHARD, extra, timeout=400)[0]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_training_equals_the_single_process_reference(world: int, case: str) -> None:
    config, groups = CASES[case]
    run = results(world)[case]
    assert run["skipped"] == 0 and run["global_steps"] == 20
    reference = cached_reference(config["gradient_clipping"], groups)
    check_against_reference(run, reference, loss_tol=1e-5, param_tol=1e-5)
    assert run["losses"][-1] < run["losses"][0] - 0.1, "the model did not learn"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", sorted(NCCL_PLAN))
def test_the_collectives_nccl_would_use_give_the_same_training(world: int, case: str) -> None:
    run = results(world)[case]
    assert run["global_steps"] == 20
    check_against_reference(run, cached_reference(CLIP, False), loss_tol=1e-5, param_tol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", sorted(UNDER_BACKWARD))
def test_stages_0_and_1_reduce_each_bucket_under_backward_as_ddp_does(world: int, case: str) -> None:
    """With DeepSpeed's defaults (one 5e8 bucket, overlap_comm false) the whole reduction used to
    wait for the end of backward; now a model is at least four buckets and each one's collective is
    issued from the gradient hook that completes it, while backward still runs."""
    run = results(world)[case]
    boundaries = run["global_steps"]   # gradient_accumulation_steps 2: one reducing backward per step
    assert run["buckets"] >= 4
    assert run["inside"] == boundaries * run["buckets"], run
    check_against_reference(run, cached_reference(CLIP, False), loss_tol=1e-5, param_tol=1e-5)


def test_a_gradient_accumulated_after_its_bucket_went_out_is_an_error_naming_the_parameter() -> None:
    """Reentrant checkpointing of a Linear used in two segments: the second accumulation would race
    the reduction already running on the first. Every rank stops with the same clear error (no hang,
    no silently wrong sum), as DDP and DeepSpeed stop."""
    run = results(2)["reentrant-twice-stage1"]
    assert run["error"] == "GradientOrderError", run
    assert "'shared.weight'" in run["message"] or "'shared.bias'" in run["message"], run["message"]
    assert "use_reentrant=False" in run["message"]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", sorted(LOW_PRECISION))
def test_mixed_precision_tracks_the_fp32_reference(world: int, case: str) -> None:
    run = results(world)[case]
    tol = TOLERANCE[case.split("-")[0]]
    assert run["skipped"] == 0  # fp16 starts at 2**12 here: no overflow, so steps line up
    check_against_reference(run, cached_reference(CLIP, False), loss_tol=tol["loss"], param_tol=tol["param"],
                            label=f"{case}: ")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [1, 2])
def test_model_state_memory_matches_the_zero_paper(world: int, stage: int) -> None:
    run = results(world)[f"memory-stage{stage}"]
    psi, got = run["psi"], run["bytes"]
    # bf16 params (2Ψ) and gradients summed in fp32 (4Ψ, or 4Ψ/N partitioned; stage 1 also reduces its
    # 4Ψ/N share into a partition, the optimizer's gradient) + fp32 master and Adam m, v (12Ψ/N)
    expected = 6 * psi + 16 * psi / world if stage == 1 else 2 * psi + 16 * psi / world
    states = got["params"] + got["grads"] + got["master"] + got["optimizer_states"]
    assert abs(states - expected) / expected <= 0.05, f"{got} vs ZeRO-{stage} formula {expected:.0f} bytes"
    # stage 2 adds its bucket buffers (at most a couple of reduce_bucket_size-sized ones); stage 1 needs none
    assert (got["buffers"] > 0) == (stage == 2)
    total = states + got["buffers"]
    assert abs(total - (expected + got["buffers"])) / (expected + got["buffers"]) <= 0.05


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", sorted(RESHARD))
def test_full_state_from_one_layout_resumes_in_another(world: int, case: str) -> None:
    check_resumed_in_another_layout(results(world)[case])
