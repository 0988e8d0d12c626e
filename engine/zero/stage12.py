"""ZeRO stages 0, 1 and 2: flat buffers, gradient reduction and the partitioned optimizer step.

What each stage keeps on every rank (Ψ parameters, N ranks, mixed precision):

==========  ==================  ====================  ========================  ============
stage       model params        gradients             fp32 master + Adam state  ZeRO paper
==========  ==================  ====================  ========================  ============
0           all (2Ψ)            all (2Ψ)              all (12Ψ)                 16Ψ
1           all (2Ψ)            all (2Ψ)              own partition (12Ψ/N)     4Ψ + 12Ψ/N
2           all (2Ψ)            own partition (2Ψ/N)  own partition (12Ψ/N)     2Ψ + 14Ψ/N
==========  ==================  ====================  ========================  ============

The model's parameters are views into one flat buffer per rank (``flat_params``), laid out by
``FlatLayout`` so that each rank's partition is a contiguous slice. That makes the all-gather
after the step write straight into the parameters, and lets stages 0/1 keep gradients as
views into a flat gradient buffer that is reduced in place, bucket by bucket.

Stage 2 never holds all gradients at once: a post-accumulate-grad hook copies each gradient
into a bucket buffer the moment autograd finishes it and frees it; a full bucket is reduced
(asynchronously when ``overlap_comm``, so communication overlaps the rest of backward) and
the owner keeps its slice in the flat gradient partition.

Gradient accumulation communicates nothing until the boundary micro-step: gradients stay
local (in ``p.grad``) and only the boundary's backward reduces, as DDP's ``no_sync`` does.
Buckets are reduced in one fixed order on every rank (collectives must match across ranks),
even if autograd finishes them in another.

The step: gradient norm over all partitions (one all-reduce of a scalar), overflow check,
one combined multiplier (1/loss scale, 1/world size, clip coefficient) applied to the flat
gradient, the optimizer over the flat fp32 master partition, then the updated partition is
cast into ``flat_params`` and all-gathered. Under fp32 the master partition *is* the slice
of ``flat_params`` (no copy), and so is its gradient.
"""
from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from ..comm import Comm, Handle
from ..optimizers import step_with_multiplier, takes_scale_kwargs
from ..precision import LossScaler
from .partition import Bucket, FlatLayout

__all__ = ["GradientOrderError", "ZeroOptimizer", "ZeroSettings"]

NamedParams = Sequence[tuple[str, nn.Parameter]]


class GradientOrderError(RuntimeError):
    """A parameter received a gradient after its bucket had already been reduced."""


@dataclass(frozen=True)
class ZeroSettings:
    """The ``zero_optimization`` knobs stages 0-2 use, plus ``gradient_clipping``."""

    stage: int = 0
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    gradient_clipping: float = 0.0


class ZeroOptimizer:
    """Owns the flat buffers, the gradient reduction and the optimizer step for stages 0-2.

    ``groups`` are the optimizer's parameter groups as ``(hyperparameters, [(name, param)])``;
    ``make_optimizer`` builds the torch optimizer from master param groups (engine/optimizers.py).
    The engine calls ``begin_backward``/``end_backward`` around each backward and ``step`` at
    accumulation boundaries. ``param_groups``/``state``/``defaults`` are the inner optimizer's,
    so LR schedules work on this object as on a torch optimizer.
    """

    def __init__(self, groups: Sequence[tuple[Mapping[str, Any], NamedParams]],
                 make_optimizer: Callable[[list[dict[str, Any]]], Optimizer], *, settings: ZeroSettings,
                 comm: Comm, model_dtype: torch.dtype, loss_scaler: LossScaler, device: torch.device) -> None:
        if settings.stage not in (0, 1, 2):
            raise ValueError(f"ZeroOptimizer implements stages 0-2, got {settings.stage}")
        self.settings, self.comm, self.loss_scaler = settings, comm, loss_scaler
        self.stage = settings.stage
        self.model_dtype = model_dtype
        count = comm.world_size if self.stage >= 1 else 1
        self.layout = FlatLayout.build([list(named) for _, named in groups], partition_count=count)
        self.params: list[nn.Parameter] = [p for _, named in groups for _, p in named]
        self._rank = comm.rank if count > 1 else 0   # whose partition this rank updates
        self._prescale = model_dtype == torch.float16  # average before summing: fp16 sums overflow

        self.flat_params = self._adopt_params(device)
        comm.broadcast(self.flat_params, src=0)       # every rank starts from rank 0's weights
        self.flat_grads: Optional[torch.Tensor] = None
        self.grad_partition: Optional[torch.Tensor] = None
        self._grad_views: list[torch.Tensor] = []
        self._make_grad_storage(device)

        self.master_is_view = model_dtype == torch.float32
        self.master: Optional[torch.Tensor] = None
        self._masters = self._make_masters(device)
        self.master_params = [nn.Parameter(m) for m in self._masters]
        self.optimizer = make_optimizer([{**dict(hyper), "params": [mp]}
                                         for (hyper, _), mp in zip(groups, self.master_params)])
        # engine.ops' optimizers unscale, clip and write the low-precision copy in their one pass;
        # they also read bf16/fp16 gradients directly, which saves a 4Ψ/N fp32 gradient copy.
        self._fused_step = takes_scale_kwargs(self.optimizer)
        self._lowp_grads = self._fused_step and not self.master_is_view and self._allow_lowp_grads()

        self.buckets = self.layout.buckets(settings.reduce_bucket_size)
        self._order: list[Bucket] = list(reversed(self.buckets))  # backward finishes last params first
        self._position = {b.index: pos for pos, b in enumerate(self._order)}
        self._bucket_of = {i: b.index for b in self.buckets for i in b.params}
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(functools.partial(self._on_grad_ready, i))

        self._pass_active = False     # inside the boundary micro-step's backward
        self._reduced = False         # this step's gradients are reduced
        self._pending: list[int] = []
        self._next = 0                # position in self._order of the next bucket to launch
        self._arrived: set[int] = set()
        self._inflight: deque[tuple[Bucket, Handle]] = deque()
        self._buffers: dict[int, torch.Tensor] = {}   # stage 2: bucket index -> staging buffer
        self._free: list[torch.Tensor] = []
        self._pool: list[torch.Tensor] = []
        self.global_grad_norm: Optional[float] = None
        self.overflow = False

    # -- torch.optim.Optimizer look-alike ---------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale

    cur_scale = loss_scale  # DeepSpeed's name

    # -- set-up -------------------------------------------------------------------------------
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
        """Stage 2: this rank's gradient partition only. Stages 0/1: a flat buffer that every
        ``p.grad`` is a view of, so autograd accumulates straight into what gets reduced."""
        if self.stage == 2:
            self.grad_partition = torch.zeros(self.layout.partition_numel, dtype=self.model_dtype, device=device)
            return
        self.flat_grads = torch.zeros(self.layout.padded_numel, dtype=self.model_dtype, device=device)
        self._grad_views = [self._view(self.flat_grads, i) for i in range(len(self.params))]
        for p, view in zip(self.params, self._grad_views):
            p.grad = view

    def _make_masters(self, device: torch.device) -> list[torch.Tensor]:
        """One fp32 master slice per group: views into flat_params (fp32) or into self.master."""
        ranges = [g.partition_range(self._rank) for g in self.layout.groups]
        if self.master_is_view:
            return [self.flat_params[lo:hi] for lo, hi in ranges]
        self.master = torch.empty(self.layout.partition_numel, dtype=torch.float32, device=device)
        views = []
        for g, (lo, hi) in zip(self.layout.groups, ranges):
            view = self.master[g.local_offset:g.local_offset + g.partition_numel]
            view.copy_(self.flat_params[lo:hi])
            views.append(view)
        return views

    def _allow_lowp_grads(self) -> bool:
        """Let the fp32 masters carry bf16/fp16 gradients (torch >= 2.10 has ``grad_dtype``)."""
        try:
            for mp in self.master_params:
                mp.grad_dtype = None
        except (AttributeError, RuntimeError, TypeError):
            return False
        return True

    # -- backward: collecting and reducing gradients ----------------------------------------
    def begin_backward(self, boundary: bool) -> None:
        """Called before each backward; only the boundary micro-step's backward communicates."""
        self._pass_active = boundary
        if boundary:
            self._start_pass()

    def end_backward(self) -> None:
        """Called after each backward: on the boundary, reduce what is left and wait for it."""
        if self._pass_active:
            self._flush()
            self._pass_active = False

    def _start_pass(self) -> None:
        self._pending = [len(b.params) for b in self.buckets]
        self._next = 0
        self._arrived = set()
        self._reduced = False

    def _on_grad_ready(self, index: int, param: nn.Parameter) -> None:
        if not self._pass_active:
            return                      # accumulation micro-step: the gradient stays local
        if self.stage < 2 and not self.settings.overlap_comm:
            return                      # reduced in one go by end_backward
        bucket = self.buckets[self._bucket_of[index]]
        if index in self._arrived:
            self._second_arrival(index, bucket)
            return
        self._arrived.add(index)
        if self.stage == 2:
            self._stage_grad(index, param, bucket)
        else:
            self._adopt_grad(index, param)
        self._pending[bucket.index] -= 1
        if self._pending[bucket.index] == 0:
            self._launch_ready(async_op=self.settings.overlap_comm)

    def _second_arrival(self, index: int, bucket: Bucket) -> None:
        """A parameter's gradient finished twice in one backward (reentrant checkpointing)."""
        if self._position[bucket.index] < self._next:
            raise GradientOrderError(
                f"parameter {self.layout.params[index].name!r} received a second gradient after its bucket was "
                "reduced. This happens with reentrant activation checkpointing; use "
                "engine.checkpointing.checkpoint (non-reentrant) or torch.utils.checkpoint(use_reentrant=False).")
        if self.stage == 2:
            entry, param = self.layout.params[index], self.params[index]
            rel = entry.buffer_offset - bucket.start
            self._buffer_for(bucket)[rel:rel + entry.numel].add_(param.grad.reshape(-1))
            param.grad = None

    def _adopt_grad(self, index: int, param: nn.Parameter) -> None:
        """Stages 0/1: make sure the gradient lives in (is a view of) the flat gradient buffer.

        It normally does; a ``module.zero_grad(set_to_none=True)`` makes autograd allocate a
        fresh tensor instead, which is copied in here.
        """
        view, grad = self._grad_views[index], param.grad
        if grad is None:
            view.zero_()
        elif grad.data_ptr() != view.data_ptr():
            view.copy_(grad)
        param.grad = view

    def _stage_grad(self, index: int, param: nn.Parameter, bucket: Bucket) -> None:
        """Stage 2: copy the finished gradient into its bucket's buffer and free it."""
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
            else:
                buf = torch.empty(max(b.numel for b in self.buckets), dtype=self.model_dtype,
                                  device=self.flat_params.device)
                self._pool.append(buf)
            self._buffers[bucket.index] = buf
        return buf[:bucket.numel]

    def _launch_ready(self, async_op: bool) -> None:
        while self._next < len(self._order) and self._pending[self._order[self._next].index] == 0:
            self._launch(self._order[self._next], async_op)
            self._next += 1

    def _launch(self, bucket: Bucket, async_op: bool) -> None:
        if self.stage == 2:
            data = self._buffers[bucket.index][:bucket.numel]
        else:
            data = self.flat_grads[bucket.start:bucket.end]
        if self._prescale and self.comm.active:
            data.mul_(1.0 / self.comm.world_size)
        if self.layout.partition_count > 1:
            handle = self.comm.reduce_to_owners(data, bucket.pieces, async_op=async_op)
        else:
            handle = self.comm.all_reduce(data, async_op=async_op)
        self._inflight.append((bucket, handle))
        if not async_op:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        bucket, handle = self._inflight.popleft()
        handle.wait()
        if self.stage != 2:
            return
        buf = self._buffers.pop(bucket.index)
        group = self.layout.groups[bucket.group]
        part_start = group.partition_range(self._rank)[0]
        for rank, lo, hi in bucket.pieces:
            if rank == self._rank:
                local = group.local_offset + bucket.start + lo - part_start
                self.grad_partition[local:local + hi - lo].copy_(buf[lo:hi])
        self._free.append(buf)

    def _flush(self) -> None:
        """Reduce every bucket not yet launched (gradients that never arrived count as zero)."""
        for bucket in self._order[self._next:]:
            for i in bucket.params:
                if i not in self._arrived:
                    self._arrived.add(i)
                    if self.stage == 2:
                        self._stage_grad(i, self.params[i], bucket)
                    else:
                        self._adopt_grad(i, self.params[i])
            self._launch(bucket, async_op=True)
        self._next = len(self._order)
        while self._inflight:
            self._complete_oldest()
        self._reduced = True

    def reduce_gradients(self) -> None:
        """Reduce now, e.g. when the user ran ``loss.backward()`` instead of ``engine.backward``."""
        if not self._reduced:
            if not self._pass_active:
                self._start_pass()
            self._flush()
            self._pass_active = False

    # -- the step -----------------------------------------------------------------------------
    def _own_grads(self) -> list[torch.Tensor]:
        """Per group: the reduced gradient slice this rank's master partition consumes."""
        out = []
        for g in self.layout.groups:
            if self.stage == 2:
                out.append(self.grad_partition[g.local_offset:g.local_offset + g.partition_numel])
            else:
                lo, hi = g.partition_range(self._rank)
                out.append(self.flat_grads[lo:hi])
        return out

    def step(self) -> bool:
        """One optimizer step at an accumulation boundary; False when skipped for overflow."""
        self.reduce_gradients()
        self._reduced = False
        grads = self._own_grads()
        divisor = self.loss_scaler.loss_scale * (1 if self._prescale else self.comm.world_size)
        norm = self._global_norm(grads) / divisor
        self.global_grad_norm = norm
        self.overflow = not math.isfinite(norm)
        if self.overflow:
            self.loss_scaler.update(True)
            self.zero_grad()
            return False
        clip = self.settings.gradient_clipping
        clip_coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        for mp, grad in zip(self.master_params, grads):
            mp.grad = grad if grad.dtype == torch.float32 or self._lowp_grads else grad.float()
        lowp = None
        if self._fused_step and not self.master_is_view:
            lowp = [self.flat_params.narrow(0, lo, hi - lo)
                    for lo, hi in (g.partition_range(self._rank) for g in self.layout.groups)]
        copied = step_with_multiplier(self.optimizer, divisor, clip_coef, lowp_out=lowp)
        for mp in self.master_params:
            mp.grad = None
        self.loss_scaler.update(False)
        self.zero_grad()
        self._publish_params(copied)
        return True

    def _global_norm(self, grads: Sequence[torch.Tensor]) -> float:
        """L2 norm of the reduced gradient over all partitions (inf/nan when it overflowed)."""
        square = torch.zeros((), dtype=torch.float32, device=self.flat_params.device)
        for g in grads:
            if g.numel():
                square += torch.linalg.vector_norm(g, dtype=torch.float32).square()
        if self.layout.partition_count > 1:
            self.comm.all_reduce(square)
        return math.sqrt(square.item()) if math.isfinite(square.item()) else float("inf")

    @torch.no_grad()
    def _publish_params(self, local_copied: bool = False) -> None:
        """Updated master partitions -> model parameters on every rank."""
        for g, master in zip(self.layout.groups, self._masters):
            lo, hi = g.partition_range(self._rank)
            if not self.master_is_view and not local_copied:
                self.flat_params[lo:hi].copy_(master)
            if self.layout.partition_count > 1:
                flat = self.flat_params[g.buffer_offset:g.buffer_offset + g.padded_numel]
                self.comm.all_gather_partitions(flat, g.partition_numel, self.settings.allgather_bucket_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients (the flat buffers are zeroed and kept, never freed)."""
        if self.stage == 2:
            self.grad_partition.zero_()
            for p in self.params:
                p.grad = None
        else:
            self.flat_grads.zero_()
            for p, view in zip(self.params, self._grad_views):
                p.grad = view

    # -- accounting and checkpoint access --------------------------------------------------
    def model_state_bytes(self) -> dict[str, int]:
        """Bytes of the model states this rank holds, counted from the tensors themselves."""
        def size(t: Optional[torch.Tensor]) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        flat_grad = self.flat_grads if self.flat_grads is not None else self.grad_partition
        stray = sum(size(p.grad) for i, p in enumerate(self.params)
                    if p.grad is not None and not (self._grad_views and p.grad is self._grad_views[i]))
        states = sum(size(v) for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v))
        return {"params": size(self.flat_params), "grads": size(flat_grad) + stray,
                "master": 0 if self.master_is_view else size(self.master),
                "optimizer_states": states, "buffers": sum(size(b) for b in self._pool)}

    def master_partition(self) -> torch.Tensor:
        """This rank's fp32 master weights as one flat tensor (``layout.partition_numel``)."""
        return self._masters[0] if len(self._masters) == 1 else torch.cat(self._masters)

    def optimizer_state_partitions(self) -> dict[str, torch.Tensor]:
        """This rank's optimizer states: flat tensors like the master partition (e.g.
        ``exp_avg``, ``exp_avg_sq``), scalars (``step``) as 0-dim tensors. Empty before the
        first step (torch creates optimizer state lazily)."""
        states = [self.optimizer.state.get(mp, {}) for mp in self.master_params]
        keys = sorted({k for st in states for k in st})
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            values = [st.get(key) for st in states]
            if all(torch.is_tensor(v) and v.shape == mp.shape for v, mp in zip(values, self.master_params)):
                out[key] = values[0] if len(values) == 1 else torch.cat(values)
            else:
                first = next(v for v in values if v is not None)
                out[key] = first.detach().clone() if torch.is_tensor(first) else torch.tensor(float(first))
        return out

    @torch.no_grad()
    def load_full(self, master: torch.Tensor, optimizer_states: Optional[Mapping[str, Any]] = None) -> None:
        """Fill this rank's partitions from full canonical vectors (see partition.py).

        ``master``: every parameter's fp32 value, length ``layout.numel``. ``optimizer_states``:
        per-element states as vectors of the same length, scalars (``step``) as numbers or
        0-dim tensors. Works whatever world size or stage wrote them: that is resharding.
        """
        master = master.to(device=self.flat_params.device, dtype=torch.float32)
        local = self.layout.shard(master, self._rank)
        for g, view in zip(self.layout.groups, self._masters):
            if not self.master_is_view:
                view.copy_(local[g.local_offset:g.local_offset + g.partition_numel])
        for entry in self.layout.params:  # every rank has the full vector: no all-gather needed
            self.flat_params[entry.buffer_offset:entry.buffer_offset + entry.numel].copy_(
                master[entry.offset:entry.offset + entry.numel])
        if optimizer_states:
            self._load_states(optimizer_states)

    def _load_states(self, full_states: Mapping[str, Any]) -> None:
        shards = {k: self.layout.shard(v.to(self.flat_params.device, torch.float32), self._rank)
                  for k, v in full_states.items() if torch.is_tensor(v) and v.dim() == 1}
        state: dict[int, dict[str, Any]] = {}
        for i, g in enumerate(self.layout.groups):
            st: dict[str, Any] = {}
            for key, value in full_states.items():
                if key in shards:
                    st[key] = shards[key][g.local_offset:g.local_offset + g.partition_numel].clone()
                else:
                    st[key] = torch.tensor(float(value), dtype=torch.float32)
            state[i] = st
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)

    def __repr__(self) -> str:
        return (f"ZeroOptimizer(stage={self.stage}, partitions={self.layout.partition_count}, "
                f"params={self.layout.numel}, optimizer={type(self.optimizer).__name__})")
