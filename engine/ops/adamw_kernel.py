"""The fused AdamW (and Adam with L2) step in Triton: one pass over memory per step.

Per element it reads the gradient (any float dtype), the parameter and both moments, and
writes the parameter, the moments and, optionally, a low-precision copy of the parameter:
the loss-scale unscale, the clip factor, weight decay, bias correction and the copy-out all
happen in registers. Math in fp32 whatever the storage dtypes, as torch's AdamW:

    p <- p * (1 - lr*wd)                               (AdamW; Adam adds wd*p to g instead)
    m <- m + (1-b1)*(g-m) ;  v <- b2*v + (1-b2)*g*g
    p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

from .multi_tensor import TableCache
from .scaling import GradMultiplier
from .triton_common import kernel, launch_optimizer, load_f32, optimizer_inputs, store, store_param, tensor_base


@kernel
def adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, lo_ptr,
    n_elements, prog_ptr, numel_ptr,
    gs_ptr, clip_ptr, gs_val, clip_val,
    decay, weight_decay, beta1_c, beta2, beta2_c, eps, step_size, inv_bc2_sqrt,
    BLOCK: tl.constexpr, MULTI: tl.constexpr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr, V_DT: tl.constexpr, LO_DT: tl.constexpr,
    GS_MODE: tl.constexpr, CLIP_MODE: tl.constexpr, HAS_LOWP: tl.constexpr, ADAMW: tl.constexpr,
):
    offs, mask, t, g, p_at, p = optimizer_inputs(p_ptr, g_ptr, n_elements, prog_ptr, numel_ptr, gs_ptr, clip_ptr,
                                                 gs_val, clip_val, BLOCK, MULTI, P_DT, G_DT, GS_MODE, CLIP_MODE)
    m_at = tensor_base(m_ptr, t, M_DT, MULTI)
    v_at = tensor_base(v_ptr, t, V_DT, MULTI)
    m = load_f32(m_at, offs, mask)
    v = load_f32(v_at, offs, mask)

    if ADAMW:
        p = p * decay
    else:
        g = g + weight_decay * p
    m = m + beta1_c * (g - m)  # torch's lerp form: bit-closer to torch.optim.AdamW
    v = beta2 * v + beta2_c * (g * g)
    denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
    p = p - step_size * tl.div_rn(m, denom)

    store(m_at, offs, m, mask)
    store(v_at, offs, v, mask)
    store_param(p_at, lo_ptr, t, offs, p, mask, LO_DT, MULTI, HAS_LOWP)


_tables = TableCache()


def adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    lowp: Sequence[torch.Tensor] | None = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    adam_w_mode: bool = True,
    bias_correction: bool = True,
    multiplier: GradMultiplier = GradMultiplier(),
    block: int | None = None,
    num_warps: int | None = None,
    direct_min: int | None = None,
) -> None:
    """Update every tensor in place. All lists align; tensors are contiguous, one device, and
    each list holds one dtype. ``step`` is the step number after this update (1 on the first).
    ``block``/``num_warps`` override the tuned launch configuration and ``direct_min`` the
    size from which a tensor gets a launch of its own.
    """
    if not params:
        return
    # Python ints would reach the kernel as i32 arguments (and compile another variant)
    lr, beta1, beta2, eps, weight_decay = (float(x) for x in (lr, beta1, beta2, eps, weight_decay))
    if bias_correction:
        step_size = lr / (1.0 - beta1**step)
        inv_bc2_sqrt = 1.0 / (1.0 - beta2**step) ** 0.5
    else:
        step_size, inv_bc2_sqrt = lr, 1.0
    launch_optimizer(
        "adamw", adamw_kernel, _tables,
        {"p_ptr": params, "g_ptr": grads, "m_ptr": exp_avgs, "v_ptr": exp_avg_sqs, "lo_ptr": lowp or None},
        {
            "decay": 1.0 - lr * weight_decay, "weight_decay": weight_decay,
            # complements in float64 here: 1 - 0.9 in fp32 on the device would be 0.100000024
            "beta1_c": 1.0 - beta1, "beta2": beta2, "beta2_c": 1.0 - beta2, "eps": eps,
            "step_size": step_size, "inv_bc2_sqrt": inv_bc2_sqrt, "ADAMW": bool(adam_w_mode),
        },
        multiplier=multiplier, block=block, num_warps=num_warps, direct_min=direct_min,
        tune_step=adamw_step, tune_args={"lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
                                         "step": 1},
    )
