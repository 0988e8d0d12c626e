"""Parameters partitioned by ``engine.zero.Init``: each rank's equal piece, and how to get the whole back.

Before ``engine.initialize`` there is no ``FlatLayout`` yet (the optimizer's parameter groups are
not known), so ``Init`` cuts every parameter on its own into ``world_size`` equal, zero-padded
pieces (DeepSpeed's ``ds_tensor``). The piece lives in the parameter's ``__dict__``; the
parameter's data is an empty tensor and it carries DeepSpeed's ``ds_shape``/``ds_numel`` so that
code can still size it. Stage 3 later gathers each parameter from these pieces (one at a time)
and cuts its own layout's partitions out of it; stages 0-2 ``materialize`` the whole model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from torch import nn

from ..comm import Comm

if TYPE_CHECKING:
    from .stage3_init_swap import InitSwap

__all__ = ["InitShard", "InitStats", "full_from_shards", "full_shape_view", "is_partitioned_at_init",
           "keep_piece", "mark_partitioned", "materialize", "partition_param", "release_init_shard", "shard_of"]

_ATTR = "_zero3_init"


class InitShard:
    """What ``Init`` keeps of a parameter: its shape and this rank's equal piece (zero-padded).

    The piece is a tensor (host or device memory), or with ``remote_device="nvme"`` a slot of the
    rank's ``InitSwap`` file: then ``piece`` reads it back and assigning ``piece`` writes it, so
    the code that uses pieces does not care where they are."""

    def __init__(self, shape: torch.Size, numel: int, piece: torch.Tensor, world: int, rank: int,
                 swap: Optional["InitSwap"] = None) -> None:
        self.shape, self.numel, self.world, self.rank, self.swap = shape, numel, world, rank, swap
        self._piece: Optional[torch.Tensor] = piece if swap is None else None
        self._slot = swap.append(piece) if swap is not None else None

    @property
    def piece(self) -> torch.Tensor:
        if self.swap is None:
            return self._piece
        return self.swap.read(self._slot)

    @piece.setter
    def piece(self, value: torch.Tensor) -> None:
        if self.swap is None:
            self._piece = value
        else:
            self._slot = self.swap.write(self._slot, value)

    @property
    def dtype(self) -> torch.dtype:
        """The piece's dtype (without reading it back from the drive)."""
        return self._piece.dtype if self._slot is None else self._slot.dtype

    def release(self) -> None:
        """``initialize`` took the piece over: its slot (and with the last, the file) can go."""
        if self.swap is not None and self._slot is not None:
            self.swap.release(self._slot)
            self._slot = None


@dataclass
class InitStats:
    """What ``Init`` allocated: the largest parameter ever whole, and the pieces kept."""

    largest_whole_bytes: int = 0
    kept_bytes: int = 0
    partitioned: int = 0

    def note(self, whole: int, kept: int) -> None:
        self.saw_whole(whole)
        self.kept_bytes += kept
        self.partitioned += 1

    def saw_whole(self, nbytes: int) -> None:
        self.largest_whole_bytes = max(self.largest_whole_bytes, nbytes)


def is_partitioned_at_init(t: torch.Tensor) -> bool:
    return _ATTR in getattr(t, "__dict__", {})


def shard_of(t: torch.Tensor) -> InitShard:
    return t.__dict__[_ATTR]


def full_shape_view(p: torch.Tensor) -> torch.Tensor:
    """``p`` itself, or for an ``Init``-partitioned parameter a zero-stride stand-in with its full shape."""
    if not is_partitioned_at_init(p):
        return p
    return torch.empty((), dtype=p.dtype, device=p.device).expand(shard_of(p).shape)


def mark_partitioned(p: torch.Tensor, shape: torch.Size) -> None:
    """DeepSpeed's attributes for code that sizes partitioned parameters: ``p.ds_shape``, ``p.ds_numel``
    (``p.shape`` is ``(0,)`` while the parameter is not gathered)."""
    p.__dict__["ds_shape"] = torch.Size(shape)
    p.__dict__["ds_numel"] = math.prod(shape)


def release_init_shard(p: torch.Tensor) -> None:
    info = p.__dict__.pop(_ATTR, None)
    if info is not None:
        info.release()


def full_from_shards(p: torch.Tensor, comm: Comm) -> torch.Tensor:
    """All ranks' pieces put together: the parameter's full value (a collective), on ``p``'s device."""
    info = shard_of(p)
    if info.world != comm.world_size:
        raise RuntimeError(f"a parameter was partitioned by engine.zero.Init over {info.world} ranks but the "
                           f"process group has {comm.world_size}; build the model in the same process group")
    device = comm.device if comm.active else p.device
    piece = info.piece.to(device)
    out = torch.empty(piece.numel() * info.world, dtype=piece.dtype, device=device)
    comm.all_gather_into(out, piece)
    return out[:info.numel].view(info.shape).to(p.device)


@torch.no_grad()
def partition_param(p: torch.Tensor, comm: Comm, remote: Optional[torch.device], dtype: Optional[torch.dtype],
                    stats: InitStats, swap: Optional["InitSwap"] = None) -> None:
    """Keep this rank's piece of ``p`` (rank 0's values) and empty its data.

    The whole value is broadcast on the group's device (NCCL refuses host tensors), so a model
    built on the CPU under ``Init`` keeps its pieces on the GPU, as DeepSpeed's does, unless
    ``remote_device`` says otherwise; with ``swap`` (``remote_device="nvme"``) the piece is
    written to the rank's swap file and only the parameter being partitioned is in memory."""
    home = p.data.device
    full = p.data.to(comm.device if comm.active else home).contiguous()
    comm.broadcast(full, src=0)
    size = math.ceil(full.numel() / comm.world_size) if full.numel() else 0
    target = dtype if dtype is not None and full.is_floating_point() else full.dtype
    piece = torch.zeros(size, dtype=target, device=torch.device("cpu") if swap is not None else remote or full.device)
    _fill(piece, full, comm.rank)
    p.__dict__[_ATTR] = InitShard(full.shape, full.numel(), piece, comm.world_size, comm.rank, swap)
    stats.note(full.numel() * full.element_size(), piece.numel() * piece.element_size())
    mark_partitioned(p, full.shape)
    p.data = torch.empty(0, dtype=target, device=full.device if comm.active else home)


@torch.no_grad()
def keep_piece(p: torch.Tensor, whole: torch.Tensor, comm: Comm, src: int = 0) -> None:
    """Rank ``src``'s ``whole`` value of ``p`` becomes everyone's pieces (after an in-place change)."""
    whole = whole.to(comm.device if comm.active else whole.device).contiguous()
    comm.broadcast(whole, src=src)
    info = shard_of(p)
    piece = info.piece
    _fill(piece, whole, info.rank)
    info.piece = piece          # in memory the same tensor; on the drive, written back


def _fill(piece: torch.Tensor, whole: torch.Tensor, rank: int) -> None:
    """This rank's elements of ``whole`` into ``piece`` (its tail past the parameter stays zero)."""
    size, numel = piece.numel(), whole.numel()
    lo, hi = min(numel, rank * size), min(numel, (rank + 1) * size)
    piece[:hi - lo].copy_(whole.reshape(-1)[lo:hi])


def materialize(module: nn.Module, comm: Optional[Comm] = None) -> int:
    """Make every ``Init``-partitioned parameter of ``module`` whole again (stages 0-2); returns how many."""
    comm = comm or Comm()
    count = 0
    for p in unique_params(module):
        if is_partitioned_at_init(p):
            with torch.no_grad():
                whole = full_from_shards(p, comm)
            release_init_shard(p)
            p.data = whole
            count += 1
    return count


def unique_params(module: nn.Module) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield p
