"""The host copy an asynchronous save writes from: reusable pinned memory, filled and handed over.

An asynchronous save must copy the shard before training changes it. Allocating that copy per
save costs page faults over the whole shard every time (and, with CUDA, pinning cannot happen
at all for fresh pageable memory, so device-to-host copies would be synchronous). The arena
keeps one page-aligned (pinned with CUDA) buffer per engine and hands out consecutive views of
it; the next save reuses it once the previous writer has finished (save.py waits for it first).
The large copies (master, optimizer states) happen on a background thread while the next
forward and backward run (``SnapshotArena`` says why that is safe).
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
        """Called when no writer reads the arena any more (the previous save was waited for).
        The buffer is (re)made here, at the size the last save needed, so it fits from then on."""
        self.wait()
        if self._cursor and (self._buffer is None or self._cursor > self._buffer.numel()):
            self._buffer = None                       # drop the old one before making the new
            self._buffer = aligned_empty(self._cursor, self.pin)
        self._cursor = 0

    def copy(self, tensor: torch.Tensor, deferred: bool = False) -> torch.Tensor:
        """A host copy of ``tensor`` inside the arena (same dtype and shape); a plain copy while
        the arena is smaller than this save (its first save, or a larger shard than before)."""
        t = tensor.detach()
        nbytes = t.numel() * t.element_size()
        start = -(-self._cursor // _ALIGN) * _ALIGN
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
        if torch.cuda.is_available():
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


def _copy_all(pending: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for out, src in pending:
        copy_bytes(byte_view(out), byte_view(src))   # GIL released: the training thread goes on
