"""1-bit compression with error feedback: the public functions, and their torch implementation.

``compress(x, error, n_chunks)`` returns the packed signs of ``x + error`` (one bit per element,
``>= 0`` is 1, eight to a byte, first element in the high bit) and one scale per chunk
(``||chunk|| / sqrt(chunk_numel)``), and leaves in ``error`` what the compression lost.
``unpack_sum(bits, scales, out, factor)`` decompresses rows of packed signs (each row with its
own per-chunk scales) and writes ``factor`` times their sum.

``impl``: "triton" runs ``onebit_kernel.py`` (interpreted on a machine without CUDA), "torch"
the plain-torch version below (the reference the kernels are tested against, and the CPU
path), "auto" picks as the optimizers do (Triton on CUDA, torch on CPU).
"""
from __future__ import annotations

import torch

from .dispatch import resolve

_SHIFTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def check_shape(numel: int, n_chunks: int) -> None:
    if n_chunks <= 0 or numel % n_chunks or (numel // n_chunks) % 8:
        raise ValueError(f"1-bit compression needs equal chunks of a multiple of 8 elements: "
                         f"{numel} elements in {n_chunks} chunks")


def compress(x: torch.Tensor, error: torch.Tensor, n_chunks: int = 1, *,
             impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    check_shape(x.numel(), n_chunks)
    if error.numel() != x.numel():
        raise ValueError(f"the error buffer has {error.numel()} elements for {x.numel()} to compress")
    if resolve(impl, x.device, owner="engine.ops.onebit") == "triton":
        from . import onebit_kernel

        return onebit_kernel.compress(x.reshape(-1), error.reshape(-1), n_chunks)
    return compress_torch(x.reshape(-1), error.reshape(-1), n_chunks)


def unpack_sum(bits: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, factor: float = 1.0, *,
               accumulate: bool = False, impl: str = "auto") -> torch.Tensor:
    bits = bits.reshape(bits.shape[0] if bits.dim() > 1 else 1, -1)
    scales = scales.reshape(bits.shape[0], -1).to(torch.float32)
    if out.numel() != bits.shape[1] * 8:
        raise ValueError(f"unpack_sum: {bits.shape[1]} bytes per row decompress to {bits.shape[1] * 8} "
                         f"elements, out has {out.numel()}")
    if resolve(impl, out.device, owner="engine.ops.onebit") == "triton":
        from . import onebit_kernel

        return onebit_kernel.unpack_sum(bits.contiguous(), scales, out.reshape(-1), factor, accumulate)
    return unpack_sum_torch(bits, scales, out.reshape(-1), factor, accumulate)


def compress_torch(x: torch.Tensor, error: torch.Tensor, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    value = x.float() + error.float()
    chunks = value.view(n_chunks, -1)
    scales = chunks.square().sum(dim=1).div_(chunks.shape[1]).sqrt_()
    positive = value >= 0
    signs = torch.where(positive, 1.0, -1.0).view(n_chunks, -1)
    error.copy_((chunks - scales[:, None] * signs).view(-1))
    weights = _SHIFTS.to(x.device)
    bits = (positive.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)
    return bits, scales


def unpack_sum_torch(bits: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, factor: float,
                     accumulate: bool) -> torch.Tensor:
    n_rows, row_bytes = bits.shape
    n_chunks = scales.shape[1]
    on = (bits[:, :, None] & _SHIFTS.to(bits.device)) != 0                       # [rows, bytes, 8]
    signs = torch.where(on, 1.0, -1.0).view(n_rows, n_chunks, -1)
    total = (signs * scales[:, :, None]).sum(dim=0).view(-1) * factor
    if accumulate:
        total += out.float()
    out.copy_(total)
    return out
