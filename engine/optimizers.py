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
from typing import Any, Iterable

import torch
from torch.optim import Optimizer

__all__ = ["Lion", "build_optimizer", "step_with_multiplier"]


class Lion(Optimizer):
    """Lion (Chen et al. 2023) with decoupled weight decay, as DeepSpeed's FusedLion computes it.

    torch has no Lion; this foreach version is the portable fallback for ``"type": "Lion"``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            avgs = [self.state[p].setdefault("exp_avg", torch.zeros_like(p)) for p in params]
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            update = torch._foreach_lerp(avgs, grads, 1.0 - beta1)
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-lr)
            torch._foreach_lerp_(avgs, grads, 1.0 - beta2)
        return loss


def _fused_ok(groups: list[dict[str, Any]]) -> bool:
    """torch's fused Adam(W) kernels need float params on CPU (torch >= 2.4) or CUDA."""
    tensors = [p for g in groups for p in g["params"]]
    return bool(tensors) and hasattr(torch, "_fused_adamw_") and all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda")
        for p in tensors)


def build_optimizer(optimizer_cfg: Any, param_groups: list[dict[str, Any]]) -> Optimizer:
    """A torch optimizer over ``param_groups`` as the config's ``optimizer`` section describes.

    ``optimizer_cfg`` is a validated ``OptimizerConfig``: "Adam" means AdamW unless
    ``adam_w_mode`` is false (then classic L2 Adam), as in DeepSpeed. Per-group entries in
    ``param_groups`` (e.g. ``weight_decay: 0`` for biases) override the section's values.
    """
    kind = optimizer_cfg.resolved_kind()
    kwargs = optimizer_cfg.torch_kwargs()
    params = optimizer_cfg.params
    if kind in ("adamw", "adam_l2"):
        if not params.get("bias_correction", True):
            raise ValueError("optimizer.params.bias_correction false is not supported by orch's engine "
                             "(torch's Adam always corrects bias); remove it")
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        fused = {"fused": True} if _fused_ok(param_groups) else {"foreach": True}
        return cls(param_groups, **kwargs, **fused)
    if kind == "sgd":
        return torch.optim.SGD(param_groups, **kwargs, foreach=True)
    if kind == "lion":
        return Lion(param_groups, **kwargs)
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


def _takes_scale_kwargs(optimizer: Optimizer) -> bool:
    try:
        names = inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        return False
    return "grad_scale" in names and "clip_coef" in names


def step_with_multiplier(optimizer: Optimizer, grad_divisor: float, clip_coef: float) -> None:
    """One optimizer step on gradient ``grad / grad_divisor * clip_coef``.

    An optimizer whose ``step`` takes ``grad_scale``/``clip_coef`` (engine.ops' fused kernels)
    receives them and reads the gradient once; any other gets the gradient multiplied in place.
    """
    if _takes_scale_kwargs(optimizer):
        optimizer.step(grad_scale=grad_divisor if grad_divisor != 1.0 else None,
                       clip_coef=clip_coef if clip_coef != 1.0 else None)
        return
    factor = clip_coef / grad_divisor
    if factor != 1.0:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch._foreach_mul_(grads, factor)
    optimizer.step()
