"""Process-group setup from torchrun's environment, and the partitioned collectives on gloo."""
from __future__ import annotations

import pytest
import torch

from engine.comm import PLANS, CollectivePlan, Comm, DistributedSetupError, init_distributed
from tests.dist_utils import RankError, run_distributed


def test_without_a_launcher_the_engine_runs_as_one_process(monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    init_distributed()
    assert not torch.distributed.is_initialized()
    comm = Comm()
    assert (comm.rank, comm.world_size, comm.active) == (0, 1, False)
    t = torch.ones(3)
    comm.all_reduce(t).wait()
    assert torch.equal(t, torch.ones(3))


def test_a_half_set_environment_says_what_is_missing(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(DistributedSetupError, match="WORLD_SIZE missing.*torchrun"):
        init_distributed()


def _join_and_run_collectives(plans: list[CollectivePlan]) -> dict:
    """As a torchrun worker would: join from the environment, then use the collectives."""
    import torch.distributed as dist

    import engine

    engine.init_distributed()
    engine.init_distributed()  # a second call is a no-op
    result = {"backend": dist.get_backend(), "world": dist.get_world_size(), "rank": dist.get_rank(),
              "plans": [_collectives(plan) for plan in plans]}
    dist.destroy_process_group()
    return result


def _collectives(plan: CollectivePlan) -> dict:
    comm = Comm(plan=plan)
    rank, world = comm.rank, comm.world_size
    size = 5
    # reduce to shards: every rank contributes rank+1 everywhere; each rank's shard holds the sum
    buf = torch.full((world * size,), float(rank + 1))
    comm.reduce_to_shards(buf, async_op=True).wait()
    own_sum = buf[rank * size:(rank + 1) * size].tolist()
    # gather partitions: rank r writes r into its slice; chunked (bucket 2) and whole
    gathered = []
    for bucket in (2, 100):
        flat = torch.full((world * size,), -1.0)
        flat[rank * size:(rank + 1) * size] = rank
        comm.all_gather_partitions(flat, size, bucket)
        gathered.append(flat.tolist())
    return {"own_sum": own_sum, "gathered": gathered}


PLAN_VARIANTS = [PLANS["gloo"], CollectivePlan("all_reduce", "all_gather"), CollectivePlan("reduce_scatter", "all_reduce")]


@pytest.mark.slow
def test_torchrun_environment_joins_the_group_and_every_collective_plan_agrees() -> None:
    world = 3
    results = run_distributed(_join_and_run_collectives, world, PLAN_VARIANTS, init=False)
    expected_sum = [float(sum(range(1, world + 1)))] * 5
    expected_gather = [float(r) for r in range(world) for _ in range(5)]
    for rank, result in enumerate(results):
        assert (result["backend"], result["world"], result["rank"]) == ("gloo", world, rank)
        for plan, got in zip(PLAN_VARIANTS, result["plans"]):
            assert got["own_sum"] == expected_sum, plan
            assert got["gathered"] == [expected_gather, expected_gather], plan


def _fails_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")


@pytest.mark.slow
def test_dist_utils_reports_a_failing_rank_with_its_traceback() -> None:
    with pytest.raises(RankError, match="(?s)rank 1 raised.*boom on purpose"):
        run_distributed(_fails_on_rank_one, 2, timeout=60)


@pytest.mark.slow
def test_collectives_benchmark_runs_and_reports_every_alternative() -> None:
    from bench.collectives import run

    medians = run(numel=4096, repeats=1, rounds=1)
    assert {name for _, name in medians} == {
        "reduce_scatter_single (native)", "all_reduce + slice", "reduce per owner",
        "all_gather_single (in place)", "zero others + all_reduce", "all_gather (list)", "broadcast per owner"}
    assert all(t > 0 for t in medians.values())
