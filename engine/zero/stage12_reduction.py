"""Stages 1-2's gradient reduction: one reduce-scatter per bucket, straight into the owner's shard.

Stages 1-2 lay every reduce bucket out as one evenly sharded span (``FlatLayout.bucketed``):
the bucket's gradients are ``N × P`` contiguous elements of the flat buffer and rank ``r`` owns
elements ``[r·P, (r+1)·P)`` of it, its piece at the bucket's place in its gradient partition. So
reducing a bucket is one collective whatever N is (the classic group-wide layout needed one
``reduce`` per owner of a piece of the bucket, so calls per step grew with N):

* stage 1: gradients accumulate in the flat gradient buffer (every ``p.grad`` a view of it); the
  bucket's slice of that buffer is reduce-scattered straight into the rank's gradient partition
  (with a ``communication_data_type`` other than the accumulation dtype, the slice is first cast
  into a staging buffer of that dtype, reduced there, and the rank's share cast back);
* stage 2: each finished gradient is staged in a bucket buffer (reduction.py), which is
  reduce-scattered into the partition the same way, or in place and then added to it when every
  micro-step's sum accumulates there (``accumulate``).

Under the gloo plan (no fast reduce-scatter on gloo: comm.py) the bucket is all-reduced and the
owner's piece copied (or added) into its partition; with ``offload_optimizer`` the reduction is
in place and the piece goes to the host partition on the side stream (offload_grads.py).
"""
from __future__ import annotations

import torch

from ..comm import Handle
from .stage3_reduction import SpanBucket, SpanReducer

__all__ = ["BucketReducer"]


class BucketReducer(SpanReducer):
    """``GradientReducer`` over stages 1-2's one-span buckets (see the module docstring)."""

    _direct: set[int]

    def _make_buckets(self, bucket_numel: int) -> list[SpanBucket]:  # type: ignore[override]
        self._direct = set()
        return super()._make_buckets(1)   # the layout cut the spans by reduce_bucket_size: one each

    def _source(self, bucket: SpanBucket) -> torch.Tensor:
        """The bucket's ``N × P`` gradient elements, in element (= rank-major) order, in the
        reduction dtype: the staging buffer, or stage 1's slice of the flat gradients."""
        if bucket.index in self._buffers:
            return self._buffers[bucket.index][:bucket.numel]
        flat = self._flat_slice(bucket)
        if flat.dtype == self.dtype:
            return flat
        staged = self._buffer_for(bucket)        # communication_data_type: reduce a cast copy
        staged.copy_(flat)
        return staged

    def _flat_slice(self, bucket: SpanBucket) -> torch.Tensor:
        start = bucket.spans[0].buffer_offset
        return self.flat_grads[start:start + bucket.numel]

    def _target(self, bucket: SpanBucket) -> torch.Tensor:
        return self.grad_partition[bucket.local_start:bucket.local_start + bucket.width]

    def _region(self, index: int, bucket: SpanBucket) -> torch.Tensor:
        entry, span = self.layout.params[index], bucket.spans[0]
        rel = entry.offset - span.canonical_offset
        return self._buffer_for(bucket)[rel:rel + entry.numel]

    def _stage_grad(self, index: int, param: torch.nn.Parameter, bucket: SpanBucket) -> None:  # type: ignore[override]
        region = self._region(index, bucket)
        if param.grad is None:
            region.zero_()
        else:
            region.copy_(param.grad.reshape(-1))
            param.grad = None

    def _add_second_grad(self, index: int, param: torch.nn.Parameter, bucket: SpanBucket) -> None:  # type: ignore[override]
        self._region(index, bucket).add_(param.grad.reshape(-1))
        param.grad = None

    def _fresh_buffer(self, buf: torch.Tensor) -> torch.Tensor:
        return buf   # every parameter's region is written when it arrives; the padding at launch

    def _launch(self, bucket: SpanBucket, async_op: bool) -> None:  # type: ignore[override]
        data = self._source(bucket)
        if self.partitioned:
            data[bucket.spans[0].numel:].zero_()      # the span's padding (the buffer is reused)
        if self.predivide != 1.0:
            data.mul_(1.0 / self.predivide)
        target = self._target(bucket)
        if self._reduces_into(target, data):
            handle: Handle = self.comm.reduce_scatter_into(target, data, async_op=async_op)
            self._direct.add(bucket.index)
        else:
            handle = self._reduce(data, bucket, async_op)
        self._inflight.append((bucket, handle))
        if not async_op:
            self._complete_oldest()

    def _reduces_into(self, target: torch.Tensor, data: torch.Tensor) -> bool:
        """Whether the reduce-scatter can write the partition itself (NCCL plan, same device, and
        the sum replaces the partition rather than adding to it)."""
        return (self.comm.active and self.comm.plan.reduce != "all_reduce" and not self.accumulate
                and target.device == data.device and target.dtype == data.dtype)

    def _complete_oldest(self) -> None:
        bucket, handle = self._inflight.popleft()
        handle.wait()
        buf = self._buffers.pop(bucket.index, None)
        if buf is None:          # stage 1 reduced in its flat buffer, not reused before flush_host
            self._deliver(self._flat_slice(bucket), bucket)
            self._reads = []
            return
        self._deliver(buf, bucket)
        if self._reads:          # offload: reuse the buffer once the host copies have read it
            self._reuse_after[id(buf)] = self._reads
            self._reads = []
        self._free.append(buf)

    def _deliver(self, buf: torch.Tensor, bucket: SpanBucket) -> None:  # type: ignore[override]
        if bucket.index in self._direct:
            self._direct.discard(bucket.index)
            return
        super()._deliver(buf, bucket)
