"""The host copy an asynchronous save writes from: reusable pinned memory, filled and handed over.

An asynchronous save must copy the shard before training changes it. Allocating that copy per
save costs page faults over the whole shard every time (and, with CUDA, pinning cannot happen
at all for fresh pageable memory, so device-to-host copies would be synchronous). The arena
keeps one page-aligned (pinned with CUDA) buffer per engine and hands out consecutive views of
it; the next save reuses it once the previous writer has finished (save.py waits for it first).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..io import aligned_empty

__all__ = ["SnapshotArena"]

_ALIGN = 64


class SnapshotArena:
    """Bump allocator over a reusable host buffer; ``reset`` starts the next save from its start."""

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self._buffer: Optional[torch.Tensor] = None
        self._cursor = 0          # bytes this save has asked for so far (also beyond the buffer)

    def reset(self) -> None:
        """Called when no writer reads the arena any more (the previous save was waited for).
        The buffer is (re)made here, at the size the last save needed, so it fits from then on."""
        if self._cursor and (self._buffer is None or self._cursor > self._buffer.numel()):
            self._buffer = None                       # drop the old one before making the new
            self._buffer = aligned_empty(self._cursor, self.pin)
        self._cursor = 0

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` inside the arena (same dtype and shape); a plain copy while
        the arena is smaller than this save (its first save, or a larger shard than before)."""
        t = tensor.detach()
        nbytes = t.numel() * t.element_size()
        start = -(-self._cursor // _ALIGN) * _ALIGN
        self._cursor = start + nbytes
        if self._buffer is None or start + nbytes > self._buffer.numel() or not t.is_contiguous():
            return t.to("cpu", copy=True)
        out = self._buffer[start:start + nbytes].view(t.dtype).view(t.shape)
        out.copy_(t, non_blocking=t.device.type == "cuda" and self.pin)
        return out

    def ready(self) -> None:
        """Wait for device-to-host copies into the arena before a writer thread reads it."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else int(self._buffer.numel())
