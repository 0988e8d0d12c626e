"""Where every parameter lives in ZeRO's flat buffers, and which rank owns which slice.

ZeRO keeps each parameter group's tensors in one flat buffer and gives each rank one equal,
contiguous slice of it ("partition"). Equal slices matter because gloo's ``all_gather``
rejects lists of different sizes and NCCL's fast paths need them, so each group is padded at
its end up to ``partition_count × partition_numel`` (``partition_numel`` rounded up to
``alignment`` elements so that every slice starts on a vector-friendly boundary).

Two coordinate systems are used:

* **buffer** coordinates: offsets into the engine's padded flat buffer, all groups one after
  the other; the layout of the model's low-precision params and gradients. Group ``g``'s
  partition for rank ``r`` is ``[g.buffer_offset + r·P_g, g.buffer_offset + (r+1)·P_g)``.
* **canonical** coordinates: offsets into the *unpadded* concatenation of all parameters in
  layout order. It does not depend on the world size, which is why checkpoints describe
  tensors in it: resharding to another world size is ``new_layout.shard(old_layout.unshard(...))``.

A rank's *local* partition (the fp32 master copy, the optimizer states) is the concatenation
of its slice of every group: group ``g`` starts at ``g.local_offset`` inside it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch

__all__ = ["ALIGNMENT", "Bucket", "FlatLayout", "GroupLayout", "ParamEntry", "Segment"]

ALIGNMENT = 16  # elements; 64 bytes of fp32, a cache line / vector width


@dataclass(frozen=True)
class ParamEntry:
    """One parameter: its name in the module, shape, dtype, and both of its offsets."""

    name: str
    shape: tuple[int, ...]
    numel: int
    dtype: str             # e.g. "bfloat16": the model-side dtype (master copies are fp32)
    group: int
    offset: int            # start in canonical coordinates
    buffer_offset: int     # start in buffer coordinates


@dataclass(frozen=True)
class GroupLayout:
    """One optimizer parameter group's flat buffer."""

    index: int
    numel: int             # real elements (no padding)
    partition_numel: int   # P_g: elements per rank, padding included
    partition_count: int
    canonical_offset: int
    buffer_offset: int
    local_offset: int      # where this group's slice starts in a rank's local partition

    @property
    def padded_numel(self) -> int:
        return self.partition_numel * self.partition_count

    def partition_range(self, rank: int) -> tuple[int, int]:
        """Rank's slice of this group, in buffer coordinates."""
        start = self.buffer_offset + rank * self.partition_numel
        return start, start + self.partition_numel


@dataclass(frozen=True)
class Segment:
    """A run of real (non-padding) elements in one rank's local partition."""

    group: int
    canonical_start: int
    canonical_end: int
    local_start: int

    @property
    def numel(self) -> int:
        return self.canonical_end - self.canonical_start


@dataclass(frozen=True)
class Bucket:
    """Whole consecutive parameters of one group, reduced together (buffer coordinates).

    ``pieces`` says which rank owns which part: ``(rank, start, end)`` relative to ``start``.
    """

    index: int
    group: int
    start: int
    end: int
    params: tuple[int, ...]          # indices into FlatLayout.params
    pieces: tuple[tuple[int, int, int], ...]

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FlatLayout:
    """The full description of how parameters map onto flat buffers and rank partitions.

    ``to_dict()`` is JSON-ready (a checkpoint manifest stores it); ``from_dict`` restores it.
    """

    params: tuple[ParamEntry, ...]
    groups: tuple[GroupLayout, ...]
    partition_count: int
    alignment: int = ALIGNMENT

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, groups: Sequence[Sequence[tuple[str, torch.Tensor]]], partition_count: int,
              alignment: int = ALIGNMENT) -> "FlatLayout":
        """Lay out ``groups`` (each a list of ``(name, tensor)``) over ``partition_count`` ranks."""
        if partition_count < 1:
            raise ValueError(f"partition_count must be >= 1, got {partition_count}")
        entries: list[ParamEntry] = []
        layouts: list[GroupLayout] = []
        canonical = buffer = local = 0
        for g, named in enumerate(groups):
            numel = sum(t.numel() for _, t in named)
            per_rank = math.ceil(numel / partition_count)
            per_rank = math.ceil(per_rank / alignment) * alignment
            group = GroupLayout(g, numel, per_rank, partition_count, canonical, buffer, local)
            inner = 0
            for name, tensor in named:
                entries.append(ParamEntry(name, tuple(tensor.shape), tensor.numel(), _dtype_name(tensor.dtype),
                                          g, canonical + inner, buffer + inner))
                inner += tensor.numel()
            layouts.append(group)
            canonical += numel
            buffer += group.padded_numel
            local += per_rank
        return cls(tuple(entries), tuple(layouts), partition_count, alignment)

    # -- sizes --------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Ψ: real elements over all groups (the canonical vector's length)."""
        return sum(g.numel for g in self.groups)

    @property
    def padded_numel(self) -> int:
        """Length of the flat buffer (all groups, padding included)."""
        return sum(g.padded_numel for g in self.groups)

    @property
    def partition_numel(self) -> int:
        """Length of each rank's local partition (all groups, padding included)."""
        return sum(g.partition_numel for g in self.groups)

    # -- ownership ------------------------------------------------------------------------
    def segments(self, rank: int) -> list[Segment]:
        """The real elements rank ``rank`` owns, as canonical ranges with their local offsets."""
        out = []
        for g in self.groups:
            lo = min(g.numel, rank * g.partition_numel)
            hi = min(g.numel, (rank + 1) * g.partition_numel)
            if hi > lo:
                out.append(Segment(g.index, g.canonical_offset + lo, g.canonical_offset + hi, g.local_offset))
        return out

    def shard(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank's local partition (padding zero) cut from a canonical vector of length Ψ."""
        self._check_full(full)
        out = torch.zeros(self.partition_numel, dtype=full.dtype, device=full.device)
        for seg in self.segments(rank):
            out[seg.local_start:seg.local_start + seg.numel] = full[seg.canonical_start:seg.canonical_end]
        return out

    def unshard(self, partitions: Sequence[torch.Tensor]) -> torch.Tensor:
        """The canonical vector put back together from every rank's local partition."""
        if len(partitions) != self.partition_count:
            raise ValueError(f"expected {self.partition_count} partitions, got {len(partitions)}")
        full = torch.empty(self.numel, dtype=partitions[0].dtype, device=partitions[0].device)
        for rank, part in enumerate(partitions):
            for seg in self.segments(rank):
                full[seg.canonical_start:seg.canonical_end] = part[seg.local_start:seg.local_start + seg.numel]
        return full

    def buckets(self, bucket_numel: int) -> list[Bucket]:
        """Consecutive whole parameters of one group, at most ``bucket_numel`` elements each.

        A parameter larger than ``bucket_numel`` is a bucket of its own. Padding is never in
        a bucket: it is zero and nobody needs it reduced.
        """
        limit = max(1, int(bucket_numel))
        out: list[Bucket] = []
        current: list[int] = []

        def close() -> None:
            if current:
                first, last = self.params[current[0]], self.params[current[-1]]
                start, end = first.buffer_offset, last.buffer_offset + last.numel
                out.append(Bucket(len(out), first.group, start, end, tuple(current),
                                  self._pieces(self.groups[first.group], start, end)))
                current.clear()

        size = 0
        for i, entry in enumerate(self.params):
            if current and (self.params[current[0]].group != entry.group or size + entry.numel > limit):
                close()
                size = 0
            current.append(i)
            size += entry.numel
        close()
        return out

    def _pieces(self, group: GroupLayout, start: int, end: int) -> tuple[tuple[int, int, int], ...]:
        pieces = []
        for rank in range(self.partition_count):
            lo, hi = group.partition_range(rank)
            lo, hi = max(lo, start), min(hi, end)
            if hi > lo:
                pieces.append((rank, lo - start, hi - start))
        return tuple(pieces)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"partition_count": self.partition_count, "alignment": self.alignment,
                "groups": [asdict(g) for g in self.groups],
                "params": [asdict(p) | {"shape": list(p.shape)} for p in self.params]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FlatLayout":
        params = tuple(ParamEntry(**(dict(p) | {"shape": tuple(p["shape"])})) for p in data["params"])
        groups = tuple(GroupLayout(**g) for g in data["groups"])
        return cls(params, groups, int(data["partition_count"]), int(data["alignment"]))

    def _check_full(self, full: torch.Tensor) -> None:
        if full.dim() != 1 or full.numel() != self.numel:
            raise ValueError(f"expected a flat vector of {self.numel} elements, got shape {tuple(full.shape)}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
