"""What the scale simulator skips: drawing initial values and the arithmetic of big kernels.

Why: under torch's fake process group no rank ever receives real data, so no value the
simulated rank computes means anything; what the simulator measures (the communication
ledger, model-state bytes, gathered units and staging, tensors saved for backward) depends only
on shapes, dtypes and the order of operations. Two modes keep all of that and drop the work:

* ``NoInitValues`` (a ``TorchFunctionMode``, active while the model is built): the in-place
  initialisers (``normal_``, ``uniform_``, ``fill_``, ``zero_`` ...) return their tensor
  untouched. A 7B model is built in seconds instead of drawing 13 billion random numbers, and
  under ``engine.zero.Init`` no parameter is gathered to be initialised.
* ``ShapesOnlyCompute`` (a ``TorchDispatchMode``, active around forward and backward): matrix
  products, embedding lookups and attention kernels return zero-filled outputs of the shape, strides and dtype
  their meta kernel says, without computing. Autograd still records every node and saves the
  same tensors (the mode sits below autograd), so activation memory and the engine's hooks are
  unchanged; only the FLOPs are gone, which is what makes a 7B step take seconds on a laptop.
  Zeros (not ``empty``) keep the later elementwise kernels away from NaN and denormal slow paths;
  and since these are the only kernels that read gathered weights (norms and biases below the
  persistence threshold stay whole), the fake group's gathers need not fill their outputs.

``meta_saved_bytes`` measures the activation memory of one micro-batch at the job's full
sequence length on the meta device (no memory, no arithmetic): the bytes autograd saves for
backward, parameters excluded, with attention as a GPU runs it (flash attention saves the output
and its log-sum-exp, never the ``T × T`` matrix).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

__all__ = ["NoInitValues", "ShapesOnlyCompute", "meta_saved_bytes"]

_INIT_METHODS = frozenset({
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_,
    torch.Tensor.random_, torch.Tensor.exponential_, torch.Tensor.bernoulli_,
})


class NoInitValues(TorchFunctionMode):
    """In-place initialisers fill zeros instead of drawing values (see the module docstring).

    The zeros are written with every torch-function mode disabled: a parameter ``zero.Init``
    has already partitioned holds no data here, so nothing is gathered to be initialised.
    Zeros rather than nothing: uninitialised memory may hold NaNs, and a non-finite gradient
    norm would make the engine skip the step the simulation measures.
    """

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if func in _INIT_METHODS or getattr(func, "__module__", "") == "torch.nn.init" and \
                getattr(func, "__name__", "").endswith("_"):
            tensor = args[0] if args else (kwargs or {})["tensor"]
            with torch._C.DisableTorchFunction(), torch.no_grad():
                tensor.zero_()
            return tensor
        return func(*args, **(kwargs or {}))


def _aten(*names: str) -> frozenset[Any]:
    ops = []
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.extend(getattr(packet, overload) for overload in packet.overloads())
    return frozenset(ops)


_HEAVY = _aten("mm", "addmm", "bmm", "baddbmm", "embedding", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_efficient_attention",
               "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_flash_attention_backward")


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


class ShapesOnlyCompute(TorchDispatchMode):
    """Matrix products and attention give zeros of the right layout without computing them."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in _HEAVY or "out" in kwargs:
            return func(*args, **kwargs)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        shaped = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))

        def real(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            return torch.zeros_strided(t.shape, t.stride(), dtype=t.dtype, device=device) \
                if hasattr(torch, "zeros_strided") else \
                torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).zero_()

        return tree_map(real, shaped)


class _FlashAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as the flash kernel (what a GPU runs), for meta tensors."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) == 3:
            q, k, v = args
            out = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False), scale=kwargs.get("scale"))
            return out[0]
        return func(*args, **kwargs)


def meta_saved_bytes(model_factory: Callable[[], nn.Module], *, batch: int, seq_len: int, vocab_size: int,
                     dtype: torch.dtype) -> int:
    """Bytes autograd saves for backward in one forward of ``batch × seq_len`` tokens (parameters
    excluded), measured on the meta device. The model's own activation-checkpointing setting is
    honoured: its checkpointed regions save only their inputs."""
    with torch.device("meta"), NoInitValues():
        model = model_factory()
    model = model.to(dtype)
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            seen.setdefault(storage._cdata, storage.nbytes())
        return t

    tokens = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    with _FlashAttention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, tokens)
    return sum(seen.values())


@contextlib.contextmanager
def shapes_only(enabled: bool = True) -> Iterator[None]:
    """``ShapesOnlyCompute`` with denormals flushed (garbage from unfilled buffers stays fast)."""
    if not enabled:
        yield
        return
    flushed = torch.set_flush_denormal(True)
    try:
        with ShapesOnlyCompute():
            yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)
