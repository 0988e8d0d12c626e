"""Every Triton kernel in engine.ops against a float64 reference of the same math.

Without CUDA the kernels run in Triton's CPU interpreter: engine.ops chooses it itself, so
these checks do not depend on TRITON_INTERPRET or on who imported triton first. With CUDA
the same checks run on the GPU (the ``cuda`` cases, marked ``gpu``).

The interpreter costs about a millisecond per program, so sizes stay at or below a million
elements and the block size is a parameter: small blocks give many blocks and ragged tails
on small tensors, large blocks keep the million-element cases fast.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install 'orch[triton]')")

from engine.ops.adamw_kernel import adamw_step  # noqa: E402
from engine.ops.dispatch import interpreter_mode  # noqa: E402
from engine.ops.lion_kernel import lion_step  # noqa: E402
from engine.ops.norm_kernel import norm_and_overflow  # noqa: E402
from engine.ops.scaling import GradMultiplier  # noqa: E402
from engine.ops.sgd_kernel import sgd_step  # noqa: E402

DEVICES = [
    pytest.param(
        "cpu", id="interpreter",
        marks=pytest.mark.skipif(not interpreter_mode(), reason="CUDA is present, so the kernels compile for the GPU "
                                 "(the cuda cases run these checks); set TRITON_INTERPRET=1 to run them interpreted"),
    ),
    pytest.param(
        "cuda", id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")],
    ),
]
SENTINEL = 12345.0  # written past the end of every output, must survive the step


def rel_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |a - r| relative to |r|, with a floor at the tensor's rms (values that land near
    zero by cancellation carry the rounding of their larger inputs)."""
    a, r = actual.detach().double().cpu(), reference.detach().double().cpu()
    floor = r.pow(2).mean().sqrt().clamp_min(1e-30)
    return ((a - r).abs() / torch.maximum(r.abs(), floor)).max().item()


def guarded(n: int, dtype: torch.dtype, device: str, fill: float | None = None, values: torch.Tensor | None = None):
    """A length-n view into a buffer whose tail holds SENTINEL, to catch writes past the end."""
    buf = torch.full((n + 37,), SENTINEL, dtype=dtype, device=device)
    view = buf[:n]
    if values is not None:
        view.copy_(values)
    elif fill is not None:
        view.fill_(fill)
    return buf, view


def assert_tail_intact(buf: torch.Tensor, n: int) -> None:
    assert torch.all(buf[n:] == SENTINEL), "a kernel wrote past the end of a tensor"


def assert_bf16_rounding(low: torch.Tensor, fp32: torch.Tensor, ref64: torch.Tensor) -> None:
    """The low-precision copy is the updated fp32 value rounded to nearest, and within half a
    unit in the last place of the float64 reference (plus the fp32 error)."""
    assert not torch.isnan(low).any(), "an element of the low-precision copy was never written"
    assert torch.equal(low.cpu(), fp32.cpu().to(low.dtype))
    ulp = torch.finfo(low.dtype).eps * ref64.abs().cpu()
    assert torch.all((low.double().cpu() - ref64.cpu()).abs() <= 0.5 * ulp + 1e-6 * ref64.abs().cpu() + 1e-30)


# --- AdamW ---------------------------------------------------------------------------------

def adamw_reference(p, g, m, v, *, lr, beta1, beta2, eps, wd, step, adam_w_mode, bias_correction, gs, clip):
    p, g, m, v = (t.detach().double().cpu() for t in (p, g, m, v))
    if gs is not None:
        g = g / float(gs)
    if clip is not None:
        g = g * float(clip)
    if adam_w_mode:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bc1 = 1 - beta1**step if bias_correction else 1.0
    bc2 = 1 - beta2**step if bias_correction else 1.0
    p = p - lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + eps)
    return p, m, v


ADAMW_CASES = [
    # n, block, grad dtype, low dtype, adam_w_mode, bias_correction, grad_scale, clip_coef
    (1, 1024, torch.float32, None, True, True, None, None),
    (7, 1024, torch.bfloat16, torch.bfloat16, True, True, 1024.0, "tensor:0.5"),
    (1000, 256, torch.float16, torch.float16, False, True, "tensor:256.0", 0.25),
    (65537, 65536, torch.float32, torch.bfloat16, True, False, 8.0, None),
    (1_000_003, 65536, torch.bfloat16, torch.bfloat16, True, True, "tensor:65536.0", "tensor:0.75"),
]


def _factor(spec, device):
    if isinstance(spec, str):
        return torch.tensor(float(spec.split(":")[1]), device=device)
    return spec


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ADAMW_CASES, ids=lambda c: f"n{c[0]}-b{c[1]}-{str(c[2])[6:]}-lo{str(c[3])[6:]}-w{int(c[4])}")
def test_adamw_kernel_matches_float64_reference_over_steps(device, case):
    n, block, gdtype, ldtype, adam_w_mode, bias_correction, gs_spec, clip_spec = case
    gen = torch.Generator().manual_seed(n)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8)
    wd = 0.1
    p_buf, p = guarded(n, torch.float32, device, values=torch.randn(n, generator=gen))
    m_buf, m = guarded(n, torch.float32, device, fill=0.0)
    v_buf, v = guarded(n, torch.float32, device, fill=0.0)
    gs, clip = _factor(gs_spec, device), _factor(clip_spec, device)
    scale = float(gs) if gs is not None else 1.0
    for step in (1, 2, 3):
        g = (torch.randn(n, generator=gen) * scale).to(gdtype).to(device)
        lo_buf, lo = guarded(n, ldtype, device, fill=math.nan) if ldtype else (None, None)
        expect = adamw_reference(p, g, m, v, **hyper, wd=wd, step=step, adam_w_mode=adam_w_mode,
                                 bias_correction=bias_correction, gs=gs, clip=clip)
        adamw_step([p], [g], [m], [v], [lo] if ldtype else None, **hyper, weight_decay=wd, step=step,
                   adam_w_mode=adam_w_mode, bias_correction=bias_correction,
                   multiplier=GradMultiplier(gs, clip), block=block, direct_min=0)
        for name, got, ref in zip("pmv", (p, m, v), expect):
            assert rel_error(got, ref) <= 1e-6, f"{name} at step {step}: {rel_error(got, ref):.2e}"
        if ldtype:
            assert_bf16_rounding(lo, p, expect[0])
            assert_tail_intact(lo_buf, n)
    for buf in (p_buf, m_buf, v_buf):
        assert_tail_intact(buf, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direct_min", [1 << 30, 2048], ids=["all-shared", "mixed"])
def test_adamw_many_tensors_share_one_launch_and_match(device, direct_min):
    """Small tensors go through the multi-tensor tables; each still matches the reference."""
    sizes = [1, 7, 1000, 4099, 3]
    gen = torch.Generator().manual_seed(1)
    ps = [torch.randn(n, generator=gen).to(device) for n in sizes]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    for step in (1, 2):
        gs = [torch.randn(n, generator=gen).to(torch.bfloat16).to(device) for n in sizes]
        lows = [torch.full((n,), math.nan, dtype=torch.bfloat16, device=device) for n in sizes]
        expect = [adamw_reference(p, g, m, v, **hyper, wd=0.01, step=step, adam_w_mode=True,
                                  bias_correction=True, gs=None, clip=0.5) for p, g, m, v in zip(ps, gs, ms, vs)]
        adamw_step(ps, gs, ms, vs, lows, **hyper, weight_decay=0.01, step=step,
                   multiplier=GradMultiplier(clip_coef=0.5), block=1024, direct_min=direct_min)
        for p, m, v, lo, (ep, em, ev) in zip(ps, ms, vs, lows, expect):
            assert rel_error(p, ep) <= 1e-6 and rel_error(m, em) <= 1e-6 and rel_error(v, ev) <= 1e-6
            assert_bf16_rounding(lo, p, ep)


@pytest.mark.parametrize("device", DEVICES)
def test_adamw_bf16_parameters_keep_bf16_state(device):
    """Without fp32 masters the math still runs in fp32; storage rounds to nearest."""
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(3001, generator=gen).to(torch.bfloat16).to(device)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    g = torch.randn(3001, generator=gen).to(torch.bfloat16).to(device)
    ep, em, ev = adamw_reference(p, g, m, v, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0, step=1,
                                 adam_w_mode=True, bias_correction=True, gs=None, clip=None)
    adamw_step([p], [g], [m], [v], None, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, block=1024)
    for got, ref in ((p, ep), (m, em), (v, ev)):
        assert got.dtype == torch.bfloat16
        assert rel_error(got, ref) <= 2 ** -8


# --- Lion and SGD ----------------------------------------------------------------------------

def lion_reference(p, g, m, *, lr, beta1, beta2, wd, gs, clip):
    p, g, m = (t.detach().double().cpu() for t in (p, g, m))
    g = g / (float(gs) if gs is not None else 1.0) * (float(clip) if clip is not None else 1.0)
    c = beta1 * m + (1 - beta1) * g
    # where c is within fp32 rounding of zero its sign is a coin toss: leave those out
    decided = c.abs() > 1e-6 * c.abs().max()
    return p * (1 - lr * wd) - lr * torch.sign(c), beta2 * m + (1 - beta2) * g, decided


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,block,gdtype", [(1, 1024, torch.float32), (1000, 128, torch.bfloat16), (65537, 65536, torch.float16)])
def test_lion_kernel_matches_float64_reference(device, n, block, gdtype):
    gen = torch.Generator().manual_seed(3)
    p_buf, p = guarded(n, torch.float32, device, values=torch.randn(n, generator=gen))
    m_buf, m = guarded(n, torch.float32, device, fill=0.0)
    gs = torch.tensor(4.0, device=device)
    for _ in range(3):
        g = (torch.randn(n, generator=gen) * 4).to(gdtype).to(device)
        lo_buf, lo = guarded(n, torch.bfloat16, device, fill=math.nan)
        ep, em, decided = lion_reference(p, g, m, lr=1e-3, beta1=0.9, beta2=0.99, wd=0.1, gs=gs, clip=0.9)
        lion_step([p], [g], [m], [lo], lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1,
                  multiplier=GradMultiplier(gs, 0.9), block=block, direct_min=0)
        assert rel_error(p.cpu()[decided], ep[decided]) <= 1e-6 and rel_error(m, em) <= 1e-6
        assert_bf16_rounding(lo.cpu()[decided], p.cpu()[decided], ep[decided])
        p.copy_(ep.float())  # an undecided sign must not carry into the next step's comparison
        assert_tail_intact(lo_buf, n)
    assert_tail_intact(p_buf, n)
    assert_tail_intact(m_buf, n)


def sgd_reference(p, g, buf, *, lr, momentum, dampening, wd, nesterov, first, gs, clip):
    p, g = p.detach().double().cpu(), g.detach().double().cpu()
    g = g / (float(gs) if gs is not None else 1.0) * (float(clip) if clip is not None else 1.0)
    g = g + wd * p
    if momentum:
        buf = g.clone() if first else momentum * buf.detach().double().cpu() + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return p - lr * g, buf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.0, 0.0, False), (0.9, 0.1, False), (0.9, 0.0, True)])
@pytest.mark.parametrize("n,block", [(7, 1024), (5000, 512)])
def test_sgd_kernel_matches_float64_reference(device, momentum, dampening, nesterov, n, block):
    gen = torch.Generator().manual_seed(4)
    p_buf, p = guarded(n, torch.float32, device, values=torch.randn(n, generator=gen))
    # uninitialised on purpose: the first step must not read it
    buf_buf, buf = guarded(n, torch.float32, device, fill=math.nan) if momentum else (None, None)
    for step in range(3):
        g = torch.randn(n, generator=gen).to(torch.bfloat16).to(device)
        lo_buf, lo = guarded(n, torch.float16, device, fill=math.nan)
        ep, ebuf = sgd_reference(p, g, buf, lr=0.1, momentum=momentum, dampening=dampening, wd=0.01,
                                 nesterov=nesterov, first=step == 0, gs=2.0, clip=None)
        sgd_step([p], [g], [buf] if momentum else None, [lo], lr=0.1, momentum=momentum, dampening=dampening,
                 weight_decay=0.01, nesterov=nesterov, first_step=step == 0,
                 multiplier=GradMultiplier(grad_scale=2.0), block=block, direct_min=0)
        assert rel_error(p, ep) <= 1e-6
        if momentum:
            assert rel_error(buf, ebuf) <= 1e-6
        assert_bf16_rounding(lo, p, ep)
        assert_tail_intact(lo_buf, n)
    assert_tail_intact(p_buf, n)


# --- norm and overflow -----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("block,direct_min", [(1024, 0), (256, 1 << 30), (65536, None)])
def test_norm_matches_float64_reference(device, norm_type, block, direct_min):
    gen = torch.Generator().manual_seed(5)
    tensors = [torch.randn(n, generator=gen).to(dtype).to(device)
               for n, dtype in ((1, torch.float32), (7, torch.bfloat16), (1000, torch.float32),
                                (65537, torch.float32), (3001, torch.float16), (0, torch.float32))]
    expect = torch.linalg.vector_norm(torch.cat([t.double().cpu() for t in tensors]), norm_type).item()
    total, found = norm_and_overflow(tensors, norm_type, block=block, direct_min=direct_min)
    assert total.dtype == torch.float32 and total.dim() == 0 and total.device.type == device
    assert abs(total.item() - expect) <= 1e-6 * expect
    assert found.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("planted", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("where", ["first", "tail", "small"])
def test_norm_finds_planted_inf_and_nan(device, planted, norm_type, where):
    tensors = [torch.ones(70000, device=device, dtype=torch.bfloat16), torch.ones(5, device=device)]
    index = {"first": (0, 0), "tail": (0, 69999), "small": (1, 4)}[where]
    tensors[index[0]][index[1]] = planted
    total, found = norm_and_overflow(tensors, norm_type, block=4096, direct_min=0)
    assert found.item() == 1.0
    assert not math.isfinite(total.item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_norm_overflow_of_the_sum_is_not_an_inf_gradient(device):
    """Squares of large finite fp32 values overflow the norm, but the gradient holds no inf."""
    x = torch.full((1000,), 3e38, device=device)
    total, found = norm_and_overflow([x], 2.0, block=1024)
    assert math.isinf(total.item())
    assert found.item() == 0.0
