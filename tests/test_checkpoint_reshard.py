"""Resharding: a checkpoint saved by N ranks at ZeRO stage S loads onto M ranks at stage S' exactly.

One launch of 4 processes plays every job in turn (tests/checkpoint_cases.py ``Phases``): it
trains and saves with N = 1, 2 and 4 ranks at stages 0, 1 and 2, then loads each of the 9
checkpoints with M = 1, 2, 3 and 4 ranks at stages 0, 1 and 2 (108 loads) and compares the
gathered master weights, optimizer states, step counts, LR schedule, loss scale and model
parameters with what was saved: they must be equal, bit for bit.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

SAVES = {0: "fp32", 1: "bf16", 2: "fp32"}          # stage -> precision of the run that saves


def matrix(root: str) -> list[str]:
    from tests.checkpoint_cases import Phases, Sampler, build, differences, full_state, train

    phases = Phases(4)
    truth, problems = {}, []
    for n in (1, 2, 4):
        with phases.world(n) as active:
            if active:
                for stage, precision in SAVES.items():
                    eng = build(stage, precision, seed=n + stage, gas=2 if stage == 2 else 1, clip=0.5)
                    sampler = Sampler()
                    train(eng, sampler, 3)
                    eng.save_checkpoint(f"{root}/n{n}-s{stage}", client_state={"sampler": sampler.state_dict()})
                    truth[(n, stage)] = full_state(eng)
    cases = [(n, stage) for n in (1, 2, 4) for stage in SAVES]
    for m in (1, 2, 3, 4):
        with phases.world(m) as active:
            if not active:
                continue
            for n, stage in cases:
                for new_stage in (0, 1, 2):
                    eng = build(new_stage, SAVES[stage], seed=99)
                    path, client = eng.load_checkpoint(f"{root}/n{n}-s{stage}")
                    loaded = full_state(eng)
                    if phases.rank == 0:   # rank 0 took part in every save, so it holds the truth
                        case = f"saved N={n} stage {stage} -> loaded M={m} stage {new_stage}"
                        problems += [f"{case}: {d}" for d in differences(truth[(n, stage)], loaded)]
                        if client != {"sampler": {"position": 3}} or Path(path).parent.name != f"n{n}-s{stage}":
                            problems.append(f"{case}: returned {path}, {client}")
    return problems


@pytest.mark.slow
def test_every_saved_world_size_and_stage_loads_exactly_on_every_other(tmp_path: Path) -> None:
    problems = run_distributed(matrix, 4, str(tmp_path), init=False, timeout=400)[0]
    assert problems == [], "\n".join(problems[:20])
    assert len(list(tmp_path.iterdir())) == 9


# -- the read planner alone, on many random layouts (one process, no I/O) ------------------------

def _random_groups(rng: random.Random) -> list[list[tuple[str, torch.Tensor]]]:
    groups, index = [], 0
    for _ in range(rng.randint(1, 3)):
        group = []
        for _ in range(rng.randint(1, 4)):
            shape = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 2)))
            group.append((f"p{index}", torch.empty(shape)))
            index += 1
        groups.append(group)
    return groups


def test_read_plans_rebuild_every_partition_for_random_layouts() -> None:
    from engine.checkpoint.reshard import plan_reads, source_runs, target_pieces
    from engine.zero.partition import FlatLayout

    rng = random.Random(7)
    for trial in range(200):
        groups = _random_groups(rng)
        old = FlatLayout.build(groups, rng.randint(1, 5), alignment=rng.choice([1, 4, 16]))
        regrouped = [[named for g in groups for named in g]] if trial % 3 == 0 else groups   # regrouping is allowed
        order = list(reversed(regrouped)) if trial % 5 == 0 else regrouped                   # and reordering
        new = FlatLayout.build(order, rng.randint(1, 5), alignment=rng.choice([1, 4, 16]))
        full = torch.arange(1, old.numel + 1, dtype=torch.float32)
        old_parts = [old.shard(full, r) for r in range(old.partition_count)]
        by_name = {e.name: full[e.offset:e.offset + e.numel] for e in old.params}
        saved = [{"name": e.name, "ranges": []} for e in old.params]
        for entry, record in zip(old.params, saved):
            for seg_rank in range(old.partition_count):
                for seg in old.segments(seg_rank):
                    a, b = max(seg.canonical_start, entry.offset), min(seg.canonical_end, entry.offset + entry.numel)
                    if b > a:
                        record["ranges"].append([seg_rank, seg.local_start + a - seg.canonical_start, b - a])
        expected_full = torch.cat([by_name[e.name] for e in new.params])
        for rank in range(new.partition_count):
            params = [(e.name, e.offset, e.numel) for e in new.params]
            segments = [(s.canonical_start, s.canonical_end, s.local_start) for s in new.segments(rank)]
            got = torch.zeros(new.partition_numel)
            for r in plan_reads(target_pieces(params, segments), source_runs(saved)):
                got[r.dst:r.dst + r.length] = old_parts[r.rank][r.src:r.src + r.length]
            assert torch.equal(got, new.shard(expected_full, rank)), (trial, rank)
