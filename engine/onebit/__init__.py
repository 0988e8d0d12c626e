"""Compressed-communication optimizers (DeepSpeed's ``OneBitAdam``, ``ZeroOneAdam`` and
``OneBitLamb``): instead of all-reducing the gradients every step, the ranks exchange the
momentum (or the gradient, or accumulated updates) as 1-bit signs with one scale per chunk and
error feedback, after a warm-up that runs the uncompressed optimizer.

The ZeRO engine (stage 0, as DeepSpeed) asks the optimizer through ``averages_itself`` whether
the next step's gradients are to be left local, and hands it the data-parallel ``Comm`` with
``attach_comm`` (see base.py).
"""
from __future__ import annotations

from .adam import OnebitAdam
from .allreduce import CompressedAllReduce
from .base import CompressedOptimizer
from .lamb import OnebitLamb
from .zoadam import ZeroOneAdam

# OptimizerConfig.resolved_kind() -> implementation
COMPRESSED_OPTIMIZERS: dict[str, type[CompressedOptimizer]] = {
    "onebitadam": OnebitAdam, "zerooneadam": ZeroOneAdam, "onebitlamb": OnebitLamb,
}

__all__ = ["COMPRESSED_OPTIMIZERS", "CompressedAllReduce", "CompressedOptimizer", "OnebitAdam", "OnebitLamb",
           "ZeroOneAdam"]
