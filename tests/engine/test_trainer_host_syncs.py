"""The bundled trainer lets the host run ahead of the device between log steps.

A step that is not a log step reads nothing back from the device and runs no collective of its
own: the loss stays a device tensor until the log step, which makes one all_reduce and one
copy back. What the ZeRO optimizer itself still reads per step is listed in ENGINE_SYNCS, so a
change that adds a sync anywhere in a step (or removes one of those) fails here by name.
Counted on 2 real gloo ranks with engine.host_syncs' Python-level counter (the conversions
that would wait for a GPU: .item(), float(), bool(), .tolist(), .cpu()).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed

CASES = [(stage, precision) for stage in (1, 2, 3) for precision in ("bf16", "fp16")]

# What a non-logging step of the trainer may still read back, by where it is read: the ZeRO step's
# overflow bool (engine/zero/base.py, ``bool(torch.isfinite(norm))``): whether to skip the step and,
# under fp16, how the dynamic loss scale moves. One per step at every stage and precision (the
# norm and the clip coefficient stay device tensors). Nothing in the loop or the monitor syncs.
ENGINE_SYNCS = {"bf16": ["engine/zero/base.py"], "fp16": ["engine/zero/base.py"]}
# Conversions the Python-level counter sees but that never wait for a GPU: the fused optimizer's
# ``step`` counter is a CPU tensor on GPU runs too (engine/ops/fused_optimizers.py says so).
HOST_RESIDENT = ("engine/ops/fused_optimizers.py:",)


def _config(stage: int, precision: str) -> dict:
    return {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
            "steps_per_print": 5, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage}, precision: {"enabled": True}}


def _sync_sites_of_a_step(work: str) -> dict[str, list[str]]:
    """Every rank: for each case, train step 1 (warm-up) and count the syncs of step 2."""
    import torch.distributed as dist

    from engine.host_syncs import count_host_syncs
    from engine.trainer.args import TrainerArgs
    from engine.trainer.loop import _Window, iteration, setup

    rank = dist.get_rank()
    sites = {}
    for stage, precision in CASES:
        case = Path(work) / f"z{stage}-{precision}"
        case.mkdir(parents=True, exist_ok=True)
        config = case / f"ds_config.{rank}.json"
        config.write_text(json.dumps(_config(stage, precision)))
        run = setup(TrainerArgs(deepspeed_config=str(config), model="tiny", steps=10, run_dir=str(case / "run"),
                                watchdog_timeout=0))
        try:
            window = iteration(run, 1, _Window())
            with count_host_syncs("python") as syncs:
                window = iteration(run, 2, window)       # steps_per_print 5: not a log step
            sites[f"{stage}-{precision}"] = syncs.sites
        finally:
            run.monitor.close()
    return sites


@pytest.fixture(scope="module")
def sync_sites(tmp_path_factory) -> list[dict[str, list[str]]]:
    return run_distributed(_sync_sites_of_a_step, 2, str(tmp_path_factory.mktemp("syncs")), timeout=400)


@pytest.mark.parametrize("stage,precision", CASES)
def test_a_step_between_log_steps_reads_back_only_what_the_optimizer_needs(sync_sites, stage, precision):
    for rank, per_case in enumerate(sync_sites):
        sites = [s for s in per_case[f"{stage}-{precision}"] if not any(h in s for h in HOST_RESIDENT)]
        where = sorted(next((f for f in ENGINE_SYNCS[precision] if f in s), s) for s in sites)
        assert where == ENGINE_SYNCS[precision], f"rank {rank}, ZeRO-{stage} {precision}:\n" + "\n".join(sites)


def test_a_log_step_reads_the_window_back_once(tmp_path):
    """The log step adds exactly one read-back (loss, grad norm and the checkpoint request together)."""
    [extra] = run_distributed(_log_step_syncs, 1, str(tmp_path))
    assert len(extra) == 1 and "loop.py" in extra[0] and "summarize" in extra[0], extra


def _log_step_syncs(work: str) -> list[str]:
    from engine.host_syncs import count_host_syncs
    from engine.trainer.args import TrainerArgs
    from engine.trainer.loop import _Window, iteration, setup

    config = Path(work) / "ds_config.json"
    config.write_text(json.dumps(_config(2, "bf16")))
    run = setup(TrainerArgs(deepspeed_config=str(config), model="tiny", steps=10, run_dir=str(Path(work) / "run"),
                            watchdog_timeout=0, log_every=2))
    try:
        window = iteration(run, 1, _Window())
        with count_host_syncs("python") as syncs:
            iteration(run, 2, window)
    finally:
        run.monitor.close()
    return [s for s in syncs.sites if "engine/zero/" not in s and not any(h in s for h in HOST_RESIDENT)]


def test_the_counter_sees_each_kind_of_read_back():
    import torch

    from engine.host_syncs import count_host_syncs

    t = torch.ones(3)
    with count_host_syncs("python") as syncs:
        s = t.sum()
        float(s), bool(s), s.item(), t.tolist(), t.cpu(), t.to("cpu"), t.to(torch.float64)
    assert syncs.count == 6, syncs.report()
    assert all("test_trainer_host_syncs.py" in site for site in syncs.sites), syncs.report()
