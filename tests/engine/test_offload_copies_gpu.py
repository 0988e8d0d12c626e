"""Offload's side-stream copies on a real CUDA device (run by .ci/gpu-check; skipped without CUDA).

The CPU tests (test_offload_copies.py) check the ordering contract against copies that land late;
here the real side stream, events, ``record_stream`` and pinned staging must give the same
numbers as plain copies while the compute stream is busy, and a gradient delivery must not hold
the host thread for the length of its copy.
"""
from __future__ import annotations

import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: the side stream, events and pinned copies only exist there (.ci/gpu-check runs it)")]


def _busy(device: torch.device, ms: float = 50.0) -> None:
    """Queue about ``ms`` of work on the current stream."""
    torch.cuda._sleep(int(ms * 1e6 / 1000 * 1.4))   # cycles ≈ ns × GHz (1.4 GHz is conservative)


def test_side_stream_copies_equal_plain_copies_while_compute_is_queued() -> None:
    from engine.zero.copy_stream import CopyStream
    from engine.zero.offload_grads import HostGradSink

    device = torch.device("cuda", torch.cuda.current_device())
    copies = CopyStream(device)
    src = torch.randn(1 << 22, device=device)
    host = torch.empty(src.numel(), pin_memory=True)
    src.mul_(2.0)                                        # written by the compute stream just before
    copies.copy(host, src).ready_on_host()
    assert torch.equal(host, (src.cpu()))
    sent, ticket = copies.to_device([host[:1000], host[5000:6000]])
    ticket.ready_on_device()
    copies.consumed_on_current(sent)
    assert torch.equal(sent.cpu(), torch.cat([host[:1000], host[5000:6000]]))

    sink = HostGradSink(device, torch.float32, max_pending=2)
    target = torch.zeros(1 << 20, pin_memory=True)
    pieces = [torch.full((1 << 20,), 0.5 + i, device=device) for i in range(5)]
    _busy(device)
    started = time.perf_counter()
    sink.deliver(target, pieces[0], accumulate=True)
    assert time.perf_counter() - started < 0.02, "the first delivery waited for queued compute"
    for piece in pieces[1:]:
        sink.deliver(target, piece, accumulate=True)
    sink.flush()
    assert torch.equal(target, sum(p.cpu() for p in pieces))


def test_offload_training_on_cuda_matches_it_without_offload() -> None:
    import engine
    from tests.engine_zero_cases import ds_config, global_batch, make_model

    results = {}
    for offload in (False, True):
        zero = {"reduce_bucket_size": 300}
        if offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        eng, _, _, _ = engine.initialize(model=make_model().cuda(),
                                         config=ds_config(3, 1, 0.1, precision="bf16", **zero))
        losses = []
        for step in range(4):
            x, y = (t.cuda() for t in global_batch(step))
            loss = eng(x, y)
            eng.backward(loss)
            eng.step()
            losses.append(float(loss))
        results[offload] = losses
    assert results[True] == pytest.approx(results[False], rel=2e-3)   # host vs device AdamW rounding
