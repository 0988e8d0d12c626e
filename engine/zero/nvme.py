"""NVMe offload of the optimizer (ZeRO-Infinity's ``offload_optimizer: {device: nvme}``).

With CPU offload the fp32 master partition and the optimizer states (Adam's m and v: 12Ψ/N
bytes per rank together) live in host memory. With NVMe offload they live in files under
``nvme_path``, one per rank per parameter group, and host memory holds ``buffer_count`` chunk
buffers, whatever the model's size:

* a group's partition is cut into chunks of ``chunk_numel`` elements; the file holds one *slot*
  per chunk, ``[master | state 1 | state 2 ...]``, each part page-aligned, so one chunk is one
  large aligned read and one write (O_DIRECT through engine.io). Where the model's copy of the
  partition is itself an fp32 host tensor (fp32 stage 3 with the partition in host memory, the
  fp32 host staging of stages 1-2) that tensor *is* the master (``aliased``): the slot holds only
  the states, a third fewer bytes each way per step;
* the step streams the chunks (nvme_pipeline.py): chunk k+1 (and further, up to
  ``buffer_count - 2`` ahead) is read while the optimizer updates chunk k in its buffer and chunk
  k-1 is written back, and steps alternate their direction, so each starts with the chunks the
  last one left in the buffers without reading them. The update is the inner optimizer's own step
  run on the chunk (its master, gradient and state slices), which is why only element-wise
  optimizers (Adam/AdamW, Lion, SGD, Adagrad) are accepted: the result is bit for bit the
  CPU-offload result;
* the updated low-precision chunk is written into the model's parameter storage right away, so
  stages 1-2 only all-gather afterwards and stage 3 only refreshes its persistent parameters;
* the constructors make no fp32 master (``OffloadSettings.nvme``): the first master values go
  into the files chunk by chunk from the parameters (the stage's ``master_sources``), so host
  memory never holds the states, not even while the engine is built.

The inner optimizer keeps only the per-group scalars (``step``); its ``state`` is filled with the
chunk's views for the duration of one chunk's update. ``master_params`` are placeholders that
take a chunk's shape while it is updated. Checkpoints read the states straight from the swap
files (``FileRange`` pieces: no full copy in memory) and loads write them back.

The swap directory is removed at exit, on SIGTERM and when the engine is closed; a missing,
unwritable or too small ``nvme_path`` is an error that names the key.
"""
from __future__ import annotations

import atexit
import errno
import os
import shutil
import signal
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..io import ALIGN, DirectFile, FileRange, IOPool, aligned_empty, byte_view, round_up
from ..optimizers import step_with_multiplier
from .nvme_pipeline import ChunkPipeline

__all__ = ["NvmeOffloadError", "NvmeOptimizerSwap", "NvmeSettings"]

ELEMENTWISE = frozenset({"FusedAdamW", "FusedLion", "FusedSGD", "Adam", "AdamW", "SGD", "Adagrad",
                         "DeepSpeedCPUAdam", "FusedAdam"})
DEFAULT_CHUNK_NUMEL = 4 << 20      # 4 Mi elements: a 48 MiB slot for fp32 Adam (master, m, v)
KEY = "zero_optimization.offload_optimizer.nvme_path"


class NvmeOffloadError(UserError, RuntimeError):
    """The nvme_path cannot hold the swap files (missing, unwritable, full) or the optimizer cannot stream."""


@dataclass(frozen=True)
class NvmeSettings:
    """Where and how the optimizer states are swapped (from ``offload_optimizer`` and ``aio``)."""

    path: Path
    buffer_count: int = 4
    threads: int = 4                 # aio.thread_count x aio.queue_depth: requests in flight (<= 16)
    block: int = 8 << 20             # aio.block_size (at least 1 MiB): the largest single read/write
    chunk_numel: int = DEFAULT_CHUNK_NUMEL
    pin_memory: bool = True

    @classmethod
    def from_config(cls, zero: Any, aio: Any = None) -> Optional["NvmeSettings"]:
        """The settings when ``offload_optimizer.device`` is ``nvme``, else None."""
        section = zero.offload_optimizer
        if section.device != "nvme":
            return None
        aio = aio if isinstance(aio, dict) else (aio.extras() if hasattr(aio, "extras") else {})
        chunk = int(os.environ.get("ORCH_NVME_CHUNK_NUMEL", DEFAULT_CHUNK_NUMEL))
        in_flight = int(aio.get("thread_count", 1) or 1) * int(aio.get("queue_depth", 8) or 8)   # DeepSpeed's
        return cls(path=Path(str(section.nvme_path)), buffer_count=max(3, int(section.buffer_count)),
                   threads=min(16, max(2, in_flight)),
                   block=max(1 << 20, int(aio.get("block_size", 8 << 20) or (8 << 20))),
                   chunk_numel=max(ALIGN, chunk), pin_memory=bool(section.pin_memory))


@dataclass(frozen=True)
class _Part:
    """One tensor's place in a slot: master or a per-element state."""

    key: str
    dtype: torch.dtype
    offset: int                      # bytes from the slot's start
    itemsize: int


class _GroupFile:
    """One parameter group's swap file: ``chunks`` slots of ``slot_bytes`` each."""

    def __init__(self, path: Path, numel: int, parts: list[_Part], chunk: int, slot_bytes: int,
                 master: Optional[torch.Tensor] = None) -> None:
        self.path, self.numel, self.parts, self.chunk, self.slot_bytes = path, numel, parts, chunk, slot_bytes
        self.master = master          # the fp32 host tensor that is the master (then not in the file)
        self.chunks = max(1, -(-numel // chunk))
        self.file = DirectFile(path, "rw")

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.chunk, min(self.numel, (k + 1) * self.chunk)

    def views(self, buffer: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
        """Chunk ``k``'s tensors: the parts of its slot (read into ``buffer``), and the master."""
        lo, hi = self.bounds(k)
        out = {p.key: buffer[p.offset:p.offset + (hi - lo) * p.itemsize].view(p.dtype) for p in self.parts}
        if self.master is not None:
            out["master"] = self.master[lo:hi]
        return out

    def slot(self, buffer: torch.Tensor) -> memoryview:
        return byte_view(buffer)[:self.slot_bytes]

    def ranges(self, key: str) -> list[Any]:
        """The bytes of tensor ``key`` over the whole group, as file ranges in element order (the
        aliased master: the tensor itself)."""
        if key == "master" and self.master is not None:
            return [self.master]
        part = next(p for p in self.parts if p.key == key)
        out = []
        for k in range(self.chunks):
            lo, hi = self.bounds(k)
            out.append(FileRange(self.file, k * self.slot_bytes + part.offset, (hi - lo) * part.itemsize))
        return out


class NvmeOptimizerSwap:
    """The swap files and the streamed step of one ZeRO optimizer (see the module docstring)."""

    def __init__(self, opt: Any, settings: NvmeSettings) -> None:
        self.opt, self.settings = opt, settings
        self.inner = opt.optimizer
        name = type(self.inner).__name__
        if name not in ELEMENTWISE:
            raise NvmeOffloadError(
                f"zero_optimization.offload_optimizer.device: NVMe offload streams the optimizer step chunk by "
                f"chunk, which needs an element-wise optimizer (Adam, AdamW, Lion, SGD, Adagrad); {name} is not "
                "one: use device \"cpu\", or one of those optimizers")
        self.pool = IOPool(settings.threads, settings.block)
        self.directory = _make_swap_dir(settings.path, opt.comm.rank)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.directory, True)   # engine dropped
        _register_cleanup(self)
        self.state_parts = _probe_state(self.inner, opt.master_params)
        self.scalars: list[dict[str, Any]] = [{} for _ in opt.master_params]
        targets = self._targets()
        # the model's copy is an fp32 host tensor (fp32 on CPU ranks, or the host staging of
        # stages 1-2): it *is* the master, so the files hold only the states
        self.aliased = bool(self.state_parts) and all(
            isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
            for t in targets)
        self.files = self._create_files([g.partition_numel for g in opt.layout.groups],
                                        targets if self.aliased else None)
        self._buffers = [aligned_empty(max(f.slot_bytes for f in self.files), settings.pin_memory)
                         for _ in range(settings.buffer_count)]
        self.pipeline = ChunkPipeline(len(self._buffers), self._submit_read, self._submit_write)
        self._write_initial(_initial_sources(opt))
        self.placeholders = [torch.empty(0, dtype=torch.float32) for _ in opt.master_params]
        for mp, ph in zip(opt.master_params, self.placeholders):
            mp.data = ph                      # the masters live in the files (or the model's copy) from now on
        opt.master, opt._masters = None, list(self.placeholders)

    # -- files ----------------------------------------------------------------------------------
    def _create_files(self, numels: Sequence[int], masters: Optional[list[torch.Tensor]]) -> list[_GroupFile]:
        parts_spec = ([] if masters else [("master", torch.float32)]) + self.state_parts
        chunk = min(self.settings.chunk_numel, round_up(max(numels, default=1), ALIGN))   # small models: less
        parts, at = [], 0
        for key, dtype in parts_spec:
            itemsize = torch.empty((), dtype=dtype).element_size()
            parts.append(_Part(key, dtype, at, itemsize))
            at += round_up(chunk * itemsize)
        files = []
        for g, numel in enumerate(numels):
            gf = _GroupFile(self.directory / f"optimizer-rank{self.opt.comm.rank:05d}-group{g}.swp", numel, parts,
                            chunk, at, masters[g] if masters else None)
            _reserve(gf, self.settings.path)
            files.append(gf)
        return files

    def _submit_read(self, chunk: tuple[int, int], index: int) -> Any:
        gf = self.files[chunk[0]]
        return self.pool.submit_read(gf.file, gf.slot(self._buffers[index]), chunk[1] * gf.slot_bytes)

    def _submit_write(self, chunk: tuple[int, int], index: int) -> Any:
        gf = self.files[chunk[0]]
        return self.pool.submit_write(gf.file, gf.slot(self._buffers[index]), chunk[1] * gf.slot_bytes)

    def _write_initial(self, sources: list[tuple[int, torch.Tensor]]) -> None:
        """The master values (fp32 from ``sources``: partition-local offset, tensor) and zero
        states into the files, chunk by chunk: the full master never exists in host memory."""
        self.pipeline.forget()
        in_flight: dict[int, Any] = {}
        order = [(g, k) for g, gf in enumerate(self.files) for k in range(gf.chunks)]
        for i, chunk in enumerate(order):
            index = i % len(self._buffers)
            if index in in_flight:
                in_flight.pop(index).wait()         # the buffer's previous chunk is on disk
            g, k = chunk
            gf, lg = self.files[g], self.opt.layout.groups[g]
            views = gf.views(self._buffers[index], k)
            lo, hi = gf.bounds(k)
            _copy_overlaps(views["master"], lg.local_offset + lo, sources)
            for key, _ in self.state_parts:
                views[key].zero_()
            in_flight[index] = self._submit_write(chunk, index)
        for request in in_flight.values():
            request.wait()

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], divisor: float, clip_coef: float) -> None:
        """One optimizer step over every group, streamed through the buffers (nvme_pipeline.py);
        the updated values also go to the model's copy (``_targets``)."""
        params = self.opt.master_params
        lowp_grads = bool(getattr(self.opt, "_lowp_grads", False))
        targets, flat = self._targets(), [g.reshape(-1) for g in grads]
        chunks = [(g, k) for g, gf in enumerate(self.files) for k in range(gf.chunks)]
        updated: dict[int, dict[str, Any]] = {}
        try:
            for (g, k), index in self.pipeline.run(self.pipeline.order(chunks)):
                gf = self.files[g]
                lo, hi = gf.bounds(k)
                updated[g] = self._update_chunk(g, params[g], gf.views(self._buffers[index], k), flat[g][lo:hi],
                                                targets[g], lo, hi, divisor, clip_coef, lowp_grads)
                params[g].data, params[g].grad = self.placeholders[g], None    # the next chunk's step skips it
                self.inner.state.pop(params[g], None)
        finally:
            for mp, placeholder in zip(params, self.placeholders):
                mp.data, mp.grad = placeholder, None
                self.inner.state.pop(mp, None)
        for g, scalars in updated.items():
            self.scalars[g] = scalars

    def _targets(self) -> list[torch.Tensor]:
        """Per group, where the model's copy of the parameters is written: the host staging that
        stages 1-2 send to the rank's pieces of the flat parameters, or stage 3's partition."""
        opt = self.opt
        if hasattr(opt, "flat_params"):    # pinned staging, sent on to the rank's pieces of every bucket
            return opt.publish_targets()
        return [opt.partition[g.local_offset:g.local_offset + g.partition_numel] for g in opt.layout.groups]

    def _update_chunk(self, g: int, mp: nn.Parameter, views: dict[str, torch.Tensor], grad: torch.Tensor,
                      target: Optional[torch.Tensor], lo: int, hi: int, divisor: float, clip_coef: float,
                      lowp_grads: bool) -> dict[str, Any]:
        first = not self.scalars[g]
        mp.data = views["master"]
        mp.grad = grad if grad.dtype == torch.float32 or lowp_grads else grad.float()
        state = self.inner.state[mp]
        state.clear()
        if not first:
            state.update({k: v.clone() if torch.is_tensor(v) else v for k, v in self.scalars[g].items()})
            state.update({k: views[k] for k, _ in self.state_parts})
        lowp = None
        same_device = target is not None and target.device == mp.device and target.dtype != torch.float32
        if same_device:
            lowp = [None] * len(self.opt.master_params)
            lowp[g] = target[lo:hi]
        copied = step_with_multiplier(self.inner, divisor, clip_coef, lowp_out=lowp)
        if first:                                 # the optimizer made its state: keep it in the slot
            for key, _ in self.state_parts:
                views[key].copy_(state[key].reshape(-1))
        if target is not None and not copied and not self.aliased:
            target[lo:hi].copy_(views["master"])   # the model's copy (a device, or fp32 storage)
        return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()
                if not (torch.is_tensor(v) and v.dim() >= 1 and v.numel() == hi - lo)}

    # -- checkpoints and loads -----------------------------------------------------------------
    @property
    def state_keys(self) -> list[str]:
        """Per-element states held in the files (empty before the first step, as torch's lazy state)."""
        return [k for k, _ in self.state_parts] if any(self.scalars) else []

    def file_ranges(self, key: str) -> list[FileRange]:
        """Tensor ``key`` (``master`` or a state) of the whole partition, group after group."""
        return [r for gf in self.files for r in gf.ranges(key)]

    def state_dtype(self, key: str) -> torch.dtype:
        return dict(self.state_parts)[key]

    @torch.no_grad()
    def read(self, key: str, group: int) -> torch.Tensor:
        """Tensor ``key`` of one group, materialised (for APIs that return it whole)."""
        gf = self.files[group]
        if key == "master" and gf.master is not None:
            return gf.master.clone()
        part = next(p for p in gf.parts if p.key == key)
        out = torch.empty(gf.numel, dtype=part.dtype)
        raw = byte_view(out)
        requests = []
        for k in range(gf.chunks):
            lo, hi = gf.bounds(k)
            requests.append(self.pool.submit_read(gf.file, raw[lo * part.itemsize:hi * part.itemsize],
                                                  k * gf.slot_bytes + part.offset))
        for request in requests:
            request.wait()
        return out

    @torch.no_grad()
    def write(self, values: dict[str, torch.Tensor], group: int, scalars: Optional[dict[str, Any]] = None) -> None:
        """Replace tensors of one group (``values``: key -> the group's full tensor); an aliased
        master is written in place, the rest through the file chunk by chunk."""
        gf = self.files[group]
        values = dict(values)
        if gf.master is not None and "master" in values:
            gf.master.copy_(values.pop("master").reshape(-1))
        self._rewrite_chunks(group, lambda k, views: [views[key].copy_(value.reshape(-1)[slice(*gf.bounds(k))])
                                                      for key, value in values.items()], bool(values))
        if scalars is not None:
            self.scalars[group] = dict(scalars)

    def _rewrite_chunks(self, group: int, change: Callable[[int, dict[str, torch.Tensor]], Any], files: bool) -> None:
        """``change(k, views)`` on every chunk of one group, read from and written back to its file
        (``files`` False: only the aliased master changes, nothing to read or write)."""
        gf = self.files[group]
        buf = self._buffers[0]
        self.pipeline.forget()             # buffer 0 is borrowed, and the files change
        for k in range(gf.chunks):
            if files:
                self._submit_read((group, k), 0).wait()
            change(k, gf.views(buf, k))
            if files:
                self._submit_write((group, k), 0).wait()

    def partition(self, key: str) -> torch.Tensor:
        """Tensor ``key`` of the rank's whole partition (groups concatenated), read from the files."""
        parts = [self.read(key, g) for g in range(len(self.files))]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_partitions(self) -> dict[str, torch.Tensor]:
        """What ``PartitionedOptimizer.optimizer_state_partitions`` returns, read from the files."""
        out: dict[str, torch.Tensor] = {key: self.partition(key) for key in self.state_keys}
        for key, value in (self.scalars[0] if self.scalars else {}).items():
            out[key] = value.detach().clone() if torch.is_tensor(value) else torch.tensor(float(value))
        return out

    def load_partitions(self, values: dict[str, torch.Tensor], scalars: Optional[list[dict[str, Any]]] = None) -> None:
        """New values for the rank's partitions (``key -> layout.partition_numel`` tensor), written
        to the files group by group; ``master`` also goes to the model's copy. ``scalars``: per
        group (e.g. ``step``), which also marks the states as present (a step has happened)."""
        groups = self.opt.layout.groups
        for g, (lg, target) in enumerate(zip(groups, self._targets())):
            part = {k: v.reshape(-1)[lg.local_offset:lg.local_offset + lg.partition_numel] for k, v in values.items()}
            self.write(part, g, None if scalars is None else scalars[g])
            if "master" in part and not self.aliased:
                target.copy_(part["master"])

    @torch.no_grad()
    def load_streamed(self, fill: Callable[[str, int, int, torch.Tensor], None], keys: Sequence[str],
                      scalars: Optional[list[dict[str, Any]]] = None) -> None:
        """Replace tensors ``keys`` chunk by chunk: ``fill(key, lo, hi, view)`` writes elements
        ``[lo, hi)`` of the rank's new partition into the chunk's view (its current values are
        there already). Host memory holds one chunk buffer; ``master`` also goes to the model's
        copy. ``scalars``: per group, as ``load_partitions``."""
        in_files = any(key != "master" or not self.aliased for key in keys)
        for g, (lg, gf, target) in enumerate(zip(self.opt.layout.groups, self.files, self._targets())):
            def change(k: int, views: dict[str, torch.Tensor]) -> None:
                lo, hi = gf.bounds(k)
                for key in keys:
                    fill(key, lg.local_offset + lo, lg.local_offset + hi, views[key])
                if "master" in keys and target is not None and not self.aliased:
                    target[lo:hi].copy_(views["master"])
            self._rewrite_chunks(g, change, in_files)
            if scalars is not None:
                self.scalars[g] = dict(scalars[g])

    def load_full_states(self, full_states: Any) -> None:
        """``load_full``'s optimizer states: full canonical vectors, sharded here, and scalars."""
        layout, rank = self.opt.layout, self.opt._rank
        vectors = {k: layout.shard(v.to(torch.float32), rank) for k, v in full_states.items()
                   if torch.is_tensor(v) and v.dim() == 1}
        scalars = {k: torch.tensor(float(v), dtype=torch.float32) for k, v in full_states.items() if k not in vectors}
        self.load_partitions(vectors, [dict(scalars) for _ in layout.groups])

    def close(self) -> None:
        """Remove the swap files (also run at exit and on SIGTERM)."""
        for gf in getattr(self, "files", []):
            gf.file.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def buffer_bytes(self) -> int:
        return sum(int(b.numel()) for b in self._buffers)

    @property
    def file_bytes(self) -> int:
        return sum(gf.chunks * gf.slot_bytes for gf in self.files)


# -- set-up helpers ------------------------------------------------------------------------------

def _initial_sources(opt: Any) -> list[tuple[int, torch.Tensor]]:
    """Where the masters' first values come from, as (partition-local offset, tensor) pieces: the
    stage's masters if it made them, else its parameters (``master_sources``: under NVMe offload
    the constructors never hold a full fp32 master, offload.py)."""
    masters, groups = opt._masters, opt.layout.groups
    if all(m.numel() == g.partition_numel for m, g in zip(masters, groups)):
        return [(g.local_offset, m.detach().reshape(-1)) for m, g in zip(masters, groups)]
    return opt.master_sources()


def _copy_overlaps(dst: torch.Tensor, start: int, sources: list[tuple[int, torch.Tensor]]) -> None:
    """``dst`` (elements ``[start, start + len)`` of the partition) from the pieces that cover them."""
    end = start + dst.numel()
    for at, piece in sources:
        lo, hi = max(start, at), min(end, at + piece.numel())
        if hi <= lo:
            continue
        out, src = dst[lo - start:hi - start], piece[lo - at:hi - at]
        if out.data_ptr() != src.data_ptr() or out.dtype != src.dtype:    # an aliased master is its source
            out.copy_(src)


def _probe_state(inner: Any, master_params: Sequence[nn.Parameter]) -> list[tuple[str, torch.dtype]]:
    """The optimizer's per-element state keys and dtypes, from one step on a 2-element stand-in."""
    mp = master_params[0]
    saved = mp.data
    try:
        mp.data = torch.zeros(2, dtype=torch.float32)
        mp.grad = torch.zeros(2, dtype=torch.float32)
        inner.step()
        state = inner.state.get(mp, {})
        return sorted((k, v.dtype) for k, v in state.items() if torch.is_tensor(v) and tuple(v.shape) == (2,))
    finally:
        inner.state.pop(mp, None)
        mp.data, mp.grad = saved, None


def _make_swap_dir(root: Path, rank: int, key: str = KEY, prefix: str = "orch-swap") -> Path:
    """A fresh swap directory for ``rank`` under ``root``; errors name ``key`` (the nvme_path setting)."""
    if not root.is_dir():
        raise NvmeOffloadError(f"{key}: {root} does not exist or is not a directory; create it on the NVMe "
                               "drive (every node needs it), or set nvme_path to an existing directory")
    try:
        return Path(tempfile.mkdtemp(prefix=f"{prefix}-rank{rank:05d}-", dir=root))
    except OSError as exc:
        raise NvmeOffloadError(f"{key}: cannot create swap files in {root} ({exc.strerror}); make the directory "
                               "writable for this user, or point nvme_path elsewhere") from None


def _reserve(gf: _GroupFile, root: Path) -> None:
    """Allocate the whole file now: a full disk fails here with the sizes, not mid-step."""
    _reserve_file(gf.file, gf.chunks * gf.slot_bytes, root)


def _reserve_file(file: DirectFile, size: int, root: Path, key: str = KEY, what: str = "optimizer swap file") -> None:
    """``_reserve`` for any swap file (the parameter swap's too, nvme_params.py)."""
    try:
        file.allocate(size)
    except OSError as exc:
        free = shutil.disk_usage(root).free
        reason = "not enough space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
        raise NvmeOffloadError(f"{key}: {root} cannot hold the {what} ({reason}: it needs "
                               f"{size / 2**30:.2f} GiB for this rank's group, {free / 2**30:.2f} GiB are free); "
                               "free space there, use more ranks, or use device \"cpu\"") from None


_live: "weakref.WeakSet[NvmeOptimizerSwap]" = weakref.WeakSet()
_hooks_lock = threading.Lock()
_hooked = False


def _register_cleanup(swap: NvmeOptimizerSwap) -> None:
    """Remove swap directories at interpreter exit and on SIGTERM (then exit as SIGTERM would)."""
    global _hooked
    _live.add(swap)
    with _hooks_lock:
        if _hooked:
            return
        _hooked = True
        atexit.register(_cleanup_all)
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)

            def on_sigterm(signum: int, frame: Any) -> None:
                _cleanup_all()
                if callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN):
                    previous(signum, frame)
                    return
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

            signal.signal(signal.SIGTERM, on_sigterm)


def _cleanup_all() -> None:
    for swap in list(_live):
        swap.close()
