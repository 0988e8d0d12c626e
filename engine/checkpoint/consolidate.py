"""One plain fp32 state_dict file from a sharded checkpoint, one tensor at a time.

DeepSpeed's ``zero_to_fp32`` loads every shard into memory to rebuild the model, so consolidating
a model takes RAM for all of it. Here each output tensor is assembled from the byte ranges the
manifest names (``pread`` into one reused buffer sized for the largest tensor) and written out
before the next is read, so peak memory is the largest parameter plus the interpreter.

Output formats, by the file name's suffix:

* ``.safetensors``: written without torch (the header is known from the manifest up front);
* ``.pt`` / ``.pth`` / ``.bin``: the zip format ``torch.save`` produces, written record by record
  with torch's own archive writer; ``torch.load(..., weights_only=True)`` reads it.

Keys are the plain model's state_dict keys (tied weights under every name), parameters in fp32
from the master weights, buffers and frozen parameters in their saved dtype: the result loads
with ``model.load_state_dict(torch.load(path), strict=True)``. The file is written under a
temporary name and renamed when complete.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .fsutil import fsync_dir
from .manifest import (EXTRA_FILE, TMP_SUFFIX, CheckpointError, file_problem, read_manifest, resolve_checkpoint,
                       shard_files)
from .tensorfile import ITEMSIZE, TensorEntry, read_into, write_tensor_file

__all__ = ["ConsolidateResult", "consolidate", "output_tensors"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass(frozen=True)
class OutTensor:
    """One output entry: where its elements come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str                      # "param" | "extra"
    ranges: tuple[tuple[int, int, int], ...] = ()   # param: (rank, offset, length) in master shards
    offset: int = 0                  # extra: byte offset in extra.safetensors
    alias_of: Optional[str] = None   # the key whose data this one repeats (tied weights)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class ConsolidateResult:
    checkpoint: Path
    output: Path
    tensors: int
    bytes: int
    largest_tensor_bytes: int


def output_tensors(manifest: Mapping[str, Any]) -> list[OutTensor]:
    """The consolidated state_dict's entries in the model's key order."""
    params = {p["name"]: p for p in manifest["params"]}
    extras = {e["name"]: e for e in manifest.get("extras", [])}
    extra_tensors = manifest["files"].get(EXTRA_FILE, {}).get("tensors", {})
    aliases = manifest.get("aliases", {})
    out = []
    for key in manifest["state_dict_keys"]:
        target = aliases.get(key, key)
        alias_of = target if target != key else None
        if target in params:
            p = params[target]
            out.append(OutTensor(key, "float32", tuple(p["shape"]), "param",
                                 tuple(tuple(r) for r in p["ranges"]), alias_of=alias_of))
        elif target in extras:
            e = extras[target]
            out.append(OutTensor(key, e["dtype"], tuple(e["shape"]), "extra", offset=extra_tensors[target]["offset"],
                                 alias_of=alias_of))
    return out


class _Reader:
    """Fills a tensor's bytes from the checkpoint's files (file descriptors opened once)."""

    def __init__(self, ckpt_dir: Path, manifest: Mapping[str, Any]) -> None:
        self.dir, self.manifest = ckpt_dir, manifest
        self.fds: dict[str, int] = {}

    def _fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(self.dir / name, os.O_RDONLY)
        return self.fds[name]

    def fill(self, t: OutTensor, view: memoryview) -> None:
        if t.source == "extra":
            read_into(self._fd(EXTRA_FILE), t.offset, view)
            return
        pos = 0
        for rank, offset, length in t.ranges:
            name = self.manifest["shards"]["master"][rank]
            base = self.manifest["files"][name]["tensors"]["master"]["offset"]
            read_into(self._fd(name), base + offset * 4, view[pos:pos + length * 4])
            pos += length * 4

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def consolidate(checkpoint: str | Path, output: str | Path, *, verify: bool = True,
                progress: Optional[Callable[[str], None]] = None) -> ConsolidateResult:
    """Write the checkpoint's model as one state_dict file (see the module docstring)."""
    ckpt_dir = resolve_checkpoint(Path(checkpoint))
    output = Path(output)
    if output.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise CheckpointError(f"output {output}: use a .safetensors or .pt file name", output)
    if output.exists() and output.is_dir():
        raise CheckpointError(f"output {output} is a directory; give a file name ending in .safetensors or .pt",
                              output)
    manifest = read_manifest(ckpt_dir)
    if verify:
        needed = shard_files(manifest, ("master",)) + ([EXTRA_FILE] if EXTRA_FILE in manifest["files"] else [])
        problems = [p for n in needed if (p := file_problem(ckpt_dir, n, manifest["files"][n]))]
        if problems:
            raise CheckpointError("; ".join(problems), ckpt_dir)
    tensors = output_tensors(manifest)
    if not tensors:
        raise CheckpointError(f"{ckpt_dir}: the manifest lists no tensors to consolidate", ckpt_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}{TMP_SUFFIX}")
    reader = _Reader(ckpt_dir, manifest)
    try:
        if output.suffix == ".safetensors":
            _write_safetensors(tmp, tensors, reader, manifest, progress)
        else:
            _write_torch(tmp, tensors, reader, progress)
            _fsync_file(tmp)
        os.replace(tmp, output)
        fsync_dir(output.parent)
    finally:
        reader.close()
        if tmp.exists():
            tmp.unlink()
    return ConsolidateResult(ckpt_dir, output, len(tensors), output.stat().st_size, max(t.nbytes for t in tensors))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Streamed:
    """Chunks of one tensor for the safetensors writer: filled into the shared buffer on demand."""

    def __init__(self, t: OutTensor, reader: _Reader, buf: bytearray,
                 progress: Optional[Callable[[str], None]]) -> None:
        self.t, self.reader, self.buf, self.progress = t, reader, buf, progress

    def __iter__(self) -> Any:
        view = memoryview(self.buf)[:self.t.nbytes]
        self.reader.fill(self.t, view)
        if self.progress:
            self.progress(self.t.name)
        yield view


def _write_safetensors(path: Path, tensors: list[OutTensor], reader: _Reader, manifest: Mapping[str, Any],
                       progress: Optional[Callable[[str], None]]) -> None:
    buf = bytearray(max(t.nbytes for t in tensors))
    entries = [TensorEntry(t.name, t.dtype, t.shape, _Streamed(t, reader, buf, progress), reused=True)
               for t in tensors]
    meta = {"format": "pt", "producer": "orch consolidate", "tag": str(manifest["tag"]),
            "global_step": str(manifest["global_step"])}
    write_tensor_file(path, entries, meta)


def _write_torch(path: Path, tensors: list[OutTensor], reader: _Reader,
                 progress: Optional[Callable[[str], None]]) -> None:
    """The archive ``torch.save(state_dict, path)`` would write, one storage record at a time."""
    import torch

    from .torch_archive import TorchArchiveWriter

    buf = torch.empty(max(t.nbytes for t in tensors), dtype=torch.uint8)
    raw = memoryview(buf.numpy()).cast("B")
    with TorchArchiveWriter(path) as archive:
        keys = archive.declare([(t.name, t.dtype, t.shape, t.alias_of) for t in tensors])
        for t in tensors:
            if t.alias_of is not None:
                continue            # shares the storage of the tensor it is tied to
            reader.fill(t, raw[:t.nbytes])
            archive.write_storage(keys[t.name], buf, t.nbytes)
            if progress:
                progress(t.name)
