"""Tensor files in the safetensors format, written streaming with their sha256, read by byte range.

Why safetensors' layout (an 8-byte header length, a JSON header, then raw little-endian tensor
bytes) instead of ``torch.save``: a tensor's elements sit at a fixed byte offset, so a rank can
read exactly the ranges it needs with ``pread`` and consolidation can copy one parameter at a
time; and other tools (the ``safetensors`` package, Hugging Face loaders) read the files. The
format is simple enough to write here, which also lets a writer hash the bytes as they go out
(one pass) and never hold more than the caller's own tensors.

This module does not import torch; ``tensor_bytes`` imports it when called.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["DTYPE_CODES", "ITEMSIZE", "TensorEntry", "read_header", "read_into", "tensor_bytes",
           "write_tensor_file"]

DTYPE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16", "uint32": "U32",
    "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "complex64": "C64",
}
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint8": 1, "bool": 1, "uint16": 2, "uint32": 4, "uint64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "complex64": 8,
}
_DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
_ALIGN = 64            # data starts on a 64-byte boundary (vector loads, mmap)
_SLICE = 16 << 20      # bytes hashed and written per call


@dataclass
class TensorEntry:
    """One tensor to write: its bytes come from ``chunks`` (buffers), concatenated in order."""

    name: str
    dtype: str                       # torch's name without "torch.", e.g. "float32"
    shape: tuple[int, ...]
    chunks: Sequence[Any] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n * ITEMSIZE[self.dtype]


def tensor_bytes(tensor: Any) -> memoryview:
    """A CPU tensor's bytes without a copy (contiguous tensors; others are copied once)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(_uint8()).numpy()).cast("B")


def _uint8() -> Any:
    import torch

    return torch.uint8


def _header(entries: Sequence[TensorEntry], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, Any]]:
    table: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets = {}
    pos = 0
    for e in entries:
        if e.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {e.name!r}: dtype {e.dtype} cannot be stored in a safetensors file")
        table[e.name] = {"dtype": DTYPE_CODES[e.dtype], "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        offsets[e.name] = pos
        pos += e.nbytes
    text = json.dumps(table, separators=(",", ":")).encode("utf-8")
    text += b" " * ((-(8 + len(text))) % _ALIGN)
    start = 8 + len(text)
    tensors = {e.name: {"dtype": e.dtype, "shape": list(e.shape), "offset": start + offsets[e.name]} for e in entries}
    return struct.pack("<Q", len(text)) + text, tensors


def write_tensor_file(path: Path, entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None,
                      fsync: bool = True) -> dict[str, Any]:
    """Write ``entries`` to ``path``; returns ``{"bytes", "sha256", "tensors"}`` for the manifest.

    The bytes are hashed as they are written (one pass over memory) and the file is fsynced.
    """
    head, tensors = _header(entries, metadata or {})
    digest = hashlib.sha256(head)
    total = len(head)
    with open(path, "wb", buffering=0) as f, _Hasher(digest, sum(e.nbytes for e in entries)) as hasher:
        _write_all(f, memoryview(head))
        for e in entries:
            written = 0
            for chunk in e.chunks:
                view = _as_bytes(chunk)
                for lo in range(0, len(view), _SLICE):
                    piece = view[lo:lo + _SLICE]
                    hasher.update(piece)      # hashed on another thread while this one writes
                    _write_all(f, piece)
                written += len(view)
            if written != e.nbytes:
                raise ValueError(f"tensor {e.name!r}: chunks hold {written} bytes, its shape needs {e.nbytes}")
            total += written
        hasher.finish()
        if fsync:
            os.fsync(f.fileno())
    return {"bytes": total, "sha256": digest.hexdigest(), "tensors": tensors}


class _Hasher:
    """``digest.update`` of one slice overlapped with the write of the same slice.

    hashlib releases the GIL on large buffers, so hashing on a helper thread runs beside the
    ``write`` system call: a save costs max(hash, write) per slice instead of their sum. Slices
    are hashed in order (the next waits for the previous). Small files hash inline.
    """

    def __init__(self, digest: Any, nbytes: int) -> None:
        self.digest = digest
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sha256") if nbytes >= 2 * _SLICE else None
        self.pending: Any = None

    def update(self, piece: memoryview) -> None:
        if self.pool is None:
            self.digest.update(piece)
            return
        self.finish()
        self.pending = self.pool.submit(self.digest.update, piece)

    def finish(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def __enter__(self) -> "_Hasher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _as_bytes(chunk: Any) -> memoryview:
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return memoryview(chunk).cast("B")
    return tensor_bytes(chunk)   # a torch tensor: copied to CPU here, one chunk at a time


def _write_all(f: Any, view: memoryview) -> None:
    while len(view):
        n = f.write(view)
        view = view[n:]


def read_into(fd: int, offset: int, buffer: memoryview) -> None:
    """Fill ``buffer`` with the file's bytes starting at ``offset`` (``pread``: no seek, thread-safe)."""
    view = memoryview(buffer).cast("B")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise EOFError(f"file ends {len(view)} bytes short of the range being read")
        view = view[n:]
        offset += n


def read_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file: ``{name: {"dtype", "shape", "offset"}}`` (absolute offsets)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        table = json.loads(f.read(n))
    table.pop("__metadata__", None)
    return {name: {"dtype": _DTYPE_NAMES[v["dtype"]], "shape": v["shape"], "offset": 8 + n + v["data_offsets"][0]}
            for name, v in table.items()}
