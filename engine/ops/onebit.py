"""1-bit compression with error feedback: the public functions, and their torch implementation.

``compress(x, error, n_chunks)`` returns the packed signs of ``x + error`` (one bit per element,
``>= 0`` is 1, eight to a byte, first element in the high bit) and one scale per chunk
(``||chunk|| / sqrt(chunk_numel)``), and leaves in ``error`` what the compression lost.
``unpack_sum(bits, scales, out, factor)`` decompresses rows of packed signs (each row with its
own per-chunk scales) and writes ``factor`` times their sum.

``compress(..., momentum=MomentumInput(grad, beta1, coef))`` compresses ``beta1 * x + coef * grad``
instead of ``x`` without writing it anywhere (1-bit Adam's momentum update folded into the first
pass: the decompressed average overwrites the momentum afterwards), and ``unpack_sum(...,
then=fn)`` calls ``fn(lo, hi)`` as soon as ``out[lo:hi]`` is final, while that block is still in
cache (1-bit Adam's parameter update). Both give the same bits as the separate passes.

``impl``: "triton" runs ``onebit_kernel.py`` (interpreted on a machine without CUDA), "torch"
the plain-torch version below (the reference the kernels are tested against, and the CPU
path), "auto" picks as the optimizers do (Triton on CUDA, torch on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .dispatch import resolve

@dataclass(frozen=True)
class MomentumInput:
    """What to compress instead of ``x``: ``beta1 * x + coef * grad`` (``grad`` shaped like ``x``)."""

    grad: torch.Tensor
    beta1: float
    coef: float


BlockDone = Callable[[int, int], None]


def check_shape(numel: int, n_chunks: int) -> None:
    if n_chunks <= 0 or numel % n_chunks or (numel // n_chunks) % 8:
        raise ValueError(f"1-bit compression needs equal chunks of a multiple of 8 elements: "
                         f"{numel} elements in {n_chunks} chunks")


def compress(x: torch.Tensor, error: torch.Tensor, n_chunks: int = 1, *, impl: str = "auto",
             momentum: Optional[MomentumInput] = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_shape(x.numel(), n_chunks)
    if error.numel() != x.numel():
        raise ValueError(f"the error buffer has {error.numel()} elements for {x.numel()} to compress")
    if momentum is not None and momentum.grad.numel() != x.numel():
        raise ValueError(f"the momentum's gradient has {momentum.grad.numel()} elements for {x.numel()}")
    if resolve(impl, x.device, owner="engine.ops.onebit") == "triton":
        from . import onebit_kernel

        if momentum is not None:                  # one more pass on the device (x is consumed)
            x.mul_(momentum.beta1).add_(momentum.grad.view_as(x), alpha=momentum.coef)
        return onebit_kernel.compress(x.reshape(-1), error.reshape(-1), n_chunks)
    return compress_torch(x.reshape(-1), error.reshape(-1), n_chunks, momentum)


def unpack_sum(bits: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, factor: float = 1.0, *,
               accumulate: bool = False, impl: str = "auto", then: Optional[BlockDone] = None) -> torch.Tensor:
    bits = bits.reshape(bits.shape[0] if bits.dim() > 1 else 1, -1)
    scales = scales.reshape(bits.shape[0], -1).to(torch.float32)
    if out.numel() != bits.shape[1] * 8:
        raise ValueError(f"unpack_sum: {bits.shape[1]} bytes per row decompress to {bits.shape[1] * 8} "
                         f"elements, out has {out.numel()}")
    if resolve(impl, out.device, owner="engine.ops.onebit") == "triton":
        from . import onebit_kernel

        onebit_kernel.unpack_sum(bits.contiguous(), scales, out.reshape(-1), factor, accumulate)
        if then is not None:
            then(0, out.numel())
        return out
    return unpack_sum_torch(bits, scales, out.reshape(-1), factor, accumulate, then)


def compress_torch(x: torch.Tensor, error: torch.Tensor, n_chunks: int,
                   momentum: Optional[MomentumInput] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path, two passes over memory, each block worked on while it is in cache: first
    ``error += x`` and the chunks' sums of squares, then the signs, their packing and the error
    update (``error -= copysign(scale, value + 0.0)``: adding 0.0 makes -0.0 read as +0.0, the
    way ``>= 0`` does), all through reused workspace buffers (a fresh multi-MiB tensor each
    step costs page faults)."""
    chunks = error.view(n_chunks, -1)
    width = chunks.shape[1]
    values = x.reshape(n_chunks, -1)
    blocks = _blocks(n_chunks, width)
    sums = torch.zeros(n_chunks, dtype=torch.float32, device=error.device)
    work = _workspace(error.device)
    grads = None if momentum is None else momentum.grad.reshape(n_chunks, -1)
    for c, lo, hi in blocks:
        value = values[c, lo:hi]
        if grads is not None:                     # the momentum update, in the same block
            value = torch.mul(value, momentum.beta1, out=work.values[:hi - lo])
            value.add_(grads[c, lo:hi], alpha=momentum.coef)
        piece = chunks[c, lo:hi].add_(value)
        sums[c] += torch.dot(piece.float(), piece.float())
    scales = sums.sqrt_().div_(width ** 0.5)
    bits = torch.empty(error.numel() // 8, dtype=torch.uint8, device=error.device)
    for c, lo, hi in blocks:
        piece, n = chunks[c, lo:hi], hi - lo
        start = (c * width + lo) // 8
        positive = torch.ge(piece, 0, out=work.positive[:n])
        pack_signs(positive, out=bits[start:start + n // 8], words=work.words[:n // 8])
        signed = torch.add(piece, 0.0, out=work.values[:n]) if piece.dtype == torch.float32 else piece.float() + 0.0
        torch.copysign(scales[c].expand(n), signed, out=signed)
        piece.sub_(signed)                        # error = value - scale * sign
    return bits, scales


def pack_signs(positive: torch.Tensor, out: Optional[torch.Tensor] = None,
               words: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eight booleans to a byte, the first in the high bit: the 8 bytes of each group, read as one
    little-endian int64, times _PACK puts bit ``b_i`` at bit ``63 - i`` with no carries (every
    product term lands on its own bit), so the top byte (byte 7) is the packed value."""
    packed = positive.view(torch.uint8).view(torch.int64)
    product = torch.mul(packed, _PACK, out=words) if words is not None else packed * _PACK
    top = product.view(torch.uint8).view(-1, 8)[:, 7]
    return out.copy_(top) if out is not None else top.clone()


def unpack_sum_torch(bits: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, factor: float,
                     accumulate: bool, then: Optional[BlockDone] = None) -> torch.Tensor:
    """Decompression as a table look-up: for row ``r`` and chunk ``c`` the 256 possible bytes map
    to 8 values ``±factor·scale[r, c]`` (a [n_chunks·256, 8] table), so a block of packed bytes,
    offset by ``256·chunk`` as int32, is one ``index_select`` straight into the output (row 0)
    or into a cached block added to it (the other rows). Blocks of ``_BLOCK`` elements from the
    start of ``out`` (split where chunks meet), each handed to ``then`` once all rows are in."""
    n_rows, row_bytes = bits.shape
    n_chunks = scales.shape[1]
    chunk_bytes = row_bytes // n_chunks
    tables = (_sign_table(bits.device)[None, None] * (scales.to(torch.float32) * factor)[:, :, None, None])
    tables = tables.view(n_rows, n_chunks * 256, 8)
    work = _workspace(bits.device)
    rows_out = out.view(-1, 8)
    for lo in range(0, row_bytes, _BLOCK // 8):
        hi = min(row_bytes, lo + _BLOCK // 8)
        for c in range(lo // chunk_bytes, (hi - 1) // chunk_bytes + 1):
            start, stop = max(lo, c * chunk_bytes), min(hi, (c + 1) * chunk_bytes)
            n, dest = stop - start, rows_out[start:stop]
            for r in range(n_rows):
                index = work.index[:n].copy_(bits[r, start:stop]).add_(256 * c)
                if r == 0 and not accumulate:
                    torch.index_select(tables[r], 0, index, out=dest)
                else:
                    dest.add_(torch.index_select(tables[r], 0, index, out=work.values[:8 * n].view(n, 8)))
        if then is not None:
            then(8 * lo, 8 * hi)
    return out


_BLOCK = 1 << 18                                  # elements per block: 1 MiB of fp32, cache-sized
_PACK = sum(1 << (63 - 9 * i) for i in range(8)) - (1 << 64)   # as a signed int64
_TABLES: dict[str, torch.Tensor] = {}


def _blocks(n_chunks: int, width: int, block: int = _BLOCK) -> list[tuple[int, int, int]]:
    """(chunk, lo, hi) pieces of at most ``block`` elements (multiples of 8) inside each chunk."""
    return [(c, lo, min(width, lo + block)) for c in range(n_chunks) for lo in range(0, width, block)]


class _Workspace:
    """Block-sized buffers reused by every compression and decompression on one device."""

    def __init__(self, device: torch.device) -> None:
        self.positive = torch.empty(_BLOCK, dtype=torch.bool, device=device)
        self.words = torch.empty(_BLOCK // 8, dtype=torch.int64, device=device)
        self.values = torch.empty(_BLOCK, dtype=torch.float32, device=device)
        self.index = torch.empty(_BLOCK // 8, dtype=torch.int32, device=device)


_WORKSPACES: dict[str, _Workspace] = {}


def _workspace(device: torch.device) -> _Workspace:
    key = str(device)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = _Workspace(device)
    return _WORKSPACES[key]


def _sign_table(device: torch.device) -> torch.Tensor:
    """[256, 8]: the +1/-1 signs each byte encodes, high bit first."""
    key = str(device)
    if key not in _TABLES:
        codes = torch.arange(256)
        on = (codes[:, None] >> torch.arange(7, -1, -1)) & 1
        _TABLES[key] = (on.to(torch.float32) * 2 - 1).to(device)
    return _TABLES[key]
