"""Write a ``torch.save``-format state_dict one storage at a time.

``torch.save`` needs every tensor in memory before it writes. Its file is a zip archive: a
pickle (``data.pkl``) that describes each tensor and refers to its storage by key, plus one
record per storage (``data/<key>``). The pickle needs only names, dtypes and shapes, so it can
be written first from the manifest, and the storages after it, each as soon as it has been
assembled. Records go through torch's own archive writer (``torch._C.PyTorchFileWriter``, the
one ``torch.save`` uses: alignment, CRCs), and the pickle uses the same reduce functions, so
``torch.load(path, weights_only=True)`` (also with ``mmap=True``) reads the result.
"""
from __future__ import annotations

import io
import math
import pickle
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

__all__ = ["TorchArchiveWriter"]


class _Storage:
    """Stands for one storage in the pickle; ``persistent_id`` turns it into torch's storage tag."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles exactly as a contiguous CPU tensor of ``shape`` over ``storage`` does."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int) -> Any:
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= max(int(d), 1)
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(reversed(stride)), False, OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


class TorchArchiveWriter:
    """``declare`` the state_dict's entries once, then ``write_storage`` each key's bytes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._writer: Optional[Any] = None
        self._pending: set[str] = set()

    def __enter__(self) -> "TorchArchiveWriter":
        self._writer = torch._C.PyTorchFileWriter(str(self.path))
        return self

    def declare(self, entries: Sequence[tuple[str, str, tuple[int, ...], Optional[str]]]) -> dict[str, str]:
        """``(name, dtype, shape, alias_of)`` in state_dict order; returns name -> storage key.

        A tied name (``alias_of`` set) shares its target's storage, as in ``torch.save``.
        """
        keys: dict[str, str] = {}
        storages: dict[str, _Storage] = {}
        state: dict[str, _Tensor] = {}
        for name, dtype, shape, alias_of in entries:
            if alias_of is not None and alias_of in storages:
                keys[name] = keys[alias_of]
                state[name] = _Tensor(storages[alias_of], tuple(shape))
                continue
            key = str(len(storages))
            storages[name] = _Storage(key, getattr(torch, dtype), math.prod(shape))
            keys[name] = key
            state[name] = _Tensor(storages[name], tuple(shape))
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(state)
        data = buf.getvalue()
        writer = self._writer
        writer.write_record("data.pkl", data, len(data))
        writer.write_record(".format_version", "1", 1)
        writer.write_record(".storage_alignment", "64", 2)
        writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._pending = {s.key for s in storages.values()}
        return keys

    def write_storage(self, key: str, buffer: torch.Tensor, nbytes: int) -> None:
        """The bytes of storage ``key``: the first ``nbytes`` of ``buffer`` (a CPU tensor)."""
        if nbytes:
            self._writer.write_record(f"data/{key}", buffer.untyped_storage(), nbytes)
        else:
            self._writer.write_record(f"data/{key}", b"", 0)
        self._pending.discard(key)

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        writer, self._writer = self._writer, None
        if exc_type is None:
            if self._pending:
                raise RuntimeError(f"storages {sorted(self._pending)} were declared but never written")
            writer.write_end_of_file()
        del writer
