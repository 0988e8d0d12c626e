"""Reduced gradients -> the host gradient partition (``offload_optimizer``), beside backward.

When a bucket's reduction completes, this rank's piece goes to the host partition the host
optimizer reads. Done naively (``target.add_(piece.to("cpu"))``) the autograd thread waits for
each transfer, bucket after bucket, and the copy waits for all compute queued before it. Here
each piece is copied on the side stream (copy_stream.py) straight into the pinned partition
(a reducer that overwrites it) or into a reused pinned staging buffer whose host-side ``add_``
into the partition is applied later, oldest first, when its copy has landed: at most
``max_pending`` pieces are in flight, and ``flush`` applies the rest before the host reads or
clears the partition (the step, ``zero_grad``). Order of the adds per element is the order of
the micro-steps, as before, so results are bit-identical.

Without CUDA the piece already is in host memory: it is copied or added at once, as before.
"""
from __future__ import annotations

from collections import deque

import torch

from .copy_stream import CopyStream, CopyTicket, PinnedBuffers

__all__ = ["HostGradSink"]


class HostGradSink:
    """Delivers reduced device pieces into host tensors (see the module docstring)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, max_pending: int = 4,
                 copies: CopyStream | None = None) -> None:
        self.copies = copies or CopyStream(device)
        self.staging = PinnedBuffers(dtype)
        self.max_pending = max(1, int(max_pending))
        self._adds: deque[tuple[CopyTicket, torch.Tensor, torch.Tensor]] = deque()
        self._copies: list[CopyTicket] = []

    def deliver(self, target: torch.Tensor, piece: torch.Tensor, accumulate: bool) -> CopyTicket:
        """``target += piece`` (``accumulate``) or ``target[:] = piece``; the ticket says when ``piece``
        (a device buffer the caller will reuse) has been read."""
        if not self.copies.asynchronous:
            if accumulate:
                target.add_(piece)
            else:
                target.copy_(piece)
            return CopyTicket()
        if not accumulate:
            ticket = self.copies.copy(target, piece)
            self._copies.append(ticket)
            return ticket
        stage = self.staging.take(piece.numel())
        ticket = self.copies.copy(stage, piece)
        self._adds.append((ticket, stage, target))
        self._apply_landed()
        while len(self._adds) > self.max_pending:
            self._apply_oldest()
        return ticket

    def _apply_landed(self) -> None:
        while self._adds and self._adds[0][0].done:
            self._apply_oldest()

    def _apply_oldest(self) -> None:
        ticket, stage, target = self._adds.popleft()
        ticket.ready_on_host()
        target.add_(stage)
        self.staging.give_back(stage)

    @property
    def pending(self) -> int:
        return len(self._adds) + len(self._copies)

    def flush(self) -> None:
        """Every delivered piece is in its target: call before host code reads or clears them."""
        while self._adds:
            self._apply_oldest()
        for ticket in self._copies:
            ticket.ready_on_host()
        self._copies.clear()

    def nbytes(self) -> int:
        return self.staging.nbytes()
