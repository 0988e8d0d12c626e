"""``Engine.save_checkpoint`` / ``Engine.load_checkpoint`` with DeepSpeed's signatures.

A mixin so that engine.py stays about the training step: ``class Engine(CheckpointMethods,
nn.Module)``. It uses the engine's ``optimizer`` (any ZeRO stage's ``PartitionedOptimizer``:
``layout``, ``params``, ``master_params``, ``optimizer`` (the inner torch optimizer),
``loss_scaler``, ``stage``, ``load_master_partition``), ``module``, ``lr_scheduler``,
``counters``, ``precision``, ``config``, ``comm``, ``global_steps`` and, when it has
``state_dict``, ``training_dataloader``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional

__all__ = ["CheckpointMethods"]


class CheckpointMethods:
    """Sharded checkpoints for the Engine (see engine/checkpoint/__init__.py for the format)."""

    def save_checkpoint(self, save_dir: str | Path, tag: Optional[str] = None,
                        client_state: Optional[Mapping[str, Any]] = None, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False, *, keep: Optional[int] = None,
                        async_save: Optional[bool] = None) -> bool:
        """Save to ``<save_dir>/<tag>`` (default tag ``step-<global_steps>``); every rank must call it.

        Each rank writes only its own shard; rank 0 writes the manifest last and then points
        ``<save_dir>/latest`` at the new tag. ``keep`` deletes all but the newest ``keep``
        checkpoints once the new one is complete. ``async_save`` (default: the ds_config's
        ``checkpoint.async_save``) returns as soon as the shard is copied to CPU memory.
        """
        from .save import save_checkpoint

        return save_checkpoint(self, save_dir, tag, client_state, save_latest, keep=keep, async_save=async_save,
                               exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str | Path, tag: Optional[str] = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Optional[Callable[..., Any]] = None, *,
                        fallback_to_previous: bool = False) -> tuple[Optional[str], Optional[dict[str, Any]]]:
        """Load ``<load_dir>/<tag>`` (default: the tag ``latest`` names); every rank must call it.

        The checkpoint may come from any world size and ZeRO stage 0-2: it is resharded onto
        this engine. Checksums are verified first; a corrupt or missing file is named in the
        error, and with ``fallback_to_previous=True`` the newest intact older checkpoint is
        loaded instead. Returns ``(path, client_state)``, or ``(None, None)`` if there is no
        ``latest``.
        """
        if custom_load_fn is not None:
            raise NotImplementedError("load_checkpoint(custom_load_fn=...) is not supported by orch's engine: "
                                      "checkpoints are resharded by the engine itself")
        from .load import load_checkpoint

        return load_checkpoint(self, load_dir, tag, load_module_strict, load_optimizer_states,
                               load_lr_scheduler_states, load_module_only, fallback_to_previous=fallback_to_previous)

    def wait_for_checkpoint(self) -> None:
        """Block until an asynchronous save has finished; raises if it failed."""
        from .manifest import CheckpointError
        from .save import async_writer

        error = async_writer(self).wait()
        if error:
            raise CheckpointError(f"asynchronous checkpoint save failed: {error}")
