"""Where ``engine.zero.Init(remote_device="nvme")`` keeps this rank's parameter pieces: a swap file.

Why: with ``offload_param: {device: nvme}`` the point is a model whose 1/N partition does not fit
in host memory. If ``Init`` kept each rank's pieces in RAM until ``engine.initialize`` moved them
to the drive, building such a model would fail before training could start. So each piece goes
to the rank's file under ``offload_param.nvme_path`` as its parameter is partitioned: appended at
a page-aligned offset, cast into one aligned staging block at a time (``aio.block_size``) and
written through engine.io's direct writes, like every other swap file. Host memory holds the
staging block and, while a piece is being used, that one piece read back (kept until another
piece is asked for, so asking a piece's size and then its values reads it once).

``initialize`` reads each piece from here once: stage 3 copies it into its own swap files (laid
out by fetch unit and parameter group, which ``Init`` cannot know yet; nvme_params.py) or gathers
the parameter from every rank's piece when its layout cuts it differently; stages 0-2 gather the
whole parameter. The file goes when its last piece is released (``initialize`` releases each one
it took over), when the ``Init`` context and its model are dropped, at exit and on SIGTERM
(nvme.py's cleanup, as for every swap directory). A full drive is an error naming the key, with
the sizes, when the piece that does not fit is written.
"""
from __future__ import annotations

import shutil
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from ..io import DirectFile, IOPool, aligned_empty, byte_view, round_up
from .nvme import NvmeOffloadError, _make_swap_dir, _register_cleanup, _reserve_file
from .nvme_params import SECTION, NvmeParamSettings

__all__ = ["InitSwap", "Slot"]

KEY = f"{SECTION}.nvme_path"


@dataclass(frozen=True)
class Slot:
    """Where one piece is in the file: ``capacity`` bytes from ``offset`` (page aligned), holding
    ``numel`` elements of ``dtype``."""

    offset: int
    capacity: int
    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class InitSwap:
    """One rank's file of ``Init`` pieces (see the module docstring)."""

    def __init__(self, settings: NvmeParamSettings, rank: int) -> None:
        self.root, self.rank = settings.path, rank
        self.file: Optional[DirectFile] = None
        self._open()                   # a missing or unwritable nvme_path fails at Init, not mid-model
        self.pool = IOPool(settings.threads, settings.block)
        self.block = round_up(settings.block)
        self._staging = aligned_empty(self.block, settings.pin_memory)
        self.end = 0                   # bytes of the file in use (every slot is page aligned)
        self.live = 0                  # pieces not released yet
        self._cached: Optional[tuple[Slot, torch.Tensor]] = None

    def _open(self) -> DirectFile:
        self.directory = _make_swap_dir(self.root, self.rank, KEY, "orch-param-init")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.directory, True)
        _register_cleanup(self)
        try:
            self.file = DirectFile(self.directory / f"params-rank{self.rank:05d}-init.swp", "rw")
        except OSError as exc:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise NvmeOffloadError(f"{KEY}: cannot create the zero.Init parameter swap file in {self.root} "
                                   f"({exc.strerror}); make the directory writable, or point nvme_path "
                                   "elsewhere") from None
        self.end = 0
        return self.file

    # -- pieces ---------------------------------------------------------------------------------
    def append(self, values: torch.Tensor) -> Slot:
        """Write ``values`` (a piece) after the last one; its slot."""
        file = self.file if self.file is not None else self._open()    # more pieces after the last went
        capacity = round_up(max(1, values.numel() * values.element_size()))
        try:
            _reserve_file(file, self.end + capacity, self.root, KEY, "zero.Init parameter swap file")
        except NvmeOffloadError:
            self.close()               # the model cannot be built: leave nothing half-written behind
            raise
        slot = Slot(self.end, capacity, values.numel(), values.dtype)
        self.end += capacity
        self.live += 1
        self._write(slot, values)
        return slot

    def write(self, slot: Slot, values: torch.Tensor) -> Slot:
        """New values for the piece in ``slot`` (after an in-place change or a dtype cast); where
        they went: the same slot when they fit, else a new one at the end."""
        if values.numel() * values.element_size() > slot.capacity:
            self.live -= 1
            return self.append(values)
        slot = Slot(slot.offset, slot.capacity, values.numel(), values.dtype)
        self._write(slot, values)
        return slot

    def _write(self, slot: Slot, values: torch.Tensor) -> None:
        """Cast into the staging block a block at a time and write each with aligned writes."""
        self._cached = None
        raw = values.detach().reshape(-1)
        per_block = self.block // max(1, raw.element_size())
        for lo in range(0, raw.numel(), per_block):
            part = raw[lo:lo + per_block]
            nbytes = part.numel() * part.element_size()
            staged = self._staging[:nbytes].view(raw.dtype)
            staged.copy_(part)
            self.pool.submit_write(self.file, byte_view(self._staging)[:round_up(nbytes)],
                                   slot.offset + lo * raw.element_size()).wait()

    def read(self, slot: Slot) -> torch.Tensor:
        """The piece in ``slot`` (a fresh host tensor; the last one read is kept for the next ask)."""
        if self._cached is not None and self._cached[0] == slot:
            return self._cached[1]
        buffer = aligned_empty(slot.capacity)
        self.pool.submit_read(self.file, byte_view(buffer), slot.offset).wait()
        piece = buffer[:slot.nbytes].view(slot.dtype)
        self._cached = (slot, piece)
        return piece

    def release(self, slot: Slot) -> None:
        """A piece is no longer needed (``initialize`` took it over); the file goes with the last."""
        if self._cached is not None and self._cached[0] == slot:
            self._cached = None
        self.live -= 1
        if self.live <= 0:
            self.close()

    def close(self) -> None:
        """Remove the file and its directory (also run at exit and on SIGTERM)."""
        self._cached = None
        if self.file is not None:
            self.file.close()
            self.file = None
        shutil.rmtree(self.directory, ignore_errors=True)

