"""CPU offload: where ZeRO puts the optimizer side (stages 1-3) and stage 3's parameter partitions.

DeepSpeed's ``offload_optimizer: {device: cpu}`` keeps the fp32 master partition and the
optimizer states in host memory and runs the optimizer there (ZeRO-Offload,
arXiv:2101.06840): the device keeps only what forward and backward touch. Here:

* reduced gradients are copied to a host gradient partition as each bucket's reduction
  completes (engine/zero/reduction.py), so the transfers overlap the rest of backward;
* the step runs on the host with engine.ops' FusedAdamW, which on CPU tensors is torch's fused
  CPU AdamW (measured as fast as DeepSpeedCPUAdam, ~0.65 ns/parameter on 2 threads);
* the host step writes the updated partition in the model's dtype straight into a pinned
  staging buffer (the fp32 -> bf16 cast happens on the host, in the optimizer's own pass: no
  fp32 copy and no temporary on the device), which ``HostPublish`` copies to the device on the
  side stream (copy_stream.py); stages 1-2 all-gather it there, stage 3 keeps it as the rank's
  partition.

``offload_param: {device: cpu}`` (stage 3 only) keeps the low-precision parameter partition in
host memory as well; each module's pieces are copied to the device when it is gathered.

``pin_memory`` pins the host tensors (page-locked memory makes host<->device copies
asynchronous and faster); it only means something with CUDA, so it is ignored on CPU runs.
``offload_optimizer: {device: nvme}`` (nvme.py) keeps the master and the optimizer states in swap
files instead; the constructors then make no fp32 master at all (``OffloadSettings.nvme``): the
swap writes its first values from the parameters chunk by chunk (``master_sources``), so host
memory never holds the states, not even while the engine is being built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .copy_stream import CopyStream, CopyTicket

__all__ = ["HostPublish", "OffloadSettings", "copy_between", "host_empty", "host_zeros", "synchronize"]


@dataclass(frozen=True)
class OffloadSettings:
    """Which ZeRO states live in host memory instead of on the training device."""

    optimizer: bool = False      # fp32 master, optimizer states, reduced gradient partition
    param: bool = False          # stage 3: the low-precision parameter partition
    pin_memory: bool = True
    nvme: bool = False           # the optimizer side lives in NVMe swap files (nvme.py), not host memory

    @classmethod
    def from_config(cls, zero: Any) -> "OffloadSettings":
        """From a validated ``zero_optimization`` section ("cpu" and "nvme" both run the optimizer
        on the host; "nvme" keeps its states in swap files)."""
        opt, par = zero.offload_optimizer, zero.offload_param
        return cls(optimizer=opt.device != "none", param=par.device != "none",
                   pin_memory=bool(opt.pin_memory if opt.device != "none" else par.pin_memory),
                   nvme=opt.device == "nvme")

    @property
    def any(self) -> bool:
        return self.optimizer or self.param

    def pinned(self) -> bool:
        """Whether host tensors are pinned: asked for, and there is a CUDA device to copy to."""
        return self.pin_memory and torch.cuda.is_available()


def host_empty(numel: int, dtype: torch.dtype, settings: OffloadSettings) -> torch.Tensor:
    """An uninitialised host tensor (pinned when the settings ask and CUDA exists)."""
    return torch.empty(numel, dtype=dtype, device="cpu", pin_memory=settings.pinned())


def host_zeros(numel: int, dtype: torch.dtype, settings: OffloadSettings) -> torch.Tensor:
    out = host_empty(numel, dtype, settings)
    out.zero_()
    return out


def copy_between(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, asynchronous when it crosses between pinned host memory and a GPU.

    The device's stream orders later device work after the copy; host code that reads a
    device-to-host result must call ``synchronize`` first.
    """
    crossing = dst.device != src.device
    pinned = (dst.device.type == "cpu" and dst.is_pinned()) or (src.device.type == "cpu" and src.is_pinned())
    dst.copy_(src, non_blocking=crossing and pinned)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (e.g. copies into host memory) before the host reads."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class HostPublish:
    """Updated host values of one device partition, on their way back (see the module docstring).

    ``targets(ranges)`` are the pinned host views the host optimizer writes (``lowp_out``);
    ``send(dst, lo, hi, master)`` casts ``master`` into the buffer first when the optimizer did not
    write it, copies ``[lo, hi)`` to ``dst`` on the side stream and makes the compute stream wait
    for it (the all-gather or forward that reads ``dst`` comes next). The host writes the buffer
    again only after the previous step's copies have read it (``_wait_reads``)."""

    def __init__(self, numel: int, dtype: torch.dtype, settings: OffloadSettings, device: torch.device) -> None:
        self.buffer = host_empty(numel, dtype, settings)
        self.copies = CopyStream(device)
        self._reads: list[CopyTicket] = []

    def targets(self, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
        self._wait_reads()
        return [self.buffer[lo:hi] for lo, hi in ranges]

    def send(self, dst: torch.Tensor, lo: int, hi: int, master: Optional[torch.Tensor] = None) -> None:
        view = self.buffer[lo:hi]
        if master is not None:
            self._wait_reads()
            view.copy_(master)                     # the cast, on the host
        ticket = self.copies.copy(dst, view)
        ticket.ready_on_device()
        self._reads.append(ticket)

    def _wait_reads(self) -> None:
        for ticket in self._reads:
            ticket.ready_on_host()
        self._reads.clear()

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()
