"""Where every parameter lives in ZeRO's flat buffers, and which rank owns which slice.

ZeRO keeps each parameter group's tensors in one flat buffer and gives each rank one equal,
contiguous slice of it ("partition"). Equal slices matter because gloo's ``all_gather``
rejects lists of different sizes and NCCL's fast paths need them, so each group is padded at
its end up to ``partition_count × partition_numel`` (``partition_numel`` rounded up to
``alignment`` elements so that every slice starts on a vector-friendly boundary).

Stage 3 shards finer (DESIGN "Scale rules"): each **span** (a run of consecutive parameters of one
group that one fetch unit holds) is split evenly over the ranks on its own, so gathering a unit
is one all-gather of ``N × P_span`` elements straight into its buffer and reducing its gradient
one reduce-scatter, instead of moving the whole group's slice of every rank. ``FlatLayout.build``
takes ``span_keys`` for that; without them a group is one span (the classic layout above, which
stage 0 and checkpoints written before spans existed use). Stages 1-2 shard the same way with
one span per reduce bucket (``FlatLayout.bucketed``): a bucket's reduction is one reduce-scatter
and the gather after the step one all-gather per bucket, whatever N. A group's partition for a
rank is then the concatenation of its piece of every span.

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
from typing import Any, Hashable, Mapping, Optional, Sequence

import torch

__all__ = ["ALIGNMENT", "Bucket", "FlatLayout", "GroupLayout", "ParamEntry", "Segment", "Span"]

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
        """Rank's slice of this group, in buffer coordinates (a one-span group: the classic layout)."""
        start = self.buffer_offset + rank * self.partition_numel
        return start, start + self.partition_numel


@dataclass(frozen=True)
class Span:
    """Consecutive parameters of one group split evenly over the ranks: rank ``r`` holds elements
    ``[r·P, (r+1)·P)`` of the span (zero padding past ``numel``) at ``local_offset`` of its partition."""

    index: int
    group: int
    numel: int             # real elements
    partition_numel: int   # P: elements per rank, padding included
    canonical_offset: int
    buffer_offset: int     # start of the span's N·P elements in buffer coordinates
    local_offset: int      # where rank r's piece of it starts in r's local partition
    first_param: int       # index into FlatLayout.params
    param_count: int

    def padded_numel(self, world: int) -> int:
        return self.partition_numel * world

    def piece_start(self, rank: int) -> int:
        """Where rank ``rank``'s piece of the span starts, in buffer coordinates."""
        return self.buffer_offset + rank * self.partition_numel


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
    spans: tuple[Span, ...] = ()   # empty: one span per group (the classic layout)

    def __post_init__(self) -> None:
        if not self.spans:
            object.__setattr__(self, "spans", tuple(_group_spans(self.groups, self.params)))
        span_of = [0] * len(self.params)
        for span in self.spans:
            span_of[span.first_param:span.first_param + span.param_count] = [span.index] * span.param_count
        object.__setattr__(self, "_span_of", span_of)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, groups: Sequence[Sequence[tuple[str, torch.Tensor]]], partition_count: int,
              alignment: int = ALIGNMENT, span_keys: Optional[Sequence[Sequence[Hashable]]] = None) -> "FlatLayout":
        """Lay out ``groups`` (each a list of ``(name, tensor)``) over ``partition_count`` ranks.

        ``span_keys`` (per group, per parameter): consecutive parameters with equal keys form a
        span sharded on its own (stage 3's fetch units); None: each group is one span.
        """
        if partition_count < 1:
            raise ValueError(f"partition_count must be >= 1, got {partition_count}")
        entries: list[ParamEntry] = []
        layouts: list[GroupLayout] = []
        spans: list[Span] = []
        canonical = buffer = local = 0
        for g, named in enumerate(groups):
            keys = list(span_keys[g]) if span_keys is not None else [None] * len(named)
            group_start = (canonical, buffer, local)
            for run in _runs_of_equal(keys):
                sizes = [named[i][1].numel() for i in run]
                numel = sum(sizes)
                # a span too small to give every rank a whole aligned block is padded per element:
                # at 1024 ranks a 768-element bias would otherwise occupy 16 Ki elements
                align = alignment if span_keys is None or numel >= partition_count * alignment else 1
                per_rank = math.ceil(math.ceil(numel / partition_count) / align) * align
                spans.append(Span(len(spans), g, numel, per_rank, canonical, buffer, local, len(entries), len(run)))
                inner = 0
                for i, size in zip(run, sizes):
                    name, tensor = named[i]
                    entries.append(ParamEntry(name, tuple(tensor.shape), size, _dtype_name(tensor.dtype),
                                              g, canonical + inner, buffer + inner))
                    inner += size
                canonical += numel
                buffer += per_rank * partition_count
                local += per_rank
            layouts.append(GroupLayout(g, canonical - group_start[0], local - group_start[2], partition_count,
                                       *group_start))
        return cls(tuple(entries), tuple(layouts), partition_count, alignment, tuple(spans))

    @classmethod
    def bucketed(cls, groups: Sequence[Sequence[tuple[str, torch.Tensor]]], partition_count: int,
                 bucket_numel: int, alignment: int = ALIGNMENT) -> "FlatLayout":
        """Stages 1-2: every reduce bucket (whole consecutive parameters of one group, at most
        ``bucket_numel`` elements; a larger parameter alone) is one span, sharded evenly."""
        return cls.build(groups, partition_count, alignment,
                         span_keys=[_bucket_keys([t.numel() for _, t in named], bucket_numel) for named in groups])

    def span_of(self, param_index: int) -> Span:
        """The span holding ``params[param_index]``."""
        return self.spans[self._span_of[param_index]]  # type: ignore[attr-defined]

    def param_runs(self, param_index: int) -> list[tuple[int, int, int, int]]:
        """``(rank, offset in rank's local partition, offset in the parameter, length)`` runs holding
        the parameter's elements, in element order."""
        entry = self.params[param_index]
        span = self.span_of(param_index)
        size = span.partition_numel
        lo = entry.offset - span.canonical_offset
        hi = lo + entry.numel
        out = []
        rank = lo // size if size else 0
        while size and rank * size < hi:
            a, b = max(lo, rank * size), min(hi, (rank + 1) * size)
            out.append((rank, span.local_offset + a - rank * size, a - lo, b - a))
            rank += 1
        return out

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
    def owned_pieces(self, rank: int) -> list[tuple[Span, int, int]]:
        """``(span, buffer start, local start)`` of rank's piece of every span (``span.partition_numel``
        elements each, padding included): where its partition sits in the flat buffers."""
        return [(s, s.piece_start(rank), s.local_offset) for s in self.spans if s.partition_numel]

    def segments(self, rank: int) -> list[Segment]:
        """The real elements rank ``rank`` owns, as canonical ranges with their local offsets."""
        out = []
        for s in self.spans:
            lo = min(s.numel, rank * s.partition_numel)
            hi = min(s.numel, (rank + 1) * s.partition_numel)
            if hi > lo:
                out.append(Segment(s.group, s.canonical_offset + lo, s.canonical_offset + hi, s.local_offset))
        return out

    @property
    def single_span_groups(self) -> bool:
        """Whether every group is one span (the classic layout ``partition_range``/``buckets`` need)."""
        return len({s.group for s in self.spans}) == len(self.spans)

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
                "params": [asdict(p) | {"shape": list(p.shape)} for p in self.params],
                "spans": [asdict(s) for s in self.spans]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FlatLayout":
        """From ``to_dict``'s output; layouts saved before spans existed are one span per group."""
        params = tuple(ParamEntry(**(dict(p) | {"shape": tuple(p["shape"])})) for p in data["params"])
        groups = tuple(GroupLayout(**g) for g in data["groups"])
        spans = tuple(Span(**s) for s in data.get("spans", ()))
        return cls(params, groups, int(data["partition_count"]), int(data["alignment"]), spans)

    def _check_full(self, full: torch.Tensor) -> None:
        if full.dim() != 1 or full.numel() != self.numel:
            raise ValueError(f"expected a flat vector of {self.numel} elements, got shape {tuple(full.shape)}")


def _bucket_keys(sizes: Sequence[int], bucket_numel: int) -> list[int]:
    """Bucket number of each parameter: consecutive ones while their sum fits ``bucket_numel``
    (a parameter larger than that is a bucket of its own), as ``FlatLayout.buckets`` cuts."""
    limit, keys, bucket, size = max(1, int(bucket_numel)), [], 0, 0
    for numel in sizes:
        if size and size + numel > limit:
            bucket, size = bucket + 1, 0
        keys.append(bucket)
        size += numel
    return keys


def _runs_of_equal(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices grouped into runs of consecutive equal keys."""
    runs: list[list[int]] = []
    for i, key in enumerate(keys):
        if runs and keys[runs[-1][-1]] == key:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _group_spans(groups: Sequence[GroupLayout], params: Sequence[ParamEntry]) -> list[Span]:
    """The classic layout's spans: each group whole (also what a layout saved without spans meant)."""
    out, first = [], 0
    for g in groups:
        count = sum(1 for p in params if p.group == g.index)
        out.append(Span(g.index, g.index, g.numel, g.partition_numel, g.canonical_offset, g.buffer_offset,
                        g.local_offset, first, count))
        first += count
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
