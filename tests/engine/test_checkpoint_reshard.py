"""Resharding and consolidation: a checkpoint saved by N ranks at ZeRO stage S loads onto M ranks
at stage S' exactly, and consolidates into one file the plain model loads strictly.

One launch of 4 processes plays every job in turn (tests/checkpoint_cases.py ``Phases``): it
trains and saves with N = 1, 2 and 4 ranks at stages 0, 1, 2 (and 3 where the engine has it),
then loads each checkpoint with M = 1, 2, 3 and 4 ranks at every stage (108 loads for stages
0-2, 192 with stage 3) and compares the
gathered master weights, optimizer states, step counts, LR schedule, loss scale and model
parameters with what was saved: they must be equal, bit for bit. The saved states come back to
the test, which then consolidates every checkpoint the way a user would (``orch ckpt
consolidate``) and loads the result into a fresh ``CkptNet`` with ``strict=True``.
"""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

SAVES = {0: "fp32", 1: "bf16", 2: "fp32", 3: "bf16"}   # stage -> precision of the run that saves
if importlib.util.find_spec("engine.zero.stage3") is None:  # stage 3 reuses the format once it exists
    del SAVES[3]


def matrix(root: str) -> list[str]:
    from tests.checkpoint_cases import Phases, Sampler, build, differences, full_state, train

    phases = Phases(4)
    truth, problems = {}, []
    for n in (1, 2, 4):
        with phases.world(n) as active:
            if active:
                for stage, precision in SAVES.items():
                    eng = build(stage, precision, seed=n + stage, gas=2 if stage >= 2 else 1, clip=0.5)
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
                for new_stage in SAVES:
                    eng = build(new_stage, SAVES[stage], seed=99)
                    path, client = eng.load_checkpoint(f"{root}/n{n}-s{stage}")
                    loaded = full_state(eng)
                    if phases.rank == 0:   # rank 0 took part in every save, so it holds the truth
                        case = f"saved N={n} stage {stage} -> loaded M={m} stage {new_stage}"
                        problems += [f"{case}: {d}" for d in differences(truth[(n, stage)], loaded)]
                        if client != {"sampler": {"position": 3}} or Path(path).parent.name != f"n{n}-s{stage}":
                            problems.append(f"{case}: returned {path}, {client}")
    return {"problems": problems, "truth": {k: {"master": v["vectors"]["master"], "params": v["params"]}
                                            for k, v in truth.items()}}


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("matrix")
    result = run_distributed(matrix, 4, str(root), init=False, timeout=400)[0]
    return result | {"root": root}


@pytest.mark.slow
def test_every_saved_world_size_and_stage_loads_exactly_on_every_other(matrix_run: dict) -> None:
    assert matrix_run["problems"] == [], "\n".join(matrix_run["problems"][:20])
    assert len(list(matrix_run["root"].iterdir())) == 3 * len(SAVES)


@pytest.mark.slow
def test_consolidated_checkpoints_load_strictly_into_the_plain_model(matrix_run: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from tests.checkpoint_cases import make_net

    for (n, stage), saved in matrix_run["truth"].items():
        for suffix in (".pt", ".safetensors"):
            out = tmp_path / f"n{n}-s{stage}{suffix}"
            result = CliRunner().invoke(app, ["ckpt", "consolidate", str(matrix_run["root"] / f"n{n}-s{stage}"),
                                              str(out)])
            assert result.exit_code == 0, result.output
            state = _load_file(out)
            model = make_net(seed=42)
            model.load_state_dict(state, strict=True)
            for name, value in model.state_dict().items():
                expected = saved["master"].get(name)
                if expected is None:              # a buffer or frozen weight: rank 0's, in its dtype
                    expected = saved["master"]["emb.weight"] if name == "head.weight" else saved["params"][name]
                assert torch.equal(value, expected.reshape(value.shape).to(value.dtype)), (n, stage, name)
            assert state["head.weight"].dtype == torch.float32 and torch.equal(state["head.weight"],
                                                                                 state["emb.weight"])


def _load_file(path: Path) -> dict:
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True, mmap=True)
    from engine.checkpoint.tensorfile import read_header

    out = {}
    with open(path, "rb") as f:
        data = f.read()
    for name, t in read_header(path).items():
        dtype = getattr(torch, t["dtype"])
        count = 1
        for d in t["shape"]:
            count *= d
        size = count * torch.empty((), dtype=dtype).element_size()
        out[name] = torch.frombuffer(bytearray(data[t["offset"]:t["offset"] + size]), dtype=dtype).reshape(t["shape"])
    return out


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
