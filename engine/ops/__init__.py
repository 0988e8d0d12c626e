"""Fused optimizer kernels (Triton) and their dispatch.

- ``FusedAdamW``, ``FusedLion``, ``FusedSGD``: torch.optim.Optimizer subclasses whose step is
  one pass over memory (unscale, clip, update, low-precision copy-out); ``FusedLamb``: two
  passes (moments and per-parameter norms, then the trust-ratio update), one launch each.
- ``grad_norm_and_overflow``: the global norm and inf/nan check in one reduction.
- ``kernel_report``: what ``orch doctor`` prints about the kernels on this machine.

Importing this package never needs triton; without it every path uses torch, and
``kernel_report()`` says why.
"""
from __future__ import annotations

from .dispatch import IMPLS, interpreter_mode, triton_status
from .fused_lamb import FusedLamb
from .fused_optimizers import FusedAdamW, FusedLion, FusedSGD
from .grad_norm import grad_norm_and_overflow
from .report import kernel_report

__all__ = [
    "IMPLS",
    "FusedAdamW",
    "FusedLamb",
    "FusedLion",
    "FusedSGD",
    "grad_norm_and_overflow",
    "interpreter_mode",
    "kernel_report",
    "triton_status",
]
