"""Stage 3's parameters: each rank's partition, and the fetch units gathered from it on demand.

At ZeRO stage 3 a rank keeps only its partition of the low-precision parameters: the same
``FlatLayout`` slices that stages 1-2 use for the master weights (so checkpoints and resharding
are identical), held in ``partition`` (``layout.partition_numel`` elements, on the device or, with
``offload_param``, in host memory). A module's parameters exist whole only while it runs.

A **fetch unit** is what is gathered at once: the parameters a module owns directly (a Linear's
weight and bias). Its full values live in one flat buffer, ``unit.full``; while the unit is
gathered every parameter's ``.data`` is a view of it, and when released the parameters' data
becomes an empty tensor (numel 0, as with DeepSpeed) and the buffer's *storage* is resized to
zero bytes. The buffer object itself is kept: tensors autograd saved during forward (a weight,
or a transposed view of it) share that storage, so gathering again before the module's backward
(resizing the storage back and refilling it) makes them valid again without autograd noticing.

Each rank contributes the runs of the unit it owns. How they are combined is the backend's plan
(comm.py): on gloo the buffer is zeroed, each rank writes its runs and one ``all_reduce`` sums
them (exact: all but one addend are zero; faster than gloo's all-gather); elsewhere each rank
packs its runs into an equal-sized piece, ``all_gather_into_tensor`` collects the pieces and
they are unpacked into place.

Small parameters (``stage3_param_persistence_threshold`` elements or fewer, while the total stays
under ``stage3_model_persistence_threshold``) are **persistent**: one unit kept gathered all the
time and refreshed after every optimizer step, since gathering them per module would cost more
in latency than their memory is worth.

**Frozen** parameters (``requires_grad=False``: a frozen base model under adapters, a frozen
embedding) are partitioned too, as DeepSpeed does: ``layout`` is the optimizer's groups followed
by one group of the frozen parameters, so the trainable groups keep the offsets stages 1-2 use
and the partition's tail holds this rank's share of the frozen ones. A module's frozen
parameters form a unit of their own (``FetchUnit.frozen``), apart from its trainable ones: a
trainable unit is released once its gradients are in, a frozen one once the module's backward is
done (stage3_hooks.py), and neither waits for the other.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..comm import Comm, Handle
from .offload import copy_between
from .partition import FlatLayout

__all__ = ["FetchUnit", "PartitionedParams", "UnitState"]

Run = tuple[int, int, int]   # (offset in the owner's local partition, offset in the unit buffer, length)


class UnitState(enum.Enum):
    RELEASED = "released"    # parameters are empty tensors, the buffer's storage has 0 bytes
    INFLIGHT = "inflight"    # a gather has been issued and not waited for
    AVAILABLE = "available"  # parameters are views of the full buffer


@dataclass(eq=False)
class FetchUnit:
    """Parameters gathered together (see the module docstring)."""

    index: int
    name: str                         # the owning module's name (for messages)
    params: list[int]                 # indices into layout.params / PartitionedParams.params
    offsets: list[int]                # where each parameter starts in ``full``
    numel: int
    runs: list[list[Run]]             # per rank: the runs that rank owns
    full: torch.Tensor
    persistent: bool = False
    state: UnitState = UnitState.RELEASED
    users: int = 0                    # modules using it right now (forward/recompute in progress)
    handle: Optional[Handle] = None
    staging: Optional[torch.Tensor] = None   # all_gather plan: the received pieces until unpacked
    grads_left: int = 0               # backward: gradients still to come before it may be released
    frozen: bool = False              # requires_grad=False parameters: no gradients, values never change
    backward_calls: int = 0           # frozen: forward calls whose backward has not finished yet
    pinned: bool = False              # frozen: a call whose backward end cannot be seen (kept to the end)

    @property
    def expected_grads(self) -> int:
        """Gradients one backward delivers to this unit (none for frozen parameters)."""
        return 0 if self.frozen else len(self.params)

    @property
    def nbytes(self) -> int:
        return self.numel * self.full.element_size()


class PartitionedParams:
    """This rank's parameter partition and the fetch units built over ``module``'s parameters.

    ``params[:trainable]`` are the optimizer's parameters (``layout``'s first groups), the rest are
    frozen (its last group); ``trainable`` defaults to all of them.
    """

    def __init__(self, layout: FlatLayout, params: Sequence[nn.Parameter], module: nn.Module, comm: Comm, *,
                 rank: int, dtype: torch.dtype, device: torch.device, partition: torch.Tensor,
                 persistence_threshold: int, model_persistence_threshold: int,
                 trainable: Optional[int] = None) -> None:
        self.layout, self.params, self.comm = layout, list(params), comm
        self.trainable = len(self.params) if trainable is None else int(trainable)
        self.rank, self.dtype, self.device = rank, dtype, device
        self.partition = partition
        self.world = layout.partition_count
        self.use_all_reduce = comm.plan.gather == "all_reduce" or not comm.active
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.units: list[FetchUnit] = []
        self.unit_of: list[int] = [-1] * len(self.params)
        self.module_units: dict[int, list[int]] = {}     # id(module) -> unit indices it needs
        self._build_units(module, persistence_threshold, model_persistence_threshold)
        self.live_numel = 0            # elements gathered or in flight, persistent unit excluded
        self.peak_live_bytes = 0

    # -- units ------------------------------------------------------------------------------------
    def _build_units(self, module: nn.Module, threshold: int, model_threshold: int) -> None:
        persistent: list[int] = []
        total = 0
        for i, entry in enumerate(self.layout.params):
            if 0 < entry.numel <= threshold and total + entry.numel <= model_threshold:
                persistent.append(i)
                total += entry.numel
        taken = set(persistent)
        self._add_units("(persistent)", persistent, persistent=True)
        for name, sub in module.named_modules(remove_duplicate=True):
            mine = []
            for p in sub._parameters.values():
                i = self._index.get(id(p)) if p is not None else None
                if i is not None and i not in taken and self.layout.params[i].numel > 0:
                    mine.append(i)
                    taken.add(i)
            self._add_units(name or "(root)", mine)
        for i, entry in enumerate(self.layout.params):   # parameters no submodule owns
            if i not in taken and entry.numel > 0:
                self._add_units(entry.name, [i])
        for name, sub in module.named_modules(remove_duplicate=True):
            self.note_module_params(sub, [p for p in sub._parameters.values() if p is not None])

    def note_module_params(self, sub: nn.Module, params: Iterable[torch.Tensor]) -> list[int]:
        """Record that ``sub``'s forward uses ``params``; returns the (non-persistent) units it needs."""
        needed = self.module_units.setdefault(id(sub), [])
        for p in params:
            i = self._index.get(id(p))
            if i is None or self.unit_of[i] < 0:
                continue
            u = self.unit_of[i]
            if not self.units[u].persistent and u not in needed:
                needed.append(u)
        if not needed:
            del self.module_units[id(sub)]
        return needed

    def is_frozen(self, index: int) -> bool:
        return index >= self.trainable

    def _add_units(self, name: str, indices: list[int], persistent: bool = False) -> None:
        """One unit for the trainable parameters among ``indices``, another for the frozen ones."""
        trainable = [i for i in indices if not self.is_frozen(i)]
        frozen = [i for i in indices if self.is_frozen(i)]
        if trainable:
            self._add_unit(name, trainable, persistent)
        if frozen:
            self._add_unit(f"{name} (frozen)", frozen, persistent, frozen=True)

    def _add_unit(self, name: str, indices: list[int], persistent: bool = False, frozen: bool = False) -> None:
        offsets, numel = [], 0
        for i in indices:
            offsets.append(numel)
            numel += self.layout.params[i].numel
        runs = [self._runs(indices, offsets, r) for r in range(self.world)]
        full = torch.empty(numel, dtype=self.dtype, device=self.device)
        unit = FetchUnit(len(self.units), name, indices, offsets, numel, runs, full, persistent=persistent,
                         frozen=frozen)
        _free_storage(full)
        for i in indices:
            self.unit_of[i] = unit.index
        self.units.append(unit)

    def param_runs(self, index: int, rank: int) -> list[Run]:
        """Parameter ``index``'s elements that ``rank`` owns: ``(offset in its partition, offset in
        the parameter, length)``, at most one run (a group's slice of a rank is contiguous)."""
        entry = self.layout.params[index]
        group = self.layout.groups[entry.group]
        lo, hi = group.partition_range(rank)
        a, b = max(entry.buffer_offset, lo), min(entry.buffer_offset + entry.numel, hi)
        return [(group.local_offset + a - lo, a - entry.buffer_offset, b - a)] if b > a else []

    def _runs(self, indices: list[int], offsets: list[int], rank: int) -> list[Run]:
        out: list[Run] = []
        for i, unit_offset in zip(indices, offsets):
            for local, start, length in self.param_runs(i, rank):
                run = (local, unit_offset + start, length)
                if out and out[-1][0] + out[-1][2] == run[0] and out[-1][1] + out[-1][2] == run[1]:
                    last = out.pop()
                    run = (last[0], last[1], last[2] + run[2])
                out.append(run)
        return out

    # -- gather / release ---------------------------------------------------------------------
    @torch.no_grad()
    def gather(self, unit: FetchUnit, async_op: bool = True) -> None:
        """Start gathering ``unit`` (no-op unless released); ``wait`` completes it."""
        if unit.state is not UnitState.RELEASED:
            return
        _alloc_storage(unit.full)
        if not unit.persistent:
            self.live_numel += unit.numel
            self.peak_live_bytes = max(self.peak_live_bytes, self.live_numel * unit.full.element_size())
        mine = unit.runs[self.rank]
        if self.use_all_reduce:
            if self.comm.active:
                unit.full.zero_()
            for local, offset, length in mine:
                copy_between(unit.full[offset:offset + length], self.partition[local:local + length])
            unit.handle = self.comm.all_reduce(unit.full, async_op=async_op)
        else:
            piece = max(sum(n for _, _, n in runs) for runs in unit.runs)
            send = torch.empty(piece, dtype=self.dtype, device=self.device)
            pos = 0
            for local, _, length in mine:
                copy_between(send[pos:pos + length], self.partition[local:local + length])
                pos += length
            unit.staging = torch.empty(piece * self.world, dtype=self.dtype, device=self.device)
            unit.handle = self.comm.all_gather_into(unit.staging, send, async_op=async_op)
        unit.state = UnitState.INFLIGHT
        if not async_op:
            self.wait(unit)

    @torch.no_grad()
    def wait(self, unit: FetchUnit) -> None:
        """Finish an issued gather and point the parameters at the full values."""
        if unit.state is not UnitState.INFLIGHT:
            return
        unit.handle.wait()
        unit.handle = None
        if unit.staging is not None:
            piece = unit.staging.numel() // self.world
            for r, runs in enumerate(unit.runs):
                pos = r * piece
                for _, offset, length in runs:
                    unit.full[offset:offset + length].copy_(unit.staging[pos:pos + length])
                    pos += length
            unit.staging = None
        self._bind(unit)

    def fetch(self, unit: FetchUnit) -> None:
        """Make ``unit`` available now (gathering synchronously if nobody prefetched it)."""
        if unit.state is UnitState.RELEASED:
            self.gather(unit, async_op=False)
        else:
            self.wait(unit)

    @torch.no_grad()
    def release(self, unit: FetchUnit) -> None:
        """Free the unit's full values (waiting for an in-flight gather first)."""
        if unit.state is UnitState.RELEASED:
            return
        if unit.state is UnitState.INFLIGHT:
            self.wait(unit)
        for i in unit.params:
            p = self.params[i]
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        _free_storage(unit.full)
        unit.state = UnitState.RELEASED
        if not unit.persistent:
            self.live_numel -= unit.numel

    def release_all(self, keep_persistent: bool = True) -> None:
        for unit in self.units:
            if not (keep_persistent and unit.persistent):
                self.release(unit)

    def refresh_persistent(self, frozen: bool = False) -> None:
        """After a step (trainable) or a load (``frozen``): the persistent units of that kind are
        gathered again from the partition."""
        for unit in self.units:
            if unit.persistent and unit.frozen == frozen:
                self.release(unit)
                self.gather(unit, async_op=False)

    # -- filling the partition at start-up ----------------------------------------------------
    @torch.no_grad()
    def load_from_params(self, full_value: Callable[[int], torch.Tensor]) -> None:
        """Cut this rank's partition out of the parameters' current full values, unit by unit.

        ``full_value(i)`` returns parameter ``i``'s full value (same on every rank: the caller
        broadcasts or gathers it), so at most one unit is ever whole besides the model itself.
        """
        for unit in self.units:
            _alloc_storage(unit.full)
            for i, offset in zip(unit.params, unit.offsets):
                n = self.layout.params[i].numel
                unit.full[offset:offset + n].copy_(full_value(i).reshape(-1))
            for local, offset, length in unit.runs[self.rank]:
                copy_between(self.partition[local:local + length], unit.full[offset:offset + length])
            if unit.persistent:
                self._bind(unit)
            else:
                for i in unit.params:
                    p = self.params[i]
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                _free_storage(unit.full)

    def _bind(self, unit: FetchUnit) -> None:
        """Point the unit's parameters at its (filled) buffer."""
        for i, offset in zip(unit.params, unit.offsets):
            entry = self.layout.params[i]
            self.params[i].data = unit.full[offset:offset + entry.numel].view(entry.shape)
        unit.state = UnitState.AVAILABLE

    # -- accounting -----------------------------------------------------------------------------
    def persistent_bytes(self) -> int:
        """Full values of the persistent units, trainable and frozen."""
        return sum(u.nbytes for u in self.units if u.persistent and u.state is not UnitState.RELEASED)

    def live_bytes(self) -> int:
        """Full values of non-persistent units gathered (or being gathered) right now."""
        return sum(u.nbytes for u in self.units if not u.persistent and u.state is not UnitState.RELEASED)

    def persistent_numel(self) -> int:
        return sum(u.numel for u in self.units if u.persistent)


def _free_storage(t: torch.Tensor) -> None:
    storage = t.untyped_storage()
    if storage.nbytes():
        storage.resize_(0)


def _alloc_storage(t: torch.Tensor) -> None:
    storage = t.untyped_storage()
    need = t.numel() * t.element_size()
    if storage.nbytes() != need:
        storage.resize_(need)
