"""ZeRO: partitioned training states (stages 0-3), CPU offload, and ``engine.zero.Init``.

``engine.zero.Init``, ``GatheredParameters`` and ``register_external_parameter`` are DeepSpeed's
``deepspeed.zero`` names (stage3_init.py, stage3_gather.py); the optimizers live in stage12.py
and stage3.py.
"""
from __future__ import annotations

from .stage3_gather import GatheredParameters, register_external_parameter
from .stage3_init import Init

__all__ = ["GatheredParameters", "Init", "register_external_parameter"]
