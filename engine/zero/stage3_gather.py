"""``GatheredParameters`` and ``register_external_parameter``: DeepSpeed's ways to reach whole ZeRO-3 weights.

``GatheredParameters(params, modifier_rank=None)`` makes the given parameters whole for a block of
code, whether they were partitioned by ``engine.zero.Init`` (before ``initialize``) or are held by a
stage-3 engine (after); parameters of neither kind are left alone, as in DeepSpeed. With
``modifier_rank`` the values that rank leaves behind are broadcast and written back into every
rank's partition (and, after ``initialize``, into the fp32 master weights too).

``register_external_parameter(module, param)`` tells stage 3 that ``module``'s forward uses a
parameter another module owns (a tied head written as ``F.linear(h, self.emb.weight)``), so the
parameter is gathered for ``module`` as well.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..comm import Comm
from .stage3_shards import full_from_shards, is_partitioned_at_init, keep_piece

__all__ = ["GatheredParameters", "register_external_parameter"]


class GatheredParameters:
    """Gather ``params`` (a parameter or an iterable) for a block; with ``modifier_rank`` keep that
    rank's changes. Works on ``Init``-partitioned parameters and on a stage-3 engine's parameters;
    for anything else it does nothing, as DeepSpeed's does."""

    def __init__(self, params: Any, modifier_rank: Optional[int] = None, fwd_module: Any = None,
                 enabled: bool = True) -> None:
        self.params = [params] if isinstance(params, torch.Tensor) else list(params or [])
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        self._init_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._engine_ctx: list[Any] = []

    def __enter__(self) -> "GatheredParameters":
        if not self.enabled:
            return self
        comm = Comm()
        owners: dict[int, tuple[Any, list[int]]] = {}
        for p in self.params:
            if is_partitioned_at_init(p):
                with torch.no_grad():
                    whole = full_from_shards(p, comm)
                self._init_parts.append((p, p.data))
                p.data = whole
            elif _owner(p) is not None:
                opt, index = _owner(p)
                owners.setdefault(id(opt), (opt, []))[1].append(index)
        for opt, indices in owners.values():
            ctx = opt.gathered(indices)
            ctx.__enter__()
            self._engine_ctx.append((opt, indices, ctx))
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        comm = Comm()
        for p, empty in self._init_parts:
            if self.modifier_rank is not None:
                keep_piece(p, p.data, comm, src=self.modifier_rank)
            p.data = empty
        self._init_parts.clear()
        for opt, indices, ctx in self._engine_ctx:
            if self.modifier_rank is not None:
                opt.write_back(indices, self.modifier_rank)
            ctx.__exit__(*exc)
        self._engine_ctx.clear()


def register_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """``module``'s forward uses ``parameter`` although another module owns it (DeepSpeed's API).

    Call it before ``engine.initialize`` or after: stage 3 then gathers ``parameter`` for ``module``.
    """
    module.__dict__.setdefault("_zero3_external_params", []).append(parameter)
    owner = _owner(parameter)
    if owner is not None:
        owner[0].coordinator.add_external(module, [parameter])


def _owner(p: torch.Tensor) -> Optional[tuple[Any, int]]:
    """The stage-3 optimizer managing ``p`` and its index there, if any."""
    found = getattr(p, "__dict__", {}).get("_zero3_owner")
    if found is None:
        return None
    ref, index = found
    opt = ref()
    return None if opt is None else (opt, index)


