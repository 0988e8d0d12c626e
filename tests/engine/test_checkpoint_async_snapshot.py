"""Asynchronous saves from the reusable snapshot memory: every save holds the state of its moment.

From the second save on, the shard is copied into memory kept from the previous save, and the
large copies finish in the background while the next forward and backward run; the optimizer
step waits for them. Each checkpoint must still equal the training state when it was asked for.
"""
from __future__ import annotations

from pathlib import Path

from tests.checkpoint_cases import Sampler, build, differences, full_state, train


def test_every_async_save_holds_the_state_it_was_called_with(tmp_path: Path) -> None:
    eng, sampler = build(2, "bf16", async_save=True), Sampler()
    expected = {}
    for _ in range(3):
        train(eng, sampler, 2)
        expected[f"step-{eng.global_steps}"] = full_state(eng)
        eng.save_checkpoint(tmp_path)              # returns before the copies and the writes are done
    train(eng, sampler, 1)                         # this step waits for the last save's copies
    eng.wait_for_checkpoint()
    arena = eng.__dict__["_checkpoint_arena"]
    assert arena.nbytes > 0                        # the later saves used the kept memory
    for tag, state in expected.items():
        other = build(2, "bf16", seed=9)
        other.load_checkpoint(tmp_path, tag=tag)
        assert differences(state, full_state(other)) == [], tag


def test_consecutive_saves_reuse_one_host_arena_and_write_the_same_bytes(tmp_path: Path) -> None:
    """The arena is allocated at the first save and every later save copies into the same memory;
    what reaches the disk is byte for byte what a save straight from the tensors writes."""
    eng, sampler = build(2, "bf16", async_save=True), Sampler()
    train(eng, sampler, 2)
    eng.save_checkpoint(tmp_path, tag="async-1")
    eng.wait_for_checkpoint()
    arena = eng.__dict__["_checkpoint_arena"]
    first = (arena._buffer.data_ptr(), arena.nbytes)
    assert first[1] > 0                                      # allocated by the first save, not the second
    eng.save_checkpoint(tmp_path, tag="direct", async_save=False)   # CPU tensors: written in place
    eng.save_checkpoint(tmp_path, tag="async-2")
    eng.wait_for_checkpoint()
    assert (arena._buffer.data_ptr(), arena.nbytes) == first
    shards = sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    assert shards, "no shard files written"
    for name in shards:
        direct = (tmp_path / "direct" / name).read_bytes()
        assert (tmp_path / "async-1" / name).read_bytes() == direct, name
        assert (tmp_path / "async-2" / name).read_bytes() == direct, name
