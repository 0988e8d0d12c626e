"""Loading an NVMe-offloaded engine: the checkpoint streams into the swap files chunk by chunk.

An NVMe run keeps its master weights and optimizer states in swap files because they do not fit
in host memory, so its load must not materialise them either. ``PartitionReader`` knows, from
the reshard plan, which byte ranges of which saved shard hold each element of this rank's new
partition; the swap (``NvmeOptimizerSwap.load_streamed``) asks it to fill one chunk's views at a
time (its buffer holds that chunk's current slot, so master elements the checkpoint lacks keep
their values) and writes the chunk back. Host memory holds one chunk buffer, whatever the model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .manifest import CheckpointError
from .ranged_reads import RangedReads, tensor_bytes_view
from .tensorfile import ITEMSIZE

__all__ = ["PartitionReader"]


class PartitionReader:
    """Fills element ranges of this rank's new partition (``master`` or a state) from a checkpoint."""

    def __init__(self, ckpt_dir: Path, manifest: Mapping[str, Any], reads: list[Any]) -> None:
        self.ckpt_dir, self.manifest = ckpt_dir, manifest
        self.reads = sorted(reads, key=lambda r: r.dst)

    def fill(self, key: str, lo: int, hi: int, out: torch.Tensor) -> None:
        """Elements ``[lo, hi)`` of ``key`` into ``out`` (``hi - lo`` elements). States the
        checkpoint does not cover are zero; master elements it does not cover are left as they are."""
        if key != "master":
            out.zero_()
        kind = "master" if key == "master" else "optimizer"
        item = out.element_size()
        raw = tensor_bytes_view(out)
        with RangedReads(self.ckpt_dir) as files:
            for r in self.reads:
                a, b = max(lo, r.dst), min(hi, r.dst + r.length)
                if b <= a:
                    continue
                name = self.manifest["shards"][kind][r.rank]
                tensor = self.manifest["files"][name]["tensors"][key]
                if ITEMSIZE[tensor["dtype"]] != item:
                    raise CheckpointError(f"{self.ckpt_dir / name}: tensor {key!r} is {tensor['dtype']}, expected "
                                          f"{out.dtype}", self.ckpt_dir / name)
                src = r.src + (a - r.dst)
                files.read(name, tensor["offset"] + src * item, raw[(a - lo) * item:(b - lo) * item])
