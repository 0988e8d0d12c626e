"""Page-aligned host buffers that O_DIRECT transfers and pinned host<->device copies can use.

O_DIRECT needs the buffer address, the file offset and the length to be multiples of the
device's logical block size (4096 covers every NVMe and SSD in practice). torch allocations are
64-byte aligned, so a buffer is over-allocated by one page and sliced at the first page
boundary. Pinned (page-locked) memory is what makes host<->GPU copies asynchronous; it is only
asked for when CUDA exists, since pinning without a device to copy to just locks RAM.
"""
from __future__ import annotations

import mmap
import threading
from collections import deque
from typing import Any, Optional

__all__ = ["ALIGN", "BufferPool", "aligned_empty", "byte_view", "round_up"]

ALIGN = 4096


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-int(n) // align) * align


def aligned_empty(nbytes: int, pin: bool = False) -> Any:
    """An uninitialised uint8 CPU tensor of ``nbytes`` whose first byte sits on a page boundary."""
    import torch

    nbytes = int(nbytes)
    pin = bool(pin) and torch.cuda.is_available()
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    start = (-raw.data_ptr()) % ALIGN
    return raw[start:start + nbytes]


def byte_view(tensor: Any) -> memoryview:
    """A writable byte view of a contiguous CPU tensor or an mmap buffer (no copy)."""
    if isinstance(tensor, mmap.mmap):
        return memoryview(tensor)
    if tensor.numel() == 0:
        return memoryview(bytearray())
    flat = tensor.reshape(-1)
    if flat.dtype != _uint8():
        flat = flat.view(_uint8())
    return memoryview(flat.numpy()).cast("B")


def _uint8() -> Any:
    import torch

    return torch.uint8


class BufferPool:
    """``count`` reusable aligned buffers of ``nbytes`` each: ``acquire`` blocks until one is free.

    Bounding the buffers bounds host memory: a stream of any length goes through ``count``
    buffers, and the writer that holds them all waits for the I/O threads to give one back.
    """

    def __init__(self, count: int, nbytes: int, pin: bool = False, torch_free: bool = False) -> None:
        if count < 1 or nbytes < 1:
            raise ValueError(f"a buffer pool needs count >= 1 and nbytes >= 1, got {count} x {nbytes}")
        self.nbytes = round_up(nbytes)
        self.count = count
        self.pin = pin
        self.torch_free = torch_free     # anonymous mmap (page-aligned) for callers that avoid torch
        self._free: deque[Any] = deque()
        self._made = 0
        self._cond = threading.Condition()

    def acquire(self, timeout: Optional[float] = None) -> Any:
        with self._cond:
            while not self._free and self._made >= self.count:
                if not self._cond.wait(timeout):
                    raise TimeoutError(f"no I/O buffer came back within {timeout} s")
            if self._free:
                return self._free.popleft()
            self._made += 1
        if self.torch_free:
            return mmap.mmap(-1, self.nbytes)
        return aligned_empty(self.nbytes, self.pin)     # allocated lazily, outside the lock

    def release(self, buffer: Any) -> None:
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()

    @property
    def allocated_bytes(self) -> int:
        return self._made * self.nbytes
