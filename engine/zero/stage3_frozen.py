"""Stage 3's frozen parameters: which are partitioned, and how checkpoints read and write them.

A user fine-tuning a large frozen model with small adapters (LoRA) must get stage 3's memory
saving on the frozen part too, as DeepSpeed gives it: every ``requires_grad=False`` parameter is
partitioned like a trainable one (its share in the tail of the store's partition, see
stage3.py), gathered for its module's forward and backward and released after.

Checkpoints keep the format every stage writes: frozen parameters are whole tensors among rank
0's "extras". Saving gathers them one fetch unit at a time (``FrozenShares.gather``, a
collective every rank joins in the same order) for rank 0 to write; loading reads only the byte
ranges of this rank's share (``owned``) and writes them into the partition (``load``), so no rank
ever holds the whole frozen model on the device.

Parameters neither trainable-in-the-optimizer nor partitionable here (``requires_grad=True`` but
left out of every parameter group, integer parameters, a dtype other than the model's) stay whole
on every rank as before; ``materialize_leftovers`` makes those that ``engine.zero.Init`` built
partitioned whole again.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..comm import Comm
from .stage3_params import PartitionedParams, Run, UnitState
from .stage3_shards import full_from_shards, is_partitioned_at_init, release_init_shard, shard_of, unique_params

__all__ = ["FrozenShares", "frozen_params", "materialize_leftovers"]


def frozen_params(module: nn.Module, managed: set[int], model_dtype: torch.dtype) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every frozen parameter stage 3 partitions, in ``named_parameters`` order:
    ``requires_grad=False``, not empty, floating point and in the model dtype (``Init`` pieces of
    any floating dtype are cast to it, as their trainable neighbours are)."""
    out = []
    for name, p in module.named_parameters():
        if id(p) in managed or p.requires_grad:
            continue
        if is_partitioned_at_init(p):
            info = shard_of(p)
            if info.numel and info.dtype.is_floating_point:
                out.append((name, p))
        elif p.numel() and p.dtype == model_dtype:
            out.append((name, p))
    return out


def materialize_leftovers(module: nn.Module, partitioned: set[int], comm: Comm, dtype: torch.dtype,
                          device: torch.device) -> None:
    """Parameters built partitioned by ``engine.zero.Init`` that stage 3 does not hold are made whole."""
    for p in unique_params(module):
        if id(p) not in partitioned and is_partitioned_at_init(p):
            full = full_from_shards(p, comm)
            release_init_shard(p)
            p.data = full.to(device=device, dtype=dtype if p.is_floating_point() else p.dtype)


class FrozenShares:
    """The checkpoint code's access to the frozen parameters in ``store`` (``store.params[store.trainable:]``)."""

    def __init__(self, store: PartitionedParams, comm: Comm) -> None:
        self.store, self.comm = store, comm

    @property
    def params(self) -> list[nn.Parameter]:
        return self.store.params[self.store.trainable:]

    @torch.no_grad()
    def gather(self, rank0_only: bool = True) -> dict[int, torch.Tensor]:
        """``id(parameter) -> full value`` on the host, gathered one unit at a time.

        Collective: every rank calls it. With ``rank0_only`` other ranks get an empty dict (and
        keep nothing), so at most one unit is ever gathered on the device.
        """
        keep = not rank0_only or self.comm.rank == 0
        out: dict[int, torch.Tensor] = {}
        for unit in self.store.units:
            if not unit.frozen:
                continue
            opened = unit.state is UnitState.RELEASED
            self.store.fetch(unit)
            if keep:
                for i in unit.params:
                    out[id(self.store.params[i])] = self.store.params[i].detach().to("cpu", copy=True)
            if opened:
                self.store.release(unit)
        return out

    def owned(self) -> dict[int, list[Run]]:
        """``id(parameter) -> [(offset in store.partition, offset in the parameter, length)]``: the
        elements of each frozen parameter this rank keeps (empty list: none)."""
        store = self.store
        return {id(store.params[i]): store.param_runs(i, store.rank) for i in range(store.trainable, len(store.params))}

    @torch.no_grad()
    def load(self, pieces: Mapping[int, Sequence[tuple[int, torch.Tensor]]]) -> None:
        """Write loaded values ``id(parameter) -> [(offset in store.partition, flat values)]`` into the
        partition. Collective (every rank calls it, with or without pieces): the persistent frozen
        units are gathered again from the new partition."""
        for unit in self.store.units:
            if unit.frozen and not unit.persistent:
                self.store.release(unit)
        for runs in pieces.values():
            for local, value in runs:
                self.store.store_range(local, value)
        self.store.refresh_persistent(frozen=True)
