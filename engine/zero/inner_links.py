"""What an inner optimizer may need to know about the flat partitions it is handed (stages 0-2).

- LAMB (``set_segments``): where each parameter lies in the flat master partition, so its trust
  ratio is per parameter (LAMB's definition, and what DeepSpeed's FusedLamb computes at stage 0),
  and, when parameters are split across ranks (stages 1/2), an all-reduce of the per-parameter
  squared norms (``[2, n_params + 1]`` floats, one small collective per step).
- compressed-communication optimizers (``attach_comm``, ``set_live_numel``): the data-parallel
  group they average their momentum over, and how much of each (stage 0, unpartitioned) flat
  master is real parameters rather than alignment padding.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..comm import Comm
from ..ops.segments import SegmentSpec
from .partition import FlatLayout, GroupLayout


def link_inner_optimizer(optimizer: Any, layout: FlatLayout, masters: list[torch.Tensor], rank: int,
                         comm: Comm, device: torch.device) -> None:
    """Hand ``optimizer`` what it asks for (by the methods it has); a no-op for the others."""
    if hasattr(optimizer, "attach_comm"):
        optimizer.attach_comm(comm)
    if hasattr(optimizer, "set_live_numel") and layout.partition_count == 1 and layout.single_span_groups:
        for group, master in zip(layout.groups, masters):
            optimizer.set_live_numel(master, group.numel)
    if hasattr(optimizer, "set_segments"):
        reduce = _norm_reduce(comm, device) if layout.partition_count > 1 else None
        for group, master in zip(layout.groups, masters):
            optimizer.set_segments(master, partition_segments(layout, group, rank, reduce))


def partition_segments(layout: FlatLayout, group: GroupLayout, rank: int,
                       reduce: Optional[Callable[[torch.Tensor], None]] = None) -> SegmentSpec:
    """``group``'s slice for ``rank`` (its piece of every span, side by side) as consecutive
    segments keyed by parameter index.

    Alignment gaps and the end padding join the segment before them (they hold zeros: nothing
    to either norm); a slice holding only padding is one segment of the spare key ``len(params)``.
    """
    pieces: list[tuple[int, int, int]] = []      # (start, end, key) inside the group's local slice
    for span, start, local in layout.owned_pieces(rank):
        if span.group != group.index:
            continue
        lo, hi, base = start, start + span.partition_numel, local - group.local_offset
        for index in range(span.first_param, span.first_param + span.param_count):
            entry = layout.params[index]
            a, b = max(lo, entry.buffer_offset), min(hi, entry.buffer_offset + entry.numel)
            if b > a:
                pieces.append((base + a - lo, base + b - lo, index))
    lo, hi = 0, group.partition_numel
    spare = len(layout.params)
    if not pieces:
        return SegmentSpec(lengths=(hi - lo,), keys=(spare,), n_keys=spare + 1, reduce=reduce)
    pieces.sort()
    starts = [0] + [s for s, _, _ in pieces[1:]]
    ends = starts[1:] + [hi - lo]
    return SegmentSpec(lengths=tuple(e - s for s, e in zip(starts, ends)), keys=tuple(k for _, _, k in pieces),
                       n_keys=spare + 1, reduce=reduce)


def _norm_reduce(comm: Comm, device: torch.device) -> Callable[[torch.Tensor], None]:
    def reduce(totals: torch.Tensor) -> None:
        if totals.device == device or comm.backend != "nccl":
            comm.all_reduce(totals)
            return
        on_device = totals.to(device)             # offloaded masters: NCCL reduces device tensors only
        comm.all_reduce(on_device)
        totals.copy_(on_device)
    return reduce
