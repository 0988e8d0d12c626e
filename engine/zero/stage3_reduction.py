"""Stage 3's gradient reduction: one reduce-scatter per bucket of spans, straight to every owner's shard.

Stage 3's layout shards every fetch unit's spans evenly (partition.py), so rank ``r`` owns row
``r`` of each span's ``(N, P)`` view. A bucket is a run of whole consecutive spans of one group
(at most ``reduce_bucket_size`` elements, a larger span alone); its staging buffer is laid out
**rank-major**: row ``r`` holds rank ``r``'s piece of every span of the bucket side by side, which
is exactly rank ``r``'s contiguous range of its gradient partition. A finished gradient is
written into its rows (at most three copies: a partial first row, whole rows, a partial last),
and one reduce-scatter (in place, the NCCL plan) or all-reduce (the gloo plan) leaves the sum of
this rank's row in that row, which is added into the partition. Compared with the group-wide
layout this moves each gradient once, whatever N is, and issues one collective per bucket.

Everything else (the order buckets launch in, overlap, staging-buffer reuse, accumulation
across micro-steps) is ``GradientReducer``'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..comm import Handle
from .partition import FlatLayout, Span
from .reduction import GradientReducer

__all__ = ["SpanBucket", "SpanReducer", "span_buckets"]


@dataclass(frozen=True)
class SpanBucket:
    """Whole consecutive spans of one group, reduced together (see the module docstring)."""

    index: int
    group: int
    params: tuple[int, ...]
    spans: tuple[Span, ...]
    columns: tuple[int, ...]   # where each span's piece starts within a row
    width: int                 # elements per rank: the sum of the spans' P
    local_start: int           # where the row starts in a rank's local partition
    world: int

    @property
    def numel(self) -> int:
        return self.width * self.world


def span_buckets(layout: FlatLayout, bucket_numel: int) -> list[SpanBucket]:
    """Consecutive spans of one group, at most ``bucket_numel`` padded elements each (a larger
    span is a bucket of its own); spans without elements are left out."""
    world, limit = layout.partition_count, max(1, int(bucket_numel))
    out: list[SpanBucket] = []
    current: list[Span] = []

    def close() -> None:
        if current:
            columns, width = [], 0
            for span in current:
                columns.append(width)
                width += span.partition_numel
            params = tuple(i for s in current for i in range(s.first_param, s.first_param + s.param_count))
            out.append(SpanBucket(len(out), current[0].group, params, tuple(current), tuple(columns), width,
                                  current[0].local_offset, world))
            current.clear()

    size = 0
    for span in layout.spans:
        if span.numel == 0:
            continue
        padded = span.padded_numel(world)
        if current and (current[0].group != span.group or size + padded > limit):
            close()
            size = 0
        current.append(span)
        size += padded
    close()
    return out


class SpanReducer(GradientReducer):
    """``GradientReducer`` over ``span_buckets`` with rank-major staging (see the module docstring)."""

    def _make_buckets(self, bucket_numel: int) -> list[SpanBucket]:  # type: ignore[override]
        buckets = span_buckets(self.layout, bucket_numel)
        self._column = {}
        for bucket in buckets:
            for span, column in zip(bucket.spans, bucket.columns):
                self._column[span.index] = column
        return buckets

    def _rows_of(self, index: int, bucket: SpanBucket) -> tuple[torch.Tensor, int]:
        """The ``(N, P)`` view of parameter ``index``'s span in the bucket's buffer, and where the
        parameter starts in the span's flattened (row-major) order."""
        span = self.layout.span_of(index)
        column = self._column[span.index]
        rows = self._buffer_for(bucket).view(bucket.world, bucket.width)[:, column:column + span.partition_numel]
        return rows, self.layout.params[index].offset - span.canonical_offset

    def _stage_grad(self, index: int, param: torch.nn.Parameter, bucket: SpanBucket) -> None:  # type: ignore[override]
        rows, start = self._rows_of(index, bucket)
        if param.grad is not None:
            _place(rows, start, param.grad.reshape(-1), torch.Tensor.copy_)
            param.grad = None

    def _add_second_grad(self, index: int, param: torch.nn.Parameter, bucket: SpanBucket) -> None:  # type: ignore[override]
        rows, start = self._rows_of(index, bucket)
        _place(rows, start, param.grad.reshape(-1), torch.Tensor.add_)
        param.grad = None

    def _fresh_buffer(self, buf: torch.Tensor) -> torch.Tensor:
        return buf.zero_()   # padding and gradients that never arrive must read as zero

    def _reduce(self, data: torch.Tensor, bucket: SpanBucket, async_op: bool) -> Handle:  # type: ignore[override]
        return self.comm.reduce_to_shards(data, async_op=async_op)   # rank r's row: its shard

    def _deliver(self, buf: torch.Tensor, bucket: SpanBucket) -> None:  # type: ignore[override]
        mine = buf[:bucket.numel].view(bucket.world, bucket.width)[self.rank]
        target = self.grad_partition[bucket.local_start:bucket.local_start + bucket.width]
        self._into_partition(target, mine)


def _place(rows: torch.Tensor, start: int, flat: torch.Tensor,
           op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """``op(dst, src)`` of ``flat`` onto elements ``[start, start + len)`` of ``rows`` in row-major order."""
    width = rows.shape[1]
    row, col = divmod(start, width)
    done = 0
    if col:
        head = min(width - col, flat.numel())
        op(rows[row, col:col + head], flat[:head])
        done, row = head, row + 1
    whole = (flat.numel() - done) // width
    if whole:
        op(rows[row:row + whole], flat[done:done + whole * width].view(whole, width))
        done, row = done + whole * width, row + whole
    if done < flat.numel():
        op(rows[row, :flat.numel() - done], flat[done:])
