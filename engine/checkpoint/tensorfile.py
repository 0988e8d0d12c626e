"""Tensor files in the safetensors format, written streaming with their hash, read by byte range.

Why safetensors' layout (an 8-byte header length, a JSON header, then raw little-endian tensor
bytes) instead of ``torch.save``: a tensor's elements sit at a fixed byte offset, so a rank can
read exactly the ranges it needs with ``pread`` and consolidation can copy one parameter at a
time; and other tools (the ``safetensors`` package, Hugging Face loaders) read the files. The
format is simple enough to write here, which also lets a writer hash the bytes as they go out
(one pass, on the I/O threads) and never hold more than the caller's own tensors.

This module does not import torch; ``tensor_bytes`` imports it when called.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..io import FileRange, StreamWriter, TreeHash

__all__ = ["DTYPE_CODES", "ITEMSIZE", "TensorEntry", "read_header", "read_into", "tensor_bytes",
           "write_tensor_file", "write_tensor_files"]

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
_ALIGN = 4096          # data starts on a page boundary (O_DIRECT reads of whole tensors, mmap)


@dataclass
class TensorEntry:
    """One tensor to write: its bytes come from ``chunks`` (buffers), concatenated in order."""

    name: str
    dtype: str                       # torch's name without "torch.", e.g. "float32"
    shape: tuple[int, ...]
    chunks: Sequence[Any] = field(default_factory=list)
    reused: bool = False             # the chunks are one buffer refilled per chunk: copy each at once

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
                      fsync: bool = True, hasher: Optional[TreeHash] = None) -> dict[str, Any]:
    """Write ``entries`` to ``path``; returns ``{"bytes", "hash", "hash_block", "digest", "tensors"}``.

    The bytes go out through engine.io's ``StreamWriter``: large aligned (O_DIRECT where the
    filesystem allows) writes on the I/O threads, each block hashed by the thread that writes it.
    A chunk may be a tensor (any device), a byte buffer, or an ``engine.io.FileRange`` (copied
    from another file, e.g. an NVMe swap file, without passing through other memory).
    """
    return write_tensor_files([(path, entries, metadata or {})], fsync=fsync, hasher=hasher)[0]


def write_tensor_files(files: Sequence[tuple[Path, Sequence[TensorEntry], Mapping[str, str]]], fsync: bool = True,
                       hasher: Optional[TreeHash] = None) -> list[dict[str, Any]]:
    """``write_tensor_file`` for several files at once: every file's blocks are queued before the
    first is closed, so the I/O threads write the files side by side instead of draining (and
    fsyncing) one before starting the next."""
    writers: list[tuple[StreamWriter, dict[str, Any]]] = []
    try:
        for path, entries, metadata in files:
            head, tensors = _header(entries, metadata)
            writer = StreamWriter(path, hasher=hasher, size=len(head) + sum(e.nbytes for e in entries))
            writers.append((writer, tensors))
            writer.write(head)
            for e in entries:
                _write_entry(writer, e)
            writer.finish()             # its last block goes out; the staging buffer is free for the next file
        return [writer.close(fsync=fsync) | {"tensors": tensors} for writer, tensors in writers]
    except BaseException:
        for writer, _ in writers:
            writer.abort()
        raise


def _write_entry(writer: StreamWriter, entry: TensorEntry) -> None:
    written = 0
    for chunk in entry.chunks:
        writer.write(chunk, reused=entry.reused)
        written += _nbytes(chunk)
    if written != entry.nbytes:
        raise ValueError(f"tensor {entry.name!r}: chunks hold {written} bytes, its shape needs {entry.nbytes}")


def _nbytes(chunk: Any) -> int:
    if hasattr(chunk, "data_ptr"):
        return int(chunk.numel()) * int(chunk.element_size())
    if isinstance(chunk, FileRange):
        return len(chunk)
    return memoryview(chunk).nbytes


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
