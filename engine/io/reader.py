"""Read a whole file into memory once, at disk speed, verifying it on the way.

A load that verifies a checkpoint file and then reads it crosses memory three times through the
page cache (disk -> cache, cache -> the hash's buffer, cache -> the tensors). ``read_verified``
does it once: the file's hash blocks are read with O_DIRECT (where the filesystem takes it)
straight into one page-aligned buffer, on the pool's threads, and each thread hashes the block
it has just read. The caller gets the buffer and the digest; its tensors can be views of it.

``start_read_verified`` is the same read, submitted and not waited for: a checkpoint load queues
every file of its rank at once (the pool takes them in order) and works on the first file's bytes
(publishing the master weights) while the threads still read and hash the later ones.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any, Optional

from .aligned import ALIGN, aligned_empty, byte_view, round_up
from .files import DirectFile
from .hashing import TreeHash
from .pool import IOPool, shared_pool

__all__ = ["VerifiedRead", "read_verified", "start_read_verified"]


class VerifiedRead:
    """One file being read and hashed by the pool's threads (``start_read_verified``).

    The file closes itself when its last block is done, so a read that nobody waits for (a load
    that failed on another file first) leaves no descriptor behind; ``cancel`` drops the blocks
    not started yet and waits for the others."""

    def __init__(self, path: Path | str, hasher: TreeHash, pool: IOPool) -> None:
        self.path, self.hasher = Path(path), hasher
        self.file = DirectFile(path, "r")
        try:
            self.size = self.file.size()
            self.buffer = aligned_empty(round_up(max(self.size, 1), ALIGN))
        except BaseException:
            self.file.close()
            raise
        view = byte_view(self.buffer)
        offsets = range(0, self.size, hasher.block)
        self._left = len(offsets)
        self._lock = threading.Lock()
        self.futures: list[Future] = []
        if not self._left:
            self._close()
        for offset in offsets:
            future = pool.call(_read_and_hash, self.file, hasher, view, offset, min(hasher.block, self.size - offset))
            future.add_done_callback(self._block_done)
            self.futures.append(future)

    def _block_done(self, _: Future) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self._close()

    def _close(self) -> None:
        """Once, under the lock (a done callback and the waiting caller may both get here)."""
        if self.file.fd != -1:
            self.file.close()

    def wait(self) -> tuple[int, str, Any]:
        """``(size, digest, buffer)`` as ``read_verified`` returns it; re-raises a block's error."""
        self._wait_all()            # every block has finished before an error is raised
        leaves = [f.result() for f in self.futures]
        return self.size, self.hasher.root(leaves), self.buffer[:self.size]

    def cancel(self) -> None:
        """Give up on the file: blocks not started are dropped, running ones waited for."""
        for future in self.futures:
            future.cancel()
        self._wait_all()

    def _wait_all(self) -> None:
        wait(self.futures)
        with self._lock:        # the last block's callback may not have run yet
            self._close()


def start_read_verified(path: Path | str, hasher: TreeHash, pool: Optional[IOPool] = None) -> VerifiedRead:
    """Submit the read of a whole file (see ``read_verified``); ``.wait()`` gives its result."""
    return VerifiedRead(path, hasher, pool or shared_pool())


def read_verified(path: Path | str, hasher: TreeHash, pool: Optional[IOPool] = None) -> tuple[int, str, Any]:
    """``(size, digest, buffer)``: the file's bytes in a page-aligned uint8 CPU tensor of ``size``
    elements, and the digest ``StreamWriter`` computes for them (compare it with the recorded one
    before using the bytes)."""
    return start_read_verified(path, hasher, pool).wait()


def _read_and_hash(file: DirectFile, hasher: TreeHash, view: memoryview, offset: int, n: int) -> bytes:
    got = file.read(view[offset:offset + round_up(n, ALIGN)], offset)
    if got < n:
        raise EOFError(f"{file.path} changed size while it was being read")
    return hasher.leaf(view[offset:offset + n])
