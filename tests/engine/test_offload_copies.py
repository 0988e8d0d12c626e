"""Offload's copies beside compute: the ordering contract, the host thread rule, unchanged training.

engine/zero/copy_stream.py moves offload's gradients, parameters and published weights on a side
CUDA stream. Without CUDA every copy is a plain copy that has landed when it returns; the
contract the engine relies on (a delivered gradient is in the host partition by the time the
host reads it, in micro-step order; a staging buffer is written again only after its copy has
read it) is checked here against a copy stream whose copies land only when waited for, the way
a real side stream's may. The GPU half is tests/engine/test_offload_copies_gpu.py.
"""
from __future__ import annotations

import functools

import pytest
import torch

from engine.zero.copy_stream import CopyStream, CopyTicket, PinnedBuffers
from engine.zero.host_threads import THREADS_ENV, host_optimizer_threads
from engine.zero.offload import HostPublish, OffloadSettings
from engine.zero.offload_grads import HostGradSink
from tests.dist_utils import run_distributed
from tests.engine_zero_cases import ds_config, engine_run

# -- the copy stream on a CPU ----------------------------------------------------------------------


def test_without_cuda_a_copy_has_landed_when_it_returns() -> None:
    copies = CopyStream(torch.device("cpu"))
    src, dst = torch.arange(6.0), torch.zeros(6, dtype=torch.bfloat16)
    ticket = copies.copy(dst, src)
    assert ticket.done and torch.equal(dst, src.to(torch.bfloat16)) and not copies.asynchronous
    ticket.ready_on_device()
    ticket.ready_on_host()
    one, _ = copies.to_device([src])
    assert one is src                                   # nothing to move: the piece itself
    both, _ = copies.to_device([src[:2], src[4:]])
    assert torch.equal(both, torch.tensor([0.0, 1.0, 4.0, 5.0]))


class _LateEvent:
    """A side stream's event that completes only when waited for (the slowest a real one can be)."""

    def __init__(self, log: list[str], name: str) -> None:
        self.landed, self.log, self.name = False, log, name

    def query(self) -> bool:
        return self.landed

    def synchronize(self) -> None:
        if not self.landed:
            self.log.append(f"wait {self.name}")
            self.landed = True


class _LateCopies(CopyStream):
    """Copies whose results appear only once their ticket is waited for (checks the consumers wait)."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.log: list[str] = []
        self.count = 0

    @property
    def asynchronous(self) -> bool:
        return True

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> CopyTicket:
        self.count += 1
        event = _LateEvent(self.log, f"copy{self.count}")
        value = src.clone()
        dst.fill_(float("nan"))                         # not there yet
        original = event.synchronize

        def land() -> None:
            original()
            dst.copy_(value)

        event.synchronize = land
        return _HostTicket(event)


class _HostTicket(CopyTicket):
    def ready_on_device(self) -> None:
        self.event.synchronize()


def test_gradients_reach_the_host_partition_in_micro_step_order_before_it_is_read() -> None:
    copies = _LateCopies()
    sink = HostGradSink(torch.device("cpu"), torch.float32, max_pending=2, copies=copies)
    target = torch.zeros(4)
    pieces = [torch.full((4,), 1.0 + i / 3) for i in range(5)]
    for piece in pieces:
        sink.deliver(target, piece, accumulate=True)
        assert sink.pending <= 2                        # never more than max_pending copies in flight
    assert copies.log == ["wait copy1", "wait copy2", "wait copy3"]   # the oldest first
    sink.flush()
    assert sink.pending == 0 and copies.log[-2:] == ["wait copy4", "wait copy5"]
    expected = torch.zeros(4)
    for piece in pieces:
        expected += piece                               # the same additions in the same order
    assert torch.equal(target, expected)
    assert len(sink.staging.allocated) <= 3             # staging buffers are reused, not grown


def test_an_overwriting_delivery_lands_before_flush_returns() -> None:
    copies = _LateCopies()
    sink = HostGradSink(torch.device("cpu"), torch.float32, copies=copies)
    target = torch.zeros(3)
    sink.deliver(target, torch.tensor([1.0, 2.0, 3.0]), accumulate=False)
    assert torch.isnan(target).all()                    # still in flight
    sink.flush()
    assert torch.equal(target, torch.tensor([1.0, 2.0, 3.0]))


def test_the_publish_casts_on_the_host_and_waits_before_rewriting_its_staging() -> None:
    publish = HostPublish(6, torch.bfloat16, OffloadSettings(optimizer=True), torch.device("cpu"))
    publish.copies = copies = _LateCopies()
    master = torch.linspace(-1, 1, 6, dtype=torch.float32) / 3
    device_side = torch.zeros(6, dtype=torch.bfloat16)
    publish.send(device_side, 0, 6, master)             # the cast happens in the pinned buffer
    assert torch.equal(publish.buffer, master.to(torch.bfloat16))
    assert torch.equal(device_side, master.to(torch.bfloat16))   # ready_on_device waited for it
    views = publish.targets([(0, 3), (3, 6)])           # the host step may write the buffer again
    assert views[0].data_ptr() == publish.buffer.data_ptr() and copies.log == ["wait copy1"]


def test_pinned_buffers_are_reused() -> None:
    pool = PinnedBuffers(torch.float32, pin=False)
    a = pool.take(10)
    pool.give_back(a)
    b = pool.take(8)
    assert b.data_ptr() == a.data_ptr() and len(pool.allocated) == 1 and pool.nbytes() == 40


# -- the host optimizer's threads --------------------------------------------------------------------


@pytest.mark.parametrize("env, cores, ranks, threads", [
    ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "8"}, 64, 8, 8),   # torchrun's default: the rank's share
    ({}, 64, 1, 64),                                                 # nothing set: every core
    ({"LOCAL_WORLD_SIZE": "8"}, 4, 8, 1),                            # never below one
    ({"OMP_NUM_THREADS": "6", "LOCAL_WORLD_SIZE": "8"}, 64, 8, 6),   # the user's own value is kept
    ({"OMP_NUM_THREADS": "1"}, 64, 1, 1),                            # an explicit 1 outside torchrun
    ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "8", THREADS_ENV: "2"}, 64, 8, 2),   # orch's knob wins
])
def test_host_optimizer_threads_follow_the_rule(env: dict, cores: int, ranks: int, threads: int) -> None:
    got, why = host_optimizer_threads(env, cores, ranks)
    assert got == threads, why
    assert why


# -- training is unchanged ---------------------------------------------------------------------------

OFFLOAD = {"offload_optimizer": {"device": "cpu", "pin_memory": True}}
CASES = {f"{precision}-z{stage}{'-offload' if offload else ''}":
         ds_config(stage, 2, 0.1, precision=precision, reduce_bucket_size=300, **(OFFLOAD if offload else {}))
         for precision in ("bf16", "fp32") for stage in (2, 3) for offload in (False, True)}


def _runs() -> dict:
    return {name: engine_run(cfg, steps=6) for name, cfg in CASES.items()}


@functools.lru_cache(maxsize=None)
def _results(world: int) -> dict:
    return _runs() if world == 1 else run_distributed(_runs, world, timeout=300)[0]


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("offload")])
def test_offloading_changes_nothing_but_placement(world: int, case: str) -> None:
    ours, base = _results(world)[case], _results(world)[case.removesuffix("-offload")]
    assert ours["losses"] == base["losses"], f"{case} at {world} rank(s): losses differ from the run without offload"
    for name, value in base["params"].items():
        assert torch.equal(ours["params"][name], value), name
    assert ours["split"]["offloaded"] > 0
