"""Files opened for large positional I/O, with O_DIRECT where the filesystem takes it.

O_DIRECT moves data between the disk and the caller's buffer without the page cache: a
checkpoint or an optimizer swap file passes through memory once instead of twice, and does not
evict the training job's own pages. Some filesystems refuse the flag (tmpfs: EINVAL at open) or
accept it and then fail aligned I/O; ``direct_supported`` probes a directory once (one aligned
write and read of a scratch file) and everything falls back to ordinary buffered I/O there.

Every ``DirectFile`` also keeps a buffered descriptor for the pieces O_DIRECT cannot take
(unaligned offsets and lengths: a file's tail, a ranged read of one tensor).
"""
from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path
from typing import Optional

from .aligned import ALIGN

__all__ = ["DirectFile", "direct_supported", "pread_full", "pwrite_full"]

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_probed: dict[tuple[int, str], bool] = {}
_probe_lock = threading.Lock()


def pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view`` at ``offset`` (``pwrite`` may write less than asked)."""
    view = memoryview(view).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view, offset = view[n:], offset + n


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; returns the bytes read (fewer only at the end of the file)."""
    view = memoryview(view).cast("B")
    total = 0
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            break
        view, offset, total = view[n:], offset + n, total + n
    return total


def direct_supported(directory: Path) -> bool:
    """Whether O_DIRECT reads and writes work in ``directory`` (probed once per filesystem)."""
    directory = Path(directory)
    if not _O_DIRECT:
        return False
    key = (os.stat(directory).st_dev, str(directory))
    with _probe_lock:
        if key not in _probed:
            _probed[key] = _probe(directory)
        return _probed[key]


def _probe(directory: Path) -> bool:
    path = directory / f".orch-odirect-probe-{os.getpid()}-{threading.get_ident()}"
    buf = memoryview(mmap.mmap(-1, ALIGN))      # page-aligned, and no torch needed
    buf[:] = b"\x07" * ALIGN
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        pwrite_full(fd, buf, 0)
        return pread_full(fd, buf, 0) == ALIGN
    except OSError:
        return False
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


class DirectFile:
    """One file, a direct descriptor (when the filesystem allows) and a buffered one.

    ``write``/``read`` take the direct path when offset, length and buffer address are all
    aligned, the buffered one otherwise; both are positional, so any number of threads may use
    one ``DirectFile`` at once.
    """

    def __init__(self, path: Path | str, mode: str = "r", direct: Optional[bool] = None) -> None:
        if mode not in ("r", "w", "rw"):
            raise ValueError(f"mode must be 'r', 'w' or 'rw', got {mode!r}")
        self.path = Path(path)
        flags = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "rw": os.O_RDWR | os.O_CREAT}[mode]
        self.fd = os.open(self.path, flags, 0o644)
        if direct is None:        # reads just try (a refused direct read falls back); writes probe first
            direct = True if mode == "r" else direct_supported(self.path.parent)
        self.direct_fd: Optional[int] = None
        if direct and _O_DIRECT:
            try:
                self.direct_fd = os.open(self.path, (flags & ~os.O_TRUNC & ~os.O_CREAT) | _O_DIRECT)
            except OSError:
                self.direct_fd = None
        self._direct_opened = self.direct_fd     # closed at close() even if reads stopped using it

    @property
    def direct(self) -> bool:
        return self.direct_fd is not None

    def _fd_for(self, view: memoryview, offset: int) -> int:
        if self.direct_fd is None or offset % ALIGN or len(view) % ALIGN:
            return self.fd
        address = _address(view)
        return self.direct_fd if address is not None and address % ALIGN == 0 else self.fd

    def write(self, view: memoryview, offset: int) -> None:
        view = memoryview(view).cast("B")
        pwrite_full(self._fd_for(view, offset), view, offset)

    def read(self, view: memoryview, offset: int) -> int:
        view = memoryview(view).cast("B")
        fd = self._fd_for(view, offset)
        try:
            return pread_full(fd, view, offset)
        except OSError as exc:
            if fd != self.direct_fd or exc.errno != errno.EINVAL:
                raise
            self.direct_fd = None           # the filesystem took the flag but not the I/O
            return pread_full(self.fd, view, offset)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def allocate(self, size: int) -> None:
        """Reserve ``size`` bytes on disk now, so a full disk fails here and not mid-stream."""
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                os.ftruncate(self.fd, size)      # the filesystem cannot reserve; sparse instead
            else:
                raise

    def sync(self) -> None:
        os.fsync(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        for fd in (self._direct_opened, self.fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.direct_fd = self._direct_opened = None
        self.fd = -1

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _address(view: memoryview) -> Optional[int]:
    """The address of a memoryview's first byte (None when it cannot be found)."""
    import numpy as np

    try:
        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
    except (TypeError, ValueError):
        return None
