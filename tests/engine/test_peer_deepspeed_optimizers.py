"""The peer tier for Lamb and 1-bit Adam: why DeepSpeed 0.19.8 cannot be the peer on this machine.

The issue asks for each new optimizer against DeepSpeed 0.19.8 on the same config. On CPU that
comparison cannot run, and these tests pin down why, so that the day it can (a CPU FusedLamb,
1-bit Adam restored) they fail and say to add the comparison:

- ``Lamb``: DeepSpeed's FusedLamb is a CUDA op; on its CPU accelerator the op builder refuses
  to load. The float64 reference of its kernel's rule stands in (test_ops_lamb.py,
  test_engine_lamb.py).
- ``OneBitAdam``: removed from DeepSpeed (0.19 dropped the compressed-communication optimizers);
  0.19.8 rejects the type. The float64 reference of DeepSpeed <= 0.18's algorithm stands in
  (test_engine_onebit.py).
"""
from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.engine.test_peer_deepspeed import _missing

pytestmark = [pytest.mark.peer, pytest.mark.slow, pytest.mark.skipif(bool(_missing()), reason=_missing())]


def fused_lamb_on_cpu() -> str:
    from deepspeed.ops.op_builder import FusedLambBuilder

    try:
        FusedLambBuilder().load()
    except Exception as exc:     # what DeepSpeed raises for an op its accelerator lacks
        return f"{type(exc).__name__}: {exc}"
    return "loaded"


def onebit_adam_in_deepspeed() -> str:
    import deepspeed
    import torch

    model = torch.nn.Linear(4, 4)
    cfg = {"train_batch_size": 1, "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3, "freeze_step": 2}}}
    try:
        deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "initialized"


def test_deepspeeds_fused_lamb_does_not_run_on_cpu():
    answer = run_distributed(fused_lamb_on_cpu, 1, env={"DS_ACCELERATOR": "cpu"})[0]
    assert answer != "loaded", "DeepSpeed's FusedLamb loads on CPU now: compare Lamb against it in the peer tier"
    assert "not been implemented on CPU" in answer


def test_deepspeed_0_19_8_no_longer_has_one_bit_adam():
    import deepspeed

    answer = run_distributed(onebit_adam_in_deepspeed, 1, env={"DS_ACCELERATOR": "cpu"})[0]
    assert answer != "initialized", (f"DeepSpeed {deepspeed.__version__} runs OneBitAdam again: compare orch's "
                                     "1-bit Adam against it in the peer tier")
    assert "not a supported DeepSpeed Optimizer" in answer, answer
