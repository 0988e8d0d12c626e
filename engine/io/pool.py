"""The I/O thread pool: large positional reads and writes, submitted now and waited for later.

Why threads and not libaio/io_uring: ``os.pread``/``os.pwrite`` release the GIL for the whole
system call, so a few threads keep several large requests in flight, which is what an NVMe
drive needs to reach its bandwidth; bench/io_layer.py measured this against ``dd`` with
O_DIRECT, against mmap (``torch.UntypedStorage.from_file``) and against the PyPI io_uring
binding on the same filesystem (BENCHMARKS.md). No compiler, no system library at run time.

A request larger than ``block`` is split into ``block``-sized pieces on several threads.
``submit_*`` returns an ``IORequest``; ``wait()`` re-raises the first error of its pieces.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

from .aligned import ALIGN

__all__ = ["DEFAULT_BLOCK", "DEFAULT_THREADS", "IOPool", "IORequest", "shared_pool"]

DEFAULT_THREADS = 4
DEFAULT_BLOCK = 8 << 20


class IORequest:
    """Pieces of one submitted transfer; ``wait`` blocks until all are done."""

    def __init__(self, futures: Sequence[Future]) -> None:
        self.futures = list(futures)

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> list[Any]:
        return [f.result() for f in self.futures]


class IOPool:
    """``threads`` workers doing blocking positional I/O (see the module docstring)."""

    def __init__(self, threads: int = DEFAULT_THREADS, block: int = DEFAULT_BLOCK) -> None:
        self.threads = max(1, int(threads))
        self.block = max(ALIGN, int(block) // ALIGN * ALIGN)
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="orch-io")

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on an I/O thread (e.g. hash and write one block)."""
        return self._executor.submit(fn, *args)

    def _pieces(self, view: memoryview, offset: int) -> list[tuple[memoryview, int]]:
        view = memoryview(view).cast("B")
        return [(view[lo:lo + self.block], offset + lo) for lo in range(0, len(view), self.block)] or [(view, offset)]

    def submit_write(self, file: Any, view: memoryview, offset: int) -> IORequest:
        return IORequest([self.call(file.write, piece, at) for piece, at in self._pieces(view, offset)])

    def submit_read(self, file: Any, view: memoryview, offset: int) -> IORequest:
        return IORequest([self.call(_read_exact, file, piece, at) for piece, at in self._pieces(view, offset)])

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


def _read_exact(file: Any, view: memoryview, offset: int) -> int:
    n = file.read(view, offset)
    if n != len(view):
        raise EOFError(f"{file.path} ends {len(view) - n} bytes short of the range [{offset}, {offset + len(view)})")
    return n


_shared: Optional[IOPool] = None
_shared_lock = threading.Lock()


def shared_pool() -> IOPool:
    """The process's default pool (``ORCH_IO_THREADS`` threads, default 4), made on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = IOPool(int(os.environ.get("ORCH_IO_THREADS", DEFAULT_THREADS)))
        return _shared
