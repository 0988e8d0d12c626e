"""Read a whole file into memory once, at disk speed, verifying it on the way.

A load that verifies a checkpoint file and then reads it crosses memory three times through the
page cache (disk -> cache, cache -> the hash's buffer, cache -> the tensors). ``read_verified``
does it once: the file's hash blocks are read with O_DIRECT (where the filesystem takes it)
straight into one page-aligned buffer, on the pool's threads, and each thread hashes the block
it has just read. The caller gets the buffer and the digest; its tensors can be views of it.
"""
from __future__ import annotations

from concurrent.futures import wait
from pathlib import Path
from typing import Any, Optional

from .aligned import ALIGN, aligned_empty, byte_view, round_up
from .files import DirectFile
from .hashing import TreeHash
from .pool import IOPool, shared_pool

__all__ = ["read_verified"]


def read_verified(path: Path | str, hasher: TreeHash, pool: Optional[IOPool] = None) -> tuple[int, str, Any]:
    """``(size, digest, buffer)``: the file's bytes in a page-aligned uint8 CPU tensor of ``size``
    elements, and the digest ``StreamWriter`` computes for them (compare it with the recorded one
    before using the bytes)."""
    pool = pool or shared_pool()
    with DirectFile(path, "r") as file:
        size = file.size()
        buffer = aligned_empty(round_up(max(size, 1), ALIGN))
        view = byte_view(buffer)
        futures = [pool.call(_read_and_hash, file, hasher, view, offset, min(hasher.block, size - offset))
                   for offset in range(0, size, hasher.block)]
        wait(futures)                # every read has finished before the file is closed, errors or not
        leaves = [f.result() for f in futures]
    return size, hasher.root(leaves), buffer[:size]


def _read_and_hash(file: DirectFile, hasher: TreeHash, view: memoryview, offset: int, n: int) -> bytes:
    got = file.read(view[offset:offset + round_up(n, ALIGN)], offset)
    if got < n:
        raise EOFError(f"{file.path} changed size while it was being read")
    return hasher.leaf(view[offset:offset + n])
