"""Model zoo of the bundled trainer: GPT presets by name.

``preset_num_parameters`` and ``PRESETS`` come from the torch-free ``presets`` module, so
``orch check`` can size a job without importing torch; ``build_model`` imports torch on use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.models.presets import PRESETS, GPTConfig, UnknownPreset, get_preset, preset_num_parameters

if TYPE_CHECKING:
    import torch

    from engine.models.gpt import GPT

__all__ = [
    "PRESETS", "GPTConfig", "UnknownPreset", "build_model", "get_preset", "preset_num_parameters",
]


def build_model(
    name: str, *, seed: int = 1234, device: torch.device | str | None = None, **overrides: object
) -> GPT:
    """Build preset ``name`` (fields replaced by ``overrides``) with weights drawn from ``seed``.

    ``device`` builds the parameters there directly (a 3B model never lands in host memory).
    """
    import torch

    from engine.models.gpt import GPT

    cfg = get_preset(name, **overrides)
    with torch.device(device if device is not None else "cpu"):
        return GPT(cfg, seed=seed)
