"""How fast a directory's filesystem reads and writes with this layer (``orch doctor``'s NVMe line).

Writes then reads back a scratch file of ``nbytes`` through the same pool and aligned buffers the
checkpoints and the NVMe swap files use (O_DIRECT where the filesystem takes it, so the page
cache does not flatter the figure), fsyncs, and removes it. Torch-free: the CLI can call it.
"""
from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .files import DirectFile, direct_supported
from .pool import IOPool

__all__ = ["DiskSpeed", "measure_directory"]


@dataclass(frozen=True)
class DiskSpeed:
    path: Path
    direct: bool            # O_DIRECT works there (else buffered I/O, flushed and dropped from the cache)
    write_gbps: float
    read_gbps: float
    nbytes: int


def measure_directory(path: Path | str, nbytes: int = 512 << 20, threads: int = 4) -> DiskSpeed:
    """Sustained write and read GB/s of ``path``'s filesystem; raises OSError if it is not writable."""
    path = Path(path)
    direct = direct_supported(path)
    block = 8 << 20
    nbytes = max(block, nbytes // block * block)
    buffer = mmap.mmap(-1, nbytes)
    buffer.write(os.urandom(1 << 20) * (nbytes >> 20))
    pool = IOPool(threads, block)
    scratch = path / f".orch-doctor-{os.getpid()}.bin"
    try:
        with DirectFile(scratch, "w") as f:
            t0 = time.perf_counter()
            pool.submit_write(f, memoryview(buffer), 0).wait()
            f.sync()
            write_s = time.perf_counter() - t0
        _drop_cache(scratch)
        with DirectFile(scratch, "r") as f:
            t0 = time.perf_counter()
            pool.submit_read(f, memoryview(buffer), 0).wait()
            read_s = time.perf_counter() - t0
    finally:
        pool.shutdown()
        scratch.unlink(missing_ok=True)
    return DiskSpeed(path, direct, nbytes / write_s / 1e9, nbytes / read_s / 1e9, nbytes)


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
