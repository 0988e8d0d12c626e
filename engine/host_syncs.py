"""Count the places where the host waits for the device: the check behind "no per-step host syncs".

At hundreds of GPUs a training step must let the CPU run ahead of the GPU: every ``.item()``,
``float(tensor)``, ``bool(tensor)``, ``.tolist()`` or ``.cpu()`` of a device tensor stops the
launch queue until the device has caught up, and with NCCL that also waits for the slowest rank.
``count_host_syncs()`` lets a test (or a user's own script) assert how many such waits a piece of
code makes::

    from engine.host_syncs import count_host_syncs

    with count_host_syncs() as syncs:
        engine.backward(engine(x, y)); engine.step()
    assert syncs.count <= 1, syncs.report()

Two ways of counting, chosen by where the code runs:

* ``"cuda"``: torch's own detector (``torch.cuda.set_sync_debug_mode("warn")``) sees every
  synchronising CUDA call, including those made inside torch's C++ code (``nonzero``, masked
  indexing, pageable copies);
* ``"python"`` (CPU runs, where nothing ever waits): a ``TorchFunctionMode`` counts the Python-level
  conversions that *would* synchronise on a GPU (``HOST_CONVERSIONS``), whatever device the tensor
  is on. It cannot see syncs hidden in C++ kernels, and it also counts conversions of tensors
  that stay on the host on a GPU too (an optimizer's CPU ``step`` counter, say): each site is
  kept with its caller, so ``report()`` shows what was counted and a test can state what it allows.
"""
from __future__ import annotations

import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HOST_CONVERSIONS", "HostSyncs", "count_host_syncs"]

# Tensor -> Python conversions: each waits for the device when the tensor lives there.
HOST_CONVERSIONS = frozenset({
    "item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
    "equal", "allclose", "is_nonzero",
})
_CUDA_SYNC_WARNING = "synchroniz"      # torch's message: "called a synchronizing CUDA operation"


@dataclass
class HostSyncs:
    """What ``count_host_syncs`` saw: how many syncs, and where each came from."""

    mode: str
    sites: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.sites)

    def report(self) -> str:
        head = f"{self.count} host sync(s) ({self.mode} counting)"
        return head + "".join(f"\n  {i + 1}. {site}" for i, site in enumerate(self.sites))


class _ConversionCounter(TorchFunctionMode):
    """Records each host conversion with the first caller outside torch and this module."""

    def __init__(self, syncs: HostSyncs) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_CONVERSIONS or (name == "to" and _to_host(args, kwargs or {})):
            self.syncs.sites.append(f"Tensor.{name} at {_caller()}")
        return func(*args, **(kwargs or {}))


def _to_host(args: tuple, kwargs: dict[str, Any]) -> bool:
    """``tensor.to("cpu")``: code that names the host. (A ``.to(device)`` whose variable is the CPU
    on a CPU run is a device-side move on a GPU run, so it is not counted.)"""
    return any(t == "cpu" for t in (*args[1:], kwargs.get("device")) if isinstance(t, str))


def _caller() -> str:
    for frame in reversed(traceback.extract_stack(limit=40)[:-1]):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith("engine/host_syncs.py"):
            return f"{path}:{frame.lineno} ({frame.name})"
    return "torch internals"


@contextmanager
def count_host_syncs(mode: Optional[str] = None) -> Iterator[HostSyncs]:
    """Count host syncs inside the block; ``mode`` is ``"cuda"`` or ``"python"`` (default: cuda
    when CUDA is initialised in this process, else python). Not thread-safe: count one thread's
    work at a time (background threads' conversions are counted too in python mode)."""
    if mode is None:
        mode = "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "python"
    if mode not in ("cuda", "python"):
        raise ValueError(f"count_host_syncs mode must be 'cuda' or 'python', got {mode!r}")
    syncs = HostSyncs(mode)
    if mode == "python":
        with _ConversionCounter(syncs):
            yield syncs
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        if _CUDA_SYNC_WARNING in str(w.message):
            syncs.sites.append(f"{str(w.message).splitlines()[0]} at {w.filename}:{w.lineno}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)   # not ours: pass on
