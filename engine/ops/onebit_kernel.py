"""1-bit compression with error feedback, and decompression, in Triton.

A buffer of ``n_chunks`` equal chunks (each a multiple of 8 elements) is compressed to one sign
bit per element (``x >= 0`` is 1, packed 8 to a byte, first element in the high bit as numpy's
``packbits``) and one fp32 scale per chunk, ``||x_chunk|| / sqrt(chunk_numel)``, where ``x`` is
the value plus the error left over from the last compression; the new error, ``x - scale *
(+1 | -1)``, is written back (error feedback: what one round loses, the next one sends). That
is DeepSpeed's compressed all-reduce (runtime/comm/nccl.py) and the papers' (arXiv:2102.02888).

Two launches per compression: ``chunk_sumsq_kernel`` writes per program the sum of ``x*x`` over
its block (programs never straddle chunks; torch folds them per chunk, in a fixed order), then
``sign_pack_kernel`` reads the scales on the device and packs. ``unpack_sum_kernel``
decompresses rows of packed signs, each row with its own scales, and sums them times a factor
(the server's average over workers, or a plain decompression with one row).
"""
from __future__ import annotations

import torch
import triton.language as tl
from triton.language.standard import _sum_combine

from .triton_common import block_sum, kernel, load_f32, tl_dtype

PACK_BYTES = 1024    # bytes (8 Ki elements) per program on a GPU
INTERPRETED_PACK_BYTES = 8192


@kernel
def chunk_sumsq_kernel(x_ptr, e_ptr, out_ptr, chunk_numel, blocks_per_chunk, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    c = pid // blocks_per_chunk
    local = (pid % blocks_per_chunk) * BLOCK + tl.arange(0, BLOCK)
    mask = local < chunk_numel
    offs = c.to(tl.int64) * chunk_numel + local
    x = load_f32(x_ptr, offs, mask) + load_f32(e_ptr, offs, mask)
    tl.store(out_ptr + pid, block_sum(x * x))


@kernel
def sign_pack_kernel(x_ptr, e_ptr, scale_ptr, bits_ptr, chunk_numel, blocks_per_chunk, BYTES: tl.constexpr):
    pid = tl.program_id(0)
    c = pid // blocks_per_chunk
    j = pid % blocks_per_chunk
    byte_idx = j * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    local = byte_idx[:, None] * 8 + bit[None, :]
    mask = local < chunk_numel
    offs = c.to(tl.int64) * chunk_numel + local
    x = load_f32(x_ptr, offs, mask) + load_f32(e_ptr, offs, mask)
    scale = tl.load(scale_ptr + c)
    positive = x >= 0.0
    tl.store(e_ptr + offs, (x - tl.where(positive, scale, -scale)).to(e_ptr.dtype.element_ty), mask=mask)
    weights = tl.where(positive & mask, 1 << (7 - bit[None, :]), 0)
    packed = tl.reduce(weights, 1, _sum_combine).to(tl.uint8)
    chunk_bytes = chunk_numel // 8
    tl.store(bits_ptr + c.to(tl.int64) * chunk_bytes + byte_idx, packed, mask=byte_idx < chunk_bytes)


@kernel
def unpack_sum_kernel(bits_ptr, scale_ptr, out_ptr, n_rows, row_bytes, chunk_numel, n_chunks, factor,
                      BYTES: tl.constexpr, ACCUM: tl.constexpr):
    pid = tl.program_id(0)
    byte_idx = pid * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    local = byte_idx[:, None] * 8 + bit[None, :]
    mask = local < row_bytes * 8
    acc = tl.full((BYTES, 8), 0.0, tl.float32)   # tl.zeros is a jit function: not callable in the interpreter
    chunk = local // chunk_numel
    for r in range(n_rows):
        packed = tl.load(bits_ptr + r * row_bytes + byte_idx, mask=byte_idx < row_bytes, other=0)
        on = ((packed.to(tl.int32)[:, None] >> (7 - bit[None, :])) & 1) != 0
        scale = tl.load(scale_ptr + r * n_chunks + chunk, mask=mask, other=0.0)
        acc += tl.where(on, scale, -scale)
    acc = acc * factor
    if ACCUM:
        acc += load_f32(out_ptr, local, mask)
    tl.store(out_ptr + local, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _bytes_per_program() -> int:
    from .triton_common import is_interpreted

    return INTERPRETED_PACK_BYTES if is_interpreted(sign_pack_kernel) else PACK_BYTES


def compress(x: torch.Tensor, error: torch.Tensor, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed signs ``uint8[numel/8]``, scales ``fp32[n_chunks]``) of ``x + error``; ``error`` updated."""
    numel = x.numel()
    chunk = numel // n_chunks
    tl_dtype(x.dtype), tl_dtype(error.dtype)   # a clear error for an unsupported dtype
    nbytes = _bytes_per_program()
    block = nbytes * 8
    per_chunk = -(-chunk // block)
    partials = torch.empty(n_chunks * per_chunk, dtype=torch.float32, device=x.device)
    chunk_sumsq_kernel[(n_chunks * per_chunk,)](x, error, partials, chunk, per_chunk, BLOCK=block)
    scales = (partials.view(n_chunks, per_chunk).sum(dim=1) / chunk).sqrt_()
    bits = torch.empty(numel // 8, dtype=torch.uint8, device=x.device)
    sign_pack_kernel[(n_chunks * per_chunk,)](x, error, scales, bits, chunk, per_chunk, BYTES=nbytes)
    return bits, scales


def unpack_sum(bits: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, factor: float = 1.0,
               accumulate: bool = False) -> torch.Tensor:
    """``out = factor * sum_r decompress(bits[r], scales[r])`` (``+ out`` when ``accumulate``)."""
    n_rows, row_bytes = bits.shape
    n_chunks = scales.shape[-1]
    nbytes = _bytes_per_program()
    unpack_sum_kernel[(-(-row_bytes // nbytes),)](
        bits, scales.contiguous(), out, n_rows, row_bytes, row_bytes * 8 // n_chunks, n_chunks, float(factor),
        BYTES=nbytes, ACCUM=bool(accumulate))
    return out
