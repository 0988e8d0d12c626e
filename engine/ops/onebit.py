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
    value = error.add_(x)                         # the compensated value, built in the error buffer
    chunks = value.view(n_chunks, -1)
    width = chunks.shape[1]
    scales = torch.linalg.vector_norm(chunks, dim=1, dtype=torch.float32).div_(width ** 0.5)
    bits = torch.empty(value.numel() // 8, dtype=torch.uint8, device=value.device)
    for c in range(n_chunks):                     # in blocks: temporaries stay at a few MiB
        for lo in range(0, width, _BLOCK):
            piece = chunks[c, lo:lo + _BLOCK]
            positive = piece >= 0
            start = (c * width + lo) // 8
            bits[start:start + piece.numel() // 8] = pack_signs(positive)
            signs = positive.to(piece.dtype).mul_(2.0).sub_(1.0)
            piece.sub_(signs.mul_(scales[c].to(piece.dtype)))   # error = value - scale * sign
    return bits, scales


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """Eight booleans to a byte, the first in the high bit: the 8 bytes of each group, read as one
    little-endian int64, times _PACK puts bit ``b_i`` at bit ``63 - i`` with no carries (every
    product term lands on its own bit), so the top byte is the packed value."""
    words = positive.view(torch.uint8).view(-1, 8).contiguous().view(torch.int64).view(-1)
    return ((words * _PACK) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def unpack_sum_torch(bits: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, factor: float,
                     accumulate: bool) -> torch.Tensor:
    n_rows, row_bytes = bits.shape
    n_chunks = scales.shape[1]
    chunk_bytes = row_bytes // n_chunks
    table = _sign_table(bits.device)
    step = _BLOCK // 8
    for lo in range(0, row_bytes, step):          # in blocks of the output: bounded temporaries
        hi = min(row_bytes, lo + step)
        chunk = torch.arange(lo, hi, device=bits.device) // chunk_bytes
        total = out[lo * 8:hi * 8].view(-1, 8) if accumulate else None
        acc = None
        for r in range(n_rows):
            signs = torch.nn.functional.embedding(bits[r, lo:hi].long(), table)
            signs.mul_((scales[r][chunk] * factor)[:, None])
            acc = signs if acc is None else acc.add_(signs)
        assert acc is not None
        if total is not None:
            acc.add_(total)
        out[lo * 8:hi * 8].copy_(acc.view(-1))
    return out


_BLOCK = 1 << 22
_PACK = sum(1 << (63 - 9 * i) for i in range(8)) - (1 << 64)   # as a signed int64
_TABLES: dict[str, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """[256, 8]: the +1/-1 signs each byte encodes, high bit first."""
    key = str(device)
    if key not in _TABLES:
        codes = torch.arange(256)
        on = (codes[:, None] >> torch.arange(7, -1, -1)) & 1
        _TABLES[key] = (on.to(torch.float32) * 2 - 1).to(device)
    return _TABLES[key]
