"""FusedAdamW / FusedLion / FusedSGD as a user (or the ZeRO engine) drives them.

Each implementation (``triton``: the kernels, interpreted on a machine without CUDA;
``torch``: foreach; ``auto``: torch's fused CPU AdamW for CPU tensors) must train exactly like
torch's own optimizers, take the engine's extras (loss-scale, clip factor, low-precision
copy-out, bf16 gradients) and swap checkpoints with torch.optim.AdamW.
"""
from __future__ import annotations

import inspect
import io
import math

import pytest
import torch

import engine
from engine.ops import FusedAdamW, FusedLion, FusedSGD, grad_norm_and_overflow, interpreter_mode, triton_status

CUDA = torch.cuda.is_available()
TRITON_CPU = triton_status().available and interpreter_mode()  # CPU tensors can reach the kernels


def impls(*names):
    out = []
    for name in names:
        marks = []
        if name == "triton":
            marks.append(pytest.mark.skipif(not TRITON_CPU, reason="CPU tensors reach the Triton kernels only through the "
                                            "interpreter, used without CUDA or with TRITON_INTERPRET=1 (GPU: the gpu tests)"))
        out.append(pytest.param(name, marks=marks))
    return out


ALL = impls("triton", "torch", "auto")
SIZES = (1, 7, 1000, 65537)


def make_params(seed: int, sizes=SIZES, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(device).requires_grad_() for n in sizes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(groups_of_params, seed: int, dtype=torch.float32, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    for params in zip(*groups_of_params):
        g = torch.randn(params[0].shape, generator=gen) * scale
        for p in params:
            if dtype != p.dtype:
                p.grad_dtype = None  # torch >= 2.9 checks grad dtype == param dtype unless told
            p.grad = g.to(dtype).to(p.device)


def through_disk(state_dict):
    """A checkpoint's round trip (a live state_dict shares tensors with its optimizer)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def max_rel(a_list, b_list):
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(a_list, b_list))


@pytest.mark.parametrize("impl", ALL)
def test_fused_adamw_trains_like_torch_adamw_over_steps(impl):
    ref = make_params(0)
    ours = clone_params(ref)
    torch_opt = torch.optim.AdamW([{"params": ref[:2], "lr": 3e-3}, {"params": ref[2:], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    fused = FusedAdamW([{"params": ours[:2], "lr": 3e-3}, {"params": ours[2:], "weight_decay": 0.0}],
                       lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, impl=impl)
    for step in range(5):
        set_grads([ref, ours], seed=step)
        torch_opt.step()
        fused.step()
    assert max_rel(ours, ref) <= 1e-6
    for a, b in zip(ours, ref):
        sa, sb = fused.state[a], torch_opt.state[b]
        assert set(sa) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(sa["step"]) == float(sb["step"]) == 5.0
        assert max_rel([sa["exp_avg"], sa["exp_avg_sq"]], [sb["exp_avg"], sb["exp_avg_sq"]]) <= 1e-6


@pytest.mark.parametrize("impl", ALL)
def test_adam_w_mode_false_trains_like_torch_adam_with_l2(impl):
    ref = make_params(1)
    ours = clone_params(ref)
    torch_opt = torch.optim.Adam(ref, lr=1e-2, weight_decay=0.05)
    fused = FusedAdamW(ours, lr=1e-2, weight_decay=0.05, adam_w_mode=False, impl=impl)
    for step in range(4):
        set_grads([ref, ours], seed=10 + step)
        torch_opt.step()
        fused.step()
    assert max_rel(ours, ref) <= 1e-6


@pytest.mark.parametrize("impl", ALL)
def test_bias_correction_off_follows_deepspeed_math(impl):
    """DeepSpeed's bias_correction=False: step size lr, denominator sqrt(v) + eps."""
    p0 = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    p = p0.clone().requires_grad_()
    fused = FusedAdamW([p], lr=1e-2, weight_decay=0.0, bias_correction=False, impl=impl)
    m = torch.zeros(1000, dtype=torch.float64)
    v = torch.zeros(1000, dtype=torch.float64)
    expect = p0.double()
    for step in range(3):
        set_grads([[p]], seed=20 + step)
        g = p.grad.double()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        expect = expect - 1e-2 * m / (v.sqrt() + 1e-8)
        fused.step()
    assert ((p.double() - expect).abs() / expect.abs().clamp_min(1e-2)).max().item() <= 1e-6


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["floats", "tensors"])
def test_grad_scale_and_clip_coef_equal_an_unscaled_clipped_gradient(impl, as_tensor):
    scaled = make_params(3)
    plain = clone_params(scaled)
    opt_scaled = FusedAdamW(scaled, lr=1e-2, impl=impl)
    opt_plain = FusedAdamW(plain, lr=1e-2, impl=impl)
    loss_scale, clip = 2.0**14, 0.3
    for step in range(3):
        set_grads([scaled], seed=30 + step, scale=loss_scale)
        set_grads([plain], seed=30 + step, scale=clip)
        gs = torch.tensor(loss_scale) if as_tensor else loss_scale
        cc = torch.tensor(clip) if as_tensor else clip
        opt_scaled.step(grad_scale=gs, clip_coef=cc)
        opt_plain.step()
    assert max_rel(scaled, plain) <= 1e-6


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("low_dtype", [torch.bfloat16, torch.float16])
def test_bf16_gradients_and_low_precision_copy_out(impl, low_dtype):
    """The engine's case: fp32 masters, bf16 gradients, bf16/fp16 working copies refreshed."""
    masters = make_params(4)
    ref = clone_params(masters)
    fused = FusedAdamW(masters, lr=1e-3, impl=impl)
    torch_opt = torch.optim.AdamW(ref, lr=1e-3)
    for step in range(3):
        set_grads([masters], seed=40 + step, dtype=torch.bfloat16)
        for r, m in zip(ref, masters):
            r.grad = m.grad.float()
        lows = [torch.full_like(p, math.nan, dtype=low_dtype) for p in masters]
        fused.step(lowp_out=lows)
        torch_opt.step()
        for p, lo in zip(masters, lows):
            assert torch.equal(lo, p.detach().to(low_dtype))
    assert max_rel(masters, ref) <= 1e-6


def test_lowp_out_skips_none_entries_and_params_without_grad():
    params = make_params(5, sizes=(10, 20, 30))
    fused = FusedAdamW(params, lr=1e-2, impl="torch")
    set_grads([params], seed=50)
    params[2].grad = None
    lows = [None, torch.zeros(20, dtype=torch.bfloat16), torch.zeros(30, dtype=torch.bfloat16)]
    fused.step(lowp_out=lows)
    assert torch.equal(lows[1], params[1].detach().bfloat16())
    assert torch.count_nonzero(lows[2]) == 0  # no gradient: parameter and its copy untouched
    assert params[2] not in fused.state


@pytest.mark.parametrize("impl", ALL)
def test_state_dict_swaps_with_torch_adamw_both_ways(impl):
    ref = make_params(6)
    ours = clone_params(ref)
    fused = FusedAdamW(ours, lr=1e-2, impl=impl)
    for step in range(2):
        set_grads([ours], seed=60 + step)
        fused.step()
    # our checkpoint -> torch.optim.AdamW (fused, as a torch user would run it)
    with torch.no_grad():
        for r, o in zip(ref, ours):
            r.copy_(o)
    torch_opt = torch.optim.AdamW(ref, lr=1.0, fused=True)
    torch_opt.load_state_dict(through_disk(fused.state_dict()))
    assert torch_opt.param_groups[0]["lr"] == 1e-2
    for step in range(2, 4):
        set_grads([ref, ours], seed=60 + step)
        torch_opt.step()
        fused.step()
    assert max_rel(ours, ref) <= 1e-6
    # torch's checkpoint (step tensors on the params' device) -> a fresh FusedAdamW
    again = clone_params(ref)
    restored = FusedAdamW(again, lr=0.5, impl=impl)
    restored.load_state_dict(through_disk(torch_opt.state_dict()))
    assert restored.param_groups[0]["impl"] == impl
    assert restored.param_groups[0]["adam_w_mode"] is True
    for step in range(4, 6):
        set_grads([ref, again], seed=60 + step)
        torch_opt.step()
        restored.step()
    assert max_rel(again, ref) <= 1e-6
    assert float(restored.state[again[0]]["step"]) == 6.0


def test_state_dict_from_torch_adam_means_l2_mode():
    params = make_params(7, sizes=(100,))
    torch_opt = torch.optim.Adam(params, lr=1e-3, weight_decay=0.1)
    set_grads([params], seed=70)
    torch_opt.step()
    fused = FusedAdamW(clone_params(params), impl="torch")
    fused.load_state_dict(through_disk(torch_opt.state_dict()))
    assert fused.param_groups[0]["adam_w_mode"] is False


def test_state_dict_round_trips_through_torch_save(tmp_path):
    params = make_params(8, sizes=(1000, 7))
    fused = FusedAdamW(params, lr=1e-2, impl="torch")
    set_grads([params], seed=80)
    fused.step()
    torch.save(fused.state_dict(), tmp_path / "optim.pt")
    twin = FusedAdamW(clone_params(params), lr=1.0, impl="torch")
    twin.load_state_dict(torch.load(tmp_path / "optim.pt"))
    for a, b in zip(fused.state.values(), twin.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == float(b["step"]) == 1.0


def test_amsgrad_checkpoint_is_refused_with_a_clear_message():
    params = make_params(9, sizes=(10,))
    torch_opt = torch.optim.AdamW(params, amsgrad=True)
    set_grads([params], seed=90)
    torch_opt.step()
    with pytest.raises(ValueError, match="amsgrad"):
        FusedAdamW(clone_params(params)).load_state_dict(torch_opt.state_dict())


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("momentum,dampening,nesterov,wd", [(0.0, 0.0, False, 0.0), (0.9, 0.1, False, 1e-2), (0.9, 0.0, True, 1e-2)])
def test_fused_sgd_trains_like_torch_sgd(impl, momentum, dampening, nesterov, wd):
    ref = make_params(10)
    ours = clone_params(ref)
    torch_opt = torch.optim.SGD(ref, lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd)
    fused = FusedSGD(ours, lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd, impl=impl)
    for step in range(4):
        set_grads([ref, ours], seed=100 + step)
        torch_opt.step()
        fused.step()
    assert max_rel(ours, ref) <= 1e-6
    if momentum:
        twin = FusedSGD(clone_params(ref), lr=0.05, momentum=momentum, impl=impl)
        twin.load_state_dict(through_disk(torch_opt.state_dict()))  # momentum buffers carry over
        assert all("momentum_buffer" in s for s in twin.state.values())


@pytest.mark.parametrize("impl", ALL)
def test_fused_lion_follows_the_lion_update(impl):
    params = make_params(11)
    start = [p.detach().double().clone() for p in params]
    fused = FusedLion(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, impl=impl)
    m = [torch.zeros_like(s) for s in start]
    expect = start
    for step in range(3):
        set_grads([params], seed=110 + step)
        new_expect = []
        for i, (p, e) in enumerate(zip(params, expect)):
            g = p.grad.double()
            update = torch.sign(0.9 * m[i] + 0.1 * g)
            new_expect.append(e * (1 - 1e-3 * 0.1) - 1e-3 * update)
            m[i] = 0.99 * m[i] + 0.01 * g
        expect = new_expect
        fused.step(clip_coef=1.0)
    assert max_rel(params, expect) <= 1e-6
    assert set(fused.state[params[0]]) == {"exp_avg"}


@pytest.mark.parametrize("impl", ALL)
def test_grad_norm_and_overflow_on_flat_gradients(impl):
    gen = torch.Generator().manual_seed(12)
    grads = [torch.randn(n, generator=gen) for n in (65537, 1000, 7)] + [torch.randn(500, generator=gen).bfloat16()]
    expect = torch.linalg.vector_norm(torch.cat([g.double() for g in grads])).item()
    total, found = grad_norm_and_overflow(grads, impl=impl)
    assert abs(total.item() - expect) <= 1e-6 * expect and found.item() == 0.0
    grads[1][3] = math.nan
    total, found = grad_norm_and_overflow(grads, impl=impl)
    assert found.item() == 1.0 and not math.isfinite(total.item())
    total, found = grad_norm_and_overflow([], impl=impl)
    assert total.item() == 0.0 and found.item() == 0.0


def test_engine_namespace_exposes_the_ops():
    assert engine.FusedAdamW is FusedAdamW
    assert engine.grad_norm_and_overflow is grad_norm_and_overflow
    assert callable(engine.kernel_report)


def test_step_signature_shows_the_engine_extras():
    """engine/optimizers.py detects fused optimizers by these keyword names."""
    opt = FusedAdamW([torch.zeros(3, requires_grad=True)])
    names = inspect.signature(opt.step).parameters
    assert {"closure", "grad_scale", "clip_coef", "lowp_out"} <= set(names)


def test_closure_is_evaluated_and_its_loss_returned():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = FusedAdamW([w], lr=0.1, impl="torch")

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0
    assert torch.all(w.abs() < torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: FusedAdamW(p, impl="cuda"), "impl='cuda' is not one of"),
        (lambda p: FusedAdamW(p, betas=(0.9, 1.0)), "betas must be two numbers in"),
        (lambda p: FusedAdamW(p, lr=-1.0), "lr must be >= 0"),
        (lambda p: FusedSGD(p, nesterov=True), "nesterov=True needs momentum"),
        (lambda p: FusedLion(p, weight_decay=-0.1), "weight_decay must be >= 0"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(make, message):
    with pytest.raises(ValueError, match=message):
        make([torch.zeros(2, requires_grad=True)])


def test_mismatched_lowp_out_names_the_problem():
    params = make_params(13, sizes=(10, 20))
    opt = FusedAdamW(params, impl="torch")
    set_grads([params], seed=130)
    with pytest.raises(ValueError, match="lowp_out has 1 tensors but the optimizer holds 2"):
        opt.step(lowp_out=[torch.zeros(10, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match=r"lowp_out\[1\] has 10 elements"):
        opt.step(lowp_out=[None, torch.zeros(10, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="grad_scale must be a finite number > 0"):
        opt.step(grad_scale=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("opt_name", ["adamw", "sgd", "lion"])
def test_cuda_fused_step_matches_torch_path(opt_name):
    """On the GPU the Triton kernels and the foreach fallback agree, extras included."""
    sizes = (1, 7, 1000, 65537, (1 << 20) + 3)
    a = make_params(14, sizes=sizes, device="cuda")
    b = clone_params(a)
    build = {
        "adamw": lambda ps, impl: FusedAdamW(ps, lr=1e-2, impl=impl),
        "sgd": lambda ps, impl: FusedSGD(ps, lr=0.05, momentum=0.9, nesterov=True, impl=impl),
        "lion": lambda ps, impl: FusedLion(ps, lr=1e-3, weight_decay=0.1, impl=impl),
    }[opt_name]
    fast, slow = build(a, "triton"), build(b, "torch")
    for step in range(3):
        set_grads([a, b], seed=140 + step, dtype=torch.bfloat16, scale=1024.0)
        clip = torch.tensor(0.5, device="cuda")
        lows_a = [torch.empty_like(p, dtype=torch.bfloat16) for p in a]
        lows_b = [torch.empty_like(p, dtype=torch.bfloat16) for p in b]
        fast.step(grad_scale=1024.0, clip_coef=clip, lowp_out=lows_a)
        slow.step(grad_scale=1024.0, clip_coef=clip, lowp_out=lows_b)
    if opt_name == "lion":
        # Lion takes a sign: where the interpolated momentum rounds to about zero the two fp32
        # paths may disagree, moving an element by 2*lr; allow a handful of those in 3M
        differ = sum(int(((x - y).abs() > 1e-5 * y.abs().max()).sum()) for x, y in zip(a, b))
        assert differ <= 8
    else:
        assert max_rel(a, b) <= 1e-5
