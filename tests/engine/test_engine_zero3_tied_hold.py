"""``stage3_hold_tied_params`` on 2 real gloo ranks: a user trades memory for one gather a step fewer.

GPT's lm_head is its token embedding's weight: one stage-3 fetch unit read by two forward calls.
By default the engine releases it after the embedding and gathers it again for the head (twice a
step); with the key set it is held from the embedding's forward through the head's backward and
gathered once, as FSDP2 gathers its root. The communication ledger shows the gather saved, and the
training must not notice: the same losses and weights, bit for bit, as the release policy.
The collectives are the NCCL plan's (equal-piece ``all_gather_into_tensor``), carried out by gloo.
"""
from __future__ import annotations

import math
from typing import Any

import pytest

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow

STEPS = 4


def _tied_unit_numel(opt: Any, model: Any) -> int:
    store = opt.store
    index = next(i for i, p in enumerate(store.params) if p is model.wte.weight)
    return store.units[store.unit_of[index]].numel


def _train(hold: bool) -> dict[str, Any]:
    import engine
    from engine.comm import ledger
    from tests.dist_utils import train_global_batches
    from tests.engine_zero_cases import build, ds_config, full_weights, global_batch

    config = ds_config(3, 1, 0.1, reduce_bucket_size=300, stage3_param_persistence_threshold=40,
                       stage3_prefetch_bucket_size=3000, stage3_max_reuse_distance=0,
                       stage3_hold_tied_params=hold)
    model = build("gpt")
    assert model.wte.weight is model.lm_head.weight
    eng, opt, _, _ = engine.initialize(model=model, config=config)
    losses, gathers = [], []
    for step in range(STEPS):
        before = ledger.by_op().get("all_gather/float32", {"calls": 0, "elements": 0})
        losses += train_global_batches(eng, [global_batch(step)])
        after = ledger.by_op()["all_gather/float32"]
        gathers.append({k: after[k] - before[k] for k in ("calls", "elements")})
    return {"losses": losses, "gathers": gathers, "tied": _tied_unit_numel(opt, model), "params": full_weights(model)}


def both_policies() -> dict[str, Any]:
    """Rank 0's view: the release policy's run, then the hold policy's, under the NCCL plan."""
    from engine import comm

    saved = comm.PLANS["gloo"]
    comm.PLANS["gloo"] = comm.PLANS["nccl"]
    try:
        return {"release": _train(False), "hold": _train(True)}
    finally:
        comm.PLANS["gloo"] = saved


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    return run_distributed(both_policies, 2, timeout=300)[0]


def test_holding_the_tied_unit_saves_one_gather_of_it_every_step_after_the_first(runs: dict[str, Any]) -> None:
    release, hold = runs["release"], runs["hold"]
    tied = hold["tied"]
    # step 0 records the fetch trace: nothing is known to be read twice yet, so both gather it twice
    assert hold["gathers"][0] == release["gathers"][0]
    for step in range(1, STEPS):
        saved = {k: release["gathers"][step][k] - hold["gathers"][step][k] for k in ("calls", "elements")}
        assert saved == {"calls": 1, "elements": tied}, (step, release["gathers"], hold["gathers"], tied)


def test_the_hold_policy_trains_exactly_as_the_release_policy(runs: dict[str, Any]) -> None:
    import torch

    release, hold = runs["release"], runs["hold"]
    assert hold["losses"] == release["losses"] and all(map(math.isfinite, hold["losses"]))
    for name, value in release["params"].items():
        assert torch.equal(hold["params"][name], value), name
