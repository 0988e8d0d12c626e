"""The same optimizer steps and norm in plain torch: torch's fused CPU AdamW for CPU
(offloaded) state, and ``_foreach`` ops as the debugging fallback on any device.

Math in each tensor's own dtype, as torch's optimizers do (our Triton kernels compute in fp32
whatever the storage dtype; the two agree for fp32 parameters).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .scaling import GradMultiplier

Tensors = Sequence[torch.Tensor]


def has_fused_cpu_adamw() -> bool:
    return hasattr(torch, "_fused_adamw_") and hasattr(torch, "_fused_adam_")


def adamw_fused_cpu(
    params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, steps: Tensors,
    lowp: Tensors | None, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    adam_w_mode: bool, multiplier: GradMultiplier,
) -> None:
    """torch's fused CPU Adam(W) kernel; ``steps`` already count this step.

    It unscales fp32 gradients in place (torch's kernel writes them back); gradients of
    another dtype are first converted to the parameters' dtype.
    """
    dtype = params[0].dtype
    grads = [g if g.dtype == dtype else g.to(dtype) for g in grads]
    fused = torch._fused_adamw_ if adam_w_mode else torch._fused_adam_
    fused(
        list(params), grads, list(exp_avgs), list(exp_avg_sqs), [], list(steps),
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
        grad_scale=multiplier.divisor(params[0].device), found_inf=None,
    )
    if lowp:
        torch._foreach_copy_(list(lowp), list(params))


def adamw_foreach(
    params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, lowp: Tensors | None,
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
    adam_w_mode: bool, bias_correction: bool, multiplier: GradMultiplier,
) -> None:
    params, exp_avgs, exp_avg_sqs = list(params), list(exp_avgs), list(exp_avg_sqs)
    g = multiplier.apply(list(grads), params[0].dtype)
    if adam_w_mode:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    elif weight_decay != 0.0:
        torch._foreach_add_(g, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, g, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1.0 - beta2)
    if bias_correction:
        step_size = lr / (1.0 - beta1**step)
        bc2_sqrt = math.sqrt(1.0 - beta2**step)
    else:
        step_size, bc2_sqrt = lr, 1.0
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-step_size)
    if lowp:
        torch._foreach_copy_(list(lowp), params)


def lion_foreach(
    params: Tensors, grads: Tensors, exp_avgs: Tensors, lowp: Tensors | None,
    *, lr: float, beta1: float, beta2: float, weight_decay: float, multiplier: GradMultiplier,
) -> None:
    params, exp_avgs = list(params), list(exp_avgs)
    g = multiplier.apply(list(grads), params[0].dtype)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    update = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(update, g, alpha=1.0 - beta1)
    torch._foreach_sign_(update)
    torch._foreach_add_(params, update, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, g, alpha=1.0 - beta2)
    if lowp:
        torch._foreach_copy_(list(lowp), params)


def sgd_foreach(
    params: Tensors, grads: Tensors, momentum_buffers: Tensors | None, lowp: Tensors | None,
    *, lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    first_step: bool, multiplier: GradMultiplier,
) -> None:
    params = list(params)
    g = multiplier.apply(list(grads), params[0].dtype)
    if weight_decay != 0.0:
        torch._foreach_add_(g, params, alpha=weight_decay)
    if momentum != 0.0:
        assert momentum_buffers is not None
        bufs = list(momentum_buffers)
        if first_step:
            torch._foreach_copy_(bufs, g)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, g, alpha=1.0 - dampening)
        if nesterov:
            torch._foreach_add_(g, bufs, alpha=momentum)
        else:
            g = bufs
    torch._foreach_add_(params, g, alpha=-lr)
    if lowp:
        torch._foreach_copy_(list(lowp), params)


def norm_and_overflow(tensors: Tensors, norm_type: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's version of the fused reduction; on CPU the overflow check only runs when the
    norm is not finite (no device to sync with there)."""
    tensors = [t for t in tensors if t.numel() > 0]
    device = tensors[0].device
    p = float(norm_type)
    total = torch.linalg.vector_norm(torch.stack(_norms(tensors, p)), p)
    if p == math.inf:
        max_abs = total
    elif device.type == "cpu" and bool(torch.isfinite(total)):
        return total, torch.zeros((), dtype=torch.float32, device=device)
    else:
        max_abs = torch.stack(_norms(tensors, math.inf)).amax()
    found_inf = (~torch.isfinite(max_abs)).to(torch.float32)
    return total, found_inf


def _norms(tensors: Tensors, p: float) -> list[torch.Tensor]:
    try:
        return list(torch._foreach_norm(list(tensors), p, dtype=torch.float32))
    except TypeError:  # torch without the dtype argument
        return [torch.linalg.vector_norm(t.float(), p) for t in tensors]
