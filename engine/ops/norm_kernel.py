"""The global gradient norm and the inf/nan check in one Triton reduction over the gradients.

Each program reduces its block to a partial (sum of |x|^p, or max |x|) and a flag (any
element inf or nan); torch then folds the partials in a fixed order, so the result is
deterministic, and nothing is read back to the host.

Overflow means an inf or nan in the gradient itself: a sum of squares that overflows fp32
makes the norm inf but does not set ``found_inf``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton.language as tl

from . import autotune
from .multi_tensor import TableCache, launch, program_count
from .triton_common import block_max, block_sum, is_interpreted, kernel, program_span, tensor_base, tl_dtype

FLT_MAX = 3.4028234663852886e38
NORM_INF, NORM_ONE, NORM_TWO, NORM_P = 0, 1, 2, 3


@kernel
def norm_kernel(
    x_ptr,
    n_elements, prog_ptr, numel_ptr,
    out_ptr, n_out, prog_offset, power,
    BLOCK: tl.constexpr, MULTI: tl.constexpr, X_DT: tl.constexpr, NORM: tl.constexpr,
):
    offs, mask, t = program_span(n_elements, prog_ptr, numel_ptr, BLOCK, MULTI)
    x = tl.load(tensor_base(x_ptr, t, X_DT, MULTI) + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(x)
    if NORM == 0:
        part = block_max(a)
    elif NORM == 1:
        part = block_sum(a)
    elif NORM == 2:
        part = block_sum(x * x)
    else:
        part = block_sum(tl.where(a > 0.0, tl.exp2(power * tl.log2(tl.where(a > 0.0, a, 1.0))), 0.0))
    # ordered compare: false for inf and for nan
    bad = block_max(tl.where(a <= 3.4028234663852886e38, 0.0, 1.0))
    slot = prog_offset + tl.program_id(0)
    tl.store(out_ptr + slot, part)
    tl.store(out_ptr + n_out + slot, bad)


_tables = TableCache()


def norm_and_overflow(
    tensors: Sequence[torch.Tensor],
    norm_type: float = 2.0,
    *,
    block: int | None = None,
    num_warps: int | None = None,
    direct_min: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total norm, found_inf) as 0-dim fp32 tensors on the tensors' device; no host sync."""
    tensors = [t.reshape(-1) for t in tensors if t.numel() > 0]
    if not tensors:
        raise ValueError("norm_and_overflow needs at least one non-empty tensor")
    device = tensors[0].device
    mode = _mode(norm_type)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    configs = {
        dtype: autotune.launch_config(
            "norm", device, {"X_DT": dtype}, interpreted=is_interpreted(norm_kernel), block=block,
            num_warps=num_warps, measure=lambda c, d=dtype: _measure(device, d, c),
        )
        for dtype in by_dtype
    }
    n_out = sum(program_count([t.numel() for t in ts], configs[d].block) for d, ts in by_dtype.items())
    out = torch.empty(2 * n_out, dtype=torch.float32, device=device)
    offset = 0
    for dtype, group in by_dtype.items():
        offset += launch(
            norm_kernel,
            {"x_ptr": group},
            args={"out_ptr": out[offset:], "n_out": n_out, "power": float(norm_type) if mode == NORM_P else 1.0,
                  "X_DT": tl_dtype(dtype), "NORM": mode},
            config=configs[dtype],
            tables=_tables,
            multi_ok=device.type == "cpu" or not is_interpreted(norm_kernel),
            direct_min=direct_min,
            prog_offset_arg="prog_offset",
        )
    return finish(out[:n_out], out[n_out:], norm_type)


def finish(partials: torch.Tensor, flags: torch.Tensor, norm_type: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold per-program partials into the norm (fixed order: deterministic)."""
    found_inf = flags.amax()
    mode = _mode(norm_type)
    if mode == NORM_INF:
        total = partials.amax()
        # the max may skip a nan; a norm over non-finite values is never finite
        total = torch.where((found_inf > 0) & torch.isfinite(total), torch.full_like(total, math.nan), total)
    elif mode == NORM_ONE:
        total = partials.sum()
    elif mode == NORM_TWO:
        total = partials.sum().sqrt()
    else:
        total = partials.sum().pow(1.0 / float(norm_type))
    return total, found_inf


def _mode(norm_type: float) -> int:
    p = float(norm_type)
    if p == math.inf:
        return NORM_INF
    if p == 1.0:
        return NORM_ONE
    if p == 2.0:
        return NORM_TWO
    if p > 0 and math.isfinite(p):
        return NORM_P
    raise ValueError(f"norm_type must be a positive number or inf, got {norm_type}")


def _measure(device: torch.device, dtype: torch.dtype, config: autotune.KernelConfig) -> float:
    x = torch.randn(1 << 24, device=device, dtype=dtype)
    return autotune.time_cuda(lambda: norm_and_overflow([x], block=config.block, num_warps=config.num_warps))
