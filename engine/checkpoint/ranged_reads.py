"""Ranged reads of a checkpoint's files through engine.io's pool (load.py, stream_load.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .manifest import CheckpointError
from ..io import DirectFile, shared_pool
from ..io.stream import copy_bytes

__all__ = ["RangedReads", "tensor_bytes_view"]


def tensor_bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (reads land directly in it)."""
    if not t.numel():
        return memoryview(bytearray())
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


class RangedReads:
    """Ranged reads of a checkpoint's files through engine.io's pool: every ``read`` is submitted
    at once (split over the I/O threads, O_DIRECT where offset, length and buffer are aligned) and
    ``__exit__`` waits for all of them, naming the file if one is shorter than the manifest says."""

    def __init__(self, root: Path, preloaded: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        self.root = root
        self.preloaded = preloaded or {}
        self.files: dict[str, DirectFile] = {}
        self.pool = shared_pool()
        self.requests: list[tuple[str, Any]] = []

    def read(self, name: str, offset: int, view: memoryview) -> None:
        data = self.preloaded.get(name)
        if data is not None:      # already in memory, verified
            if offset + len(view) > data.numel():
                raise CheckpointError(f"{self.root / name} is shorter than the manifest says", self.root / name)
            copy_bytes(view, tensor_bytes_view(data[offset:offset + len(view)]))
            return
        file = self.files.get(name)
        if file is None:     # through the page cache: the checksum pass has just read these files
            file = self.files[name] = DirectFile(self.root / name, "r", direct=False)
        self.requests.append((name, self.pool.submit_read(file, view, offset)))

    def wait(self) -> None:
        requests, self.requests = self.requests, []
        problems = {}
        for name, request in requests:
            try:
                request.wait()
            except (EOFError, OSError) as exc:
                problems.setdefault(name, exc)
        for name, exc in problems.items():
            raise CheckpointError(f"{self.root / name} is shorter than the manifest says: {exc}"
                                  if isinstance(exc, EOFError) else f"cannot read {self.root / name}: {exc}",
                                  self.root / name)

    def __enter__(self) -> "RangedReads":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self.wait()
            else:
                for _, request in self.requests:
                    for f in request.futures:
                        f.exception()
        finally:
            for file in self.files.values():
                file.close()
