"""The host copy a save writes from: reusable pinned memory, filled without blocking and handed over.

Every save of an engine stages through one arena: the tensors a writer reads are copied into a
page-aligned buffer (pinned with CUDA) that is allocated at the first save, at the size that save
needs, and reused by every later one (grown only if a save needs more). On a GPU the copies are
``non_blocking`` device-to-host copies into pinned memory, queued back to back, and the writer
waits once (an event) before reading, instead of a pageable ``.cpu()`` per tensor while the other
ranks wait in the save's next collective. Page-aligned copies also go to disk straight from the
arena (engine.io). A synchronous save on CPU needs no copy (the writer reads the tensors while the
training thread waits for it); an asynchronous save copies everything, because training changes
the tensors while the writer runs. Its large copies (master, optimizer states) happen on a
background thread while the next forward and backward run (``SnapshotArena`` says why that is safe).
"""
from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from ..io import aligned_empty, byte_view
from ..io.stream import copy_bytes

__all__ = ["SnapshotArena"]

_ALIGN = 4096      # page-aligned copies are written to disk straight from the arena (engine.io)


class SnapshotArena:
    """Bump allocator over a reusable host buffer; ``reset`` starts the next save from its start.

    ``copy(..., deferred=True)`` (the master and optimizer-state partitions) only reserves the
    place: ``start`` copies those on a background thread, and the inner optimizer's step waits
    for them (``guard``) before it changes what is being copied. Forward and backward never write
    the master or the optimizer states, so the next step's forward and backward overlap the copy
    and the save call itself blocks for the bookkeeping only.
    """

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self._buffer: Optional[torch.Tensor] = None
        self._cursor = 0          # bytes this save has asked for so far (also beyond the buffer)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._thread: Optional[threading.Thread] = None
        self._event: Any = None
        self._guarded: set[int] = set()

    def reset(self) -> None:
        """Called when no writer reads the arena any more (the previous save was waited for)."""
        self.wait()
        self._cursor = 0

    def reserve(self, tensors: Any) -> None:
        """Make the buffer hold ``tensors`` (copied next, in this order): allocated once, at the
        first save, and again only when a save needs more than any before it."""
        needed = 0
        for t in tensors:
            needed = _aligned(needed) + t.numel() * t.element_size()
        if needed and (self._buffer is None or needed > self._buffer.numel()):
            self._buffer = None                       # drop the old one before making the new
            self._buffer = aligned_empty(needed, self.pin)

    def copy(self, tensor: torch.Tensor, deferred: bool = False) -> torch.Tensor:
        """A host copy of ``tensor`` inside the arena (same dtype and shape); a plain copy when it
        does not fit (a tensor not ``reserve``d) or is not contiguous."""
        t = tensor.detach()
        nbytes = t.numel() * t.element_size()
        start = _aligned(self._cursor)
        self._cursor = start + nbytes
        if self._buffer is None or start + nbytes > self._buffer.numel() or not t.is_contiguous():
            return t.to("cpu", copy=True)
        out = self._buffer[start:start + nbytes].view(t.dtype).view(t.shape)
        if deferred and t.device.type == "cpu":
            self._pending.append((out, t))
        else:
            out.copy_(t, non_blocking=t.device.type == "cuda" and self.pin)
        return out

    def start(self, optimizer: Any) -> None:
        """Copy the deferred tensors in the background; ``optimizer``'s next step waits for them."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._event = torch.cuda.Event()
            self._event.record()                       # device-to-host copies queued by ``copy``
        if id(optimizer) not in self._guarded and hasattr(optimizer, "register_step_pre_hook"):
            optimizer.register_step_pre_hook(lambda *_: self.wait())
            self._guarded.add(id(optimizer))
        pending, self._pending = self._pending, []
        if pending:
            self._thread = threading.Thread(target=_copy_all, args=(pending,), name="checkpoint-snapshot",
                                            daemon=True)
            self._thread.start()

    def wait(self) -> None:
        """Until every copy into the arena has landed (writers call it before reading)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else int(self._buffer.numel())


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _copy_all(pending: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for out, src in pending:
        copy_bytes(byte_view(out), byte_view(src))   # GIL released: the training thread goes on
