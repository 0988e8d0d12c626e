"""``"type": "Lamb"`` through engine.initialize: ZeRO stage 0 and, with DeepSpeed's
``zero_allow_untested_optimizer``, stages 1 and 2 on 2 real gloo ranks, against a float64
reference of DeepSpeed FusedLamb's rule with one trust ratio per model parameter.

DeepSpeed's FusedLamb is a CUDA op (its CPU accelerator answers "This op had not been
implemented on CPU backend"), so the peer here is the rule itself (see test_ops_lamb.py).
Stage 0 is where DeepSpeed and orch agree exactly (DeepSpeed steps per parameter there); at
stages 1/2 DeepSpeed would give each rank's flat partition one ratio, which depends on the
world size, while orch keeps LAMB's per-parameter ratio by all-reducing the norms: so the
stage 1/2 runs must equal the same reference as stage 0.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.engine.test_ops_lamb import reference_lamb
from tests.engine_zero_cases import GLOBAL_BATCH, STEPS, global_batch, make_model, train_steps

pytestmark = pytest.mark.slow

HYPER = dict(lr=2e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_coeff=10.0, min_coeff=0.01)


def lamb_config(stage: int) -> dict:
    params = {**HYPER, "betas": list(HYPER["betas"])}
    return {"train_batch_size": GLOBAL_BATCH, "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": stage > 0, "optimizer": {"type": "Lamb", "params": params}}


@functools.lru_cache(maxsize=None)
def lamb_reference(steps: int = STEPS) -> list[float]:
    """float64: full-batch gradients, DeepSpeed's rule per parameter."""
    model = make_model().double()
    params = list(model.parameters())
    state_w = [p.detach().clone() for p in params]
    losses, grads_per_step = [], []
    for step in range(steps):
        x, y = global_batch(step)
        torch.nn.utils.vector_to_parameters(torch.cat([w.reshape(-1) for w in state_w]), params)
        model.zero_grad()
        loss = model(x, y)
        loss.backward()
        losses.append(float(loss.detach()))
        grads_per_step.append([p.grad.detach().clone() for p in params])
        state_w = [w.view(p.shape) for w, p in zip(reference_lamb(
            [p.detach() for p in make_model().double().parameters()], grads_per_step, **HYPER), params)]
    return losses


def run_stages() -> dict:
    import engine

    out = {}
    for stage in (0, 1, 2):
        model = make_model()
        eng, _, _, _ = engine.initialize(model=model, config=copy.deepcopy(lamb_config(stage)))
        out[stage] = train_steps(eng, 0, STEPS)
    return out


@functools.lru_cache(maxsize=None)
def results(world: int) -> dict:
    return run_distributed(run_stages, world, timeout=400)[0]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_lamb_trains_like_deepspeeds_rule_per_parameter(world, stage):
    got, want = results(world)[stage], lamb_reference()
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    assert worst < 2e-5, f"stage {stage} on {world} rank(s): losses differ from the reference by {worst:.2e}"


def test_deepspeeds_refusals_name_the_key_and_the_fix():
    from engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="zero_allow_untested_optimizer"):
        load_config({**lamb_config(2), "zero_allow_untested_optimizer": False}, world_size=2)
    with pytest.raises(ConfigError, match="fp16.loss_scale.*dynamic loss scaling"):
        load_config({**lamb_config(0), "fp16": {"enabled": True, "loss_scale": 128}}, world_size=1)
    with pytest.raises(ConfigError, match="stage 3"):
        load_config({**lamb_config(3), "zero_allow_untested_optimizer": True}, world_size=2)
