"""Building the optimizer that updates the flat fp32 master partitions, and stepping it.

This is the one place that decides which optimizer implementation runs: the config's
``optimizer`` section (or the user's own optimizer) is turned into a torch optimizer over
the ZeRO optimizer's flat fp32 partitions here, and ``step_with_multiplier`` is how every
step is taken. Swapping in a fused kernel (``engine.ops``) means changing this module only.

Why one multiplier: the flat gradient must be divided by the loss scale (and by the world
size, because reductions sum) and multiplied by the clip coefficient. Doing that as one
``mul_`` (or handing both factors to a fused kernel that reads the gradient once anyway)
costs one pass over the gradient instead of three.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch.optim import Optimizer

__all__ = ["build_optimizer", "rebind_optimizer", "step_with_multiplier", "takes_scale_kwargs"]


def build_optimizer(optimizer_cfg: Any, param_groups: list[dict[str, Any]]) -> Optimizer:
    """The optimizer the config's ``optimizer`` section describes, over ``param_groups``.

    ``optimizer_cfg`` is a validated ``OptimizerConfig``: "Adam" means AdamW unless
    ``adam_w_mode`` is false (then classic L2 Adam), as in DeepSpeed. Per-group entries in
    ``param_groups`` (e.g. ``weight_decay: 0`` for biases) override the section's values.
    The implementations are engine.ops' fused optimizers: Triton kernels on CUDA, torch's fused
    CPU AdamW or foreach ops on CPU; they take the loss scale and clip factor inside the step.
    """
    from .ops import FusedAdamW, FusedLamb, FusedLion, FusedSGD

    kind = optimizer_cfg.resolved_kind()
    kwargs = optimizer_cfg.torch_kwargs()
    if kind in ("adamw", "adam_l2"):
        return FusedAdamW(param_groups, adam_w_mode=kind == "adamw",
                          bias_correction=bool(optimizer_cfg.params.get("bias_correction", True)), **kwargs)
    if kind == "sgd":
        return FusedSGD(param_groups, **kwargs)
    if kind == "lion":
        return FusedLion(param_groups, **kwargs)
    if kind == "lamb":
        return FusedLamb(param_groups, **optimizer_cfg.engine_kwargs())
    if kind in ("onebitadam", "zerooneadam", "onebitlamb"):
        from .onebit import COMPRESSED_OPTIMIZERS

        return COMPRESSED_OPTIMIZERS[kind](param_groups, **optimizer_cfg.engine_kwargs())
    raise ValueError(f"optimizer kind {kind!r} has no implementation in engine/optimizers.py")


def rebind_optimizer(optimizer: Optimizer, param_groups: list[dict[str, Any]]) -> Optimizer:
    """Point a user's optimizer at the master partitions, keeping its class and hyperparameters.

    The object is changed in place (as DeepSpeed does) so that an LR scheduler the user built
    on it before ``initialize`` still drives the optimizer that actually steps.
    """
    if len(param_groups) != len(optimizer.param_groups):
        raise ValueError("internal: one master group per optimizer group expected")
    optimizer.state.clear()
    for group, new in zip(optimizer.param_groups, param_groups):
        group["params"] = list(new["params"])
    return optimizer


def takes_scale_kwargs(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` applies ``grad_scale``/``clip_coef`` itself (engine.ops' optimizers)."""
    try:
        names = inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        return False
    return "grad_scale" in names and "clip_coef" in names


def step_with_multiplier(optimizer: Optimizer, grad_divisor: float, clip_coef: float | torch.Tensor,
                         lowp_out: Optional[list[torch.Tensor]] = None) -> bool:
    """One optimizer step on gradient ``grad / grad_divisor * clip_coef``.

    ``clip_coef`` may be a device tensor (the ZeRO step's ``clamp(max_norm / norm, max=1)``): it
    is never read on the host. An optimizer whose ``step`` takes ``grad_scale``/``clip_coef``
    (engine.ops' fused kernels) receives them and reads the gradient once, and also refreshes
    ``lowp_out`` (the model's bf16/fp16 copies of the parameters) in the same pass; any other
    optimizer gets the gradient multiplied in place. Returns whether ``lowp_out`` was written.
    """
    as_tensor = isinstance(clip_coef, torch.Tensor)
    if takes_scale_kwargs(optimizer):
        optimizer.step(grad_scale=grad_divisor if grad_divisor != 1.0 else None,
                       clip_coef=clip_coef if as_tensor or clip_coef != 1.0 else None, lowp_out=lowp_out)
        return lowp_out is not None
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if as_tensor and grads:
        factor = clip_coef.to(device=grads[0].device, dtype=torch.float32) / grad_divisor
        torch._foreach_mul_(grads, factor)
    elif not as_tensor and clip_coef / grad_divisor != 1.0:
        torch._foreach_mul_(grads, clip_coef / grad_divisor)
    optimizer.step()
    return False
