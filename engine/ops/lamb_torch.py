"""LAMB in plain torch: the CPU path (offloaded optimizer state) and the debugging fallback.

The same rule and the same two phases as ``lamb_kernel.py`` (moments and norms, then the
scaled update), in fp32 whatever the storage dtypes; segments and the cross-rank sum come
from the same ``SegmentPlan``, so both paths give every parameter the same trust ratio.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .scaling import GradMultiplier
from .segments import SegmentPlan, lamb_step_size, trust_coefficients


def lamb_torch(
    plan: SegmentPlan,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    lowp: Sequence[torch.Tensor] | None = None,
    *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
    max_coeff: float, min_coeff: float, bias_correction: bool = True, eps_inside_sqrt: bool = False,
    multiplier: GradMultiplier = GradMultiplier(),
) -> torch.Tensor:
    """Update in place; return the per-segment coefficients (as ``lamb_kernel.lamb_step``)."""
    grads32 = multiplier.apply(list(grads), torch.float32)
    updates, sums = [], []
    for p, g, m, v, (lengths, _) in zip(params, grads32, exp_avgs, exp_avg_sqs, plan.per_tensor):
        m32 = m.float().mul_(beta1).add_(g, alpha=1.0 - beta1)
        v32 = v.float().mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        m.copy_(m32)
        v.copy_(v32)
        w = p.float().reshape(-1)
        denom = (v32 + eps).sqrt_() if eps_inside_sqrt else v32.sqrt().add_(eps)
        u = (m32 / denom).reshape(-1).add_(w, alpha=weight_decay)
        seg_lengths = torch.tensor(lengths, device=p.device)
        sums.append(torch.stack([torch.segment_reduce(x * x, "sum", lengths=seg_lengths) for x in (w, u)]))
        updates.append(u)
    coeffs = trust_coefficients(plan.reduce(torch.cat(sums, dim=1)), plan.keys_on(params[0].device),
                                max_coeff, min_coeff)
    step_size = lamb_step_size(lr, beta1, beta2, step, bias_correction)
    start = 0
    for i, (p, u, (lengths, _)) in enumerate(zip(params, updates, plan.per_tensor)):
        scale = coeffs[start:start + len(lengths)].repeat_interleave(torch.tensor(lengths, device=p.device))
        start += len(lengths)
        new = p.float().reshape(-1) - step_size * scale * u
        p.copy_(new.view(p.shape))
        if lowp:
            lowp[i].copy_(new.view(lowp[i].shape))
    return coeffs
