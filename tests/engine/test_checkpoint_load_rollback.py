"""A load that finds a bad optimizer shard after it published the new weights leaves the engine as it was.

At ZeRO stages 1-2 the load publishes the checkpoint's master weights to every rank's parameters
(the all-gather) while the optimizer-state files are still being read and verified. A user's
session: two ranks train and checkpoint twice, a byte of rank 1's optimizer shard in the newest
checkpoint flips on disk, and a job that has trained a little on its own tries to resume. Both
ranks must refuse with the damaged file's name, and every rank's parameters, master weights,
optimizer states, step counts and LR schedule must be exactly what they were before the call;
asked to, the load falls back to the previous checkpoint. The same on one rank loading the
two-rank checkpoint (the optimizer files are then checked through the page cache, not read whole).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist_utils import run_distributed


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def refused_then_fallback(eng, root: str) -> dict:
    """Try the damaged newest checkpoint, then fall back: what happened, as plain values."""
    from engine.checkpoint.manifest import CheckpointError
    from tests.checkpoint_cases import differences, full_state

    before = full_state(eng)
    try:
        eng.load_checkpoint(root)
        error = None
    except CheckpointError as exc:
        error = str(exc)
    unchanged = differences(before, full_state(eng))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path, client_state = eng.load_checkpoint(root, fallback_to_previous=True)
    return {"error": error, "changed": unchanged, "fallback": Path(path).name, "steps": eng.global_steps,
            "position": client_state["position"], "apart": eng.optimizer.publishes_apart()}


def session(root: str) -> dict:
    import torch.distributed as dist

    from tests.checkpoint_cases import Phases, Sampler, build, train

    phases = Phases(2)
    out = {}
    with phases.world(2):
        eng, sampler = build(2, "bf16"), Sampler()
        for _ in range(2):
            train(eng, sampler, 2)
            eng.save_checkpoint(root, client_state={"position": sampler.position})
        if phases.rank == 1:
            flip_byte(Path(root) / "step-4" / "optim-rank-00001.safetensors")
        dist.barrier()
        other = build(2, "bf16", seed=7)
        train(other, Sampler(), 1)            # its own master, optimizer states and step count
        out["two ranks"] = refused_then_fallback(other, root)
    with phases.world(1) as active:
        if active:
            other = build(1, "bf16", seed=7)
            train(other, Sampler(), 1)
            out["one rank"] = refused_then_fallback(other, root)
    return out


@pytest.mark.slow
def test_a_bad_optimizer_shard_found_after_the_publish_leaves_every_rank_as_it_was(tmp_path: Path) -> None:
    results = run_distributed(session, 2, str(tmp_path), init=False, timeout=300)
    for rank, out in enumerate(results):
        for world, seen in out.items():
            assert seen["apart"], "stage 2 with a bf16 model publishes before the optimizer shards are checked"
            assert seen["error"] is not None and "optim-rank-00001.safetensors fails its xxh3_128 check" in \
                seen["error"] and "fallback_to_previous=True" in seen["error"], (rank, world, seen["error"])
            assert seen["changed"] == [], f"rank {rank}, {world}: changed by a refused load: {seen['changed']}"
            assert (seen["fallback"], seen["steps"], seen["position"]) == ("step-2", 2, 2), (rank, world)
