"""ZeRO stage 3: parameters, gradients and optimizer states all partitioned (16Ψ/N per rank).

What a rank keeps (Ψ parameters, N ranks, mixed precision; ZeRO paper, arXiv:1910.02054):

===========================  =================  =================================================
state                        bytes              where (offload.py)
===========================  =================  =================================================
low-precision params         2Ψ/N               ``partition`` (device; host with offload_param cpu;
                                                   swap files with nvme, stage3_swapped.py)
frozen params                2Φ/N               the store's partition, after ``partition``
gradients                    4Ψ/N (2Ψ/N)        ``grad_partition`` in ``grad_dtype``: fp32 by default,
                                                   bf16/fp16 with ``data_types.grad_accum_dtype``
                                                   (host with offload_optimizer)
fp32 master + Adam m, v      12Ψ/N              ``master`` + optimizer state (host when offloaded)
persistent small params      2 × their count    gathered all the time (stage3_params.py)
gathered units, buckets      bounded            stage3_max_live_parameters, reduce_bucket_size
===========================  =================  =================================================

The partitions are ``FlatLayout`` slices with the same groups and canonical order as stages 1-2,
but every fetch unit's parameters form spans sharded evenly over the ranks on their own
(stage3_units.py plans the units, partition.py lays them out): a gather is one all-gather into
the unit's buffer and a gradient bucket one reduce-scatter into the owner's shard, whatever N.
Checkpoints describe every parameter's ranges, so ``load_full`` and resharding between any stage,
layout and world size work unchanged.
Under fp32 (and no offload split) the master partition *is* the parameter partition.

Frozen parameters (``requires_grad=False``, Φ elements: a frozen base model under adapters) are
partitioned as well, in the model dtype, and never get masters, optimizer state or gradients:
the store's layout (``store.layout``) is the optimizer's groups plus one group of them, so
``partition`` (what the optimizer, the reducer and checkpoints see) is the head of
``store.partition`` and the frozen share its tail (stage3_frozen.py). Checkpoints keep writing
them whole from rank 0 as the other stages do, gathered one unit at a time.

Who does what: ``PartitionedParams`` (stage3_params.py) holds the partition and gathers/releases
fetch units; ``ParamCoordinator`` (stage3_hooks.py) decides when, from module hooks, the fetch
trace and the budgets; the ``SpanReducer`` (stage3_reduction.py) reduce-scatters every micro-step's
gradients into ``grad_partition`` (accumulating across micro-steps: a full gradient never
outlives its backward); the step is base.py's, after which the updated master is cast into the
partition and the persistent parameters are gathered again.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from ..comm import Comm
from ..precision import LossScaler
from .base import PartitionedOptimizer
from .grad_precision import GradientPrecision
from .offload import HostPublish, OffloadSettings, copy_between, host_zeros
from .partition import FlatLayout
from .stage3_reduction import SpanReducer
from .stage12 import ZeroSettings
from .stage3_frozen import FrozenShares, frozen_params, materialize_leftovers
from .stage3_hooks import ParamCoordinator
from .nvme_params import GroupSource, NvmeParamSettings, PartitionTargets
from .stage3_params import PartitionedParams
from .stage3_swapped import SwappedParams
from .stage3_shards import (full_from_shards, full_shape_view, is_partitioned_at_init, mark_partitioned,
                            release_init_shard, shard_of)
from .stage3_units import plan_units, unit_keys

__all__ = ["Stage3Optimizer", "Stage3Settings"]

NamedParams = Sequence[tuple[str, nn.Parameter]]


@dataclass(frozen=True)
class Stage3Settings(ZeroSettings):
    """``zero_optimization``'s stage-3 knobs (DeepSpeed's names and defaults), in elements."""

    stage: int = 3
    overlap_comm: bool = True
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int = 2**63 - 1
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    hold_tied_params: bool = False     # orch's stage3_hold_tied_params (stage3_hooks.py)
    gather_16bit_weights_on_model_save: bool = False


class Stage3Optimizer(PartitionedOptimizer):
    """Stage 3 over ``module``'s parameters (groups as for ``Stage12Optimizer``; see the module docstring).

    The engine calls ``begin_backward``/``end_backward`` around each backward and ``step`` at
    accumulation boundaries; ``module`` gets the hooks that gather parameters for its submodules.
    """

    def __init__(self, groups: Sequence[tuple[Mapping[str, Any], NamedParams]],
                 make_optimizer: Callable[[list[dict[str, Any]]], Optimizer], *, module: nn.Module,
                 settings: Stage3Settings, comm: Comm, model_dtype: torch.dtype, loss_scaler: LossScaler,
                 device: torch.device, offload: Optional[OffloadSettings] = None,
                 grads: Optional[GradientPrecision] = None, nvme_param: Optional[NvmeParamSettings] = None) -> None:
        self.settings, self.comm, self.loss_scaler = settings, comm, loss_scaler
        self.stage = 3
        self.model_dtype, self.device = model_dtype, device
        self.offload = offload or OffloadSettings()
        plans, store_layout = self._plan_layout(groups, module, settings, comm)
        self._rank = comm.rank
        precision = grads or GradientPrecision()
        self.grad_dtype = precision.dtype_for(model_dtype)

        self.swapped = nvme_param is not None        # offload_param nvme: the partition is in swap files
        self.store = self._make_store(store_layout, module, comm, plans, nvme_param)
        self.partition = (PartitionTargets(self.store.swap) if self.swapped   # the trainable groups' slices
                          else self.store.partition[:self.layout.partition_numel])
        self.store.load_from_params(self._full_value, self._own_piece)
        for p in self.store.params:
            release_init_shard(p)     # what Init kept is in the partition now
        materialize_leftovers(module, set(map(id, self.store.params)), comm, model_dtype, device)
        self.frozen_shares = FrozenShares(self.store, comm)   # the checkpoint code's way to the frozen ones

        numel = self.layout.partition_numel
        if self.offload.optimizer:
            self.grad_partition = host_zeros(numel, self.grad_dtype, self.offload)
        else:
            self.grad_partition = torch.zeros(numel, dtype=self.grad_dtype, device=device)
        self.master_is_view = (model_dtype == torch.float32 and self.offload.optimizer == self.offload.param
                               and not self.swapped)
        self.master: Optional[torch.Tensor] = None
        self._publish: Optional[HostPublish] = None
        self._masters = self._make_masters()
        self._build_inner_optimizer(groups, make_optimizer)

        self.reducer = SpanReducer(
            self.layout, self.params, comm, bucket_numel=self._reduce_bucket_numel(), rank=self._rank,
            dtype=precision.reduce_dtype_for(model_dtype), device=device, overlap=settings.overlap_comm,
            predivide=precision.predivide_for(model_dtype, comm.world_size), grad_partition=self.grad_partition,
            accumulate=True)
        self.coordinator = ParamCoordinator(
            module, self.store, self.reducer, prefetch_numel=settings.prefetch_bucket_size,
            max_live_numel=settings.max_live_parameters, max_reuse_distance=settings.max_reuse_distance,
            hold_tied=settings.hold_tied_params)
        for i, p in enumerate(self.store.params):   # lets GatheredParameters / register_external_parameter find us
            p.__dict__["_zero3_owner"] = (weakref.ref(self), i)
            mark_partitioned(p, self.store.layout.params[i].shape)
        if self.swapped:
            self.store.trace_source = self.coordinator      # the read-ahead follows the fetch trace
        self.global_grad_norm: Optional[torch.Tensor] = None
        self.overflow = False

    # -- set-up -------------------------------------------------------------------------------

    def _plan_layout(self, groups: Sequence[tuple[Mapping[str, Any], NamedParams]], module: nn.Module,
                     settings: Stage3Settings, comm: Comm) -> tuple[Any, FlatLayout]:
        """Fetch units over trainable then frozen parameters, and the even-per-unit layouts: the
        trainable groups' (``self.layout``, what the optimizer owns) and the whole store's."""
        trainable = [[(n, full_shape_view(p)) for n, p in named] for _, named in groups]
        self.params: list[nn.Parameter] = [p for _, named in groups for _, p in named]
        frozen = frozen_params(module, set(map(id, self.params)), self.model_dtype)
        self.frozen_params: list[nn.Parameter] = [p for _, p in frozen]
        frozen_group = [[(n, full_shape_view(p)) for n, p in frozen]] if frozen else []
        store_groups = trainable + frozen_group
        named_all = [item for group in store_groups for item in group]
        plans = plan_units(module, self.params + self.frozen_params, [t.numel() for _, t in named_all],
                           [n for n, _ in named_all], trainable=len(self.params),
                           persistence_threshold=settings.param_persistence_threshold,
                           model_persistence_threshold=settings.model_persistence_threshold)
        keys = unit_keys(plans, len(named_all))
        group_keys, at = [], 0
        for group in store_groups:
            group_keys.append(keys[at:at + len(group)])
            at += len(group)
        self.layout = FlatLayout.build(trainable, comm.world_size, span_keys=group_keys[:len(trainable)])
        store_layout = FlatLayout.build(store_groups, comm.world_size, span_keys=group_keys)
        return plans, store_layout

    def _make_store(self, layout: FlatLayout, module: nn.Module, comm: Comm, plans: Any,
                    nvme_param: Optional[NvmeParamSettings]) -> PartitionedParams:
        """The parameters' store, its partition on the device, in host memory (``offload_param: cpu``)
        or in swap files (``nvme``, stage3_swapped.py)."""
        common: dict[str, Any] = dict(rank=self._rank, dtype=self.model_dtype, device=self.device, plans=plans,
                                      trainable=len(self.params))
        params = self.params + self.frozen_params
        if nvme_param is not None:
            return SwappedParams(layout, params, module, comm, partition=torch.empty(0, dtype=self.model_dtype),
                                 nvme=nvme_param, trainable_numel=self.layout.partition_numel, **common)
        if self.offload.param:
            whole = host_zeros(layout.partition_numel, self.model_dtype, self.offload)
        else:
            whole = torch.zeros(layout.partition_numel, dtype=self.model_dtype, device=self.device)
        return PartitionedParams(layout, params, module, comm, partition=whole, **common)

    def _full_value(self, index: int) -> torch.Tensor:
        """Parameter ``index``'s full value, identical on every rank (rank 0's, or the Init shards')."""
        p = self.store.params[index]
        if is_partitioned_at_init(p):
            value = full_from_shards(p, self.comm).to(device=self.device, dtype=self.model_dtype)
            release_init_shard(p)
            return value
        value = p.detach().to(device=self.device, dtype=self.model_dtype).contiguous()
        self.comm.broadcast(value, src=0)        # every rank starts from rank 0's weights
        return value

    def _own_piece(self, index: int, size: int) -> Optional[torch.Tensor]:
        """This rank's ``size`` elements of parameter ``index`` when ``zero.Init`` already holds exactly
        them (split into as many equal pieces as the layout splits its span): no gather needed."""
        p = self.store.params[index]
        if not is_partitioned_at_init(p):
            return None
        info = shard_of(p)
        if info.piece.numel() != size or info.world != self.comm.world_size or info.rank != self.comm.rank:
            return None
        return info.piece.to(device=self.device, dtype=self.model_dtype)

    def _reduce_bucket_numel(self) -> int:
        """``reduce_bucket_size``, but no more than two of the largest fetch units.

        A bucket is reduced once all its gradients are in, and its staging buffer holds them until
        then; with DeepSpeed's default (5e8 elements) a whole small model's gradient would sit in
        one buffer until the end of backward, which stage 3 exists to avoid. Smaller buckets honour
        the setting (it is an upper bound) and let each reduce-scatter start as its layers finish.
        """
        largest = max((u.numel for u in self.store.units if not u.persistent and not u.frozen), default=1)
        return max(1, min(int(self.settings.reduce_bucket_size), 2 * largest))

    def _make_masters(self) -> list[torch.Tensor]:
        if self.offload.nvme:       # the swap files get the masters from master_sources, chunk by chunk
            return [torch.empty(0, dtype=torch.float32) for _ in self.layout.groups]
        if self.master_is_view:
            return [self.partition[g.local_offset:g.local_offset + g.partition_numel] for g in self.layout.groups]
        numel = self.layout.partition_numel
        if self.offload.optimizer:
            self.master = host_zeros(numel, torch.float32, self.offload)
        else:
            self.master = torch.zeros(numel, dtype=torch.float32, device=self.device)
        masters = [self.master[g.local_offset:g.local_offset + g.partition_numel] for g in self.layout.groups]
        if self.swapped:          # read from the swap files, a buffer at a time
            for g, view in zip(self.layout.groups, masters):
                self.store.swap.read_range(g.index, 0, g.partition_numel, view)
        else:
            copy_between(self.master, self.partition)
        return masters

    def master_sources(self) -> list[tuple[int, torch.Tensor]]:
        """Where the fp32 masters' first values are (partition-local offset, tensor): the partition."""
        if self.swapped:          # read from the swap files a slice at a time
            return [(g.local_offset, GroupSource(self.store.swap, g.index)) for g in self.layout.groups]
        return [(0, self.partition)]

    # -- backward -------------------------------------------------------------------------------
    def begin_backward(self, boundary: bool) -> None:
        """Called before each backward. Stage 3 reduce-scatters every micro-step's gradients."""
        self.coordinator.begin_backward()

    def end_backward(self) -> None:
        """Called after each backward: finish the reduce-scatter and release every gathered unit."""
        self.coordinator.finish_backward()

    def reduce_gradients(self) -> None:
        if self.reducer.active:
            self.coordinator.finish_backward()

    # -- the step (base.py) uses these -----------------------------------------------------------
    def _own_grads(self) -> list[torch.Tensor]:
        return [self.grad_partition[g.local_offset:g.local_offset + g.partition_numel] for g in self.layout.groups]

    def _lowp_targets(self) -> Optional[list[torch.Tensor]]:
        if self.swapped:          # the master is cast into the swap files' staging (_publish_params)
            return None
        ranges = [(g.local_offset, g.local_offset + g.partition_numel) for g in self.layout.groups]
        publish = self._offload_publish()
        if publish is not None:   # the host step writes the model's dtype into pinned staging
            return publish.targets(ranges)
        if self.partition.device != self._masters[0].device:
            return None
        return [self.partition[lo:hi] for lo, hi in ranges]

    def _offload_publish(self) -> Optional[HostPublish]:
        """offload_optimizer with the partition on the device (not NVMe, which writes it itself):
        the pinned staging the host step's results go back through (offload.py)."""
        if not self.offload.optimizer or self.offload.param or self.nvme is not None:
            return None
        if self._publish is None:
            self._publish = HostPublish(self.layout.partition_numel, self.model_dtype, self.offload, self.device)
        return self._publish

    @torch.no_grad()
    def _publish_params(self, local_copied: bool = False) -> None:
        publish = self._offload_publish()
        if self.swapped:          # NVMe optimizer offload staged the new values already (local_copied)
            self.store.swap.write_groups([] if local_copied else self._masters)
        elif publish is not None:
            publish.send(self.partition, 0, self.layout.partition_numel, None if local_copied else self.master)
        elif not self.master_is_view and not local_copied:
            copy_between(self.partition, self.master)
        self.store.release_all()
        self.store.refresh_persistent()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.reducer.flush_host()
        self.grad_partition.zero_()
        for p in self.params:
            p.grad = None

    # -- full parameters on demand ---------------------------------------------------------------
    def gathered(self, indices: Optional[Sequence[int]] = None) -> "GatheredUnits":
        """A context in which the given parameters (default: all) hold their full values."""
        return GatheredUnits(self, indices)

    @torch.no_grad()
    def write_back(self, indices: Sequence[int], src: int) -> None:
        """Rank ``src``'s current (gathered) values of these parameters (indices into ``store.params``)
        become everyone's partitions and, for trainable ones, fp32 masters
        (``GatheredParameters(..., modifier_rank=src)`` on exit)."""
        for u in sorted({self.store.unit_of[i] for i in indices if self.store.unit_of[i] >= 0}):
            unit = self.store.units[u]
            self.comm.broadcast(unit.full, src=src)
            self.store.write_rows(unit, None if self.master_is_view or unit.frozen else self.master)

    def full_state_dict(self, module: nn.Module, rank0_only: bool = True,
                        frozen: bool = True) -> dict[str, torch.Tensor]:
        """``module.state_dict()`` with full (model-dtype) parameters, gathered unit by unit to the host.

        Every rank must call it (each unit is a collective); with ``rank0_only`` other ranks get
        an empty dict. Peak extra device memory is one unit. ``frozen=False`` leaves the frozen
        parameters out (without gathering them).
        """
        from ..checkpoint.state_names import unwrap  # noqa: PLC0415 - only needed when saving

        root = unwrap(module)
        values: dict[int, torch.Tensor] = {}
        keep = not rank0_only or self.comm.rank == 0
        for unit in self.store.units:
            if unit.frozen and not frozen:
                continue
            with GatheredUnits(self, unit.params):
                if keep:
                    for i in unit.params:
                        p = self.store.params[i]
                        values[id(p)] = p.detach().to("cpu", copy=True)
        if not keep:
            return {}
        skipped = set() if frozen else set(map(id, self.frozen_params))
        out = {}
        for key, value in root.state_dict(keep_vars=True).items():
            if id(value) not in skipped:
                out[key] = values[id(value)] if id(value) in values else value.detach().to("cpu", copy=True)
        return out

    # -- accounting -----------------------------------------------------------------------------
    def model_state_bytes(self) -> dict[str, int]:
        """Bytes of the model states this rank holds (see ``Stage12Optimizer.model_state_bytes``).

        ``params`` is the partition (frozen parameters' share included) plus the persistent
        parameters' full values, trainable and frozen; ``buffers`` the reduce buckets plus the units
        gathered right now (none between steps).
        """
        size = self._bytes
        stray = sum(size(p.grad) for p in self.params if p.grad is not None)
        return {"params": size(self.store.partition) + self.store.persistent_bytes(),
                "grads": size(self.grad_partition) + stray,
                "master": 0 if self.master_is_view else size(self.master),
                "optimizer_states": self._state_bytes(),
                "buffers": self.reducer.pool_bytes() + self.store.live_bytes()}

    def offloaded_bytes(self) -> int:
        """The part of ``model_state_bytes`` that offload keeps in host memory instead of on the device."""
        size = self._bytes
        out = size(self.store.partition) if self.offload.param else 0
        if self.offload.optimizer:
            out += (0 if self.master_is_view else size(self.master)) + self._state_bytes() + size(self.grad_partition)
        return out

    @property
    def live_peak_bytes(self) -> int:
        """The most bytes of (non-persistent) parameters that were gathered at once so far."""
        return self.store.peak_live_bytes

    def __repr__(self) -> str:
        return (f"Stage3Optimizer(partitions={self.layout.partition_count}, params={self.layout.numel}, "
                f"frozen={self.store.layout.numel - self.layout.numel}, "
                f"units={len(self.store.units)}, persistent={self.store.persistent_numel()}, "
                f"optimizer={type(self.optimizer).__name__}, offload_optimizer={self.offload.optimizer}, "
                f"offload_param={self.offload.param})")


class GatheredUnits:
    """Gathers the units holding the given parameters on entry and releases them on exit."""

    def __init__(self, opt: Stage3Optimizer, indices: Optional[Sequence[int]] = None) -> None:
        store = opt.store
        wanted = range(len(store.params)) if indices is None else indices
        self.store = store
        self.units = sorted({store.unit_of[i] for i in wanted if store.unit_of[i] >= 0})
        self._opened: list[int] = []

    def __enter__(self) -> "GatheredUnits":
        from .stage3_params import UnitState

        for u in self.units:
            unit = self.store.units[u]
            if unit.state is UnitState.RELEASED:
                self._opened.append(u)
            self.store.fetch(unit)
        return self

    def __exit__(self, *exc: Any) -> None:
        for u in self._opened:
            self.store.release(self.store.units[u])
        self._opened.clear()

