"""ZeRO stages 0, 1 and 2: flat parameter buffers, where gradients go, and the partitioned step.

What each stage keeps on every rank (Ψ parameters, N ranks, mixed precision):

==========  ==================  ======================  ========================  ============
stage       model params        gradients               fp32 master + Adam state  ZeRO paper
==========  ==================  ======================  ========================  ============
0           all (2Ψ)            all (2Ψ)                all (12Ψ)                 16Ψ
1           all (2Ψ)            all (2Ψ) + own (2Ψ/N)   own partition (12Ψ/N)     4Ψ + 12Ψ/N
2           all (2Ψ)            own partition (2Ψ/N)    own partition (12Ψ/N)     2Ψ + 14Ψ/N
==========  ==================  ======================  ========================  ============

(Stage 1's "own" is the reduced gradient of its partition, what its optimizer reads, as in
DeepSpeed's stage 1; gradients are 4 bytes, not 2, when summed in fp32, the default.)

The model's parameters are views into one flat buffer per rank (``flat_params``), laid out by
``FlatLayout.bucketed``: every reduce bucket (whole consecutive parameters of one group, at most
``reduce_bucket_size`` elements) is split into N equal padded pieces and rank r owns piece r of
every bucket (its partition: those pieces side by side). So whatever N is, a bucket's gradient
reduction is one reduce-scatter into the owner's partition (stage12_reduction.py) and the gather
after the step one all-gather per bucket straight into the parameters: collectives per step grow
with the buckets, never with the ranks. Stage 0 (nothing partitioned) keeps one bucket-free
layout and all-reduces.

Stages 0/1 keep gradients as views into a flat gradient buffer that is reduced from in place,
bucket by bucket, each bucket's collective starting as soon as its gradients are final (under
the rest of backward, as DDP's buckets do); stage 1's reduce-scatter writes the sum of the rank's pieces into its gradient
partition (``grad_dtype`` × Ψ/N: the optimizer's gradient, as DeepSpeed's fp32 partition gradient).
Stage 2 never holds all gradients at once: a post-accumulate-grad hook hands each finished
gradient to the reducer, which stages it in a bucket buffer, frees it, reduces full buckets
(asynchronously when ``overlap_comm``) into the partition.

Gradients accumulate and are reduced in ``grad_dtype`` (fp32 by default under bf16/fp16,
``data_types.grad_accum_dtype``; grad_precision.py). Stages 0/1 accumulate in the flat buffer
(fp32: 4Ψ instead of 2Ψ) and communicate nothing until the boundary micro-step, as DDP's
``no_sync`` does. Stage 2 does the same when it sums in the model's dtype (gradients stay in
``p.grad``); summing in fp32 it reduces every micro-step into its fp32 partition (4Ψ/N) as
DeepSpeed's stage 2 does, since keeping unreduced fp32 gradients would need a full 4Ψ buffer.

The step itself is base.py's. Under fp32 at stage 0 the master *is* ``flat_params`` (no copy);
partitioned, a rank's pieces are spread over the buckets, so its fp32 master is a copy (as
DeepSpeed's stages 1-2 keep one). With ``offload_optimizer`` (offload.py) the
master, the optimizer states and the reduced gradient partition live in host memory and the
step runs there; the updated slice is copied back into ``flat_params`` and all-gathered.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from ..comm import Comm
from ..precision import LossScaler
from .base import PartitionedOptimizer
from .inner_links import link_inner_optimizer
from .offload import HostPublish, OffloadSettings, copy_between, host_empty, host_zeros
from .grad_precision import GradientPrecision, set_grad_dtype
from .partition import FlatLayout
from .reduction import GradientOrderError, GradientReducer
from .stage12_reduction import BucketReducer

__all__ = ["GradientOrderError", "Stage12Optimizer", "ZeroSettings"]

NamedParams = Sequence[tuple[str, nn.Parameter]]


@dataclass(frozen=True)
class ZeroSettings:
    """The ``zero_optimization`` knobs stages 0-2 use, plus ``gradient_clipping``."""

    stage: int = 0
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    gradient_clipping: float = 0.0


class Stage12Optimizer(PartitionedOptimizer):
    """Owns the flat buffers, the gradient reduction and the optimizer step for stages 0-2.

    ``groups`` are the optimizer's parameter groups as ``(hyperparameters, [(name, param)])``;
    ``make_optimizer`` builds the torch optimizer from master param groups (engine/optimizers.py).
    The engine calls ``begin_backward``/``end_backward`` around each backward and ``step`` at
    accumulation boundaries. ``param_groups``/``state``/``defaults`` are the inner optimizer's,
    so LR schedules work on this object as on a torch optimizer.
    """

    def __init__(self, groups: Sequence[tuple[Mapping[str, Any], NamedParams]],
                 make_optimizer: Callable[[list[dict[str, Any]]], Optimizer], *, settings: ZeroSettings,
                 comm: Comm, model_dtype: torch.dtype, loss_scaler: LossScaler, device: torch.device,
                 offload: Optional[OffloadSettings] = None, grads: Optional[GradientPrecision] = None) -> None:
        if settings.stage not in (0, 1, 2):
            raise ValueError(f"Stage12Optimizer implements stages 0-2, got {settings.stage}")
        self.settings, self.comm, self.loss_scaler = settings, comm, loss_scaler
        self.stage = settings.stage
        self.model_dtype, self.device = model_dtype, device
        self.offload = offload or OffloadSettings()
        if self.offload.param or (self.offload.optimizer and self.stage == 0):
            raise ValueError("offload_param needs ZeRO stage 3 and offload_optimizer stage 1 or higher")
        count = comm.world_size if self.stage >= 1 else 1
        self.params: list[nn.Parameter] = [p for _, named in groups for _, p in named]
        named_groups = [list(named) for _, named in groups]
        if self.stage >= 1:
            self.layout = FlatLayout.bucketed(named_groups, count, self._reduce_bucket_numel(
                sum(p.numel() for p in self.params)))
        else:
            self.layout = FlatLayout.build(named_groups, partition_count=1)
        self._rank = comm.rank if count > 1 else 0   # whose partition this rank updates
        precision = grads or GradientPrecision()
        self.grad_dtype = precision.dtype_for(model_dtype)
        # stage 2 summing in a wider dtype than the model's reduces every micro-step into the
        # (wide) partition: holding the unreduced gradients instead would take a full-size buffer
        self._reduce_every_pass = self.stage == 2 and self.grad_dtype != model_dtype

        self.flat_params = self._adopt_params(device)
        comm.broadcast(self.flat_params, src=0)       # every rank starts from rank 0's weights
        self.flat_grads: Optional[torch.Tensor] = None
        self.grad_partition: Optional[torch.Tensor] = None
        self._grad_views: list[torch.Tensor] = []
        self._make_grad_storage(device)

        self.master_is_view = model_dtype == torch.float32 and not self.offload.optimizer and count == 1
        self.master: Optional[torch.Tensor] = None
        self._publish: Optional[HostPublish] = None
        self._masters = self._make_masters(device)
        self._build_inner_optimizer(groups, make_optimizer)
        link_inner_optimizer(self.optimizer, self.layout, self.master_params, self._rank, comm, device)

        reducer = BucketReducer if self.stage >= 1 else GradientReducer
        reduce_dtype = precision.reduce_dtype_for(model_dtype) if self.stage >= 1 else self.grad_dtype
        self.reducer = reducer(
            self.layout, self.params, comm, bucket_numel=self._reduce_bucket_numel(self.layout.numel), rank=self._rank,
            dtype=reduce_dtype, device=device,
            overlap=settings.overlap_comm or self._reduces_in_place(reduce_dtype),
            predivide=precision.predivide_for(model_dtype, comm.world_size, self.stage),
            flat_grads=self.flat_grads,
            grad_views=self._grad_views, grad_partition=self.grad_partition, accumulate=self._reduce_every_pass)
        self.buckets = self.reducer.buckets
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(functools.partial(self._on_grad_ready, i))
        self.global_grad_norm: Optional[torch.Tensor] = None
        self.overflow = False

    # -- set-up -------------------------------------------------------------------------------
    def _reduce_bucket_numel(self, numel: int) -> int:
        """``reduce_bucket_size``, but no more than a quarter of the model.

        Stage 2 copies gradients into a staging buffer of one bucket, held until its bucket is
        complete, on top of the 4Ψ/N gradient partition: with DeepSpeed's default (5e8
        elements) a model under that size is staged whole, and stage 2 ends up holding more
        gradient memory than stage 1 (measured on bench-100m: 1981 vs 1782 MiB peak RSS).
        Stages 0/1 reduce in place inside the flat gradient buffer, where the bucket sets how
        many collectives run and how early the first can start (``_reduces_in_place``): one
        bucket of the whole model starts only when backward is over. A quarter bounds stage 2's
        staging at Ψ/4 and lets three quarters of stages 0/1's reduction run under backward,
        while keeping the collectives few and large; a parameter larger than that is still one
        bucket of its own.
        """
        return max(1, min(int(self.settings.reduce_bucket_size), -(-numel // 4)))

    def _reduces_in_place(self, reduce_dtype: torch.dtype) -> bool:
        """Whether each bucket is reduced where autograd accumulated it (stages 0/1, no
        ``communication_data_type`` cast), so its collective can start, asynchronously, as soon
        as its last gradient of the boundary micro-step is in, whatever ``overlap_comm`` says.

        ``overlap_comm`` exists to trade memory for overlap (DeepSpeed's second IPG buffer); in
        place there is no memory to trade: the collective reads and writes the gradients
        themselves, which nothing touches again in this backward. So stages 0/1 overlap their
        reduction with the rest of backward as DDP does (its buckets are reduced in the same
        way), instead of exposing all of it after backward. As with DDP and DeepSpeed, a
        parameter whose gradient is accumulated twice in one backward after its bucket went out
        (reentrant checkpointing of a tied weight) is an error that says so (reduction.py).
        """
        return self.stage <= 1 and reduce_dtype == self.grad_dtype and self.comm.active

    def _view(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        entry = self.layout.params[index]
        return flat[entry.buffer_offset:entry.buffer_offset + entry.numel].view(entry.shape)

    def _adopt_params(self, device: torch.device) -> torch.Tensor:
        """Copy the parameters into one flat buffer and make each parameter a view of it."""
        flat = torch.zeros(self.layout.padded_numel, dtype=self.model_dtype, device=device)
        with torch.no_grad():
            for i, p in enumerate(self.params):
                view = self._view(flat, i)
                view.copy_(p.detach())
                p.data = view
        return flat

    def _make_grad_storage(self, device: torch.device) -> None:
        """Stages 1-2: this rank's gradient partition (in host memory when offloading).
        Stages 0/1: a flat buffer that every ``p.grad`` is a view of, so autograd accumulates
        straight into what gets reduced (in ``grad_dtype``: autograd casts each micro-step's
        gradient into it, torch's ``Parameter.grad_dtype``)."""
        dtype = self.grad_dtype
        if self.stage >= 1:
            if self.offload.optimizer:
                self.grad_partition = host_zeros(self.layout.partition_numel, dtype, self.offload)
            else:
                self.grad_partition = torch.zeros(self.layout.partition_numel, dtype=dtype, device=device)
        if self.stage == 2:
            return
        self.flat_grads = torch.zeros(self.layout.padded_numel, dtype=dtype, device=device)
        self._grad_views = [self._view(self.flat_grads, i) for i in range(len(self.params))]
        for p, view in zip(self.params, self._grad_views):
            if dtype != self.model_dtype:
                set_grad_dtype(p, dtype)
            p.grad = view

    def _make_masters(self, device: torch.device) -> list[torch.Tensor]:
        """One fp32 master slice per group: views into flat_params (fp32, stage 0) or into self.master."""
        if self.offload.nvme:       # the swap files get the masters from master_sources, chunk by chunk
            return [torch.empty(0, dtype=torch.float32) for _ in self.layout.groups]
        if self.master_is_view:
            return [self.flat_params[g.buffer_offset:g.buffer_offset + g.partition_numel] for g in self.layout.groups]
        if self.offload.optimizer:
            self.master = host_empty(self.layout.partition_numel, torch.float32, self.offload)
        else:
            self.master = torch.empty(self.layout.partition_numel, dtype=torch.float32, device=device)
        for local, piece in self._own_pieces():
            self.master[local:local + piece.numel()].copy_(piece)
        return [self.master[g.local_offset:g.local_offset + g.partition_numel] for g in self.layout.groups]

    def master_sources(self) -> list[tuple[int, torch.Tensor]]:
        """Where the fp32 masters' first values are (partition-local offset, tensor): the rank's
        pieces of the flat parameters."""
        return self._own_pieces()

    def _own_pieces(self) -> list[tuple[int, torch.Tensor]]:
        """``(local offset, view of flat_params)`` of this rank's piece of every span."""
        return [(local, self.flat_params[start:start + span.partition_numel])
                for span, start, local in self.layout.owned_pieces(self._rank)]

    # -- backward: the reducer does the work ------------------------------------------------------
    def begin_backward(self, boundary: bool) -> None:
        """Called before each backward; only the boundary micro-step's backward communicates
        (and not even that one while a 1-bit optimizer averages its momentum itself)."""
        if (boundary or self._reduce_every_pass) and not self.local_gradients:
            self.reducer.begin_pass()
        else:
            self.reducer.active = False

    def end_backward(self) -> None:
        """Called after each backward: on the boundary, reduce what is left and wait for it."""
        if self.reducer.active:
            self.reducer.finish_pass()

    def _on_grad_ready(self, index: int, param: nn.Parameter) -> None:
        self.reducer.grad_ready(index, param)

    def reduce_gradients(self) -> None:
        """Reduce now, e.g. when the user ran ``loss.backward()`` instead of ``engine.backward``."""
        if not self.reducer.reduced and not self.local_gradients:
            self.reducer.finish_pass()

    def _reduction_consumed(self) -> None:
        self.reducer.reduced = False

    # -- the step (base.py) uses these -----------------------------------------------------------
    def _own_grads(self) -> list[torch.Tensor]:
        if self.grad_partition is not None:
            return [self.grad_partition[g.local_offset:g.local_offset + g.partition_numel] for g in self.layout.groups]
        return [self.flat_grads[g.buffer_offset:g.buffer_offset + g.partition_numel] for g in self.layout.groups]

    def _lowp_targets(self) -> Optional[list[torch.Tensor]]:
        """Where the fused step may write the model's dtype: the pinned staging of offload (the
        host step casts there), or at stage 0 the flat parameters themselves. Partitioned, a rank's
        pieces are not one slice of ``flat_params``, so the step writes the master and
        ``_publish_params`` casts each piece into place."""
        publish = self._offload_publish()
        if publish is not None:
            return self.publish_targets()
        if self.layout.partition_count > 1 or self._masters[0].device != self.flat_params.device:
            return None
        return [self.flat_params.narrow(0, g.buffer_offset, g.partition_numel) for g in self.layout.groups]

    def publish_targets(self) -> list[torch.Tensor]:
        """Per group, the contiguous host staging the host step (CPU or NVMe offload) writes the
        updated parameters into, in the model's dtype; ``_publish_params`` sends them on."""
        publish = self._offload_publish()
        assert publish is not None, "publish_targets needs offload_optimizer"
        return publish.targets([(g.local_offset, g.local_offset + g.partition_numel) for g in self.layout.groups])

    def _offload_publish(self) -> Optional[HostPublish]:
        """offload_optimizer (CPU or NVMe): the pinned staging the host step's results go back
        through (offload.py), made on first use."""
        if not self.offload.optimizer:
            return None
        if self._publish is None:
            self._publish = HostPublish(self.layout.partition_numel, self.model_dtype, self.offload, self.device)
        return self._publish

    def publishes_apart(self) -> bool:
        """The master is a copy of its own (not the parameters themselves, not in swap files)."""
        return not self.master_is_view and self.nvme is None and self.master is not None

    def publish_partition(self, local: Optional[torch.Tensor]) -> None:
        if not self.publishes_apart():
            super().publish_partition(local)
        self._publish_params(False, source=local)

    @torch.no_grad()
    def _publish_params(self, local_copied: bool = False, source: Optional[torch.Tensor] = None) -> None:
        """Updated master partitions (or ``source``, values of the same layout) -> model parameters on
        every rank: this rank's pieces into ``flat_params``, then one all-gather per bucket
        (stage12_reduction.py's spans)."""
        publish = self._offload_publish()
        master = source if source is not None else None if self.master_is_view or local_copied else self.master
        for local, piece in self._own_pieces():
            source = None if master is None else master[local:local + piece.numel()]
            if publish is not None:
                publish.send(piece, local, local + piece.numel(), source)
            elif source is not None:
                copy_between(piece, source)
        if self.layout.partition_count > 1:
            for span, _, _ in self.layout.owned_pieces(self._rank):
                region = self.flat_params[span.buffer_offset:span.buffer_offset + span.padded_numel(self.comm.world_size)]
                self.comm.all_gather_partitions(region, span.partition_numel, self.settings.allgather_bucket_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients (the flat buffers are zeroed and kept, never freed)."""
        self.reducer.flush_host()    # offload: the host copies have read the reduced pieces
        if self.stage == 2:
            self.grad_partition.zero_()
            for p in self.params:
                p.grad = None
        else:
            self.flat_grads.zero_()
            for p, view in zip(self.params, self._grad_views):
                p.grad = view

    # -- accounting -----------------------------------------------------------------------------
    def model_state_bytes(self) -> dict[str, int]:
        """Bytes of the model states this rank holds (params, grads, master, optimizer_states,
        buffers), counted from the tensors themselves, wherever they live."""
        size = self._bytes
        stray = sum(size(p.grad) for i, p in enumerate(self.params)
                    if p.grad is not None and not (self._grad_views and p.grad is self._grad_views[i]))
        return {"params": size(self.flat_params), "grads": size(self.flat_grads) + size(self.grad_partition) + stray,
                "master": 0 if self.master_is_view else size(self.master),
                "optimizer_states": self._state_bytes(), "buffers": self.reducer.pool_bytes()}

    def offloaded_bytes(self) -> int:
        """The part of ``model_state_bytes`` that offload keeps in host memory instead of on the device."""
        if not self.offload.optimizer:
            return 0
        size = self._bytes
        return size(self.master) + self._state_bytes() + size(self.grad_partition)

    def __repr__(self) -> str:
        return (f"Stage12Optimizer(stage={self.stage}, partitions={self.layout.partition_count}, "
                f"params={self.layout.numel}, optimizer={type(self.optimizer).__name__}"
                f"{', offload_optimizer=cpu' if self.offload.optimizer else ''})")
