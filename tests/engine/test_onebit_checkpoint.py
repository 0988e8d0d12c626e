"""A 0/1 Adam or 1-bit LAMB run saved mid-way and resumed continues the same loss curve.

What a checkpoint must carry for that: 0/1 Adam's schedule (variance and local-step intervals and
counters, the learning rates summed since the last sync) and its update accumulator; 1-bit
LAMB's per-parameter frozen coefficients, last factors and momentum scaling coefficients (as
one scalar state per parameter), and its fresh variance. On one rank the compressed all-reduce
is the identity, so the compression errors (which, as in DeepSpeed, restart at zero on load)
play no part and the resumed curve must equal the uninterrupted one.
"""
from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.engine.test_engine_onebit_lamb import lamb_config
from tests.engine.test_engine_zoadam import model32, zoadam_config
from tests.engine_zero_cases import train_steps

pytestmark = pytest.mark.slow

STEPS, SAVE_AT = 20, 13      # 0/1 Adam: 13 is inside a local-step interval (sync at 12 and 16)


def resumed_against_straight(config: dict, directory: str) -> tuple[list[float], list[float]]:
    import engine

    straight_engine, _, _, _ = engine.initialize(model=model32(), config=config)
    straight = train_steps(straight_engine, 0, STEPS)
    first, _, _, _ = engine.initialize(model=model32(), config=config)
    resumed = train_steps(first, 0, SAVE_AT)
    first.save_checkpoint(directory)
    second, _, _, _ = engine.initialize(model=model32(seed=5), config=config)
    second.load_checkpoint(directory)
    resumed += train_steps(second, SAVE_AT, STEPS)
    return straight, resumed


@pytest.mark.parametrize("name", ["ZeroOneAdam", "OneBitLamb"])
def test_a_resumed_run_continues_the_same_curve(name, tmp_path):
    config = zoadam_config() if name == "ZeroOneAdam" else lamb_config()
    straight, resumed = run_distributed(resumed_against_straight, 1, config, str(tmp_path))[0]
    assert resumed[:SAVE_AT] == straight[:SAVE_AT]
    for got, want in zip(resumed[SAVE_AT:], straight[SAVE_AT:]):
        assert got == pytest.approx(want, rel=1e-6), (resumed, straight)
