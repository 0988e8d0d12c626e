"""Peer tier: orch's engine and real DeepSpeed train the same model to the same losses.

A DeepSpeed user swaps ``import deepspeed`` for ``import engine`` and keeps the ds_config; this
tier checks the promise against DeepSpeed itself (0.19.8, CPU accelerator, gloo), not against our
reading of its docs. On 2 gloo ranks, for ZeRO stages 1 and 2, both libraries train the same
model from the same seed on the same micro-batches with the same ds_config (``"Adam"`` with weight
decay, i.e. AdamW semantics; WarmupLR; gradient accumulation; gradient clipping that does
clip; then the other schedules, Adam with L2, SGD, pre-scaled gradients and bf16), and must
agree step by step on the loss, the learning rate, the global gradient norm, and at the end on
every parameter.

Tolerance. fp32: losses and gradient norms within 1e-5 relative, final parameters within 1e-5
absolute, learning rates within 1e-12 relative (the last bit may differ). The two optimizers
are different kernels (DeepSpeed's FusedAdam CPU op, torch's fused AdamW), so bit equality is
not expected; the observed differences are about 1e-7 (losses) and 2e-6 (gradient norms). One
exception: the attention *key* bias of the GPT. Softmax ignores a shift shared by all keys, so that bias's gradient is
mathematically zero and numerically roundoff (~1e-9); Adam divides it by its own magnitude and
turns the noise into lr-sized random steps, so the two libraries disagree there (~2e-5) exactly
as two runs of one library on different kernels would. For that slice the test checks only that
both stay near zero.

bf16 (fp32 master weights): ZeRO-1 with accumulation is held to the fp32 tolerance (observed:
bit-identical). ZeRO-2 with accumulation sums micro-batch gradients in another order than
DeepSpeed (DeepSpeed's stage 2 reduces every micro-batch into the bf16 partition; orch
accumulates locally and reduces once at the boundary), so bf16 rounding differs: losses and
norms within 1e-3 relative, parameters within one bf16 ulp (2^-7 relative) + 1e-3 (observed:
1e-4 and one ulp).

Needs ``DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8`` (after torch) and
a C++ compiler: DeepSpeed JIT-compiles its CPU ops (FusedAdam, the shared-memory comm op) on
first use, about 2 minutes once, cached in ~/.cache/torch_extensions afterwards.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import shutil
from dataclasses import dataclass
from typing import Any

import pytest

from tests.dist_utils import run_distributed, train_global_batches

DS_INSTALL = "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8"


def _missing() -> str:
    if importlib.util.find_spec("deepspeed") is None:
        return f"deepspeed is not installed; install it after torch with: {DS_INSTALL}"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler on PATH: DeepSpeed JIT-compiles its CPU ops (FusedAdam) on first use"
    return ""


pytestmark = [pytest.mark.peer, pytest.mark.slow, pytest.mark.skipif(bool(_missing()), reason=_missing())]

STEPS = 10
WARMUP = {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2, "warmup_type": "linear"}}


@dataclass(frozen=True)
class Tolerance:
    """How close orch must be to DeepSpeed: relative on losses and norms, on parameters
    ``|orch - ds| <= param_abs + param_rel * |ds|``."""

    loss: float = 1e-5
    norm: float = 1e-5
    param_abs: float = 1e-5
    param_rel: float = 0.0


FP32 = Tolerance()
BF16_REORDERED = Tolerance(loss=1e-3, norm=1e-3, param_abs=1e-3, param_rel=2 ** -7)


ADAM = {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01}


def _case(model: str, stage: int, *, gas: int, clip: float | None, optimizer: str = "Adam",
          optimizer_params: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None,
          bf16: bool = False, tolerance: Tolerance = FP32, top: dict[str, Any] | None = None,
          **zero: Any) -> dict[str, Any]:
    """One training setup: which model, and the ds_config both libraries receive."""
    from tests.engine_zero_cases import GLOBAL_BATCH

    cfg: dict[str, Any] = {
        "train_batch_size": GLOBAL_BATCH, "gradient_accumulation_steps": gas,
        "optimizer": {"type": optimizer, "params": optimizer_params or ADAM},
        "scheduler": scheduler or WARMUP,
        "zero_optimization": {"stage": stage, **zero},
        **(top or {}),
    }
    if clip is not None:            # None: leave the key out, both libraries default to 1.0
        cfg["gradient_clipping"] = clip
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return {"model": model, "config": cfg, "tolerance": tolerance}


BF16_SUMS = {"data_types": {"grad_accum_dtype": "bf16"}}
CASES: dict[str, dict[str, Any]] = {
    # A small LM whose parameter count does not split evenly over 2 ranks (padding), with
    # weight-decay / no-decay parameter groups, accumulation over 2 micro-batches, tight clipping.
    "zero1-tinylm-accumulate-clip": _case("tinylm", 1, gas=2, clip=0.1),
    # Stage 2 with small buckets (many reductions, overlapped with backward).
    "zero2-tinylm-accumulate-clip-buckets": _case("tinylm", 2, gas=2, clip=0.1, reduce_bucket_size=300,
                                                  allgather_bucket_size=300, overlap_comm=True),
    # The trainer's tiny GPT (tied embedding/head weight), "AdamW", log warm-up, no accumulation.
    "zero1-gpt-adamw-logwarmup": _case("gpt", 1, gas=1, clip=0.05, optimizer="AdamW",
                                       scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 5}}),
    # The same GPT at stage 2 with the clipping default left to each library (DeepSpeed: 1.0).
    "zero2-gpt-default-clipping": _case("gpt", 2, gas=2, clip=None),
    # bf16 model weights, fp32 master weights and optimizer states; gradients summed in bf16, which is
    # DeepSpeed's default (orch's is fp32: the key makes both libraries do the same)
    "zero1-bf16-tinylm-accumulate-clip": _case("tinylm", 1, gas=2, clip=0.1, bf16=True, top=BF16_SUMS),
    "zero2-bf16-tinylm-accumulate-clip": _case("tinylm", 2, gas=2, clip=0.1, bf16=True, tolerance=BF16_REORDERED,
                                               top=BF16_SUMS),
    # The other schedules, with DeepSpeed's parameter names (OneCycle also cycles Adam's beta1).
    "zero1-warmup-decay": _case("tinylm", 1, gas=1, clip=0.5, scheduler={
        "type": "WarmupDecayLR", "params": {"total_num_steps": STEPS, "warmup_num_steps": 3, "warmup_max_lr": 1e-2}}),
    "zero2-warmup-cosine": _case("tinylm", 2, gas=1, clip=0.5, scheduler={
        "type": "WarmupCosineLR", "params": {"total_num_steps": STEPS, "warmup_num_steps": 3,
                                             "warmup_min_ratio": 0.1, "cos_min_ratio": 0.01}}),
    "zero1-one-cycle": _case("tinylm", 1, gas=1, clip=0.5, scheduler={
        "type": "OneCycle", "params": {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-2, "cycle_first_step_size": 3,
                                       "decay_step_size": 2, "decay_lr_rate": 0.1, "cycle_momentum": True,
                                       "cycle_min_mom": 0.85, "cycle_max_mom": 0.95}}),
    # "Adam" with adam_w_mode false is classic Adam with L2 weight decay, not AdamW.
    "zero2-adam-l2": _case("tinylm", 2, gas=1, clip=0.5, optimizer_params={**ADAM, "adam_w_mode": False}),
    # A torch optimizer by name; DeepSpeed wants zero_allow_untested_optimizer for it.
    "zero2-sgd-momentum": _case("tinylm", 2, gas=2, clip=0.5, optimizer="SGD",
                                optimizer_params={"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
                                top={"zero_allow_untested_optimizer": True}),
    # Scaling gradients before the sum instead of after changes nothing in fp32.
    "zero1-prescale-predivide": _case("tinylm", 1, gas=2, clip=0.5,
                                      top={"prescale_gradients": True, "gradient_predivide_factor": 2.0}),
}


def _build(model: str) -> Any:
    """``"gpt"``: the trainer's own tiny preset; any other name: a model of tests/engine_zero_cases.py."""
    if model == "gpt":
        from engine.models import build_model

        return build_model("tiny", seed=0)
    from tests.engine_zero_cases import MODELS

    return MODELS[model](seed=0)


def _train(library: Any, case: dict[str, Any]) -> dict[str, Any]:
    """Train one case through ``library.initialize``; what the user would look at afterwards. The
    final weights are gathered with the library's own ``zero.GatheredParameters`` (a no-op below
    stage 3, where every rank holds them whole)."""
    from tests.engine_zero_cases import global_batch, param_groups

    model = _build(case["model"])
    groups = param_groups(model) if case["model"] == "tinylm" else None
    eng, _, _, _ = library.initialize(model=model, model_parameters=groups, config=copy.deepcopy(case["config"]))
    losses, lrs, norms = [], [], []
    for loss in train_global_batches(eng, map(global_batch, range(STEPS))):
        losses.append(loss)
        lrs.append([float(lr) for lr in eng.get_lr()])
        norms.append(float(eng.get_global_grad_norm()))
    with library.zero.GatheredParameters(list(model.parameters())):
        params = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "lrs": lrs, "norms": norms, "global_steps": eng.global_steps, "params": params}


def _both_libraries(cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """On each rank: every case through DeepSpeed, then through orch's engine."""
    import deepspeed

    import engine

    deepspeed.init_distributed(dist_backend="gloo")
    return {name: {"deepspeed": _train(deepspeed, case), "orch": _train(engine, case)}
            for name, case in cases.items()}


def run_both_libraries(cases: dict[str, dict[str, Any]], timeout: float = 540) -> dict[str, dict[str, Any]]:
    """Rank 0's results of every case through both libraries, all in one 2-rank launch: DeepSpeed's
    import and op loading are paid once."""
    # The first run on a machine JIT-compiles DeepSpeed's CPU ops (about 2 minutes); 540 s keeps this
    # clearer timeout ahead of pytest-timeout's 600.
    return run_distributed(_both_libraries, 2, cases, init=False, timeout=timeout, env={"DS_ACCELERATOR": "cpu"})[0]


@functools.lru_cache(maxsize=1)
def peer_runs() -> dict[str, dict[str, Any]]:
    """Every peer case of the session, this module's and test_engine_zero3_peer.py's, from ONE 2-rank
    launch: the spawn, DeepSpeed's lazy imports, its op loading and first ``initialize`` (15-25 s of
    each launch) are paid once. Each module asserts on its own cases."""
    from tests.engine.test_engine_zero3_peer import CASES as STAGE3_CASES

    return run_both_libraries({**CASES, **STAGE3_CASES}, timeout=580)


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, Any]]:
    return peer_runs()


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_losses_and_weights_equal_deepspeed(runs: dict[str, dict[str, Any]], name: str) -> None:
    assert_matches_deepspeed(runs[name]["orch"], runs[name]["deepspeed"], CASES[name]["tolerance"])


def assert_matches_deepspeed(ours: dict[str, Any], ds: dict[str, Any], tol: Tolerance) -> None:
    """orch's run agrees with DeepSpeed's step by step (loss, LR, gradient norm) and in every final weight."""
    assert ours["global_steps"] == ds["global_steps"] == STEPS
    for step, (a, b) in enumerate(zip(ours["losses"], ds["losses"])):
        assert _rel(a, b) <= tol.loss, (f"step {step}: orch loss {a!r} vs DeepSpeed {b!r}\n"
                                        f"orch {ours['losses']}\nDeepSpeed {ds['losses']}")
    lrs = [(a, b) for mine, theirs in zip(ours["lrs"], ds["lrs"]) for a, b in zip(mine, theirs)]
    assert len(lrs) == sum(len(x) for x in ds["lrs"]) and all(_rel(a, b) <= 1e-12 for a, b in lrs), (
        f"learning rates differ:\norch {ours['lrs']}\nDeepSpeed {ds['lrs']}")
    for step, (a, b) in enumerate(zip(ours["norms"], ds["norms"])):
        assert _rel(a, b) <= tol.norm, f"step {step}: orch grad norm {a!r} vs DeepSpeed {b!r}"
    assert set(ours["params"]) == set(ds["params"])
    for pname, p in ds["params"].items():
        mine = ours["params"][pname]
        assert mine.shape == p.shape and p.numel() > 0, f"{pname} was not gathered"
        noise_only = _key_bias(pname, p)
        if noise_only is not None:
            assert max(mine[noise_only].abs().max().item(), p[noise_only].abs().max().item()) < 1e-3
            mine, p = mine.clone(), p.clone()
            mine[noise_only] = p[noise_only] = 0.0
        excess = ((mine - p).abs() - tol.param_rel * p.abs()).max().item()
        assert excess <= tol.param_abs, (f"parameter {pname}: |orch - DeepSpeed| exceeds the tolerance by "
                                         f"{excess:.3g} (max |diff| {(mine - p).abs().max().item():.3g})")


def _key_bias(name: str, p: Any) -> slice | None:
    """The key part of a GPT ``attn.qkv.bias`` (laid out q, k, v), whose true gradient is zero."""
    if not name.endswith("attn.qkv.bias"):
        return None
    d = p.numel() // 3
    return slice(d, 2 * d)


def test_the_comparison_exercises_what_it_claims(runs: dict[str, dict[str, Any]]) -> None:
    """Guard against a vacuous pass: clipping clips, warm-up moves the LR, training moves the loss."""
    for name, case in CASES.items():
        ds = runs[name]["deepspeed"]
        clip = case["config"].get("gradient_clipping", 1.0)
        assert max(ds["norms"]) > clip, f"{name}: gradient norm never exceeded the clip {clip}"
        assert len({tuple(lr) for lr in ds["lrs"]}) > 2, f"{name}: the warm-up never changed the LR"
        assert ds["losses"][-1] < ds["losses"][0], f"{name}: DeepSpeed's loss did not go down"


def test_benchmark_launches_train_the_same_model_to_the_same_loss() -> None:
    """`python -m bench.engine_vs_peers` keeps working: each candidate in its own torchrun launch
    trains the same model on the same data, so DeepSpeed ZeRO-2 and orch ZeRO-2 end on the same
    loss, and each reports a step time and its peak memory."""
    from bench.engine_vs_peers import Workload, launch

    smoke = Workload("smoke", "tiny", 2, "harness check")
    runs = {c: launch(c, smoke, steps=2, warmup=0, timeout=300) for c in ("deepspeed-z2", "orch-z2")}
    losses = {c: r.final_loss for c, r in runs.items()}
    assert abs(losses["orch-z2"] - losses["deepspeed-z2"]) <= 1e-5 * losses["deepspeed-z2"], losses
    for c, r in runs.items():
        assert r.step_s > 0 and r.cpu_s > 0, c
        assert r.peak_rss_mb >= r.rss_after_model_mb > 50, (c, r)
