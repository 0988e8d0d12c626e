"""The order in which an NVMe-offloaded step moves chunks through its few buffers.

A step visits every chunk of the swap files once: read its slot, update it, write it back. With
``n`` buffers the pass keeps ``n - 2`` reads in flight ahead of the chunk being updated while
the chunks before it are written back, so the disk reads, the CPU update and the disk writes of
neighbouring chunks overlap.

At the end of a pass the buffers still hold the last chunks it wrote, exactly as they are on
disk. The next pass therefore runs the other way round (``ChunkPipeline.order``): it starts with
those chunks and reads none of them again, which saves ``n`` chunk reads per step (the order of
the chunks does not change the math: the update is element-wise and every group's scalars are
those of the step before). Anything else that rewrites the files or borrows a buffer must call
``forget`` first.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterator, Optional

__all__ = ["Chunk", "ChunkPipeline"]

Chunk = tuple[int, int]          # (group, chunk index in the group's file)


class ChunkPipeline:
    """Buffers and residency of the streamed step (see the module docstring).

    ``read(chunk, index)`` submits the read of a chunk's slot into buffer ``index`` and
    ``write(chunk, index)`` its write-back; both return requests with ``wait()``."""

    def __init__(self, buffers: int, read: Callable[[Chunk, int], Any], write: Callable[[Chunk, int], Any]) -> None:
        self.buffers = buffers
        self.ahead = max(1, buffers - 2)
        self._read, self._write = read, write
        self._resident: dict[Chunk, int] = {}      # chunk -> the buffer that holds its on-disk bytes
        self._backwards = False

    def order(self, chunks: list[Chunk]) -> list[Chunk]:
        """This pass's order: alternately forwards and backwards."""
        out = list(reversed(chunks)) if self._backwards else list(chunks)
        self._backwards = not self._backwards
        return out

    def forget(self) -> None:
        """The buffers' contents no longer match the files (a load, a direct write)."""
        self._resident = {}

    @property
    def resident(self) -> dict[Chunk, int]:
        return dict(self._resident)

    def run(self, order: list[Chunk]) -> Iterator[tuple[Chunk, int]]:
        """Yield ``(chunk, buffer index)`` in ``order`` with the slot's bytes in the buffer; the
        caller updates the buffer in place before asking for the next one, and the update is
        written back. On return every write has finished and the last chunks stay resident."""
        reserved = {c: i for c, i in self._resident.items() if c in set(order[:self.buffers])}
        self._resident = {}
        free = [i for i in range(self.buffers) if i not in reserved.values()]
        writes: deque[tuple[Chunk, int, Any]] = deque()
        reads: dict[int, tuple[int, Optional[Any]]] = {}
        position = {c: p for p, c in enumerate(order)}

        def buffer() -> int:
            if free:
                return free.pop()
            if writes:
                _, index, request = writes.popleft()
                request.wait()
                return index
            chunk = max(reserved, key=position.__getitem__)   # never reached with >= 3 buffers
            return reserved.pop(chunk)

        def start(p: int) -> None:
            chunk = order[p]
            if chunk in reserved:
                reads[p] = (reserved.pop(chunk), None)
                return
            index = buffer()
            reads[p] = (index, self._read(chunk, index))

        done = False
        try:
            for p in range(min(self.ahead, len(order))):
                start(p)
            for p, chunk in enumerate(order):
                index, request = reads.pop(p)
                if request is not None:
                    request.wait()
                if p + self.ahead < len(order):
                    start(p + self.ahead)          # the chunk after next comes in during this update
                yield chunk, index
                writes.append((chunk, index, self._write(chunk, index)))
            done = True
        finally:
            for _, _, request in writes:
                request.wait()
            for _, request in reads.values():
                if request is not None:
                    request.wait()
            if done:
                self._resident = {chunk: index for chunk, index, _ in writes}
