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
  Outputs of ``UNWRITTEN_NUMEL`` elements or more are left unwritten: at the simulator's short
  sequences only the weights' gradients are that big (a 7B model's: 13 GB a step, whose zeroing
  was a third of ``orch check --simulate``), and they are only copied into the gradient buckets,
  whose reduce-scatter the fake group answers with zeros, so no value of theirs reaches anything
  measured (``simulate`` still refuses a step the engine skipped for non-finite gradients). Those
  copies are skipped too (the bucket keeps its zeros): reading 13 GB of untouched pages and
  writing them as fp32 was the other third.

``meta_saved_bytes`` measures the activation memory of one micro-batch at the job's full
sequence length on the meta device (no memory, no arithmetic): the bytes autograd saves for
backward, parameters excluded, with attention as a GPU runs it (flash attention saves the output
and its log-sum-exp, never the ``T × T`` matrix).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from .zero.stage3_hooks import tensors_in

__all__ = ["NoInitValues", "ShapesOnlyCompute", "meta_saved_bytes"]

_INIT_METHODS = frozenset({
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_,
    torch.Tensor.random_, torch.Tensor.exponential_, torch.Tensor.bernoulli_,
})


class NoInitValues(TorchFunctionMode):
    """In-place initialisers leave zeros instead of drawing values (see the module docstring).

    Zeros rather than nothing: uninitialised memory may hold NaNs, and a non-finite gradient
    norm would make the engine skip the step the simulation measures. A big tensor's zeros are
    written lazily, only when something reads it: under ``engine.zero.Init`` a parameter is
    partitioned as soon as its module is built, and copying this rank's ``1/N`` piece out of a
    tensor whose values were never drawn just zeroes the piece, so the whole parameter (25 GB of
    fp32 for a 7B model) is never written, nor its pages touched. Views and aliases of such a
    tensor pass through; any other read fills it first; leaving the context fills what is left.
    The zeros are written with every torch-function mode disabled: a parameter ``zero.Init``
    has already partitioned holds no data here, so nothing is gathered to be initialised.
    """

    def __init__(self) -> None:
        super().__init__()
        self._unfilled: dict[int, tuple[weakref.ref, int]] = {}   # storage address -> (tensor, address)

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _INIT_METHODS or getattr(func, "__module__", "") == "torch.nn.init" and \
                getattr(func, "__name__", "").endswith("_"):
            tensor = args[0] if args else kwargs["tensor"]
            self._leave_unfilled(tensor)
            return tensor
        if not self._unfilled:
            return func(*args, **kwargs)
        unfilled = [t for t in tensors_in((args, kwargs)) if self._is_unfilled(t)]
        if not unfilled:
            return func(*args, **kwargs)
        if _name(func) in _ALIASING:
            out = func(*args, **kwargs)
            addresses = {_address(t) for t in unfilled}
            if all(_address(t) in addresses for t in tensors_in(out)):
                return out      # metadata, a view or the tensor itself: no value was read
        if func is torch.Tensor.copy_ and len(args) >= 2 and not self._is_unfilled(args[0]) and \
                self._is_unfilled(args[1]):
            with torch._C.DisableTorchFunction(), torch.no_grad():
                return args[0].zero_()    # copying zeros that were never written
        for t in unfilled:
            self._fill(t)
        return func(*args, **kwargs)

    def __exit__(self, *exc: Any) -> Any:
        for key in list(self._unfilled):
            tensor = self._live(key)
            if tensor is not None:
                self._fill(tensor)
        return super().__exit__(*exc)

    def _leave_unfilled(self, tensor: torch.Tensor) -> None:
        with torch._C.DisableTorchFunction():
            key = _address(tensor)
            if tensor.numel() < _LAZY_NUMEL or tensor.is_meta or key == 0 or tensor.untyped_storage().nbytes() \
                    != tensor.numel() * tensor.element_size():
                with torch.no_grad():
                    tensor.zero_()
                return
        self._unfilled[key] = (weakref.ref(tensor), key)

    def _live(self, key: int) -> Optional[torch.Tensor]:
        """The recorded tensor at storage address ``key``, if it still owns that storage."""
        ref, address = self._unfilled[key]
        tensor = ref()
        if tensor is None or _address(tensor) != address:
            del self._unfilled[key]
            return None
        return tensor

    def _is_unfilled(self, t: torch.Tensor) -> bool:
        key = _address(t)
        return key in self._unfilled and self._live(key) is not None

    def _fill(self, t: torch.Tensor) -> None:
        key = _address(t)
        if key in self._unfilled:
            tensor = self._live(key)
            self._unfilled.pop(key, None)
            if tensor is not None:
                with torch._C.DisableTorchFunction(), torch.no_grad():
                    tensor.zero_()


_LAZY_NUMEL = 1 << 16     # smaller tensors are zeroed at once
# Calls that read no values when they answer metadata or return views of their argument (``to`` and
# ``contiguous`` when nothing changes); whatever they return is checked to be one of these. ``broadcast``
# (``zero.Init`` agreeing on rank 0's values) is among them: every rank's tensor is zeros never written alike.
_ALIASING = frozenset({"broadcast", "to", "contiguous", "cpu", 
    "__get__", "data", "shape", "dtype", "device", "requires_grad", "is_leaf", "grad", "layout", "ndim", "T",
    "size", "dim", "numel", "nelement", "stride", "storage_offset", "is_contiguous", "element_size",
    "is_floating_point", "is_complex", "is_meta", "is_cuda", "get_device", "data_ptr", "untyped_storage",
    "__hash__", "__len__", "_has_compatible_shallow_copy_type", "requires_grad_", "detach", "view", "view_as",
    "reshape", "reshape_as", "flatten", "narrow", "__getitem__", "t", "transpose", "permute", "unsqueeze",
    "squeeze", "expand", "expand_as", "as_strided", "split", "chunk", "unbind", "__setstate__", "register_hook",
    "_is_view", "__reduce_ex__", "_version", "grad_fn", "_base", "name", "retain_grad", "is_sparse",
    "is_quantized", "is_nested", "__class__", "__dict__",
})


def _name(func: Any) -> str:
    owner = getattr(func, "__self__", None)
    if type(owner).__name__ == "getset_descriptor":
        return owner.__name__
    return getattr(func, "__name__", "")


def _address(t: torch.Tensor) -> int:
    with torch._C.DisableTorchFunction():
        return t.untyped_storage().data_ptr() if not t.is_meta else 0


def _aten(*names: str) -> frozenset[Any]:
    ops = []
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.extend(getattr(packet, overload) for overload in packet.overloads())
    return frozenset(ops)


_COPY = torch.ops.aten.copy_.default
UNWRITTEN_NUMEL = 1 << 22   # outputs this big stay unwritten (see the module docstring)
_HEAVY = _aten("mm", "addmm", "bmm", "baddbmm", "embedding", "embedding_dense_backward", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_efficient_attention",
               "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_flash_attention_backward")


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


class ShapesOnlyCompute(TorchDispatchMode):
    """Matrix products and attention give zeros of the right layout without computing them; the
    big outputs left unwritten are not copied either (a copy from one leaves its destination as it was)."""

    def __init__(self) -> None:
        super().__init__()
        self._unwritten: dict[int, StorageWeakRef] = {}   # storages of big outputs left unwritten

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _COPY and self._is_unwritten(args[1]):
            return args[0]      # its values would be garbage; the destination's old ones are as good
        if func not in _HEAVY or "out" in kwargs:
            return func(*args, **kwargs)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        shaped = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))

        def real(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            if out.numel() < UNWRITTEN_NUMEL:
                return out.zero_()
            storage = out.untyped_storage()
            self._unwritten[storage._cdata] = StorageWeakRef(storage)
            return out

        return tree_map(real, shaped)

    def _is_unwritten(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return False
        storage = t.untyped_storage()
        ref = self._unwritten.get(storage._cdata)
        if ref is None:
            return False
        if ref.expired():       # freed; another storage now lives at that address
            del self._unwritten[storage._cdata]
            return False
        return True


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
