"""1-bit compression and decompression: the Triton kernels (interpreted on CPU) and the torch
path against a float64 reference of DeepSpeed's compressed all-reduce arithmetic
(runtime/comm/nccl.py): x += error; scale = ||x|| / sqrt(n); sign (0 counts as +);
error = x - scale * sign; bits packed as numpy's packbits (first element in the high bit)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.ops.onebit import compress, unpack_sum
from tests.engine.test_ops_optimizers import impls

BOTH = impls("triton", "torch")


def reference(x, error, n_chunks):
    value = (x.double() + error.double()).view(n_chunks, -1)
    scales = value.norm(dim=1) / value.shape[1] ** 0.5
    signs = torch.where(value >= 0, 1.0, -1.0).double()
    new_error = value - scales[:, None] * signs
    bits = np.packbits((value >= 0).numpy().reshape(-1))
    return torch.from_numpy(bits), scales, new_error.view(-1)


@pytest.mark.parametrize("impl", BOTH)
@pytest.mark.parametrize("numel,n_chunks", [(64, 1), (4096, 4), (3 * 65536 + 24, 3), (80, 2)])
def test_compress_matches_reference(impl, numel, n_chunks):
    gen = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=gen)
    x[::7] = 0.0                                   # exact zeros count as positive
    error = torch.randn(numel, generator=gen) * 0.1
    want_bits, want_scales, want_error = reference(x, error, n_chunks)
    bits, scales = compress(x, error, n_chunks, impl=impl)
    assert bits.dtype == torch.uint8 and bits.numel() == numel // 8
    assert torch.equal(bits, want_bits)
    torch.testing.assert_close(scales.double(), want_scales, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(error.double(), want_error, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", BOTH)
def test_unpack_sum_averages_rows_with_their_own_scales(impl):
    gen = torch.Generator().manual_seed(1)
    rows, numel, n_chunks = 3, 2048, 2
    signs = torch.randint(0, 2, (rows, numel), generator=gen).bool()
    bits = torch.from_numpy(np.packbits(signs.numpy(), axis=1))
    scales = torch.rand(rows, n_chunks, generator=gen) + 0.5
    want = (torch.where(signs, 1.0, -1.0).double().view(rows, n_chunks, -1) * scales.double()[:, :, None]).sum(0)
    want = want.view(-1) / rows
    out = torch.full((numel,), 7.0)
    unpack_sum(bits, scales, out, 1.0 / rows, impl=impl)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    unpack_sum(bits, scales, out, 1.0 / rows, accumulate=True, impl=impl)
    torch.testing.assert_close(out.double(), 2 * want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", BOTH)
def test_error_feedback_makes_the_running_sum_exact(impl):
    """What error feedback promises: the sum of what was sent over many rounds tracks the sum
    of the inputs within one round's error, while each single round is off by far more."""
    gen = torch.Generator().manual_seed(2)
    error = torch.zeros(1024)
    sent_total = torch.zeros(1024, dtype=torch.float64)
    true_total = torch.zeros(1024, dtype=torch.float64)
    for _ in range(30):
        x = torch.randn(1024, generator=gen) + 0.3
        bits, scales = compress(x, error, 1, impl=impl)
        decoded = unpack_sum(bits.view(1, -1), scales.view(1, -1), torch.empty(1024), impl=impl)
        sent_total += decoded.double()
        true_total += x.double()
    drift = (sent_total - true_total).abs().max()
    assert torch.allclose(sent_total - true_total, -error.double(), atol=1e-4)
    assert drift < 5.0   # bounded by the last error, not growing with the 30 rounds


def test_bad_chunking_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 8"):
        compress(torch.zeros(20), torch.zeros(20), 2, impl="torch")
