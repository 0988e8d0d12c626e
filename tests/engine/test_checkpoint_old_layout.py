"""Checkpoints written before shards were even per unit (ZeRO-3's fetch units, ZeRO-1/2's reduce
buckets) still load.

``tests/engine/data/zero3_old_layout`` was written by 2 gloo ranks with the engine of commit
a452289 (each parameter group cut into 2 contiguous ranges; how: data/make_old_layout_checkpoint.py),
after 3 AdamW steps of a 1-layer GPT, together with rank 0's full weights then. Today's stage 3
shards every fetch unit on its own; the manifest still says, per parameter, which range of which
rank holds it, so loading reads each of today's pieces from wherever the old layout put it.
``data/zero2_old_layout`` is the same for stage 2 (engine of commit 2a88b26, reduce buckets of 2000
elements), loaded by today's stages 1-2, which shard every reduce bucket on its own.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.dist_utils import run_distributed

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "zero3_old_layout"
FIXTURE_Z2 = DATA / "zero2_old_layout"


def _load_and_continue(ckpt: str, stage: int, saved_stage: int = 3) -> dict:
    import sys

    sys.path.insert(0, str(DATA))
    import make_old_layout_checkpoint as old  # the same model and config that wrote it

    import engine
    from engine.models import build_model

    model = build_model("tiny", seed=0, **old.MODEL)          # other initial weights: all must come from the file
    saved = old.config(saved_stage)
    config = dict(saved, zero_optimization=dict(saved["zero_optimization"], stage=stage))
    eng, opt, _, _ = engine.initialize(model=model, config=config)
    eng.load_checkpoint(ckpt)
    if stage == 3:
        state = opt.full_state_dict(eng.module)
    else:
        state = {k: v.detach().cpu().clone() for k, v in eng.module.state_dict().items()}
    spans, groups = len(opt.layout.spans), len(opt.layout.groups)
    x = next(iter(old.batches(eng.global_rank, 1)))
    loss = eng(x, x)
    eng.backward(loss)
    eng.step()
    return {"state": state, "spans": spans, "groups": groups, "loss": loss.item(), "step": eng.global_steps}


def test_a_stage3_checkpoint_in_the_old_layout_loads_into_the_even_per_unit_layout(tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    expected = torch.load(FIXTURE / "expected.pt")["state_dict"]
    at_3, at_2 = (run_distributed(_load_and_continue, 2, str(ckpt), stage, timeout=300)[0] for stage in (3, 2))
    assert at_3["spans"] > at_3["groups"]           # the new layout: a span per fetch unit
    for name, value in expected.items():
        assert torch.equal(at_3["state"][name], value), name
        assert torch.equal(at_2["state"][name], value), name
    assert at_3["step"] == at_2["step"] == 4        # 3 saved steps, then one more
    assert abs(at_3["loss"] - at_2["loss"]) < 1e-6


def test_a_stage2_checkpoint_in_the_contiguous_layout_loads_into_the_per_bucket_layout(tmp_path) -> None:
    ckpt = tmp_path / "ckpt2"
    shutil.copytree(FIXTURE_Z2, ckpt)
    expected = torch.load(FIXTURE_Z2 / "expected.pt")["state_dict"]
    at_2, at_1 = (run_distributed(_load_and_continue, 2, str(ckpt), stage, 2, timeout=300)[0] for stage in (2, 1))
    assert at_2["spans"] > at_2["groups"] and at_1["spans"] > at_1["groups"]   # a span per reduce bucket
    for name, value in expected.items():
        assert torch.equal(at_2["state"][name], value), name
        assert torch.equal(at_1["state"][name], value), name
    assert at_2["step"] == at_1["step"] == 4
    assert abs(at_2["loss"] - at_1["loss"]) < 1e-6
