"""``engine.checkpointing``: activation checkpointing as DeepSpeed scripts call it.

Scripts written for DeepSpeed call ``deepspeed.checkpointing.checkpoint(fn, *args)`` inside
their model and tune it with the ds_config's ``activation_checkpointing`` section (or
``deepspeed.checkpointing.configure(...)``). Here the same calls wrap
``torch.utils.checkpoint`` in its non-reentrant form: it supports keyword arguments and
inputs that do not require grad, and it lets each parameter's gradient finish exactly once
per backward, which ZeRO-2's gradient hooks rely on.

Settings, with what they do here:

* ``cpu_checkpointing``: the tensors kept for recomputation are moved to CPU memory
  (``torch.autograd.graph.save_on_cpu``), trading transfer time for device memory.
* ``synchronize_checkpoint_boundary``: ``torch.cuda.synchronize()`` around each call (debugging).
* ``partition_activations``, ``contiguous_memory_optimization``, ``number_checkpoints``,
  ``profile``: accepted for compatibility. They tune DeepSpeed's buffers for model
  parallelism, which orch's engine does not have, so they change nothing.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
import torch.utils.checkpoint as torch_checkpoint

from .config.sections import ActivationCheckpointingConfig

__all__ = ["checkpoint", "configure", "is_configured", "non_reentrant_checkpoint", "reset", "settings"]


# The settings in effect: the ds_config's ``activation_checkpointing`` section (DeepSpeed's names).
_settings = ActivationCheckpointingConfig()
_configured = False


def settings() -> ActivationCheckpointingConfig:
    """The settings in effect (a copy)."""
    return _settings.model_copy()


def configure(mpu_: Any = None, deepspeed_config: Any = None, partition_activations: Optional[bool] = None,
              contiguous_checkpointing: Optional[bool] = None, num_checkpoints: Optional[int] = None,
              checkpoint_in_cpu: Optional[bool] = None, synchronize: Optional[bool] = None,
              profile: Optional[bool] = None) -> None:
    """Set the checkpointing options, as ``deepspeed.checkpointing.configure`` does.

    ``deepspeed_config`` may be a ds_config path or dict, or a loaded ``EngineConfig``; its
    ``activation_checkpointing`` section is read first, then explicit arguments override it.
    ``mpu_`` (Megatron's model-parallel unit) is accepted and unused.
    """
    global _settings, _configured
    if deepspeed_config is not None:
        _settings = _section(deepspeed_config)
    overrides = {"partition_activations": partition_activations,
                 "contiguous_memory_optimization": contiguous_checkpointing,
                 "number_checkpoints": num_checkpoints, "cpu_checkpointing": checkpoint_in_cpu,
                 "synchronize_checkpoint_boundary": synchronize, "profile": profile}
    _settings = _settings.model_copy(update={name: value for name, value in overrides.items() if value is not None})
    _configured = True


def _section(config: Any) -> ActivationCheckpointingConfig:
    from .config import EngineConfig, load_config

    cfg = config if isinstance(config, EngineConfig) else load_config(config)
    return cfg.activation_checkpointing


def is_configured() -> bool:
    """True once ``configure`` ran (``engine.initialize`` runs it with the ds_config)."""
    return _configured


def reset() -> None:
    """Back to defaults (DeepSpeed's ``reset`` clears its buffers; here, the settings)."""
    global _settings, _configured
    _settings = ActivationCheckpointingConfig()
    _configured = False


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``, keeping only its inputs and recomputing it in backward."""
    sync = _settings.synchronize_checkpoint_boundary and torch.cuda.is_available()
    if sync:
        torch.cuda.synchronize()
    if _settings.cpu_checkpointing:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            out = torch_checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
    else:
        out = torch_checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
    if sync:
        torch.cuda.synchronize()
    return out


non_reentrant_checkpoint = checkpoint  # DeepSpeed's explicit name for the same thing

# ``engine.checkpointing`` is this module (engine/__init__.py maps the attribute lazily); also
# answer ``importlib.import_module("engine.checkpointing")`` once this module is loaded.
sys.modules.setdefault("engine.checkpointing", sys.modules[__name__])
