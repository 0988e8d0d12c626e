"""Host<->device copies of offload on a side CUDA stream, ordered against compute by events.

Why: with ``offload_optimizer``/``offload_param`` every step moves the gradient partition to the
host, the updated parameters back, and (``offload_param``) each unit's piece to the device before
its gather. Issued on the compute stream, each copy waits for all compute queued before it and
delays all compute queued after it. On a side stream a copy runs beside compute, and an
event tells whoever consumes its result when it has landed.

The contract (``CopyStream.copy``), the same on every device:

* the copy reads ``src`` as the compute stream left it when ``copy`` was called (the side
  stream first waits for the work queued so far on the compute stream);
* the returned ``CopyTicket`` says when ``dst`` may be used: ``ready_on_device()`` makes the
  compute stream wait for it (a host-to-device copy, before a kernel or collective reads
  ``dst``); ``ready_on_host()`` blocks the calling thread until it landed (a device-to-host copy,
  before host code reads ``dst``);
* device memory touched by the copy is marked with ``record_stream``, so the caching allocator
  does not hand it out again before the side stream is done with it; a buffer the caller reuses
  itself (a bucket, a staging buffer) must be waited for with the ticket first.

``to_device`` is the host-to-device form for fresh data (offload_param's pieces before a
gather): it copies into new memory allocated on the side stream, so it waits for nothing the
compute stream queued and truly runs beside it.

Without CUDA (CPU runs, every test here) ``copy`` is a plain ``dst.copy_(src)`` and tickets are
born complete: identical results, nothing to wait for. ``PinnedBuffers`` hands out reused host
staging buffers, page-locked when CUDA exists (asynchronous copies need pinned memory).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["CopyStream", "CopyTicket", "PinnedBuffers"]


class CopyTicket:
    """When one side-stream copy has landed (see the module docstring)."""

    def __init__(self, event: Optional["torch.cuda.Event"] = None, device: Optional[torch.device] = None) -> None:
        self.event, self.device = event, device

    @property
    def done(self) -> bool:
        """Whether the copy has landed (never blocks)."""
        return self.event is None or self.event.query()

    def ready_on_device(self) -> None:
        """Work queued on the current stream from now on runs after the copy."""
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)

    def ready_on_host(self) -> None:
        """Block until the copy has landed (then host code may read its destination)."""
        if self.event is not None:
            self.event.synchronize()


class CopyStream:
    """One side stream per device for offload's copies; a plain copy where there is no CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None

    @property
    def asynchronous(self) -> bool:
        """Whether copies land later than ``copy`` returns (a CUDA side stream)."""
        return self.cuda

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> CopyTicket:
        """``dst.copy_(src)`` beside compute; the ticket says when ``dst`` holds the values."""
        if not self.cuda or (dst.device.type != "cuda" and src.device.type != "cuda"):
            dst.copy_(src)
            return CopyTicket()
        stream = self.stream
        assert stream is not None
        stream.wait_stream(torch.cuda.current_stream(self.device))   # src as compute left it
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=_pinned_or_device(dst) and _pinned_or_device(src))
        for t in (dst, src):
            if t.device.type == "cuda":
                t.record_stream(stream)
        event = torch.cuda.Event()
        event.record(stream)
        return CopyTicket(event, self.device)


    def to_device(self, pieces: list[torch.Tensor]) -> tuple[torch.Tensor, CopyTicket]:
        """Host ``pieces`` side by side in a new device tensor, copied beside compute.

        The tensor is allocated on the side stream, so the copy need not wait for anything the
        compute stream has queued (its memory was never the compute stream's); the caller calls
        ``ticket.ready_on_device()`` before reading it and ``consumed_on_current`` so the memory
        outlives that reading. Without CUDA: the pieces themselves (one) or their concatenation."""
        if not self.cuda:
            return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)), CopyTicket()
        stream = self.stream
        assert stream is not None
        with torch.cuda.stream(stream):
            out = torch.empty(sum(p.numel() for p in pieces), dtype=pieces[0].dtype, device=self.device)
            pos = 0
            for piece in pieces:
                out[pos:pos + piece.numel()].copy_(piece.reshape(-1), non_blocking=_pinned_or_device(piece))
                pos += piece.numel()
        event = torch.cuda.Event()
        event.record(stream)
        return out, CopyTicket(event, self.device)

    def consumed_on_current(self, t: torch.Tensor) -> None:
        """``t`` (from ``to_device``) is read by work queued on the current stream: keep its memory until then."""
        if self.cuda and t.device.type == "cuda":
            t.record_stream(torch.cuda.current_stream(self.device))


def _pinned_or_device(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or t.is_pinned()


class PinnedBuffers:
    """Reused host staging buffers of one dtype, page-locked when CUDA exists.

    ``take(numel)`` returns a view of a free buffer at least that large (allocating one the first
    time); ``give_back`` returns it to the pool once its copy has been consumed. Buffers are never
    freed: after the first step the pool holds what one step's copies in flight need.
    """

    def __init__(self, dtype: torch.dtype, pin: Optional[bool] = None) -> None:
        self.dtype = dtype
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._free: list[torch.Tensor] = []
        self.allocated: list[torch.Tensor] = []

    def take(self, numel: int) -> torch.Tensor:
        for i, buf in enumerate(self._free):
            if buf.numel() >= numel:
                return self._free.pop(i)[:numel]
        buf = torch.empty(numel, dtype=self.dtype, device="cpu", pin_memory=self.pin)
        self.allocated.append(buf)
        return buf

    def give_back(self, view: torch.Tensor) -> None:
        base = view._base if view._base is not None else view
        self._free.append(base)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.allocated)
