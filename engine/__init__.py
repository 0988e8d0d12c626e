"""orch's training engine: a DeepSpeed-compatible ZeRO trainer in pure PyTorch.

Use it as you would DeepSpeed::

    import engine
    model_engine, optimizer, dataloader, lr_scheduler = engine.initialize(
        model=model, model_parameters=model.parameters(), config="ds_config.json")

Attributes are resolved lazily (PEP 562) so that light users, such as ``orch check``
importing ``engine.config``, never pay for importing torch.

Layout: the top of ``engine/`` is the DeepSpeed-compatible library (api.py: ``initialize``;
engine.py: the ``Engine``; comm.py, precision.py, schedulers.py, optimizers.py,
activation_checkpointing.py; zero/, ops/, checkpoint/, io/, monitor/, onebit/, models/).
config/ is the ds_config model (never imports torch). trainer/ is the bundled trainer that
``python -m engine.train`` (train.py) runs; the library never imports it. Three small
standard-library modules are shared by all: errors.py (``UserError``, the root of every mistake
a user can fix, and the one "did you mean"), log.py (the ``engine`` logger, rank 0 by default)
and run_contract.py (what orch and the trainer agree on: ``ORCH_*`` names, ``RunPaths``).
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> "module:attribute"
_LAZY: dict[str, str] = {
    "load_config": "engine.config:load_config",
    "EngineConfig": "engine.config:EngineConfig",
    "ConfigError": "engine.config:ConfigError",
    "FusedAdamW": "engine.ops:FusedAdamW",
    "FusedLion": "engine.ops:FusedLion",
    "FusedSGD": "engine.ops:FusedSGD",
    "grad_norm_and_overflow": "engine.ops:grad_norm_and_overflow",
    "kernel_report": "engine.ops:kernel_report",
    "ConfigProblem": "engine.config:ConfigProblem",
    "UserError": "engine.errors:UserError",
    "BatchSizes": "engine.config:BatchSizes",
    "initialize": "engine.api:initialize",
    "init_distributed": "engine.comm:init_distributed",
    "add_config_arguments": "engine.api:add_config_arguments",
    "Engine": "engine.engine:Engine",
    "checkpointing": "engine.activation_checkpointing",
    "zero": "engine.zero",
    "CheckpointError": "engine.checkpoint.manifest:CheckpointError",
    "consolidate_checkpoint": "engine.checkpoint.consolidate:consolidate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module_name), attr) if attr else importlib.import_module(module_name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
