"""Pieces every Triton kernel here shares: the decorator, dtype names, the jit helpers that find a
program's slice of a tensor, load its unscaled, clipped gradient and write the parameter back, and
the host side that launches an optimizer kernel.

A kernel runs in one of two modes, chosen at compile time by ``MULTI``:

- direct: the pointer arguments are the tensors themselves and program ``i`` owns elements
  ``[i*BLOCK, (i+1)*BLOCK)``; this is the flat ZeRO partition, where Triton knows the pointers'
  alignment and vectorises the loads.
- multi-tensor: the pointer arguments are int64 tables of tensor addresses, and a program
  table says which tensor and which offset each program owns, so many small tensors cost one
  launch (what torch calls multi_tensor_apply).

Importing this module imports triton: only the kernel modules import it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.standard import _elementwise_max, _sum_combine

from . import autotune
from .dispatch import interpreter_mode
from .multi_tensor import TableCache, TensorLists, launch
from .scaling import GradMultiplier

TL_DTYPES: dict[torch.dtype, Any] = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def kernel(fn):
    """``triton.jit``, or Triton's interpreter when kernels cannot compile for a GPU here.

    Deciding here rather than through TRITON_INTERPRET alone means CPU tensors reach the
    interpreter even when triton was imported before anyone set the variable.
    """
    if interpreter_mode():
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.jit(fn)


def is_interpreted(fn: Any) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every triton 3 has it
        return False
    return isinstance(fn, InterpretedFunction)


def tl_dtype(dtype: torch.dtype) -> Any:
    try:
        return TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"Triton optimizer kernels support float32/float16/bfloat16/float64 tensors, got {dtype}") from None


@kernel
def program_span(n_elements, prog_ptr, numel_ptr, BLOCK: tl.constexpr, MULTI: tl.constexpr):
    """(offsets, mask, tensor index) of this program's elements."""
    pid = tl.program_id(0)
    if MULTI:
        t = tl.load(prog_ptr + 2 * pid)
        start = tl.load(prog_ptr + 2 * pid + 1)
        n = tl.load(numel_ptr + t)
    else:
        t = 0
        start = pid.to(tl.int64) * BLOCK
        n = n_elements
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < n, t


@kernel
def tensor_base(ptr, t, DT: tl.constexpr, MULTI: tl.constexpr):
    """The base pointer of tensor ``t``: read from an address table in multi-tensor mode."""
    if MULTI:
        return tl.load(ptr + t).to(tl.pointer_type(DT))
    else:
        return ptr


if interpreter_mode():
    # Triton 3.9's interpreter truncates fp32 -> bf16 where GPUs round to nearest even; round
    # by hand there so that the interpreter computes what the GPU stores.
    @kernel
    def store(at, offs, x, mask):
        """Store fp32 ``x`` through ``at``, converting to its element type (nearest even)."""
        if at.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(x != x, 0x7FC0, rounded)
            tl.store(at + offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(at + offs, x.to(at.dtype.element_ty), mask=mask)

else:

    @kernel
    def store(at, offs, x, mask):
        """Store fp32 ``x`` through ``at``, converting to its element type (nearest even)."""
        tl.store(at + offs, x.to(at.dtype.element_ty), mask=mask)


# tl.sum and tl.max are themselves jit functions, decorated when triton was imported; outside
# TRITON_INTERPRET they cannot run in the interpreter. tl.reduce with the same combine
# functions is what they do, and the interpreter runs it as one numpy reduction.
@kernel
def block_sum(x):
    return tl.reduce(x, 0, _sum_combine)


@kernel
def block_max(x):
    return tl.reduce(x, 0, _elementwise_max)


@kernel
def load_f32(at, offs, mask):
    """``at[offs]`` converted to fp32 (0 where masked): optimizer math is fp32 whatever the storage."""
    return tl.load(at + offs, mask=mask, other=0.0).to(tl.float32)


@kernel
def load_grad(g_at, offs, mask, gs_ptr, clip_ptr, gs_val, clip_val, GS_MODE: tl.constexpr, CLIP_MODE: tl.constexpr):
    """The gradient in fp32, divided by the loss scale and multiplied by the clip factor.

    Mode 1 takes the factor as a kernel argument, mode 2 reads it from device memory (so a
    factor computed on the GPU needs no host sync).
    """
    g = load_f32(g_at, offs, mask)
    if GS_MODE == 1:
        g = tl.div_rn(g, gs_val)
    elif GS_MODE == 2:
        g = tl.div_rn(g, tl.load(gs_ptr).to(tl.float32))
    if CLIP_MODE == 1:
        g = g * clip_val
    elif CLIP_MODE == 2:
        g = g * tl.load(clip_ptr).to(tl.float32)
    return g


@kernel
def optimizer_inputs(p_ptr, g_ptr, n_elements, prog_ptr, numel_ptr, gs_ptr, clip_ptr, gs_val, clip_val,
                     BLOCK: tl.constexpr, MULTI: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                     GS_MODE: tl.constexpr, CLIP_MODE: tl.constexpr):
    """What every optimizer kernel starts from: this program's span (offsets, mask, tensor index),
    the gradient (unscaled, clipped) and the parameter in fp32, and the parameter's base pointer."""
    offs, mask, t = program_span(n_elements, prog_ptr, numel_ptr, BLOCK, MULTI)
    g = load_grad(tensor_base(g_ptr, t, G_DT, MULTI), offs, mask, gs_ptr, clip_ptr, gs_val, clip_val, GS_MODE, CLIP_MODE)
    p_at = tensor_base(p_ptr, t, P_DT, MULTI)
    return offs, mask, t, g, p_at, load_f32(p_at, offs, mask)


@kernel
def store_param(p_at, lo_ptr, t, offs, p, mask, LO_DT: tl.constexpr, MULTI: tl.constexpr, HAS_LOWP: tl.constexpr):
    """Write the updated parameter, and its low-precision copy (the model's weights) when there is one."""
    store(p_at, offs, p, mask)
    if HAS_LOWP:
        store(tensor_base(lo_ptr, t, LO_DT, MULTI), offs, p, mask)


def launch_optimizer(name: str, fn: Any, tables: TableCache, lists: TensorLists, scalars: dict[str, Any], *,
                     multiplier: GradMultiplier, block: int | None, num_warps: int | None, direct_min: int | None,
                     tune_step: Callable[..., None], tune_args: dict[str, Any]) -> None:
    """Run optimizer kernel ``fn`` over ``lists`` (``p_ptr`` first, ``lo_ptr`` None without
    low-precision copies) with ``scalars``, adding what every optimizer kernel takes: the tuned
    launch configuration (or ``block``/``num_warps``), the gradient multiplier's arguments,
    ``HAS_LOWP``, and one dtype constexpr per list, named after it (``m_ptr`` -> ``M_DT``; a list
    that is None takes the parameters' dtype). Tuning times ``tune_step(*lists, **tune_args)``,
    the public step function, on scratch tensors (``time_on_scratch``)."""
    params = lists["p_ptr"]
    device = params[0].device
    dtypes = {key.removesuffix("_ptr").upper() + "_DT": (ts or params)[0].dtype for key, ts in lists.items()}
    interpreted = is_interpreted(fn)
    config = autotune.launch_config(name, device, dtypes, interpreted=interpreted, block=block, num_warps=num_warps,
                                    measure=lambda c: time_on_scratch(tune_step, tune_args, device, dtypes, c))
    args = {**multiplier.kernel_args(device), **scalars, **{key: tl_dtype(dt) for key, dt in dtypes.items()},
            "HAS_LOWP": lists["lo_ptr"] is not None}
    # the interpreter follows the multi-tensor address tables only into host memory
    launch(fn, lists, args=args, config=config, tables=tables, multi_ok=device.type == "cpu" or not interpreted,
           direct_min=direct_min)


def time_on_scratch(step: Callable[..., None], args: dict[str, Any], device: torch.device,
                    dtypes: dict[str, torch.dtype], config: autotune.KernelConfig) -> float:
    """Milliseconds of ``step(*lists, **args)`` launched with ``config``, one scratch tensor of 4M
    elements per list in the order of ``dtypes`` (random parameters and gradients, zeroed states)."""
    n = 1 << 22
    lists = [[(torch.randn if key in ("P_DT", "G_DT") else torch.zeros)(n, device=device, dtype=dtype)]
             for key, dtype in dtypes.items()]
    return autotune.time_cuda(lambda: step(*lists, **args, block=config.block, num_warps=config.num_warps))
