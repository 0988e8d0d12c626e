"""DeepSpeed's LR schedules: the learning rate after each optimizer step, by DeepSpeed's formulas."""
from __future__ import annotations

import math

import pytest
import torch

from engine.config import load_config
from engine.schedulers import (LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR,
                               build_scheduler)


def optimizer(lr: float = 0.1, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return torch.optim.AdamW(params, lr=lr)


def lrs(schedule, steps: int) -> list[float]:
    """The lr in effect at construction, then after each of ``steps`` steps (group 0)."""
    out = [schedule.optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        schedule.step()
        out.append(schedule.optimizer.param_groups[0]["lr"])
    return out


def test_warmup_lr_log_and_linear() -> None:
    log = lrs(WarmupLR(optimizer(), warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=10), 12)
    # construction and the first step both give log(1) = 0; then log(i + 1) / log(10)
    assert log[:2] == [0.0, 0.0]
    assert log[5] == pytest.approx(0.1 * math.log(5) / math.log(10))
    assert log[11:] == [pytest.approx(0.1)] * 2
    linear = lrs(WarmupLR(optimizer(0.2), warmup_min_lr=0.02, warmup_num_steps=4, warmup_type="linear"), 6)
    # warmup_max_lr unset: the optimizer's lr (0.2)
    assert linear == pytest.approx([0.02, 0.02, 0.065, 0.11, 0.155, 0.2, 0.2])


def test_warmup_decay_lr_reaches_zero_at_total_steps() -> None:
    out = lrs(WarmupDecayLR(optimizer(), total_num_steps=10, warmup_max_lr=0.1, warmup_num_steps=2,
                            warmup_type="linear"), 12)
    assert out[:4] == pytest.approx([0.0, 0.0, 0.05, 0.1])
    assert out[6] == pytest.approx(0.1 * (10 - 5) / 8)
    assert out[11] == 0.0 and out[12] == 0.0


def test_warmup_cosine_lr_ratio_of_the_optimizer_lr() -> None:
    out = lrs(WarmupCosineLR(optimizer(0.2), total_num_steps=12, warmup_min_ratio=0.1, warmup_num_steps=2,
                             cos_min_ratio=0.01, warmup_type="linear"), 14)
    assert out[:3] == pytest.approx([0.0, 0.02, 0.11])   # construction: 0; warmup 0.1 -> 1 of 0.2
    # first post-warmup step: progress 1/10 of the cosine
    assert out[3] == pytest.approx(0.2 * (0.01 + 0.99 * (1 + math.cos(math.pi * 0.1)) / 2))
    assert out[13:] == pytest.approx([0.2 * 0.01] * 2)


def test_one_cycle_lr_and_momentum_move_in_opposite_directions() -> None:
    opt = optimizer()
    schedule = OneCycle(opt, cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=4,
                        cycle_min_mom=0.8, cycle_max_mom=0.9)
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    out = lrs(schedule, 9)
    assert out == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1])
    schedule.last_batch_iteration = 2  # the peak: iteration + 1 = 4 = cycle_first_step_size
    schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    assert opt.param_groups[0]["betas"] == pytest.approx((0.8, 0.99))  # momentum at its low


def test_one_cycle_decay_after_the_cycle() -> None:
    schedule = OneCycle(optimizer(), cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=2,
                        decay_lr_rate=0.5, decay_step_size=2, cycle_momentum=False)
    out = lrs(schedule, 8)
    assert out[5] == pytest.approx(0.1 / (1 + 0.5 * 1 / 2))   # one step into the decay


def test_lr_range_test_continuous_and_staircase() -> None:
    assert lrs(LRRangeTest(optimizer(), lr_range_test_min_lr=0.01, lr_range_test_step_size=2,
                           lr_range_test_step_rate=1.0), 3) == pytest.approx([0.01, 0.015, 0.02, 0.025])
    assert lrs(LRRangeTest(optimizer(), lr_range_test_min_lr=0.01, lr_range_test_step_size=2,
                           lr_range_test_staircase=True), 3) == pytest.approx([0.01, 0.01, 0.02, 0.02])


def test_per_group_values_and_state_round_trip() -> None:
    opt = optimizer(groups=2)
    schedule = WarmupLR(opt, warmup_min_lr=[0.0, 0.01], warmup_max_lr=[0.1, 0.2], warmup_num_steps=4,
                        warmup_type="linear")
    for _ in range(3):
        schedule.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.105])
    fresh_opt = optimizer(groups=2)
    resumed = WarmupLR(fresh_opt, warmup_min_lr=[0.0, 0.01], warmup_max_lr=[0.1, 0.2], warmup_num_steps=4,
                       warmup_type="linear")
    resumed.load_state_dict(schedule.state_dict())
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    with pytest.raises(ValueError, match="one per parameter group"):
        WarmupLR(opt, warmup_min_lr=[0.0, 0.1, 0.2])


def test_config_section_builds_the_schedule() -> None:
    cfg = load_config({"train_batch_size": 1, "scheduler": {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 100, "warmup_max_lr": 0.001, "warmup_num_steps": 10}}})
    schedule = build_scheduler(cfg.scheduler, optimizer())
    assert isinstance(schedule, WarmupDecayLR) and schedule.total_num_steps == 100
    assert schedule.warmup_type == "log" and schedule.get_last_lr() == [0.0]
