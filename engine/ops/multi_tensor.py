"""Launching an elementwise kernel over lists of tensors with few launches.

Large tensors (the flat ZeRO partitions) get a launch each, in the kernel's direct mode where
Triton sees the pointers and vectorises. All the small ones share a single launch in the
kernel's multi-tensor mode, through device tables of addresses. The tables are cached, so a
step over the same buffers as last time uploads nothing.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from .autotune import KernelConfig

# Below this many elements a tensor joins the shared multi-tensor launch: around a million
# elements the transfer time of one tensor only starts to dwarf a launch's few microseconds.
DIRECT_MIN_NUMEL = 1 << 20

TensorLists = dict[str, Sequence[torch.Tensor] | None]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split(numels: Sequence[int], block: int, direct_min: int) -> tuple[list[int], list[int]]:
    """Indices of tensors launched on their own, and of those sharing the multi-tensor launch."""
    direct = [i for i, n in enumerate(numels) if n > 0 and n >= max(direct_min, block)]
    shared = [i for i, n in enumerate(numels) if 0 < n < max(direct_min, block)]
    if len(shared) == 1:  # a table for one tensor buys nothing
        direct, shared = sorted(direct + shared), []
    return direct, shared


def program_count(numels: Sequence[int], block: int) -> int:
    """Programs over all tensors (the same in both modes: one per block of each tensor)."""
    return sum(cdiv(n, block) for n in numels if n > 0)


class TableCache:
    """Device tables for multi-tensor launches, keyed by the tensors' addresses and sizes."""

    def __init__(self, capacity: int = 8) -> None:
        self._entries: OrderedDict[tuple, tuple[dict[str, torch.Tensor | None], torch.Tensor, torch.Tensor]] = OrderedDict()
        self._capacity = capacity

    def tables(self, lists: TensorLists, numels: Sequence[int], block: int, device: torch.device):
        key = (
            block,
            str(device),
            tuple(numels),
            tuple((name, None if ts is None else tuple(t.data_ptr() for t in ts)) for name, ts in lists.items()),
        )
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        programs = [(i, start) for i, n in enumerate(numels) for start in range(0, n, block)]
        host = {
            name: None if ts is None else torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)
            for name, ts in lists.items()
        }
        host_programs = torch.tensor(programs, dtype=torch.int64).reshape(-1)
        host_numels = torch.tensor(list(numels), dtype=torch.int64)
        entry = (
            {name: None if t is None else _to_device(t, device) for name, t in host.items()},
            _to_device(host_programs, device),
            _to_device(host_numels, device),
        )
        self._entries[key] = entry
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return entry


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def launch(
    kernel: Any,
    lists: TensorLists,
    *,
    args: dict[str, Any],
    config: KernelConfig,
    tables: TableCache,
    multi_ok: bool,
    direct_min: int | None = None,
    prog_offset_arg: str | None = None,
) -> int:
    """Run ``kernel`` over every tensor of ``lists`` (keyword -> one tensor per element).

    The first list names the tensors whose sizes set the work. ``args`` holds the remaining
    kernel arguments (scalars and constexprs, dtype constexprs included). When
    ``prog_offset_arg`` is given it receives each launch's first program number, for kernels
    that write one result per program. Returns the number of programs run.
    """
    first = next(iter(lists.values()))
    assert first is not None
    numels = [t.numel() for t in first]
    if not numels:
        return 0
    device = first[0].device
    block = config.block
    direct, shared = split(numels, block, DIRECT_MIN_NUMEL if direct_min is None else direct_min)
    if not multi_ok:
        direct, shared = sorted(direct + shared), []
    options = {"num_warps": config.num_warps, "enable_fp_fusion": True}
    offset = 0
    for i in direct:
        grid = (cdiv(numels[i], block),)
        extra = {prog_offset_arg: offset} if prog_offset_arg else {}
        kernel[grid](
            **{name: None if ts is None else ts[i] for name, ts in lists.items()},
            n_elements=numels[i], prog_ptr=None, numel_ptr=None,
            BLOCK=block, MULTI=False, **args, **extra, **options,
        )
        offset += grid[0]
    if shared:
        sub = {name: None if ts is None else [ts[i] for i in shared] for name, ts in lists.items()}
        sub_numels = [numels[i] for i in shared]
        addresses, programs, numel_table = tables.tables(sub, sub_numels, block, device)
        grid = (programs.numel() // 2,)
        extra = {prog_offset_arg: offset} if prog_offset_arg else {}
        kernel[grid](
            **addresses, n_elements=0, prog_ptr=programs, numel_ptr=numel_table,
            BLOCK=block, MULTI=True, **args, **extra, **options,
        )
        offset += grid[0]
    return offset
