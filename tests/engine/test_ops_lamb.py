"""FusedLamb (``"type": "Lamb"``) against a float64 reference of DeepSpeed FusedLamb's update rule.

DeepSpeed's own FusedLamb is a CUDA op ("This op had not been implemented on CPU backend"), so
the reference here is its rule written out in float64 from csrc/lamb/fused_lamb_cuda_kernel.cu:
moments without bias correction, update = m/(sqrt(v)+eps) + wd*w, coefficient
clamp(||w||/||update||, min_coeff, max_coeff) per tensor (1 when a norm is 0), step size
lr*sqrt(1-b2^t)/(1-b1^t). Both implementations run: the Triton kernels (interpreted on CPU)
and the torch path.
"""
from __future__ import annotations

import pytest
import torch

from engine.ops.fused_lamb import FusedLamb
from engine.ops.segments import SegmentSpec
from tests.engine.test_ops_optimizers import impls

BOTH = impls("triton", "torch")


def reference_lamb(params, grads_per_step, *, lr, betas, eps, weight_decay, max_coeff, min_coeff,
                   bias_correction=True, eps_inside_sqrt=False, grad_scale=1.0, segments=None):
    """float64 DeepSpeed FusedLamb; ``segments``: per tensor a list of (length, key) to share ratios."""
    b1, b2 = betas
    ws = [p.detach().double().clone().reshape(-1) for p in params]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    for t, grads in enumerate(grads_per_step, start=1):
        updates = []
        for i, g in enumerate(grads):
            g = g.double().reshape(-1) / grad_scale
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            denom = (vs[i] + eps).sqrt() if eps_inside_sqrt else vs[i].sqrt() + eps
            updates.append(ms[i] / denom + weight_decay * ws[i])
        pieces = segments or [[(w.numel(), i)] for i, w in enumerate(ws)]
        norms: dict[int, list[float]] = {}
        for w, u, segs in zip(ws, updates, pieces):
            start = 0
            for n, key in segs:
                acc = norms.setdefault(key, [0.0, 0.0])
                acc[0] += float((w[start:start + n] ** 2).sum())
                acc[1] += float((u[start:start + n] ** 2).sum())
                start += n
        step_size = lr * (1 - b2**t) ** 0.5 / (1 - b1**t) if bias_correction else lr
        for i, (u, segs) in enumerate(zip(updates, pieces)):
            start = 0
            for n, key in segs:
                wn, un = (x ** 0.5 for x in norms[key])
                coeff = min(max(wn / un, min_coeff), max_coeff) if wn != 0 and un != 0 else 1.0
                ws[i][start:start + n] -= step_size * coeff * u[start:start + n]
                start += n
    return ws


def random_grads(shapes, steps, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * scale for s in shapes] for _ in range(steps)]


def run_fused(params, grads_per_step, *, impl, specs=None, grad_scale=None, **hyper):
    params = [p.detach().clone().requires_grad_() for p in params]
    opt = FusedLamb(params, impl=impl, **hyper)
    for p, spec in zip(params, specs or [None] * len(params)):
        if spec is not None:
            opt.set_segments(p, spec)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step(grad_scale=grad_scale)
    return params, opt


HYPER = dict(lr=2e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_coeff=10.0, min_coeff=0.01)


@pytest.mark.parametrize("impl", BOTH)
@pytest.mark.parametrize("variant", [
    {}, {"bias_correction": False}, {"eps_inside_sqrt": True}, {"max_coeff": 0.3, "min_coeff": 0.2},
    {"weight_decay": 0.0},
])
def test_lamb_matches_deepspeed_rule_in_float64(impl, variant):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (1000,), (7,), (65537,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    params[2].zero_()   # ||w|| = 0: coefficient 1, as DeepSpeed
    grads = random_grads(shapes, 5, seed=1)
    hyper = {**HYPER, **variant}
    got, opt = run_fused(params, grads, impl=impl, **hyper)
    want = reference_lamb(params, grads, **hyper)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.detach().reshape(-1).double(), w, rtol=2e-5, atol=2e-6)
    coeffs = opt.get_lamb_coeffs()
    assert len(coeffs) == 4 and all(hyper["min_coeff"] * (1 - 1e-6) <= c <= hyper["max_coeff"] * (1 + 1e-6) for c in coeffs)


@pytest.mark.parametrize("impl", BOTH)
def test_flat_partition_gets_one_trust_ratio_per_parameter(impl):
    """What the ZeRO engine hands the optimizer: one flat tensor holding three parameters (and
    padding); segments give each its own ratio, exactly as three separate tensors would."""
    gen = torch.Generator().manual_seed(3)
    sizes = [(12,), (300,), (5,)]
    parts = [torch.randn(s, generator=gen) for s in sizes]
    flat = torch.cat(parts + [torch.zeros(3)])
    grads = [[torch.cat(g + [torch.zeros(3)])] for g in random_grads(sizes, 4, seed=4)]
    spec = SegmentSpec(lengths=(12, 300, 8), keys=(0, 1, 2), n_keys=3)
    got, _ = run_fused([flat], grads, impl=impl, specs=[spec], **HYPER)
    want = reference_lamb([flat], [g for g in grads], segments=[[(12, 0), (300, 1), (8, 2)]], **HYPER)
    torch.testing.assert_close(got[0].detach().double(), want[0], rtol=2e-5, atol=2e-6)
    # and not the one-ratio-for-the-whole-flat-tensor answer
    whole = reference_lamb([flat], grads, **HYPER)
    assert not torch.allclose(got[0].detach().double(), whole[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", BOTH)
def test_split_parameter_sums_its_norms_across_the_reduce(impl):
    """A parameter split over two partitions (two "ranks"): the cross-rank reduce adds the other
    partition's squared norms, as the engine's all-reduce does, and both halves then take the
    whole parameter's ratio: the result equals LAMB on the unsplit parameter."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(40, generator=gen)
    grads = random_grads([(40,)], 3, seed=6)
    ps = [w[:25].clone().requires_grad_(), w[25:].clone().requires_grad_()]
    opts = [FusedLamb([p], impl=impl, **HYPER) for p in ps]
    for step_grads in grads:
        ps[0].grad, ps[1].grad = step_grads[0][:25].clone(), step_grads[0][25:].clone()
        sums = [_local_sums(opt, p) for opt, p in zip(opts, ps)]
        for r in range(2):
            spec = SegmentSpec(lengths=(ps[r].numel(),), keys=(0,), n_keys=1,
                               reduce=lambda totals, other=sums[1 - r]: totals.add_(other))
            opts[r].set_segments(ps[r], spec)
        for opt in opts:
            opt.step()
    want = reference_lamb([w], grads, **HYPER)[0]
    got = torch.cat([p.detach() for p in ps]).double()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


def _local_sums(opt, p):
    """[2, 1] squared norms of (w, update) this partition would contribute before its step."""
    group = opt.param_groups[0]
    b1, b2 = group["betas"]
    state = opt.state.get(p) or {}
    m = state.get("exp_avg", torch.zeros_like(p)).double()
    v = state.get("exp_avg_sq", torch.zeros_like(p)).double()
    g = p.grad.double()
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = m / (v.sqrt() + group["eps"]) + group["weight_decay"] * p.detach().double()
    return torch.tensor([[float((p.detach().double() ** 2).sum())], [float((u ** 2).sum())]], dtype=torch.float32)


@pytest.mark.parametrize("impl", BOTH)
def test_engine_extras_loss_scale_and_bf16_copy(impl):
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(257, generator=gen)]
    grads = random_grads([(257,)], 3, seed=8, scale=1024.0)
    p = params[0].clone().requires_grad_()
    lo = torch.empty(257, dtype=torch.bfloat16)
    opt = FusedLamb([p], impl=impl, **HYPER)
    for step in grads:
        p.grad = step[0].clone()
        opt.step(grad_scale=1024.0, lowp_out=[lo])
    want = reference_lamb(params, grads, grad_scale=1024.0, **HYPER)[0]
    torch.testing.assert_close(p.detach().double(), want, rtol=2e-5, atol=2e-6)
    assert torch.equal(lo, p.detach().to(torch.bfloat16))


def test_bad_coefficients_are_refused():
    with pytest.raises(ValueError, match="min_coeff"):
        FusedLamb([torch.zeros(2, requires_grad=True)], max_coeff=0.1, min_coeff=0.5)
