"""A ZeRO step reads one value on the host: whether the gradients overflowed.

On a GPU every ``.item()``, ``float(t)`` or ``if t > x`` on a device tensor stalls the host until
the device has caught up, once per step on every one of hundreds of ranks. The step computes the
global norm with one all-reduce of a device tensor and clips with ``clamp(max_norm / norm, max=1)``
as a tensor the optimizer kernels read themselves; the only host read is the overflow bool that
decides whether the step is skipped (and, under fp16, how the loss scale moves). Counted here by
watching every way a tensor becomes a Python value during ``step()``.
"""
from __future__ import annotations

import pytest
import torch

from tests.engine_zero_cases import ds_config, global_batch, make_model

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def _count_host_reads(monkeypatch: pytest.MonkeyPatch, optimizer: torch.optim.Optimizer) -> list[str]:
    """Every tensor -> Python value conversion from now on, except the optimizer's step counters
    (kept on the CPU by design, also on a GPU run: reading them costs no device sync)."""
    seen: list[str] = []

    def is_step_counter(t: torch.Tensor) -> bool:
        return any(t is state.get("step") for state in optimizer.state.values())

    for name in READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, __name=name, __original=original):
            if not is_step_counter(self):
                seen.append(__name)
            return __original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return seen


@pytest.mark.parametrize("stage, precision", [(1, "bf16"), (2, "bf16"), (3, "bf16"), (2, "fp16"), (3, "fp32")])
def test_a_clipped_step_reads_exactly_one_value_on_the_host(stage: int, precision: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import engine

    eng, opt, _, _ = engine.initialize(model=make_model(), config=ds_config(stage, 1, 0.1, precision=precision,
                                                                              reduce_bucket_size=300))
    x, y = global_batch(0)
    eng.backward(eng(x, y))
    with monkeypatch.context() as patch:
        reads = _count_host_reads(patch, opt.optimizer)
        eng.step()
    assert reads == ["__bool__"], f"host reads in one step: {reads}"
    norm = eng.get_global_grad_norm()
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0 and float(norm) > 0.1   # so clipping happened
    assert eng.global_steps == 1 and eng.skipped_steps == 0


def test_clipping_with_the_device_coefficient_equals_torchs_clip_grad_norm() -> None:
    """fp32, one process: the engine's clipped step lands where clip_grad_norm_ + AdamW land."""
    import engine

    from tests.engine_zero_cases import BETAS, EPS, LR, WEIGHT_DECAY

    reference = make_model()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    model = make_model()
    eng, _, _, _ = engine.initialize(model=model, config=ds_config(2, 1, 0.1, reduce_bucket_size=300))
    for step in range(3):
        x, y = global_batch(step)
        reference(x, y).backward()
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
        ref_opt.step()
        ref_opt.zero_grad()
        eng.backward(eng(x, y))
        eng.step()
        assert float(eng.get_global_grad_norm()) == pytest.approx(float(expected), rel=1e-5)
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name
