"""The fused SGD step (momentum, dampening, Nesterov, L2 weight decay) in Triton, with torch's
SGD semantics: on the first step the momentum buffer starts as the gradient itself.

    g <- g + wd*p
    buf <- g (first step) | momentum*buf + (1-dampening)*g
    p <- p - lr * (g + momentum*buf if nesterov else buf)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

from .multi_tensor import TableCache
from .scaling import GradMultiplier
from .triton_common import kernel, launch_optimizer, load_f32, optimizer_inputs, store, store_param, tensor_base


@kernel
def sgd_kernel(
    p_ptr, g_ptr, buf_ptr, lo_ptr,
    n_elements, prog_ptr, numel_ptr,
    gs_ptr, clip_ptr, gs_val, clip_val,
    lr, weight_decay, momentum, dampening_c,
    BLOCK: tl.constexpr, MULTI: tl.constexpr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, BUF_DT: tl.constexpr, LO_DT: tl.constexpr,
    GS_MODE: tl.constexpr, CLIP_MODE: tl.constexpr, HAS_LOWP: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
):
    offs, mask, t, g, p_at, p = optimizer_inputs(p_ptr, g_ptr, n_elements, prog_ptr, numel_ptr, gs_ptr, clip_ptr,
                                                 gs_val, clip_val, BLOCK, MULTI, P_DT, G_DT, GS_MODE, CLIP_MODE)
    g = g + weight_decay * p
    if HAS_MOMENTUM:
        buf_at = tensor_base(buf_ptr, t, BUF_DT, MULTI)
        if FIRST_STEP:
            buf = g
        else:
            buf = momentum * load_f32(buf_at, offs, mask) + dampening_c * g
        store(buf_at, offs, buf, mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    store_param(p_at, lo_ptr, t, offs, p, mask, LO_DT, MULTI, HAS_LOWP)


_tables = TableCache()


def sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    lowp: Sequence[torch.Tensor] | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first_step: bool = False,
    multiplier: GradMultiplier = GradMultiplier(),
    block: int | None = None,
    num_warps: int | None = None,
    direct_min: int | None = None,
) -> None:
    """Update in place. ``momentum_buffers`` is None when momentum is 0; on ``first_step`` the
    buffers' old contents are ignored (they may be uninitialised memory)."""
    if not params:
        return
    lr, momentum, dampening, weight_decay = (float(x) for x in (lr, momentum, dampening, weight_decay))
    has_momentum = momentum != 0.0
    if has_momentum and momentum_buffers is None:
        raise ValueError("sgd_step: momentum != 0 needs momentum_buffers")
    launch_optimizer(
        "sgd", sgd_kernel, _tables,
        {"p_ptr": params, "g_ptr": grads, "buf_ptr": momentum_buffers if has_momentum else None, "lo_ptr": lowp or None},
        {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "dampening_c": 1.0 - dampening,
         "HAS_MOMENTUM": has_momentum, "FIRST_STEP": bool(first_step), "NESTEROV": bool(nesterov)},
        multiplier=multiplier, block=block, num_warps=num_warps, direct_min=direct_min,
        tune_step=sgd_step, tune_args={"lr": 1e-5, "momentum": 0.9},
    )
