"""Stage 3's parameters: each rank's partition, and the fetch units gathered from it on demand.

At ZeRO stage 3 a rank keeps only its partition of the low-precision parameters: ``layout``'s
slices, where every fetch unit's parameters form spans sharded evenly over the ranks on their own
(partition.py; the master weights use the same slices, and checkpoints describe them per
parameter, so resharding to and from any stage works), held in ``partition``
(``layout.partition_numel`` elements, on the device or, with ``offload_param``, in host memory).
A module's parameters exist whole only while it runs.

A **fetch unit** is what is gathered at once: the parameters a module owns directly (a Linear's
weight and bias). Its full values live in one flat buffer, ``unit.full``; while the unit is
gathered every parameter's ``.data`` is a view of it, and when released the parameters' data
becomes an empty tensor (numel 0, as with DeepSpeed) and the buffer's *storage* is resized to
zero bytes. The buffer object itself is kept: tensors autograd saved during forward (a weight,
or a transposed view of it) share that storage, so gathering again before the module's backward
(resizing the storage back and refilling it) makes them valid again without autograd noticing.

``full`` holds the unit's spans one after the other, each padded to ``N × P`` elements, so rank
``r``'s piece of a span is row ``r`` of that span's ``(N, P)`` view. How a gather combines the
pieces is the backend's plan (comm.py): with the NCCL plan a one-span unit is one in-place
``all_gather_into_tensor`` straight into ``full`` (no staging, nothing unpacked); a unit of
several spans (its weight and bias in different optimizer groups, the persistent unit) is
still one collective, into a rank-major staging buffer whose columns are copied into place
(small by construction). On gloo the buffer is zeroed, each rank writes its rows and one
``all_reduce`` sums them (exact: all but one addend are zero; faster than gloo's all-gather).

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
from .copy_stream import CopyStream
from .offload import copy_between
from .partition import FlatLayout, Span
from .stage3_units import UnitPlan

__all__ = ["FetchUnit", "PartitionedParams", "UnitState"]

Run = tuple[int, int, int]   # (offset in the owner's local partition, offset in the parameter, length)


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
    numel: int                        # elements of ``full``: every span padded to N × P
    spans: list[tuple[Span, int]]     # the unit's spans and where each starts in ``full``
    full: torch.Tensor
    persistent: bool = False
    state: UnitState = UnitState.RELEASED
    users: int = 0                    # modules using it right now (forward/recompute in progress)
    handle: Optional[Handle] = None
    staging: Optional[torch.Tensor] = None   # several spans: the received rows until copied into place
    grads_left: int = 0               # backward: gradients still to come before it may be released
    frozen: bool = False              # requires_grad=False parameters: no gradients, values never change
    backward_calls: int = 0           # forward calls whose backward (reading the values) has not finished yet
    pinned: bool = False              # a call whose backward end cannot be seen (kept to the end)
    shaped: bool = False              # released with shape-only stand-ins (gradients still to come)

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
                 plans: Sequence[UnitPlan], trainable: Optional[int] = None) -> None:
        self.layout, self.params, self.comm = layout, list(params), comm
        self.trainable = len(self.params) if trainable is None else int(trainable)
        self.rank, self.dtype, self.device = rank, dtype, device
        self.partition = partition
        self.world = layout.partition_count
        self.use_all_reduce = comm.plan.gather == "all_reduce" or not comm.active
        # the local pieces are copied into the unit's buffer and the collective works on that copy
        self.copies_local_pieces = self.use_all_reduce or comm.plan.gather == "broadcast"
        self.copies = CopyStream(device)    # offload_param's host-to-device copies
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.units: list[FetchUnit] = []
        self.unit_of: list[int] = [-1] * len(self.params)
        self.module_units: dict[int, list[int]] = {}     # id(module) -> unit indices it needs
        for plan in plans:
            self._add_unit(plan)
        for sub in module.modules():
            self.note_module_params(sub, [p for p in sub._parameters.values() if p is not None])
        self.live_numel = 0            # elements gathered or in flight, persistent unit excluded
        self.staging_numel = 0         # elements of staging buffers alive right now
        self.peak_live_bytes = 0       # most bytes of gathered units (+ staging) at once

    # -- units ------------------------------------------------------------------------------------
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

    def _add_unit(self, plan: UnitPlan) -> None:
        """A unit's buffer: its spans one after the other, each ``N × P`` elements."""
        spans: list[tuple[Span, int]] = []
        numel = 0
        for span in sorted({self.layout.span_of(i).index for i in plan.params}):
            spans.append((self.layout.spans[span], numel))
            numel += self.layout.spans[span].padded_numel(self.world)
        start = {s.index: at for s, at in spans}
        offsets = [start[self.layout.span_of(i).index] + self.layout.params[i].offset
                   - self.layout.span_of(i).canonical_offset for i in plan.params]
        full = torch.empty(numel, dtype=self.dtype, device=self.device)
        unit = FetchUnit(len(self.units), plan.name, list(plan.params), offsets, numel, spans, full,
                         persistent=plan.persistent, frozen=plan.frozen)
        _free_storage(full)
        for i in plan.params:
            self.unit_of[i] = unit.index
        self.units.append(unit)

    def param_runs(self, index: int, rank: int) -> list[Run]:
        """Parameter ``index``'s elements that ``rank`` owns: ``(offset in its partition, offset in
        the parameter, length)``, at most one run (a span's piece of a rank is contiguous)."""
        return [(local, start, length) for r, local, start, length in self.layout.param_runs(index) if r == rank]

    def _rows(self, unit: FetchUnit) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per span of ``unit``: (its ``(N, P)`` view in ``full``, this rank's piece in the partition)."""
        out = []
        for span, at in unit.spans:
            size = span.partition_numel
            rows = unit.full[at:at + size * self.world].view(self.world, size)
            out.append((rows, self._piece(span)))
        return out

    def _piece(self, span: Span) -> torch.Tensor:
        """This rank's piece of ``span`` (the NVMe store, stage3_swapped.py, has it read into a buffer)."""
        return self.partition[span.local_offset:span.local_offset + span.partition_numel]

    def store_range(self, local: int, values: torch.Tensor) -> None:
        """Partition elements ``[local, local + values.numel())`` := ``values`` (start-up, write-backs, loads)."""
        copy_between(self.partition[local:local + values.numel()], values.reshape(-1))

    # -- gather / release ---------------------------------------------------------------------
    @torch.no_grad()
    def gather(self, unit: FetchUnit, async_op: bool = True) -> None:
        """Start gathering ``unit`` (no-op unless released); ``wait`` completes it."""
        if unit.state is not UnitState.RELEASED:
            return
        _alloc_storage(unit.full)
        if not unit.persistent:
            self.live_numel += unit.numel
        rows = self._rows(unit)
        if self.copies_local_pieces:
            if self.use_all_reduce and self.comm.active:
                unit.full.zero_()
            for view, piece in rows:
                copy_between(view[self.rank], piece)
            unit.handle = (self.comm.all_reduce(unit.full, async_op=async_op) if self.use_all_reduce else
                           Handle.join([self.comm.broadcast_rows(view, async_op=True) for view, _ in rows]))
        elif len(rows) == 1:
            view, piece = rows[0]
            if piece.device != unit.full.device:      # offload_param: the piece comes over first
                piece = self._over_to_device([piece])
            unit.handle = self.comm.all_gather_into(view.reshape(-1), piece, async_op=async_op)
        else:
            unit.handle = self._gather_rows(unit, rows, async_op)
        self._note_peak()
        unit.state = UnitState.INFLIGHT
        if not async_op:
            self.wait(unit)

    def _gather_rows(self, unit: FetchUnit, rows: list[tuple[torch.Tensor, torch.Tensor]], async_op: bool) -> Handle:
        """Several spans in one all-gather: this rank's pieces side by side, rows of every rank back."""
        width = sum(piece.numel() for _, piece in rows)
        if rows[0][1].device != unit.full.device:    # offload_param: packed on the way over
            send = self._over_to_device([piece for _, piece in rows])
        else:
            send = torch.empty(width, dtype=self.dtype, device=self.device)
            pos = 0
            for _, piece in rows:
                send[pos:pos + piece.numel()].copy_(piece)
                pos += piece.numel()
        unit.staging = torch.empty(width * self.world, dtype=self.dtype, device=self.device)
        self.staging_numel += unit.staging.numel()
        return self.comm.all_gather_into(unit.staging, send, async_op=async_op)

    def _over_to_device(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """offload_param: this rank's host pieces of a unit, copied to the device on the side stream
        (copy_stream.py); the collective issued next on the compute stream waits for them."""
        sent, ticket = self.copies.to_device(pieces)
        ticket.ready_on_device()
        self.copies.consumed_on_current(sent)
        return sent

    def _note_peak(self) -> None:
        self.peak_live_bytes = max(self.peak_live_bytes,
                                   (self.live_numel + self.staging_numel) * torch.finfo(self.dtype).bits // 8)

    @torch.no_grad()
    def wait(self, unit: FetchUnit) -> None:
        """Finish an issued gather and point the parameters at the full values."""
        if unit.state is not UnitState.INFLIGHT:
            return
        unit.handle.wait()
        unit.handle = None
        if unit.staging is not None:
            received = unit.staging.view(self.world, -1)
            pos = 0
            for view, _ in self._rows(unit):
                view.copy_(received[:, pos:pos + view.shape[1]])
                pos += view.shape[1]
            self.staging_numel -= unit.staging.numel()
            unit.staging = None
        self._bind(unit)

    def fetch(self, unit: FetchUnit) -> None:
        """Make ``unit`` available now (gathering synchronously if nobody prefetched it)."""
        if unit.state is UnitState.RELEASED:
            self.gather(unit, async_op=False)
        else:
            self.wait(unit)

    @torch.no_grad()
    def release(self, unit: FetchUnit, keep_shape: bool = False) -> None:
        """Free the unit's full values (waiting for an in-flight gather first).

        Released parameters are empty tensors, except with ``keep_shape``, for a unit whose gradients
        are still to come (released in a forward that records gradients, or in backward once its last
        reader is done: a tied weight, whose gradient autograd accumulates over all its uses): the
        parameters become zero-stride stand-ins of their full shape, since autograd's AccumulateGrad
        lays the gradient out like the parameter. They read as garbage and refuse writes; the next
        plain release (once the gradients are in, or at the end of backward) empties them."""
        if unit.state is UnitState.RELEASED:
            if unit.shaped and not keep_shape:
                self._empty_params(unit)
            return
        if unit.state is UnitState.INFLIGHT:
            self.wait(unit)
        if keep_shape:
            for i in unit.params:
                p = self.params[i]
                p.data = torch.empty(1, dtype=p.dtype, device=p.device).expand(self.layout.params[i].shape)
            unit.shaped = True
        else:
            self._empty_params(unit)
        _free_storage(unit.full)
        unit.state = UnitState.RELEASED
        if not unit.persistent:
            self.live_numel -= unit.numel

    def _empty_params(self, unit: FetchUnit) -> None:
        for i in unit.params:
            p = self.params[i]
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        unit.shaped = False

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
    def load_from_params(self, full_value: Callable[[int], torch.Tensor],
                         own_piece: Optional[Callable[[int, int], Optional[torch.Tensor]]] = None) -> None:
        """Cut this rank's partition out of the parameters' current full values, unit by unit.

        ``full_value(i)`` returns parameter ``i``'s full value (same on every rank: the caller
        broadcasts or gathers it), so at most one unit is ever whole besides the model itself.
        ``own_piece(i, P)``, where given, may answer for a parameter that is a span on its own with
        this rank's ``P`` elements of it (``zero.Init``'s piece when Init split it the same way): a
        unit made only of such spans is never made whole.
        """
        for unit in self.units:
            if own_piece is not None and not unit.persistent and self._load_own_pieces(unit, own_piece):
                continue
            _alloc_storage(unit.full)
            for span, at in unit.spans:   # the spans' padding stays zero in every partition
                unit.full[at + span.numel:at + span.padded_numel(self.world)].zero_()
            for i, offset in zip(unit.params, unit.offsets):
                n = self.layout.params[i].numel
                unit.full[offset:offset + n].copy_(full_value(i).reshape(-1))
            for (span, _), (view, _) in zip(unit.spans, self._rows(unit)):
                self.store_range(span.local_offset, view[self.rank])
            if unit.persistent:
                self._bind(unit)
            else:
                for i in unit.params:
                    p = self.params[i]
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                _free_storage(unit.full)

    def _load_own_pieces(self, unit: FetchUnit, own_piece: Callable[[int, int], Optional[torch.Tensor]]) -> bool:
        if any(span.param_count != 1 for span, _ in unit.spans):
            return False
        pieces = []
        for span, _ in unit.spans:
            piece = own_piece(span.first_param, span.partition_numel)
            if piece is None:
                return False
            pieces.append(piece)
        for (span, _), piece in zip(unit.spans, pieces):
            self.store_range(span.local_offset, piece)
        self._empty_params(unit)
        return True

    def write_rows(self, unit: FetchUnit, master: Optional[torch.Tensor] = None) -> None:
        """This rank's pieces of ``unit``'s (gathered, changed) full values back into the partition
        (and, given, into ``master``, which is laid out like the partition)."""
        for (span, _), (view, _) in zip(unit.spans, self._rows(unit)):
            self.store_range(span.local_offset, view[self.rank])
            if master is not None:
                copy_between(master[span.local_offset:span.local_offset + span.partition_numel], view[self.rank])

    def _bind(self, unit: FetchUnit) -> None:
        """Point the unit's parameters at its (filled) buffer."""
        for i, offset in zip(unit.params, unit.offsets):
            entry = self.layout.params[i]
            self.params[i].data = unit.full[offset:offset + entry.numel].view(entry.shape)
        unit.state = UnitState.AVAILABLE
        unit.shaped = False

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
