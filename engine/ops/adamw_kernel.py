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

from . import autotune
from .multi_tensor import TableCache, launch
from .scaling import GradMultiplier
from .triton_common import is_interpreted, kernel, load_grad, program_span, store, tensor_base, tl_dtype


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
    offs, mask, t = program_span(n_elements, prog_ptr, numel_ptr, BLOCK, MULTI)
    p_at = tensor_base(p_ptr, t, P_DT, MULTI)
    m_at = tensor_base(m_ptr, t, M_DT, MULTI)
    v_at = tensor_base(v_ptr, t, V_DT, MULTI)
    g_at = tensor_base(g_ptr, t, G_DT, MULTI)

    g = load_grad(g_at, offs, mask, gs_ptr, clip_ptr, gs_val, clip_val, GS_MODE, CLIP_MODE)
    p = tl.load(p_at + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_at + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_at + offs, mask=mask, other=0.0).to(tl.float32)

    if ADAMW:
        p = p * decay
    else:
        g = g + weight_decay * p
    m = m + beta1_c * (g - m)  # torch's lerp form: bit-closer to torch.optim.AdamW
    v = beta2 * v + beta2_c * (g * g)
    denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
    p = p - step_size * tl.div_rn(m, denom)

    store(p_at, offs, p, mask)
    store(m_at, offs, m, mask)
    store(v_at, offs, v, mask)
    if HAS_LOWP:
        store(tensor_base(lo_ptr, t, LO_DT, MULTI), offs, p, mask)


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
    device = params[0].device
    # Python ints would reach the kernel as i32 arguments (and compile another variant)
    lr, beta1, beta2, eps, weight_decay = (float(x) for x in (lr, beta1, beta2, eps, weight_decay))
    if bias_correction:
        step_size = lr / (1.0 - beta1**step)
        inv_bc2_sqrt = 1.0 / (1.0 - beta2**step) ** 0.5
    else:
        step_size, inv_bc2_sqrt = lr, 1.0
    dtypes = {
        "P_DT": params[0].dtype, "G_DT": grads[0].dtype, "M_DT": exp_avgs[0].dtype,
        "V_DT": exp_avg_sqs[0].dtype, "LO_DT": lowp[0].dtype if lowp else params[0].dtype,
    }
    config = autotune.launch_config(
        "adamw", device, dtypes, interpreted=is_interpreted(adamw_kernel), block=block, num_warps=num_warps,
        measure=lambda c: _measure(device, dtypes, c),
    )
    launch(
        adamw_kernel,
        {"p_ptr": params, "g_ptr": grads, "m_ptr": exp_avgs, "v_ptr": exp_avg_sqs, "lo_ptr": lowp or None},
        args={
            **multiplier.kernel_args(device),
            "decay": 1.0 - lr * weight_decay, "weight_decay": weight_decay,
            # complements in float64 here: 1 - 0.9 in fp32 on the device would be 0.100000024
            "beta1_c": 1.0 - beta1, "beta2": beta2, "beta2_c": 1.0 - beta2, "eps": eps,
            "step_size": step_size, "inv_bc2_sqrt": inv_bc2_sqrt,
            **{name: tl_dtype(dt) for name, dt in dtypes.items()},
            "HAS_LOWP": bool(lowp), "ADAMW": bool(adam_w_mode),
        },
        config=config,
        tables=_tables,
        multi_ok=device.type == "cpu" or not is_interpreted(adamw_kernel),
        direct_min=direct_min,
    )


def _measure(device: torch.device, dtypes: dict[str, torch.dtype], config: autotune.KernelConfig) -> float:
    """Milliseconds of one step over 4M scratch elements with ``config``."""
    n = 1 << 22
    p = torch.randn(n, device=device, dtype=dtypes["P_DT"])
    g = torch.randn(n, device=device, dtype=dtypes["G_DT"])
    m = torch.zeros(n, device=device, dtype=dtypes["M_DT"])
    v = torch.zeros(n, device=device, dtype=dtypes["V_DT"])
    lo = torch.empty(n, device=device, dtype=dtypes["LO_DT"])

    def run() -> None:
        adamw_step([p], [g], [m], [v], [lo], lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.0, step=1, block=config.block, num_warps=config.num_warps)

    return autotune.time_cuda(run)
