"""Stage 3's parameter store with the partition in swap files (``offload_param: {device: nvme}``).

``SwappedParams`` is ``PartitionedParams`` whose partition lives in a ``ParamSwap``
(nvme_params.py) instead of memory: a unit's pieces are read into a buffer just before its gather
(or earlier, by the read-ahead), the gather copies them from there, and the buffer goes back.
Writes to the partition (the start-up fill, ``GatheredParameters``' write-back, checkpoint
loads of frozen parameters) go to the files. ``partition`` is the resident part
(``max_in_cpu``), the only part of the partition in host memory.

The read-ahead follows the fetch trace of the ``ParamCoordinator`` (stage3_hooks.py): on every
gather, the next units of the trace that are not gathered start reading into the free buffers,
so the reads run ahead in the order the units will be needed. Every rank swaps its own
partition: nothing here adds a collective or changes their order.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .nvme_params import NvmeParamSettings, ParamSwap
from .partition import Span
from .stage3_params import FetchUnit, PartitionedParams, UnitState

__all__ = ["SwappedParams"]

_LOOKAHEAD = 64       # trace entries scanned for units to read ahead


class SwappedParams(PartitionedParams):
    """``PartitionedParams`` over a swapped partition (see the module docstring)."""

    def __init__(self, *args: Any, nvme: NvmeParamSettings, trainable_numel: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.swap = ParamSwap(self.layout, [[span.index for span, _ in u.spans] for u in self.units],
                              [u.name for u in self.units], self.rank, self.dtype, nvme, trainable_numel)
        self.partition = self.swap.resident
        self._held: dict[int, torch.Tensor] = {}     # span -> its piece while a gather reads it
        self.trace_source: Optional[Any] = None     # the ParamCoordinator (its trace and cursor)

    # -- where the pieces are ---------------------------------------------------------------------
    def _piece(self, span: Span) -> torch.Tensor:
        if not self.swap.swapped(span):
            return self.swap.resident[span.local_offset:span.local_offset + span.partition_numel]
        return self._held.get(span.index, _NOT_READ)

    def store_range(self, local: int, values: torch.Tensor) -> None:
        self.swap.write_piece(local, values)

    # -- gather / release -------------------------------------------------------------------------
    @torch.no_grad()
    def gather(self, unit: FetchUnit, async_op: bool = True) -> None:
        if unit.state is not UnitState.RELEASED:
            return
        pieces = self.swap.take(unit.index)
        while pieces is None:                      # every buffer feeds a gather in flight: finish one
            self.wait(self.units[next(iter(self.swap.leased))])
            pieces = self.swap.take(unit.index)
        ticket = None
        if pieces and self.copies.asynchronous:    # CUDA: the pieces cross on the side stream now
            moved, ticket = self.copies.to_device(list(pieces.values()))
            ticket.ready_on_device()
            self.copies.consumed_on_current(moved)
            pieces, at = dict(pieces), 0
            for span, piece in list(pieces.items()):
                pieces[span], at = moved[at:at + piece.numel()], at + piece.numel()
        self._held.update(pieces)
        super().gather(unit, async_op)
        if ticket is not None or self.copies_local_pieces or not async_op:   # nothing reads the buffer any more
            self._done_with(unit, ticket)
        self._read_ahead()

    def wait(self, unit: FetchUnit) -> None:
        super().wait(unit)
        self._done_with(unit)

    def _done_with(self, unit: FetchUnit, ticket: Any = None) -> None:
        for span, _ in unit.spans:
            self._held.pop(span.index, None)
        self.swap.give_back(unit.index, ticket)

    def _read_ahead(self) -> None:
        coordinator = self.trace_source
        if coordinator is None or not coordinator.on_trace or not coordinator.trace:
            return
        upcoming = coordinator.trace[coordinator.cursor:coordinator.cursor + _LOOKAHEAD]
        self.swap.read_ahead(u for u in upcoming if self.units[u].state is UnitState.RELEASED)


_NOT_READ = torch.empty(0)
