"""DeepSpeed's param-group keys of the compressed optimizers, as a BERT script sets them.

- ``exp_avg_mask``: 1-bit compression cannot represent zero, so an element whose gradient is
  always zero (here: embedding rows of tokens the data never holds, like BERT's position
  embeddings past the training sequence length) drifts by about ``scale / eps`` each compressed
  step unless a mask zeroes its averaged momentum. With the mask those rows stay exactly where
  the warm-up left them; without it they move (the control run shows the mask is what holds them).
- ``non_freeze: True`` (1-bit Adam): the group stays out of the compression: its gradients are
  all-reduced in full precision after the freeze and its variance keeps moving.

2 real gloo ranks; the rows and bytes are read from each rank's engine.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from tests.dist_utils import ledgered_steps, run_distributed
from tests.engine_zero_cases import GLOBAL_BATCH, global_batch, make_model, train_global_batches

pytestmark = pytest.mark.slow

USED_TOKENS, FREEZE, STEPS = 32, 4, 10


def config(kind: str) -> dict:
    params = {"lr": 3e-3, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0, "freeze_step": FREEZE}
    if kind == "ZeroOneAdam":
        params = {"lr": 3e-3, "var_freeze_step": FREEZE, "var_update_scaler": 1}
    return {"train_batch_size": GLOBAL_BATCH, "gradient_clipping": 0.0, "zero_optimization": {"stage": 0},
            "optimizer": {"type": kind, "params": params}}


def steps_on_used_tokens(eng, start: int, stop: int) -> list[float]:
    """The global batches, every token below USED_TOKENS: the embedding's other rows never get a gradient."""
    return list(train_global_batches(eng, (global_batch(s, vocab=USED_TOKENS) for s in range(start, stop))))


def run_groups(kind: str, masked: bool, non_freeze_head: bool = False) -> dict:
    import engine

    model = make_model()
    emb = model.emb.weight
    groups = [{"params": [emb]}, {"params": [p for p in model.parameters() if p is not emb]}]
    if masked:
        mask = torch.ones_like(emb)
        mask[USED_TOKENS:] = 0.0
        groups[0]["exp_avg_mask"] = mask
    if non_freeze_head:
        groups[1]["non_freeze"] = True
    eng, _, _, _ = engine.initialize(model=model, model_parameters=groups, config=copy.deepcopy(config(kind)))
    _, warmup_bytes = ledgered_steps(eng, steps_on_used_tokens, FREEZE)       # steps 1..FREEZE: not compressed
    after_warmup = emb.detach().clone()
    inner = eng.optimizer.optimizer
    variances = [inner.state[p]["exp_avg_sq"].clone() for p in eng.optimizer.master_params]
    _, compressed_bytes = ledgered_steps(eng, lambda e, a, b: steps_on_used_tokens(e, a + FREEZE, b + FREEZE),
                                         STEPS - FREEZE)
    moved = [bool((inner.state[p]["exp_avg_sq"] != v).any()) for p, v in zip(eng.optimizer.master_params, variances)]
    unused_rows = emb.detach()[USED_TOKENS:]
    return {"unused_drift": float((unused_rows - after_warmup[USED_TOKENS:]).abs().max()),
            "used_drift": float((emb.detach()[:USED_TOKENS] - after_warmup[:USED_TOKENS]).abs().max()),
            "weights": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "variance_moved": moved, "warmup_bytes": warmup_bytes[-1], "compressed_bytes": compressed_bytes[-1],
            "head_numel": sum(p.numel() for p in model.parameters() if p is not emb)}


CASES = [(kind, masked, False) for kind in ("OneBitAdam", "OneBitLamb", "ZeroOneAdam") for masked in (True, False)]
CASES.append(("OneBitAdam", False, True))


def every_case() -> dict:
    return {case: run_groups(*case) for case in CASES}


@functools.lru_cache(maxsize=None)
def launch() -> list[dict]:
    """One 2-rank launch runs every case (process start-up dominates a case)."""
    return run_distributed(every_case, 2, timeout=600)


def ranks_of(case: tuple[str, bool, bool]) -> list[dict]:
    return [results[case] for results in launch()]


@pytest.mark.parametrize("kind", ["OneBitAdam", "OneBitLamb", "ZeroOneAdam"])
def test_a_momentum_mask_holds_rows_that_never_get_a_gradient(kind):
    masked, unmasked = ranks_of((kind, True, False)), ranks_of((kind, False, False))
    for ranks in (masked, unmasked):   # 0/1 Adam's sync undoes local steps: equal up to that rounding
        torch.testing.assert_close(ranks[0]["weights"], ranks[1]["weights"], rtol=1e-4, atol=1e-5)
    assert masked[0]["unused_drift"] == 0.0, "masked rows moved after the freeze"
    assert masked[0]["used_drift"] > 0.0, "the rows the data uses must keep training"
    # without it, rows that never had a gradient (nor variance) move by about scale / eps
    assert unmasked[0]["unused_drift"] > 1.0, unmasked[0]["unused_drift"]


def test_a_non_freeze_group_is_averaged_in_full_and_keeps_its_variance_moving():
    ranks = ranks_of(("OneBitAdam", False, True))
    out = ranks[0]
    torch.testing.assert_close(out["weights"], ranks[1]["weights"], rtol=1e-6, atol=1e-6)
    assert out["variance_moved"] == [False, True], "only the non_freeze group's variance moves after the freeze"
    # the head's fp32 all-reduce dominates a compressed step: about (N-1)/N * 2 * 4 bytes per element
    head_bytes = out["head_numel"] * 4
    assert head_bytes <= out["compressed_bytes"] < out["warmup_bytes"], out


def wrong_size_mask() -> str:
    import engine

    model = make_model()
    groups = [{"params": [model.emb.weight], "exp_avg_mask": torch.ones(7)},
              {"params": [p for n, p in model.named_parameters() if n != "emb.weight"]}]
    try:
        engine.initialize(model=model, model_parameters=groups, config=config("OneBitAdam"))
    except ValueError as err:
        return str(err)
    return "no error"


def test_a_mask_of_the_wrong_size_is_named_at_set_up():
    message = run_distributed(wrong_size_mask, 1, timeout=120)[0]
    assert "'exp_avg_mask' has 7 elements" in message and "1024" in message, message
