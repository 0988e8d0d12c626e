"""Compressed-communication optimizers (DeepSpeed's ``OneBitAdam``): after a warm-up of plain
Adam steps the variance is frozen and the ranks exchange the momentum as 1-bit signs with one
scale per chunk and error feedback, instead of all-reducing the gradients.

The ZeRO engine (stage 0, as DeepSpeed) asks the optimizer through ``averages_itself`` whether
the next step's gradients are to be left local, and hands it the data-parallel ``Comm`` with
``attach_comm``.
"""
from __future__ import annotations

from .adam import OnebitAdam
from .allreduce import CompressedAllReduce

__all__ = ["CompressedAllReduce", "OnebitAdam"]
