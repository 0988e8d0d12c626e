"""Crash safety: SIGKILL a process while it saves checkpoints, many times; ``latest`` always loads.

A training process saves after every step (keep=2, so older checkpoints are being deleted too)
and is killed at a random moment, then restarted: it resumes from ``latest`` and goes on. The
kill lands wherever the process happens to be: writing a shard, between two shard files,
writing the manifest, renaming the directory, replacing ``latest``, deleting an old checkpoint,
or in a background (async) save. No sleeps are injected; the phases take time because every
file and directory is fsynced. After every kill, before restarting, the test checks that
``latest`` names a complete checkpoint whose checksums verify and which loads into a fresh
engine, and records which phase the kill interrupted (from what is on disk).

Processes are forked from a forkserver that has imported torch once, so a restart costs
milliseconds, not an interpreter start.
"""
from __future__ import annotations

import multiprocessing as mp
import random
from collections import Counter
from pathlib import Path

import pytest

KILLS = 24
MAX_KILLS = 60   # past KILLS only until three different phases have been interrupted (timing varies)


def interrupted_phase(root: Path) -> str:
    """Which part of a save the kill interrupted, judged from the directory."""
    from engine.checkpoint.manifest import list_checkpoints, read_latest

    names = {p.name for p in root.iterdir()}
    writing = [n for n in names if n.startswith("step-") and n.endswith(".tmp") and "deleting" not in n]
    if writing:
        return "before the rename, manifest written" if (root / writing[0] / "manifest.json").exists() \
            else "writing shards"
    if any(n.startswith(".latest") for n in names):
        return "replacing latest"
    if any("deleting" in n for n in names):
        return "deleting an old checkpoint"
    complete = [e.name for e in list_checkpoints(root, include_partial=False) if e.complete]
    if complete and complete[0] != read_latest(root):
        return "between the directory rename and latest"
    return "between saves"


@pytest.mark.slow
def test_sigkill_at_random_moments_always_leaves_a_loadable_latest(tmp_path: Path) -> None:
    from engine.checkpoint.inspect import verify
    from engine.checkpoint.manifest import read_latest, read_manifest
    from tests.checkpoint_cases import build, saver

    ctx = mp.get_context("forkserver")
    # Everything the saver imports, so a fork starts in milliseconds (engine.ops pulls in triton/sympy).
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "sympy", "triton", "engine.api", "engine.ops",
                                "engine.checkpoint.save", "engine.checkpoint.load", "tests.checkpoint_cases"])
    rng = random.Random(1234)
    probe = build(2, "bf16", seed=5)
    phases: Counter[str] = Counter()
    steps = []
    for kill in range(MAX_KILLS):
        if kill >= KILLS and len(phases) >= 3:
            break
        ready = ctx.Event()
        proc = ctx.Process(target=saver, args=(str(tmp_path), kill % 3 == 2, ready), daemon=True)
        proc.start()
        try:
            assert ready.wait(120), "the saving process did not complete a first save"
            proc.join(timeout=rng.uniform(0.0, 0.12))
            assert proc.is_alive(), f"the saver exited with {proc.exitcode}"
        finally:
            proc.kill()
            proc.join()
        phases[interrupted_phase(tmp_path)] += 1
        tag = read_latest(tmp_path)
        assert tag is not None and (tmp_path / tag).is_dir(), f"kill {kill}: latest names {tag!r}, which is missing"
        (report,) = verify(tmp_path / tag)
        assert report.ok, f"kill {kill}: {report.problems}"
        path, client_state = probe.load_checkpoint(tmp_path)
        step = read_manifest(Path(path))["global_step"]
        assert probe.global_steps == step and client_state["sampler"]["position"] == step
        steps.append(step)
    assert steps == sorted(steps) and steps[-1] > steps[0], steps   # every restart made progress
    assert sum(phases.values()) >= 20
    assert len(phases) >= 3, phases   # the kills interrupted several different phases of a save
    print("kills by interrupted phase:", dict(phases))
