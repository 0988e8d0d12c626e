"""The fp16 loss scaler follows DeepSpeed's state machine step for step."""
from __future__ import annotations

import pytest

from engine.config import load_config
from engine.precision import (DynamicLossScaler, LossScaleError, StaticLossScaler, build_loss_scaler,
                              precision_policy)


def scales(scaler: DynamicLossScaler, overflows: list[bool]) -> list[float]:
    out = []
    for overflow in overflows:
        scaler.update(overflow)
        out.append(scaler.loss_scale)
    return out


def test_overflow_spends_hysteresis_then_halves_and_clean_window_doubles() -> None:
    scaler = DynamicLossScaler(init_scale=16, scale_window=3, min_scale=1, hysteresis=2)
    # overflow (hysteresis 2 -> 1, keep 16), overflow (halve), then clean steps: the scale
    # doubles once loss_scale_window clean steps have passed since the overflow (DeepSpeed counts
    # the clean run as iterations since the overflow minus one), and every window after that.
    assert scales(scaler, [True, True, False, False, False, False, False, False, False]) == \
        [16, 8, 8, 8, 8, 16, 16, 16, 32]


def test_growth_from_the_start_without_overflow() -> None:
    scaler = DynamicLossScaler(init_scale=2 ** 16, scale_window=2, hysteresis=2)
    assert scales(scaler, [False] * 5) == [2 ** 16, 2 ** 16, 2 ** 17, 2 ** 17, 2 ** 18]


def test_doubling_refills_hysteresis() -> None:
    scaler = DynamicLossScaler(init_scale=8, scale_window=1, hysteresis=2)
    assert scales(scaler, [True, False, False, True]) == [8, 8, 16, 16]  # last overflow spent refilled hysteresis


def test_consecutive_hysteresis_refills_on_every_clean_step() -> None:
    pattern = [True, False, True, False, True]
    plain = DynamicLossScaler(init_scale=64, scale_window=100, hysteresis=2)
    consecutive = DynamicLossScaler(init_scale=64, scale_window=100, hysteresis=2, consecutive_hysteresis=True)
    assert scales(plain, pattern) == [64, 64, 32, 32, 16]
    assert scales(consecutive, pattern) == [64] * 5


def test_scale_never_drops_below_the_minimum_and_overflow_there_is_an_error() -> None:
    scaler = DynamicLossScaler(init_scale=3, scale_window=10, min_scale=2, hysteresis=1)
    assert scales(scaler, [True]) == [2]
    with pytest.raises(LossScaleError, match="minimum loss scale 2"):
        scaler.update(True)


def test_scaler_state_round_trips() -> None:
    a = DynamicLossScaler(init_scale=16, scale_window=3, hysteresis=2)
    scales(a, [True, False, False])
    b = DynamicLossScaler(init_scale=16, scale_window=3, hysteresis=2)
    b.load_state_dict(a.state_dict())
    follow = [False, False, True, True, False]
    assert scales(a, follow) == scales(b, follow)
    static = StaticLossScaler(128)
    static.update(True)
    assert static.loss_scale == 128 and StaticLossScaler(1).state_dict() == {"loss_scale": 1.0}


def test_config_chooses_the_scaler() -> None:
    dynamic = build_loss_scaler(load_config({"train_batch_size": 1, "fp16": {"enabled": True, "initial_scale_power": 10,
                                                                             "hysteresis": 3, "loss_scale_window": 50}}))
    assert isinstance(dynamic, DynamicLossScaler)
    assert (dynamic.loss_scale, dynamic.hysteresis, dynamic.scale_window, dynamic.min_scale) == (1024, 3, 50, 1)
    static = build_loss_scaler(load_config({"train_batch_size": 1, "fp16": {"enabled": True, "loss_scale": 128}}))
    assert not static.dynamic and static.loss_scale == 128
    bf16 = build_loss_scaler(load_config({"train_batch_size": 1, "bf16": {"enabled": True}}))
    assert bf16.loss_scale == 1.0


def test_precision_policy_keeps_fp32_masters() -> None:
    import torch

    assert precision_policy("bf16").model_dtype == torch.bfloat16 and precision_policy("bf16").mixed
    assert precision_policy("fp16").master_dtype == torch.float32
    assert not precision_policy("fp32").mixed
    with pytest.raises(ValueError, match="fp8"):
        precision_policy("fp8")
