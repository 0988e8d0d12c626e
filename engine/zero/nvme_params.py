"""NVMe offload of stage 3's parameter partition (ZeRO-Infinity's ``offload_param: {device: nvme}``).

With ``offload_param: {device: cpu}`` each rank's low-precision parameter partition (2Ψ/N bytes
in bf16) lives in host memory. With ``device: nvme`` it lives in swap files under ``nvme_path``,
one per rank per parameter group, laid out like the partition (element ``i`` of group ``g`` at
byte ``i × itemsize`` of the group's file), and host memory holds ``buffer_count`` buffers:

* **fetch**: before a fetch unit is gathered, this rank's pieces of it (one contiguous run per
  span) are read into a free buffer, one page-aligned read per span (O_DIRECT through
  engine.io); the gather then reads the pieces from the buffer instead of the partition, and
  the buffer is free again once the gather has copied them (on CPU at once; with CUDA once the
  side stream's host-to-device copy has landed);
* **prefetch**: while the micro-step follows the fetch trace of stage3_hooks.py, every fetch
  starts the reads of the next units in trace order, as many as there are free buffers, so the
  disk works ahead of the gathers (the first micro-step has no trace and reads on demand);
* **write-back**: after the optimizer step the updated values are cast into two page-aligned
  staging blocks and written (aligned writes, one block written while the next is filled); with
  ``offload_optimizer: nvme`` the streamed step stages each of its chunks straight into them
  (``PartitionTargets``, in whatever order its passes go), otherwise the fp32 master is cast block
  by block (``aio.block_size``). No unit is being read then; reads ahead are dropped first.

DeepSpeed's keys keep their meaning: ``buffer_size`` (elements) bounds one buffer, so the largest
fetch unit's piece must fit in it (DeepSpeed fails with "More elements ... than buffer size";
here the error names the key and the size needed); buffers are allocated to what they hold, not
to ``buffer_size``: one to the largest unit's piece, the others to the next largest (a unit takes
the smallest free buffer it fits in). ``max_in_cpu`` elements of the trainable partition (whole spans, from the start) stay in
host memory as DeepSpeed keeps them (its default, 1e9, keeps every model under a billion
parameters per rank in host memory: set it to 0 to put the whole partition on the drive).
Frozen parameters are always swapped, as in DeepSpeed.

The swap directory goes at exit, on SIGTERM and when the engine is dropped (nvme.py's cleanup).
"""
from __future__ import annotations

import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from ..io import ALIGN, DirectFile, IOPool, IORequest, aligned_empty, byte_view, round_up
from .copy_stream import CopyTicket
from .nvme import NvmeOffloadError, _make_swap_dir, _register_cleanup, _reserve_file
from .partition import FlatLayout, Span

__all__ = ["GroupSource", "NvmeParamSettings", "ParamSwap", "PartitionTargets"]

SECTION = "zero_optimization.offload_param"


@dataclass(frozen=True)
class NvmeParamSettings:
    """Where and how the parameter partition is swapped (``offload_param`` and ``aio``)."""

    path: Path
    buffer_count: int = 5
    buffer_size: int = 100_000_000        # elements per buffer (DeepSpeed's unit)
    max_in_cpu: int = 1_000_000_000       # elements of the trainable partition kept in host memory
    pin_memory: bool = True
    threads: int = 4
    block: int = 8 << 20

    @classmethod
    def from_config(cls, zero: Any, aio: Any = None) -> Optional["NvmeParamSettings"]:
        """The settings when ``offload_param.device`` is ``nvme``, else None."""
        section = zero.offload_param
        if section.device != "nvme":
            return None
        if int(section.buffer_count) < 1 or int(section.buffer_size) < 1:
            key = "buffer_count" if int(section.buffer_count) < 1 else "buffer_size"
            raise NvmeOffloadError(f"{SECTION}.{key}: NVMe parameter offload reads every fetch unit through "
                                   f"these buffers, so {key} must be at least 1 (DeepSpeed's default is "
                                   f"{5 if key == 'buffer_count' else '1e8'})")
        aio = aio if isinstance(aio, dict) else (aio.extras() if hasattr(aio, "extras") else {})
        in_flight = int(aio.get("thread_count", 1) or 1) * int(aio.get("queue_depth", 8) or 8)
        return cls(path=Path(str(section.nvme_path)), buffer_count=int(section.buffer_count),
                   buffer_size=int(section.buffer_size), max_in_cpu=int(section.max_in_cpu),
                   pin_memory=bool(section.pin_memory), threads=min(16, max(2, in_flight)),
                   block=max(1 << 20, int(aio.get("block_size", 8 << 20) or (8 << 20))))


@dataclass(frozen=True)
class _SpanRead:
    """One span's piece of a unit: the aligned byte range read, where it lands in the buffer."""

    span: int
    group: int
    offset: int           # aligned file offset
    nbytes: int           # aligned length
    at: int               # aligned position in the buffer
    skip: int             # bytes from ``at`` to the piece's first element
    numel: int


class _Read:
    """A unit's pieces being read (or read) into buffer ``buffer``."""

    def __init__(self, buffer: int, requests: list[IORequest], pieces: dict[int, torch.Tensor]) -> None:
        self.buffer, self.requests, self.pieces = buffer, requests, pieces

    def wait(self) -> dict[int, torch.Tensor]:
        for request in self.requests:
            request.wait()
        self.requests = []
        return self.pieces


class ParamSwap:
    """The swap files, buffers, reads and write-back of one rank's parameter partition.

    ``layout`` is the store's layout (trainable groups, then frozen); ``unit_spans`` per fetch
    unit the span indices it holds; ``trainable_numel`` where the frozen group starts.
    """

    def __init__(self, layout: FlatLayout, unit_spans: Sequence[Sequence[int]], unit_names: Sequence[str],
                 rank: int, dtype: torch.dtype, settings: NvmeParamSettings, trainable_numel: int) -> None:
        self.layout, self.rank, self.dtype, self.settings = layout, rank, dtype, settings
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.resident_numel = _resident_prefix(layout, min(settings.max_in_cpu, trainable_numel))
        self.resident = torch.zeros(self.resident_numel, dtype=dtype)
        if settings.pin_memory and torch.cuda.is_available() and self.resident_numel:
            self.resident = self.resident.pin_memory()
        self.plans = [self._plan(spans) for spans in unit_spans]
        self.need = [p[-1].at + p[-1].nbytes if p else 0 for p in self.plans]     # bytes of a unit's read
        self._check_buffer_size(unit_names)
        self.pool = IOPool(settings.threads, settings.block)
        self.directory = _make_swap_dir(settings.path, rank, f"{SECTION}.nvme_path", "orch-param-swap")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.directory, True)
        _register_cleanup(self)
        self.files = self._create_files()
        self.buffers = [aligned_empty(max(n, ALIGN), settings.pin_memory)
                        for n in _buffer_sizes(self.need, settings.buffer_count)]
        self._free: list[tuple[int, Optional[CopyTicket]]] = [(i, None) for i in range(len(self.buffers))]
        self.reads: dict[int, _Read] = {}       # unit -> its read in flight or done, not yet taken
        self.leased: dict[int, int] = {}        # unit -> buffer its gather still reads
        self.prefetch_hits = self.demand_reads = 0     # units found read ahead / read when asked for
        self._wstaging = [torch.empty(0, dtype=torch.uint8) for _ in range(2)]   # write-back staging
        self._wpending: dict[int, IORequest] = {}
        self._write_turn, self._writing = 0, False
        self._write_block = max(ALIGN, settings.block // self.itemsize)
        self._staged: Optional[tuple[Any, ...]] = None    # (group, lo, hi, view, staging index)

    # -- set-up ---------------------------------------------------------------------------------
    def swapped(self, span: Span) -> bool:
        return span.local_offset >= self.resident_numel and span.partition_numel > 0

    def _plan(self, spans: Sequence[int]) -> list[_SpanRead]:
        out, at = [], 0
        for index in spans:
            span = self.layout.spans[index]
            if not self.swapped(span):
                continue
            group = self.layout.groups[span.group]
            lo = (span.local_offset - group.local_offset) * self.itemsize
            hi = lo + span.partition_numel * self.itemsize
            start = lo // ALIGN * ALIGN
            nbytes = round_up(hi) - start
            out.append(_SpanRead(index, span.group, start, nbytes, at, lo - start, span.partition_numel))
            at += nbytes
        return out

    def _check_buffer_size(self, names: Sequence[str]) -> None:
        sizes = [sum(r.numel for r in plan) for plan in self.plans]
        if not sizes or max(sizes) <= self.settings.buffer_size:
            return
        worst = max(range(len(sizes)), key=sizes.__getitem__)
        raise NvmeOffloadError(
            f"{SECTION}.buffer_size: the fetch unit of module {names[worst] or '(root)'!r} has {sizes[worst]:,} "
            f"elements in this rank's partition, more than buffer_size {self.settings.buffer_size:,}; set "
            f"buffer_size to at least {sizes[worst]} (each buffer holds one unit's piece), or use more ranks")

    def _create_files(self) -> dict[int, DirectFile]:
        files = {}
        try:
            for group in self.layout.groups:
                if group.local_offset + group.partition_numel <= self.resident_numel or not group.partition_numel:
                    continue
                path = self.directory / f"params-rank{self.rank:05d}-group{group.index}.swp"
                files[group.index] = DirectFile(path, "rw")
                _reserve_file(files[group.index], round_up(group.partition_numel * self.itemsize),
                              self.settings.path, f"{SECTION}.nvme_path", "parameter swap file")
        except BaseException:
            for file in files.values():
                file.close()
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        return files

    # -- buffers --------------------------------------------------------------------------------
    def _take_buffer(self, need: int = 0) -> Optional[int]:
        """The smallest free buffer of at least ``need`` bytes (once its last host-to-device copy
        landed); read-aheads give theirs up, the farthest first; None when none fits."""
        at = self._fitting(need)
        while at is None and self.reads:
            read = self.reads.pop(next(reversed(self.reads)))
            read.wait()
            self._free.append((read.buffer, None))
            at = self._fitting(need)
        if at is None:
            return None
        index, ticket = self._free.pop(at)
        if ticket is not None:
            ticket.ready_on_host()
        return index

    def _fitting(self, need: int) -> Optional[int]:
        """Where in the free list the smallest buffer of at least ``need`` bytes is."""
        fits = [(self.buffers[i].numel(), k) for k, (i, _) in enumerate(self._free) if self.buffers[i].numel() >= need]
        return min(fits)[1] if fits else None

    def give_back(self, unit: int, ticket: Optional[CopyTicket] = None) -> None:
        """Unit ``unit``'s gather no longer reads its buffer (after ``ticket``'s copy, if given)."""
        index = self.leased.pop(unit, None)
        if index is not None:
            self._free.append((index, ticket))

    @property
    def buffer_bytes(self) -> int:
        """Host memory of the read buffers and the write-back staging."""
        return sum(int(b.numel()) for b in self.buffers + self._wstaging)

    @property
    def file_bytes(self) -> int:
        return sum(file.size() for file in self.files.values())

    # -- reads ----------------------------------------------------------------------------------
    def _start_read(self, unit: int, buffer: int) -> _Read:
        raw = byte_view(self.buffers[buffer])
        requests, pieces = [], {}
        for r in self.plans[unit]:
            requests.append(self.pool.submit_read(self.files[r.group], raw[r.at:r.at + r.nbytes], r.offset))
            start = r.at + r.skip
            pieces[r.span] = self.buffers[buffer][start:start + r.numel * self.itemsize].view(self.dtype)
        return _Read(buffer, requests, pieces)

    def take(self, unit: int) -> Optional[dict[int, torch.Tensor]]:
        """Unit ``unit``'s swapped pieces (span index -> tensor in a buffer), read now unless
        prefetched; the buffer stays the unit's until ``give_back``. None: no buffer is free (every
        one is read by a gather in flight; the caller completes one and asks again)."""
        if not self.plans[unit]:
            return {}
        read = self.reads.pop(unit, None)
        if read is not None:
            self.prefetch_hits += 1
        else:
            buffer = self._take_buffer(self.need[unit])
            if buffer is None:
                return None
            self.demand_reads += 1
            read = self._start_read(unit, buffer)
        self.leased[unit] = read.buffer
        return read.wait()

    def read_ahead(self, units: Iterable[int]) -> None:
        """Start the reads of ``units`` (in the order they will be needed) while buffers are free."""
        for unit in units:
            if not self._free:
                return
            at = self._fitting(self.need[unit])
            if at is None or unit in self.reads or unit in self.leased or not self.plans[unit]:
                continue
            index, ticket = self._free.pop(at)
            if ticket is not None:
                ticket.ready_on_host()
            self.reads[unit] = self._start_read(unit, index)

    def drop_reads(self) -> None:
        """Forget every read-ahead (the partition is about to change)."""
        for read in self.reads.values():
            read.wait()
            self._free.append((read.buffer, None))
        self.reads.clear()

    # -- single pieces (start-up fill, GatheredParameters' write-back, checkpoint loads) ----------
    def write_piece(self, local: int, values: torch.Tensor) -> None:
        """Elements ``[local, local + n)`` of the partition (``local`` in partition coordinates)."""
        self.drop_reads()
        # a copy: a byte view (numpy) would pin the storage of the caller's tensor (a unit's ``full``,
        # which is resized to nothing when released)
        values = values.detach().reshape(-1).to(device="cpu", dtype=self.dtype, copy=True)
        end = local + values.numel()
        if local < self.resident_numel:
            n = min(end, self.resident_numel) - local
            self.resident[local:local + n].copy_(values[:n])
            values, local = values[n:], local + n
        for group in self.layout.groups:
            lo, hi = max(local, group.local_offset), min(end, group.local_offset + group.partition_numel)
            if hi > lo:
                part = values[lo - local:hi - local]
                self.files[group.index].write(byte_view(part), (lo - group.local_offset) * self.itemsize)

    @torch.no_grad()
    def read_range(self, group: int, lo: int, hi: int, out: torch.Tensor) -> None:
        """Elements ``[lo, hi)`` of group ``group`` (group-local) into ``out`` (any dtype), read
        through one buffer in aligned blocks."""
        g = self.layout.groups[group]
        resident = max(0, min(self.resident_numel - g.local_offset, g.partition_numel))
        out, at = out.reshape(-1), lo
        if at < resident:
            n = min(hi, resident) - at
            out[:n].copy_(self.resident[g.local_offset + at:g.local_offset + at + n])
            at += n
        if at >= hi:
            return
        self.drop_reads()
        index = self._take_buffer()
        if index is None:
            raise RuntimeError("no parameter swap buffer is free to read the partition with (a gather is in flight)")
        buffer = self.buffers[index]
        capacity = buffer.numel() // ALIGN * ALIGN
        try:
            while at < hi:
                start = at * self.itemsize // ALIGN * ALIGN
                end = min(round_up(hi * self.itemsize), start + capacity)
                self.pool.submit_read(self.files[group], byte_view(buffer)[:end - start], start).wait()
                upto = min(hi, end // self.itemsize)
                out[at - lo:upto - lo].copy_(buffer[at * self.itemsize - start:upto * self.itemsize - start]
                                             .view(self.dtype))
                at = upto
        finally:
            self._free.append((index, None))

    # -- write-back after a step ---------------------------------------------------------------
    def stage(self, group: int, lo: int, hi: int) -> torch.Tensor:
        """A staging view for elements ``[lo, hi)`` of ``group`` (group-local) that the caller fills
        with their new values; it is written when the next chunk is staged or ``finish_writes``
        runs. Chunks may come in any order (the NVMe optimizer's passes alternate direction)."""
        if self._staged is not None and self._staged[:3] == (group, lo, hi):
            return self._staged[3]
        self._commit_staged()
        if not self._writing:
            self.drop_reads()                       # the partition changes: reads ahead are stale
            self._writing = True
        index = self._write_turn = (self._write_turn + 1) % len(self._wstaging)
        pending = self._wpending.pop(index, None)
        if pending is not None:
            pending.wait()
        nbytes = round_up((hi - lo) * self.itemsize) + ALIGN
        if self._wstaging[index].numel() < nbytes:
            self._wstaging[index] = aligned_empty(nbytes, self.settings.pin_memory)
        view = self._wstaging[index][:(hi - lo) * self.itemsize].view(self.dtype)
        self._staged = (group, lo, hi, view, index)
        return view

    def _commit_staged(self) -> None:
        """The staged chunk to host memory (its resident part) and to the drive (the rest)."""
        if self._staged is None:
            return
        group, lo, hi, view, index = self._staged
        self._staged = None
        g = self.layout.groups[group]
        resident = max(0, min(self.resident_numel - g.local_offset, g.partition_numel))
        if lo < resident:
            n = min(resident, hi) - lo
            self.resident[g.local_offset + lo:g.local_offset + lo + n].copy_(view[:n])
        if hi <= resident or group not in self.files:
            return
        nbytes = (hi - lo) * self.itemsize
        if hi == g.partition_numel:
            nbytes = round_up(nbytes)            # the file's padding takes the direct write's tail
        raw = byte_view(self._wstaging[index])[:nbytes]
        self._wpending[index] = self.pool.submit_write(self.files[group], raw, lo * self.itemsize)

    def write_group(self, group: int, values: torch.Tensor) -> None:
        """Group ``group``'s new values (its whole partition, any dtype), cast into the staging
        block by block and written (``finish_writes`` waits for the last ones)."""
        flat = values.reshape(-1)
        for lo in range(0, flat.numel(), self._write_block):
            hi = min(lo + self._write_block, flat.numel())
            self.stage(group, lo, hi).copy_(flat[lo:hi])

    def write_groups(self, values: Sequence[torch.Tensor]) -> None:
        """``write_group`` for every trainable group (``values[g]``), then ``finish_writes``."""
        for g, value in enumerate(values):
            self.write_group(g, value)
        self.finish_writes()

    def finish_writes(self) -> None:
        """End a write-back: every value is in host memory or on the drive when this returns."""
        try:
            self._commit_staged()
        finally:
            for request in self._wpending.values():
                request.wait()
            self._wpending.clear()
            self._writing = False

    def close(self) -> None:
        """Remove the swap files (also run at exit and on SIGTERM)."""
        for file in getattr(self, "files", {}).values():
            file.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class _GroupTarget:
    """One group's write target for NVMe offload's streamed step (nvme.py's ``_targets``):
    ``target[lo:hi]`` is a staging view the step writes or copies the chunk's new values into.
    Not a tensor the master could live in (``is_contiguous`` is False): the values go to the drive."""

    def __init__(self, swap: ParamSwap, group: int) -> None:
        self.swap, self.group = swap, group
        self.device, self.dtype = torch.device("cpu"), swap.dtype

    def __getitem__(self, s: slice) -> torch.Tensor:
        return self.swap.stage(self.group, s.start or 0, s.stop)

    def copy_(self, values: torch.Tensor) -> None:
        self.swap.write_group(self.group, values)

    def is_contiguous(self) -> bool:
        return False


class GroupSource:
    """Group ``group`` of a swapped partition as a source of values: ``numel()`` and slices that
    read from the drive (how NVMe optimizer offload writes its first masters, nvme.py)."""

    def __init__(self, swap: ParamSwap, group: int) -> None:
        self.swap, self.group = swap, group

    def numel(self) -> int:
        return self.swap.layout.groups[self.group].partition_numel

    def __getitem__(self, s: slice) -> torch.Tensor:
        lo, hi, _ = s.indices(self.numel())
        out = torch.empty(hi - lo, dtype=self.swap.dtype)
        self.swap.read_range(self.group, lo, hi, out)
        return out


def _buffer_sizes(needs: Sequence[int], count: int) -> list[int]:
    """Bytes of each read buffer: one fits the largest unit's piece, the others the largest of the
    rest, so one big unit (a tied embedding) does not make every buffer its size."""
    ordered = sorted(needs, reverse=True)
    if not ordered:
        return [ALIGN] * count
    rest = ordered[1] if len(ordered) > 1 else ordered[0]
    return [ordered[0]] + [rest] * (count - 1)


class PartitionTargets:
    """Stage 3's ``partition`` when it is swapped: slicing out one group's range gives that group's
    write target (``_GroupTarget``), which is how NVMe optimizer offload's step (nvme.py's
    ``_targets``) finds where the new parameter values go."""

    def __init__(self, swap: ParamSwap) -> None:
        self.swap = swap
        self.device, self.dtype = torch.device("cpu"), swap.dtype

    def __getitem__(self, s: slice) -> _GroupTarget:
        for g in self.swap.layout.groups:
            if (g.local_offset, g.local_offset + g.partition_numel) == (s.start, s.stop):
                return _GroupTarget(self.swap, g.index)
        raise IndexError(f"a swapped partition is sliced by whole groups, not [{s.start}:{s.stop}]")


def _resident_prefix(layout: FlatLayout, limit: int) -> int:
    """Elements of the partition kept in host memory: whole spans from the start, at most ``limit``."""
    end = 0
    for span in sorted(layout.spans, key=lambda s: s.local_offset):
        if span.local_offset + span.partition_numel > limit:
            break
        end = span.local_offset + span.partition_numel
    return end

