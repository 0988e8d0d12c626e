"""The plain model's state_dict names for the engine's flat parameters, its tied names and its extras.

Checkpoints name tensors as the user's own model would (``blocks.0.attn.qkv.weight``), never with
the prefixes a wrapper adds (``module.`` for DDP, ``_orig_mod.`` for ``torch.compile``): that is
what lets a consolidated file load into the plain model with ``strict=True`` and a checkpoint
be matched by name when it is resharded. Parameters are identified by object identity, so a
tied weight (one Parameter under two names) is stored once and the second name is an alias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

__all__ = ["ModelNames", "model_names", "unwrap"]


def unwrap(module: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
            continue
        return module


@dataclass
class ModelNames:
    """``params[i]``: the name of the engine's i-th flat parameter; ``aliases``: other name -> that name;
    ``extras``: ``(name, tensor)`` of buffers and parameters the optimizer does not manage;
    ``keys``: every state_dict key in order."""

    params: list[str]
    aliases: dict[str, str]
    extras: list[tuple[str, torch.Tensor]]
    keys: list[str]


def model_names(module: nn.Module, managed: Sequence[torch.Tensor], fallback: Sequence[str]) -> ModelNames:
    """Name the ``managed`` parameters (layout order) after ``module``'s state_dict keys."""
    index = {id(p): i for i, p in enumerate(managed)}
    names: list[str | None] = [None] * len(managed)
    aliases: dict[str, str] = {}
    extras: list[tuple[str, torch.Tensor]] = []
    extra_first: dict[int, str] = {}
    state = unwrap(module).state_dict(keep_vars=True)
    for key, value in state.items():
        i = index.get(id(value))
        if i is not None:
            if names[i] is None:
                names[i] = key
            else:
                aliases[key] = names[i]
        elif id(value) in extra_first:
            aliases[key] = extra_first[id(value)]
        elif torch.is_tensor(value):
            extra_first[id(value)] = key
            extras.append((key, value))
    resolved = [n if n is not None else fallback[i] for i, n in enumerate(names)]
    return ModelNames(resolved, aliases, extras, list(state))
