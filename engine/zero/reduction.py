"""Gradient reduction for every ZeRO stage: buckets of gradients summed across ranks, to their owners.

Why a module of its own: stages 0-3 differ in where a reduced gradient goes, not in how it is
reduced. Each bucket (whole consecutive parameters of one group) is summed across ranks with
one collective; afterwards

* ``in_place`` (stages 0/1): every ``p.grad`` is a view of one flat gradient buffer, so autograd
  accumulates straight into what gets reduced and nothing is copied;
* partitioned (stages 2/3): a post-accumulate-grad hook copies each finished gradient into a
  bucket staging buffer and frees it; when a bucket's reduction completes, the owner copies (or,
  with ``accumulate``, adds) its shard into the rank's gradient partition. Stages 1-3's buckets
  are evenly sharded spans (stage12_reduction.py, stage3_reduction.py: one reduce-scatter each,
  whatever N); this class alone is stage 0's, which all-reduces. That partition may live
  in CPU memory (``offload_optimizer``): the copy is then the device-to-host transfer, issued
  on a side stream as each bucket completes so it overlaps the rest of backward
  (offload_grads.py); ``flush_host`` waits for them before the host reads the partition.

Buckets are reduced in one fixed order on every rank (collectives must match across ranks),
the reverse of layout order because backward finishes the last parameters first; a bucket
whose gradients arrive early waits, in its staging buffer, for the ones before it.
``overlap_comm`` makes each reduction asynchronous so communication overlaps backward; stages
0/1 reducing in place get it always (stage12.py ``_reduces_in_place``: it costs them no memory).

The owner of this object decides which backward passes communicate (``begin_pass``) and calls
``grad_ready(index, param)`` from its gradient hooks.
"""
from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

import torch
from torch import nn

from ..comm import Comm, Handle
from .copy_stream import CopyTicket
from .offload_grads import HostGradSink
from .partition import Bucket, FlatLayout

__all__ = ["GradientOrderError", "GradientReducer"]


class GradientOrderError(RuntimeError):
    """A parameter received a gradient after its bucket had already been reduced."""


class GradientReducer:
    """Reduces ``params``' gradients bucket by bucket (see the module docstring).

    ``flat_grads``/``grad_views`` (stages 0/1: where gradients accumulate) and ``grad_partition``
    (stages 1-3: where this rank's reduced share goes) say where the gradients live; ``rank`` is whose partition this rank owns; ``dtype`` is the
    accumulation dtype (staging buckets and the reduction; grad_precision.py); ``predivide`` is
    what every rank divides its gradients by before the sum (1: nothing), applied only when
    there is more than one rank. Partitioned reducers stage each gradient as it arrives (it is
    freed then); ``accumulate`` adds each pass's reduced gradients to the partition (every
    micro-step reduces) instead of overwriting it.
    """

    def __init__(self, layout: FlatLayout, params: Sequence[nn.Parameter], comm: Comm, *, bucket_numel: int,
                 rank: int, dtype: torch.dtype, device: torch.device, overlap: bool, predivide: float = 1.0,
                 flat_grads: Optional[torch.Tensor] = None, grad_views: Sequence[torch.Tensor] = (),
                 grad_partition: Optional[torch.Tensor] = None, accumulate: bool = False) -> None:
        if flat_grads is None and grad_partition is None:
            raise ValueError("GradientReducer needs flat_grads, grad_partition or both (stage 1: reduced from "
                             "the first into the second)")
        self.layout, self.params, self.comm = layout, list(params), comm
        self.rank, self.dtype, self.device = rank, dtype, device
        self.overlap, self.accumulate = overlap, accumulate
        self.predivide = float(predivide) if comm.active else 1.0
        self.flat_grads, self.grad_views, self.grad_partition = flat_grads, list(grad_views), grad_partition
        self.partitioned = flat_grads is None     # gradients are staged in bucket buffers
        self.buckets = self._make_buckets(bucket_numel)
        self._order: list[Bucket] = list(reversed(self.buckets))  # backward finishes last params first
        self._position = {b.index: pos for pos, b in enumerate(self._order)}
        self._bucket_of = {i: b.index for b in self.buckets for i in b.params}
        self.active = False          # inside a backward pass that communicates
        self.reduced = False         # this pass's gradients are reduced
        self._pending: list[int] = []
        self._next = 0               # position in self._order of the next bucket to launch
        self._arrived: set[int] = set()
        self._inflight: deque[tuple[Bucket, Handle]] = deque()
        self._buffers: dict[int, torch.Tensor] = {}   # partitioned: bucket index -> staging buffer
        self._free: list[torch.Tensor] = []
        self.pool: list[torch.Tensor] = []             # every staging buffer ever allocated
        # offload_optimizer: reduced pieces go to the host partition on a side stream; a bucket
        # buffer is written again only after those copies have read it
        offloaded = grad_partition is not None and grad_partition.device.type != torch.device(device).type
        self.sink: Optional[HostGradSink] = HostGradSink(device, dtype) if offloaded else None
        self._reads: list[CopyTicket] = []             # copies reading the bucket being delivered
        self._reuse_after: dict[int, list[CopyTicket]] = {}

    def _make_buckets(self, bucket_numel: int) -> list[Bucket]:
        return self.layout.buckets(bucket_numel)

    # -- a pass -----------------------------------------------------------------------------------
    def begin_pass(self) -> None:
        """A backward whose gradients are to be reduced starts."""
        self.active = True
        self._pending = [len(b.params) for b in self.buckets]
        self._next = 0
        self._arrived = set()
        self.reduced = False

    def finish_pass(self) -> None:
        """Reduce every bucket not yet launched (gradients that never arrived count as zero) and wait."""
        if not self.active:
            self.begin_pass()
        for bucket in self._order[self._next:]:
            for i in bucket.params:
                if i not in self._arrived:
                    self._arrived.add(i)
                    self._take(i, self.params[i], bucket)
            self._launch(bucket, async_op=True)
        self._next = len(self._order)
        while self._inflight:
            self._complete_oldest()
        self.reduced = True
        self.active = False

    def grad_ready(self, index: int, param: nn.Parameter) -> None:
        """``params[index]``'s gradient is final for this backward (a post-accumulate-grad hook)."""
        if not self.active:
            return                      # accumulation micro-step: the gradient stays local
        if not self.partitioned and not self.overlap:
            return                      # reduced in one go by finish_pass
        bucket = self.buckets[self._bucket_of[index]]
        if index in self._arrived:
            self._second_arrival(index, bucket)
            return
        self._arrived.add(index)
        self._take(index, param, bucket)
        self._pending[bucket.index] -= 1
        if self._pending[bucket.index] == 0:
            self._launch_ready(async_op=self.overlap)

    # -- collecting -----------------------------------------------------------------------------
    def _take(self, index: int, param: nn.Parameter, bucket: Bucket) -> None:
        if self.partitioned:
            self._stage_grad(index, param, bucket)
        else:
            self._adopt_grad(index, param)

    def _second_arrival(self, index: int, bucket: Bucket) -> None:
        """A parameter's gradient finished twice in one backward (reentrant checkpointing)."""
        if self._position[bucket.index] < self._next:
            raise GradientOrderError(
                f"parameter {self.layout.params[index].name!r} received a second gradient after its bucket was "
                "reduced. This happens with reentrant activation checkpointing; use "
                "engine.checkpointing.checkpoint (non-reentrant) or torch.utils.checkpoint(use_reentrant=False).")
        if self.partitioned and self.params[index].grad is not None:
            self._add_second_grad(index, self.params[index], bucket)

    def _add_second_grad(self, index: int, param: nn.Parameter, bucket: Bucket) -> None:
        entry = self.layout.params[index]
        rel = entry.buffer_offset - bucket.start
        self._buffer_for(bucket)[rel:rel + entry.numel].add_(param.grad.reshape(-1))
        param.grad = None

    def _adopt_grad(self, index: int, param: nn.Parameter) -> None:
        """Stages 0/1: make sure the gradient lives in (is a view of) the flat gradient buffer.

        It normally does; a ``module.zero_grad(set_to_none=True)`` makes autograd allocate a
        fresh tensor instead, which is copied in here.
        """
        view, grad = self.grad_views[index], param.grad
        if grad is None:
            view.zero_()
        elif grad.data_ptr() != view.data_ptr():
            view.copy_(grad)
        param.grad = view

    def _stage_grad(self, index: int, param: nn.Parameter, bucket: Bucket) -> None:
        """Partitioned: copy the finished gradient into its bucket's buffer and free it."""
        entry = self.layout.params[index]
        rel = entry.buffer_offset - bucket.start
        region = self._buffer_for(bucket)[rel:rel + entry.numel]
        if param.grad is None:
            region.zero_()
        else:
            region.copy_(param.grad.reshape(-1))
            param.grad = None

    def _buffer_for(self, bucket: Bucket) -> torch.Tensor:
        buf = self._buffers.get(bucket.index)
        if buf is None:
            while not self._free and self._inflight:
                self._complete_oldest()
            if self._free:
                buf = self._free.pop()
                for ticket in self._reuse_after.pop(id(buf), ()):
                    ticket.ready_on_device()   # the host copies of its last bucket have read it
            else:
                buf = torch.empty(max(b.numel for b in self.buckets), dtype=self.dtype, device=self.device)
                self.pool.append(buf)
            self._fresh_buffer(buf[:bucket.numel])
            self._buffers[bucket.index] = buf
        return buf[:bucket.numel]

    def _fresh_buffer(self, buf: torch.Tensor) -> torch.Tensor:
        """A staging buffer taken for a new bucket (every element is written before it is reduced)."""
        return buf

    # -- reducing -------------------------------------------------------------------------------
    def _launch_ready(self, async_op: bool) -> None:
        while self._next < len(self._order) and self._pending[self._order[self._next].index] == 0:
            self._launch(self._order[self._next], async_op)
            self._next += 1

    def _launch(self, bucket: Bucket, async_op: bool) -> None:
        if self.partitioned:
            data = self._buffers[bucket.index][:bucket.numel]
        else:
            data = self.flat_grads[bucket.start:bucket.end]
        if self.predivide != 1.0:
            data.mul_(1.0 / self.predivide)
        self._inflight.append((bucket, self._reduce(data, bucket, async_op)))
        if not async_op:
            self._complete_oldest()

    def _reduce(self, data: torch.Tensor, bucket: Bucket, async_op: bool) -> Handle:
        """Stage 0: every rank needs the whole sum (partitioned subclasses reduce-scatter)."""
        return self.comm.all_reduce(data, async_op=async_op)

    def _complete_oldest(self) -> None:
        bucket, handle = self._inflight.popleft()
        handle.wait()
        if not self.partitioned:
            return
        buf = self._buffers.pop(bucket.index)
        self._deliver(buf, bucket)
        if self._reads:
            self._reuse_after[id(buf)] = self._reads
            self._reads = []
        self._free.append(buf)

    def _deliver(self, buf: torch.Tensor, bucket: Bucket) -> None:
        """The reduced bucket's pieces this rank owns -> its gradient partition."""
        group = self.layout.groups[bucket.group]
        part_start = group.partition_range(self.rank)[0]
        for rank, lo, hi in bucket.pieces:
            if rank == self.rank:
                local = group.local_offset + bucket.start + lo - part_start
                self._into_partition(self.grad_partition[local:local + hi - lo], buf[lo:hi])

    def _into_partition(self, target: torch.Tensor, reduced: torch.Tensor) -> None:
        if self.sink is not None and target.device != reduced.device:   # offload: beside backward
            self._reads.append(self.sink.deliver(target, reduced, self.accumulate))
        elif self.accumulate:
            target.add_(reduced)
        else:
            target.copy_(reduced)

    def flush_host(self) -> None:
        """Offload: every reduced piece is in the host partition (before the host reads or clears it)."""
        if self.sink is not None:
            self.sink.flush()

    def pool_bytes(self) -> int:
        """Device bucket buffers (the host staging of offload is counted by ``host_staging_bytes``)."""
        return sum(b.numel() * b.element_size() for b in self.pool)

    def host_staging_bytes(self) -> int:
        return self.sink.nbytes() if self.sink is not None else 0
