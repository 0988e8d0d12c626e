"""The fused LAMB step in Triton, with DeepSpeed FusedLamb's update rule: two launches per step.

LAMB scales each tensor's Adam update by a trust ratio ``||w|| / ||update||`` (You et al.
2019, arXiv:1904.00962), so the update of any element depends on a norm over its whole tensor:
one pass cannot both produce the norms and use them. The work is therefore two passes over
memory, each a single launch over every *segment* (a parameter, or a parameter's piece of a
flat ZeRO partition; see ``segments.py``):

1. ``lamb_stats_kernel``: unscale/clip the gradient, update both moments in place, and write
   per program the partial sums of ``w*w`` and ``update*update`` (programs never straddle
   segments: the program table is built per segment).
2. torch folds the partials per segment (``torch.segment_reduce``: fixed order, deterministic),
   optionally sums them across ranks (a parameter split over ZeRO partitions), and computes
   each segment's coefficient on the device: no host sync.
3. ``lamb_apply_kernel``: recompute the update from the stored moments and write
   ``p - step_size * coeff * update`` (and the low-precision copy).

DeepSpeed's rule (csrc/lamb/fused_lamb_cuda_kernel.cu), math in fp32::

    g <- g / scale ;  m <- b1*m + (1-b1)*g ;  v <- b2*v + (1-b2)*g*g
    update = m / (sqrt(v) + eps) + wd*w        (eps_inside_sqrt: m / sqrt(v + eps) + wd*w)
    coeff  = clamp(||w|| / ||update||, min_coeff, max_coeff), 1 if either norm is 0
    step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)   (lr without bias correction)
    w <- w - step_size * coeff * update
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

from . import autotune
from .multi_tensor import TableCache
from .scaling import GradMultiplier
from .segments import SegmentPlan, lamb_step_size, trust_coefficients
from .triton_common import (block_sum, is_interpreted, kernel, load_f32, optimizer_inputs, program_span, store,
                            store_param, tensor_base, tl_dtype)


@kernel
def lamb_update(m, v, p, eps, decay, EPS_INSIDE: tl.constexpr):
    if EPS_INSIDE:
        denom = tl.sqrt_rn(v + eps)
    else:
        denom = tl.sqrt_rn(v) + eps
    return tl.div_rn(m, denom) + decay * p


@kernel
def lamb_stats_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr,
    n_elements, prog_ptr, numel_ptr,
    gs_ptr, clip_ptr, gs_val, clip_val,
    out_ptr, n_out, beta1, beta1_c, beta2, beta2_c, eps, decay,
    BLOCK: tl.constexpr, MULTI: tl.constexpr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr, V_DT: tl.constexpr,
    GS_MODE: tl.constexpr, CLIP_MODE: tl.constexpr, EPS_INSIDE: tl.constexpr,
):
    offs, mask, t, g, p_at, p = optimizer_inputs(p_ptr, g_ptr, n_elements, prog_ptr, numel_ptr, gs_ptr, clip_ptr,
                                                 gs_val, clip_val, BLOCK, MULTI, P_DT, G_DT, GS_MODE, CLIP_MODE)
    m_at = tensor_base(m_ptr, t, M_DT, MULTI)
    v_at = tensor_base(v_ptr, t, V_DT, MULTI)
    m = beta1 * load_f32(m_at, offs, mask) + beta1_c * g
    v = beta2 * load_f32(v_at, offs, mask) + beta2_c * (g * g)
    store(m_at, offs, m, mask)
    store(v_at, offs, v, mask)
    u = tl.where(mask, lamb_update(m, v, p, eps, decay, EPS_INSIDE), 0.0)
    pid = tl.program_id(0)
    tl.store(out_ptr + pid, block_sum(p * p))
    tl.store(out_ptr + n_out + pid, block_sum(u * u))


@kernel
def lamb_apply_kernel(
    p_ptr, m_ptr, v_ptr, lo_ptr,
    n_elements, prog_ptr, numel_ptr,
    coeff_ptr, step_size, eps, decay,
    BLOCK: tl.constexpr, MULTI: tl.constexpr,
    P_DT: tl.constexpr, M_DT: tl.constexpr, V_DT: tl.constexpr, LO_DT: tl.constexpr,
    HAS_LOWP: tl.constexpr, EPS_INSIDE: tl.constexpr,
):
    offs, mask, t = program_span(n_elements, prog_ptr, numel_ptr, BLOCK, MULTI)
    p_at = tensor_base(p_ptr, t, P_DT, MULTI)
    p = load_f32(p_at, offs, mask)
    m = load_f32(tensor_base(m_ptr, t, M_DT, MULTI), offs, mask)
    v = load_f32(tensor_base(v_ptr, t, V_DT, MULTI), offs, mask)
    coeff = tl.load(coeff_ptr + t)
    p = p - step_size * coeff * lamb_update(m, v, p, eps, decay, EPS_INSIDE)
    store_param(p_at, lo_ptr, t, offs, p, mask, LO_DT, MULTI, HAS_LOWP)


_tables = TableCache()


def lamb_step(
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
    block: int | None = None, num_warps: int | None = None,
) -> torch.Tensor:
    """Update every tensor in place; return the per-segment coefficients (a device tensor).

    ``plan`` cuts the tensors into the segments that each get a trust ratio (and says how to
    sum a segment's norms across ranks). Both passes are one launch each over all segments.
    """
    device = params[0].device
    dtypes = {"P_DT": params[0].dtype, "G_DT": grads[0].dtype, "M_DT": exp_avgs[0].dtype,
              "V_DT": exp_avg_sqs[0].dtype, "LO_DT": (lowp or params)[0].dtype}
    config = autotune.launch_config("lamb", device, dtypes, interpreted=is_interpreted(lamb_stats_kernel),
                                    block=block, num_warps=num_warps)
    lists = {"p_ptr": params, "g_ptr": grads, "m_ptr": exp_avgs, "v_ptr": exp_avg_sqs, "lo_ptr": lowp or None}
    views = {k: None if ts is None else plan.views(ts) for k, ts in lists.items()}
    numels = plan.lengths
    addresses, programs, numel_table = _tables.tables(views, numels, config.block, device)
    n_prog = programs.numel() // 2
    options = {"num_warps": config.num_warps, "enable_fp_fusion": True, "BLOCK": config.block, "MULTI": True,
               "n_elements": 0, "prog_ptr": programs, "numel_ptr": numel_table}
    eps, decay = float(eps), float(weight_decay)
    inside = bool(eps_inside_sqrt)
    partials = torch.empty(2 * n_prog, dtype=torch.float32, device=device)
    lamb_stats_kernel[(n_prog,)](
        p_ptr=addresses["p_ptr"], g_ptr=addresses["g_ptr"], m_ptr=addresses["m_ptr"], v_ptr=addresses["v_ptr"],
        **multiplier.kernel_args(device), out_ptr=partials, n_out=n_prog,
        beta1=float(beta1), beta1_c=1.0 - float(beta1), beta2=float(beta2), beta2_c=1.0 - float(beta2),
        eps=eps, decay=decay, EPS_INSIDE=inside,
        **{k: tl_dtype(dtypes[k]) for k in ("P_DT", "G_DT", "M_DT", "V_DT")}, **options,
    )
    per_program = plan.programs_per_segment(config.block, device)
    sums = torch.stack([torch.segment_reduce(part, "sum", lengths=per_program)
                        for part in (partials[:n_prog], partials[n_prog:])])
    coeffs = trust_coefficients(plan.reduce(sums), plan.keys_on(device), max_coeff, min_coeff)
    lamb_apply_kernel[(n_prog,)](
        p_ptr=addresses["p_ptr"], m_ptr=addresses["m_ptr"], v_ptr=addresses["v_ptr"], lo_ptr=addresses["lo_ptr"],
        coeff_ptr=coeffs, step_size=lamb_step_size(lr, beta1, beta2, step, bias_correction), eps=eps, decay=decay,
        HAS_LOWP=lowp is not None and len(lowp) > 0, EPS_INSIDE=inside,
        **{k: tl_dtype(dtypes[k]) for k in ("P_DT", "M_DT", "V_DT", "LO_DT")}, **options,
    )
    return coeffs

