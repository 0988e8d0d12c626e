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
