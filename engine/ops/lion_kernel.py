"""The fused Lion step in Triton (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms"): one pass, with the same unscale, clip and low-precision copy-out as AdamW.

    p <- p * (1 - lr*wd) - lr * sign(b1*m + (1-b1)*g)
    m <- b2*m + (1-b2)*g
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
def lion_kernel(
    p_ptr, g_ptr, m_ptr, lo_ptr,
    n_elements, prog_ptr, numel_ptr,
    gs_ptr, clip_ptr, gs_val, clip_val,
    lr, decay, beta1, beta1_c, beta2, beta2_c,
    BLOCK: tl.constexpr, MULTI: tl.constexpr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr, LO_DT: tl.constexpr,
    GS_MODE: tl.constexpr, CLIP_MODE: tl.constexpr, HAS_LOWP: tl.constexpr,
):
    offs, mask, t = program_span(n_elements, prog_ptr, numel_ptr, BLOCK, MULTI)
    p_at = tensor_base(p_ptr, t, P_DT, MULTI)
    m_at = tensor_base(m_ptr, t, M_DT, MULTI)
    g = load_grad(tensor_base(g_ptr, t, G_DT, MULTI), offs, mask, gs_ptr, clip_ptr, gs_val, clip_val, GS_MODE, CLIP_MODE)
    p = tl.load(p_at + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_at + offs, mask=mask, other=0.0).to(tl.float32)

    c = beta1 * m + beta1_c * g
    update = tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, 0.0))
    p = p * decay - lr * update
    m = beta2 * m + beta2_c * g

    store(p_at, offs, p, mask)
    store(m_at, offs, m, mask)
    if HAS_LOWP:
        store(tensor_base(lo_ptr, t, LO_DT, MULTI), offs, p, mask)


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
    device = params[0].device
    lr, beta1, beta2, weight_decay = (float(x) for x in (lr, beta1, beta2, weight_decay))
    dtypes = {
        "P_DT": params[0].dtype, "G_DT": grads[0].dtype, "M_DT": exp_avgs[0].dtype,
        "LO_DT": lowp[0].dtype if lowp else params[0].dtype,
    }
    config = autotune.launch_config(
        "lion", device, dtypes, interpreted=is_interpreted(lion_kernel), block=block, num_warps=num_warps,
        measure=lambda c: _measure(device, dtypes, c),
    )
    launch(
        lion_kernel,
        {"p_ptr": params, "g_ptr": grads, "m_ptr": exp_avgs, "lo_ptr": lowp or None},
        args={
            **multiplier.kernel_args(device),
            "lr": lr, "decay": 1.0 - lr * weight_decay,
            "beta1": beta1, "beta1_c": 1.0 - beta1, "beta2": beta2, "beta2_c": 1.0 - beta2,
            **{name: tl_dtype(dt) for name, dt in dtypes.items()},
            "HAS_LOWP": bool(lowp),
        },
        config=config,
        tables=_tables,
        multi_ok=device.type == "cpu" or not is_interpreted(lion_kernel),
        direct_min=direct_min,
    )


def _measure(device: torch.device, dtypes: dict[str, torch.dtype], config: autotune.KernelConfig) -> float:
    n = 1 << 22
    p = torch.randn(n, device=device, dtype=dtypes["P_DT"])
    g = torch.randn(n, device=device, dtype=dtypes["G_DT"])
    m = torch.zeros(n, device=device, dtype=dtypes["M_DT"])
    lo = torch.empty(n, device=device, dtype=dtypes["LO_DT"])
    return autotune.time_cuda(lambda: lion_step([p], [g], [m], [lo], lr=1e-5, beta1=0.9, beta2=0.99, weight_decay=0.0,
                                                block=config.block, num_warps=config.num_warps))
