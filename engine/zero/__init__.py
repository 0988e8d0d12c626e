"""ZeRO: partitioned training states (stages 0-3), CPU offload, and ``engine.zero.Init``.

``engine.zero.Init``, ``GatheredParameters`` and ``register_external_parameter`` are DeepSpeed's
``deepspeed.zero`` names (stage3_init.py); the optimizers live in stage12.py and stage3.py.
"""
from __future__ import annotations

from .stage3_init import GatheredParameters, Init, register_external_parameter

__all__ = ["GatheredParameters", "Init", "register_external_parameter"]
