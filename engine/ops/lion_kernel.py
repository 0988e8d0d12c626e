"""The fused Lion step in Triton (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms"): one pass, with the same unscale, clip and low-precision copy-out as AdamW.

    p <- p * (1 - lr*wd) - lr * sign(b1*m + (1-b1)*g)
    m <- b2*m + (1-b2)*g
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

from .multi_tensor import TableCache
from .scaling import GradMultiplier
from .triton_common import kernel, launch_optimizer, load_f32, optimizer_inputs, store, store_param, tensor_base


@kernel
def lion_kernel(
    p_ptr, g_ptr, m_ptr, lo_ptr,
    n_elements, prog_ptr, numel_ptr,
    gs_ptr, clip_ptr, gs_val, clip_val,
    lr, decay, beta1, beta1_c, beta2, beta2_c,
    BLOCK: tl.constexpr, MULTI: tl.constexpr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr, LO_DT: tl.constexpr,
    GS_MODE: tl.constexpr, CLIP_MODE: tl.constexpr, HAS_LOWP: tl.constexpr,
):
    offs, mask, t, g, p_at, p = optimizer_inputs(p_ptr, g_ptr, n_elements, prog_ptr, numel_ptr, gs_ptr, clip_ptr,
                                                 gs_val, clip_val, BLOCK, MULTI, P_DT, G_DT, GS_MODE, CLIP_MODE)
    m_at = tensor_base(m_ptr, t, M_DT, MULTI)
    m = load_f32(m_at, offs, mask)

    c = beta1 * m + beta1_c * g
    update = tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, 0.0))
    p = p * decay - lr * update
    m = beta2 * m + beta2_c * g

    store(m_at, offs, m, mask)
    store_param(p_at, lo_ptr, t, offs, p, mask, LO_DT, MULTI, HAS_LOWP)


_tables = TableCache()


def lion_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    lowp: Sequence[torch.Tensor] | None = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    multiplier: GradMultiplier = GradMultiplier(),
    block: int | None = None,
    num_warps: int | None = None,
    direct_min: int | None = None,
) -> None:
    """Update every tensor in place (lists align; contiguous; one device; one dtype per list)."""
    if not params:
        return
    lr, beta1, beta2, weight_decay = (float(x) for x in (lr, beta1, beta2, weight_decay))
    launch_optimizer(
        "lion", lion_kernel, _tables,
        {"p_ptr": params, "g_ptr": grads, "m_ptr": exp_avgs, "lo_ptr": lowp or None},
        {"lr": lr, "decay": 1.0 - lr * weight_decay,
         "beta1": beta1, "beta1_c": 1.0 - beta1, "beta2": beta2, "beta2_c": 1.0 - beta2},
        multiplier=multiplier, block=block, num_warps=num_warps, direct_min=direct_min,
        tune_step=lion_step, tune_args={"lr": 1e-5, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0},
    )
