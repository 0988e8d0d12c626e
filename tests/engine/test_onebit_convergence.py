"""1-bit Adam keeps Adam's loss curve on the bundled GPT (the paper's claim), and error feedback
is what keeps it there.

The 1-bit Adam paper (arXiv:2102.02888, ICML 2021) reports "the same convergence speed as
uncompressed Adam" (BERT-Large pre-training and GPT-2 loss curves on top of Adam's, equal
end-task accuracy), and shows that compressing Adam without a frozen variance and error
compensation diverges. Here: the bundled ``tiny`` GPT on its synthetic successor-walk data,
2 gloo ranks, 80 steps, freeze_step 15; the mean loss of the last 20 steps of 1-bit Adam must be
within 3 % of Adam's (DeepSpeed's uncompressed warm-up rule: no bias correction, so the two
differ only in the compression), while the same run with error feedback switched off (errors
reset every round) ends far worse. Measured (2026-12-06): last-20-step mean loss Adam 0.869,
1-bit Adam 0.880 (+1.2 %), without error feedback 2.603.
"""
from __future__ import annotations

import functools

import pytest

from tests.dist_utils import run_distributed, tiny_gpt_losses

pytestmark = pytest.mark.slow

STEPS, FREEZE, MICRO, LR = 80, 15, 4, 2e-3


def config(freeze_step: int) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
            "optimizer": {"type": "OneBitAdam", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                           "freeze_step": freeze_step}}}


def train(freeze_step: int, error_feedback: bool = True) -> list[float]:
    from engine.onebit import allreduce

    if not error_feedback:
        original = allreduce.CompressedAllReduce.__call__

        def without_feedback(self, x, **fused):  # fused: the momentum update / parameter update riding along
            self.reset_errors()
            return original(self, x, **fused)
        allreduce.CompressedAllReduce.__call__ = without_feedback
    return tiny_gpt_losses(config(freeze_step), STEPS, MICRO)


def runs() -> dict:
    return {"adam": train(freeze_step=10**9), "onebit": train(FREEZE),
            "no_feedback": train(FREEZE, error_feedback=False)}


@functools.lru_cache(maxsize=None)
def results() -> dict:
    return run_distributed(runs, 2, timeout=600)[0]


def tail(losses: list[float]) -> float:
    return sum(losses[-20:]) / 20


def test_onebit_adam_tracks_adam_within_the_papers_gap():
    r = results()
    adam, onebit = tail(r["adam"]), tail(r["onebit"])
    assert r["adam"][0] - adam > 1.0, "the model should learn the synthetic walk"
    assert abs(onebit - adam) / adam < 0.03, f"1-bit Adam {onebit:.4f} vs Adam {adam:.4f}"


def test_error_feedback_is_what_keeps_it_there():
    r = results()
    assert tail(r["no_feedback"]) > 1.5 * tail(r["onebit"]), (tail(r["no_feedback"]), tail(r["onebit"]))
