"""Which implementation runs a fused optimizer step or a gradient norm.

Three implementations exist:

- ``triton``: our Triton kernels. On a CUDA machine they compile for the GPU; on a machine
  without CUDA (or with ``TRITON_INTERPRET=1``) they run in Triton's CPU interpreter, which is
  how CI checks them.
- ``torch-fused``: torch's own fused CPU AdamW (``torch._fused_adamw_``), the fast path for
  optimizer state offloaded to the CPU.
- ``torch``: plain torch ``_foreach`` ops, the debugging fallback selectable from the config.

This module imports neither triton nor the kernels, so ``import engine.ops`` works (and says
why) on machines without triton.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Literal

import torch

Impl = Literal["auto", "triton", "torch"]
Resolved = Literal["triton", "torch-fused", "torch"]
IMPLS: tuple[str, ...] = ("auto", "triton", "torch")


@dataclass(frozen=True)
class TritonStatus:
    """Whether triton can be imported here, and if not, why."""

    available: bool
    version: str | None
    reason: str


@functools.cache
def triton_status() -> TritonStatus:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return TritonStatus(False, None, f"triton is not importable ({type(exc).__name__}: {exc})")
    return TritonStatus(True, getattr(triton, "__version__", "unknown"), "ok")


def interpreter_mode() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter rather than compiled for a GPU.

    That is the case when ``TRITON_INTERPRET=1`` is set, or when this machine has no CUDA
    device (compiled kernels could not run anyway, and the interpreter lets CPU tensors
    exercise exactly the kernel code the GPU runs). ``ORCH_OPS_NO_INTERPRETER=1`` builds them
    for the GPU even without one, for ahead-of-time compile checks.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    if os.environ.get("ORCH_OPS_NO_INTERPRETER", "0") not in ("", "0"):
        return False
    return not torch.cuda.is_available()


def check_impl(impl: str, owner: str) -> None:
    """Reject an unknown ``impl`` with a message naming the valid choices."""
    if impl not in IMPLS:
        raise ValueError(f"{owner}: impl={impl!r} is not one of {', '.join(map(repr, IMPLS))}")


def resolve(impl: str, device: torch.device, *, torch_fused_ok: bool = False, owner: str = "engine.ops") -> Resolved:
    """Pick the implementation for tensors on ``device``.

    ``torch_fused_ok`` says whether torch has a fused CPU kernel for this optimizer and these
    options (AdamW with bias correction does; Lion does not).
    """
    check_impl(impl, owner)
    if impl == "torch":
        return "torch"
    if impl == "triton":
        _require_triton(device, owner)
        return "triton"
    # auto
    if device.type == "cpu":
        return "torch-fused" if torch_fused_ok else "torch"
    if device.type == "cuda" and triton_status().available:
        return "triton"
    return "torch"


def _require_triton(device: torch.device, owner: str) -> None:
    status = triton_status()
    if not status.available:
        raise RuntimeError(
            f"{owner}: impl='triton' needs triton, but {status.reason}. "
            "Install it (pip install 'orch[triton]') or use impl='auto' or impl='torch'."
        )
    if device.type == "cpu" and not interpreter_mode():
        raise RuntimeError(
            f"{owner}: impl='triton' got CPU tensors, but on this machine Triton compiles for CUDA. "
            "Move the parameters to the GPU, use impl='auto' (torch's fused CPU kernels), "
            "or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter."
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{owner}: impl='triton' supports CUDA (or CPU under the interpreter) tensors, got {device.type}")
