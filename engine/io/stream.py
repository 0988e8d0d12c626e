"""Streams through the pool: write a file from many sources while hashing it, hash a file back.

``StreamWriter`` packs whatever it is given (byte views, CPU or GPU tensors) into page-aligned
staging blocks; every full block goes to an I/O thread that hashes it and writes it with
O_DIRECT, while the caller fills the next block (``buffers`` blocks in flight bound the memory).
The last block is padded to the page size for the direct write and the file truncated back to
its real length. ``hash_file`` reads a file's blocks on the pool's threads and returns the
same digest the writer computed, so verification runs at disk speed too.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Optional

from .aligned import ALIGN, BufferPool, byte_view, round_up
from .files import DirectFile, _address
from .hashing import TreeHash
from .pool import IOPool, shared_pool

__all__ = ["FileRange", "StreamWriter", "copy_bytes", "hash_file"]


class StreamWriter:
    """Write one file sequentially from many pieces, hashing as it goes (see the module docstring).

    ``write`` only records where each piece goes; an I/O thread copies a block's pieces into a
    staging buffer, hashes it and writes it, so copies, hashes and writes of different blocks
    run in parallel. The pieces must therefore stay unchanged until ``close`` returns.
    """

    def __init__(self, path: Path | str, hasher: Optional[TreeHash] = None, pool: Optional[IOPool] = None,
                 buffers: int = 4, direct: Optional[bool] = None, size: Optional[int] = None) -> None:
        self.hasher = hasher or TreeHash()
        self.pool = pool or shared_pool()
        self.file = DirectFile(path, "w", direct=direct)
        if size:        # the final size, known: reserve it (a full disk fails now, not mid-stream), and
            try:        # the direct writes land inside the file instead of extending it one at a time
                self.file.allocate(round_up(size, ALIGN))
            except BaseException:
                self.file.truncate(0)          # a failed reservation may have taken what was free
                self.file.close()
                raise
        self.block = self.hasher.block
        # pinned torch buffers only where torch is in use (device tensors); else page-aligned mmap,
        # so a torch-free caller (orch ckpt consolidate to .safetensors) never imports torch
        self.staging = _staging(max(2, buffers, self.pool.threads + 1), self.block,
                                torch_free="torch" not in sys.modules)
        self._segments: list[tuple[int, Any]] = []   # (offset in the block, source piece) copied later
        self._buf: Any = None
        self._fill = 0
        self._index = 0
        self._pending: list[Any] = []   # futures of leaf digests, in block order
        self.bytes = 0

    def write(self, data: Any, reused: bool = False) -> None:
        """Append ``data``: bytes, a memoryview, a tensor (any device) or a ``FileRange``.

        ``reused``: the caller overwrites ``data`` after this returns (one buffer refilled per
        piece), so it is copied into the staging block now instead of by the I/O thread."""
        source = _source(data)
        pos, total = 0, len(source)
        while pos < total:
            if not reused:              # at a block boundary, page-aligned memory goes out in place
                pos += self._write_in_place(source[pos:])
                if pos == total:
                    break
            n = min(total - pos, self.block - self._fill)
            if self._buf is None:
                self._buf = self.staging.acquire()      # blocks while every staging buffer is in flight
            if reused:
                _copy_piece(self._buf, self._fill, source[pos:pos + n])
            else:
                self._segments.append((self._fill, source[pos:pos + n]))
            self._fill += n
            self.bytes += n
            pos += n
            if self._fill == self.block:
                self._flush()

    def _write_in_place(self, source: Any) -> int:
        """Whole blocks of a page-aligned source at a block boundary go to the disk straight from
        the source (no staging copy); returns how many bytes were handled so. A page-aligned
        tensor placed after a header (a shard's data starts on a page) gets here once the staged
        head has filled the first block."""
        if self._fill or not isinstance(source, memoryview) or len(source) < self.block:
            return 0
        address = _address(source)
        if address is None or address % ALIGN:
            return 0
        done = len(source) // self.block * self.block
        for lo in range(0, done, self.block):
            piece = source[lo:lo + self.block]
            self._pending.append(self.pool.call(self._hash_write, piece, self._index * self.block))
            self._index += 1
        self.bytes += done
        return done

    def _hash_write(self, view: memoryview, offset: int) -> bytes:
        leaf = self.hasher.leaf(view)
        self.file.write(view, offset)
        return leaf

    def _flush(self) -> None:
        if self._fill == 0:
            return
        buf, segments, real, index = self._buf, self._segments, self._fill, self._index
        self._pending.append(self.pool.call(self._fill_hash_write, buf, segments, real, index * self.block))
        self._buf, self._segments, self._fill, self._index = None, [], 0, index + 1

    def _fill_hash_write(self, buf: Any, segments: list[tuple[int, Any]], real: int, offset: int) -> bytes:
        try:
            view = byte_view(buf)
            for at, piece in segments:
                _copy_piece(buf, at, piece)
            padded = round_up(real, ALIGN)
            if padded > real:
                view[real:padded] = bytes(padded - real)
            leaf = self.hasher.leaf(view[:real])
            self.file.write(view[:padded], offset)
            return leaf
        finally:
            self.staging.release(buf)

    def finish(self) -> None:
        """No more data: the last partial block goes to the I/O threads now (``close`` waits for it)."""
        self._flush()

    def close(self, fsync: bool = True) -> dict[str, Any]:
        """Finish the file; returns ``{"bytes", "digest", "hash", "hash_block"}``."""
        try:
            self._flush()
            leaves = [f.result() for f in self._pending]
            if self.file.size() != self.bytes:
                self.file.truncate(self.bytes)
            if fsync:
                self.file.sync()
        except BaseException:
            self.abort()
            raise
        self.file.close()
        return {"bytes": self.bytes, "digest": self.hasher.root(leaves), **self.hasher.record()}

    def abort(self) -> None:
        """Stop after an error: wait for in-flight blocks, close (the caller removes the file)."""
        for f in self._pending:
            f.exception()
        self._pending = []
        if self._buf is not None:
            self.staging.release(self._buf)
            self._buf = None
        self.file.close()


def copy_bytes(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src`` with the GIL released (numpy's copy loop), so copies on the I/O threads and
    the training thread run in parallel; a memoryview assignment would hold the GIL throughout."""
    import numpy as np

    np.copyto(np.frombuffer(dst, dtype=np.uint8), np.frombuffer(src, dtype=np.uint8))


def _copy_piece(buf: Any, at: int, piece: Any) -> None:
    """Put one source piece into a staging block at byte ``at``."""
    if isinstance(piece, memoryview):
        copy_bytes(byte_view(buf)[at:at + len(piece)], piece)
    elif isinstance(piece, FileRange):
        piece.read_into(byte_view(buf)[at:at + len(piece)])
    else:                                           # a device tensor's bytes
        import torch

        target = buf if isinstance(buf, torch.Tensor) else torch.frombuffer(buf, dtype=torch.uint8)
        target[at:at + piece.numel()].copy_(piece)


class FileRange:
    """Bytes ``[offset, offset + nbytes)`` of an open file, as a ``StreamWriter`` source: the I/O
    thread reads them straight into its staging block (a swap file copied into a checkpoint
    never passes through any other memory)."""

    def __init__(self, file: DirectFile, offset: int, nbytes: int) -> None:
        self.file, self.offset, self.nbytes = file, int(offset), int(nbytes)

    def __len__(self) -> int:
        return self.nbytes

    def __getitem__(self, s: slice) -> "FileRange":
        lo, hi, _ = s.indices(self.nbytes)
        return FileRange(self.file, self.offset + lo, hi - lo)

    def read_into(self, view: memoryview) -> None:
        if self.file.read(view, self.offset) != len(view):
            raise EOFError(f"{self.file.path} is shorter than the range being copied from it")


def _source(data: Any) -> Any:
    """``data`` as something sliced by byte: a memoryview (CPU memory), a file range or a uint8
    device tensor."""
    if isinstance(data, FileRange):
        return data
    if not hasattr(data, "data_ptr"):
        return memoryview(data).cast("B")
    import torch

    flat = data.detach().reshape(-1)
    if flat.device.type == "cpu":
        return memoryview(b"") if flat.numel() == 0 else byte_view(flat.contiguous())
    return _DeviceBytes(flat.contiguous().view(torch.uint8))


class _DeviceBytes:
    """A device tensor's bytes, sliced lazily (copied to the host by the I/O thread)."""

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor

    def __len__(self) -> int:
        return int(self.tensor.numel())

    def __getitem__(self, s: slice) -> Any:
        return self.tensor[s]


_staging_pools: dict[tuple[int, bool], BufferPool] = {}
_staging_lock = threading.Lock()


def _staging(count: int, block: int, torch_free: bool = False) -> BufferPool:
    """Buffers shared by every writer (or reader) of one block size: allocated once, page faults once."""
    with _staging_lock:
        pool = _staging_pools.get((block, torch_free))
        if pool is None or pool.count < count:
            pool = _staging_pools[(block, torch_free)] = BufferPool(count, block, pin=not torch_free,
                                                                   torch_free=torch_free)
        return pool


def hash_file(path: Path | str, hasher: TreeHash, pool: Optional[IOPool] = None,
              keep_in_cache: bool = False) -> tuple[int, str]:
    """``(size, digest)`` of a file as ``StreamWriter`` computes it, blocks read on the pool's threads.

    ``keep_in_cache``: read through the page cache (a load that reads the file again right after
    verifying it then reads the disk once); otherwise O_DIRECT where possible."""
    pool = pool or shared_pool()
    with DirectFile(path, "r", direct=not keep_in_cache) as file:
        size = file.size()
        count = -(-size // hasher.block)
        buffers = _staging(pool.threads + 1, hasher.block, torch_free=True)
        futures = []
        for i in range(count):
            buf = buffers.acquire()        # bounds memory: at most threads+1 blocks in flight
            futures.append(pool.call(_read_and_hash, file, hasher, buffers, buf, i * hasher.block,
                                     min(hasher.block, size - i * hasher.block)))
        leaves = [f.result() for f in futures]
    return size, hasher.root(leaves)


def _read_and_hash(file: DirectFile, hasher: TreeHash, buffers: BufferPool, buf: Any, offset: int, n: int) -> bytes:
    try:
        view = byte_view(buf)
        got = file.read(view[:round_up(n, ALIGN)], offset)
        if got < n:
            raise EOFError(f"{file.path} changed size while it was being read")
        return hasher.leaf(view[:n])
    finally:
        buffers.release(buf)
