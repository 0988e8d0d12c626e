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

from . import autotune
from .multi_tensor import TableCache, launch
from .scaling import GradMultiplier
from .triton_common import is_interpreted, kernel, load_grad, program_span, store, tensor_base, tl_dtype


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
    offs, mask, t = program_span(n_elements, prog_ptr, numel_ptr, BLOCK, MULTI)
    p_at = tensor_base(p_ptr, t, P_DT, MULTI)
    g = load_grad(tensor_base(g_ptr, t, G_DT, MULTI), offs, mask, gs_ptr, clip_ptr, gs_val, clip_val, GS_MODE, CLIP_MODE)
    p = tl.load(p_at + offs, mask=mask, other=0.0).to(tl.float32)
    g = g + weight_decay * p
    if HAS_MOMENTUM:
        buf_at = tensor_base(buf_ptr, t, BUF_DT, MULTI)
        if FIRST_STEP:
            buf = g
        else:
            buf = momentum * tl.load(buf_at + offs, mask=mask, other=0.0).to(tl.float32) + dampening_c * g
        store(buf_at, offs, buf, mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    store(p_at, offs, p, mask)
    if HAS_LOWP:
        store(tensor_base(lo_ptr, t, LO_DT, MULTI), offs, p, mask)


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
    device = params[0].device
    lr, momentum, dampening, weight_decay = (float(x) for x in (lr, momentum, dampening, weight_decay))
    has_momentum = momentum != 0.0
    if has_momentum and momentum_buffers is None:
        raise ValueError("sgd_step: momentum != 0 needs momentum_buffers")
    dtypes = {
        "P_DT": params[0].dtype, "G_DT": grads[0].dtype,
        "BUF_DT": momentum_buffers[0].dtype if has_momentum else params[0].dtype,
        "LO_DT": lowp[0].dtype if lowp else params[0].dtype,
    }
    config = autotune.launch_config(
        "sgd", device, dtypes, interpreted=is_interpreted(sgd_kernel), block=block, num_warps=num_warps,
        measure=lambda c: _measure(device, dtypes, c),
    )
    launch(
        sgd_kernel,
        {"p_ptr": params, "g_ptr": grads, "buf_ptr": momentum_buffers if has_momentum else None, "lo_ptr": lowp or None},
        args={
            **multiplier.kernel_args(device),
            "lr": lr, "weight_decay": weight_decay, "momentum": momentum, "dampening_c": 1.0 - dampening,
            **{name: tl_dtype(dt) for name, dt in dtypes.items()},
            "HAS_LOWP": bool(lowp), "HAS_MOMENTUM": has_momentum, "FIRST_STEP": bool(first_step),
            "NESTEROV": bool(nesterov),
        },
        config=config,
        tables=_tables,
        multi_ok=device.type == "cpu" or not is_interpreted(sgd_kernel),
        direct_min=direct_min,
    )


def _measure(device: torch.device, dtypes: dict[str, torch.dtype], config: autotune.KernelConfig) -> float:
    n = 1 << 22
    p = torch.randn(n, device=device, dtype=dtypes["P_DT"])
    g = torch.randn(n, device=device, dtype=dtypes["G_DT"])
    buf = torch.zeros(n, device=device, dtype=dtypes["BUF_DT"])
    lo = torch.empty(n, device=device, dtype=dtypes["LO_DT"])
    return autotune.time_cuda(lambda: sgd_step([p], [g], [buf], [lo], lr=1e-5, momentum=0.9,
                                               block=config.block, num_warps=config.num_warps))
