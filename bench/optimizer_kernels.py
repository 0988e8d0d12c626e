"""The fused optimizer step (engine.ops) against what torch users run, on one flat partition.

On a GPU, per size (quick: 10M parameters; full: 100M and 1B):

* the mixed-precision step the engine takes: global norm + inf check, then one fused AdamW
  pass that unscales, clips, updates and writes the bf16 copy (ours), against the torch
  sequence (unscale in place, ``clip_grad_norm_``, ``AdamW(fused=True)``, copy to bf16) and
  apex / DeepSpeed FusedAdam in that sequence when importable. Bytes moved per parameter
  (34 for ours, 54 for the sequence, fp32 gradients) over the time, as a fraction of this
  card's device-to-device copy bandwidth measured in the same run;
* the bare AdamW step: ours vs ``AdamW(fused=True)`` vs ``AdamW(foreach=True)``.

On a CPU (no GPU here): the offload path (``FusedAdamW`` with ``impl="auto"``, which is
torch's fused CPU kernel plus our unscale and copy-out) against torch's AdamW fused and
foreach, and DeepSpeedCPUAdam when importable; plus the kernel report, i.e. the Triton
kernels' correctness run in the interpreter.

Figures are medians of repeats; ratios are peer time / our time (> 1: we are faster).

    python -m bench.optimizer_kernels [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.common import machine
from engine.ops import FusedAdamW, grad_norm_and_overflow, kernel_report

LR, LOSS_SCALE, MAX_NORM = 1e-4, 1024.0, 1.0


def run(quick: bool = False) -> list[dict]:
    print(f"machine: {machine()}")
    if torch.cuda.is_available():
        return _gpu(quick)
    return _cpu(quick)


# --- GPU -----------------------------------------------------------------------------------

def _gpu(quick: bool) -> list[dict]:
    sizes = [10_000_000] if quick else [100_000_000, 1_000_000_000]
    repeats = 5 if quick else 20
    card = torch.cuda.get_device_name()
    copy_gbps = _copy_bandwidth(repeats)
    print(f"device-to-device copy bandwidth: {copy_gbps:.0f} GB/s ({card})")
    rows: list[dict] = []
    for n in sizes:
        rows += _gpu_size(n, repeats, copy_gbps, card)
    return rows


def _copy_bandwidth(repeats: int) -> float:
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    seconds = _cuda_median(lambda: dst.copy_(src), repeats)
    del src, dst
    return 2 * (1 << 30) / seconds / 1e9


def _gpu_size(n: int, repeats: int, copy_gbps: float, card: str) -> list[dict]:
    p = torch.randn(n, device="cuda").requires_grad_()
    grad = torch.randn(n, device="cuda") * LOSS_SCALE
    low = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    p.grad = grad.clone()

    def fresh_grad() -> None:  # the sequence unscales in place; restore before each (untimed)
        p.grad.copy_(grad)

    ours = FusedAdamW([p], lr=LR, impl="triton")

    def ours_step() -> None:
        total, found = grad_norm_and_overflow([p.grad])
        clip = torch.clamp(MAX_NORM / (total / LOSS_SCALE + 1e-6), max=1.0)
        ours.step(grad_scale=LOSS_SCALE, clip_coef=clip, lowp_out=[low])

    peers = _peer_optimizers([p])
    candidates = {"orch fused (norm + one pass)": (ours_step, 34)}
    for name, opt in peers.items():
        if "foreach" not in name:
            candidates[f"{name} sequence"] = (_torch_sequence(p, low, opt), 54)
    rows = _time_gpu_candidates(f"mixed-precision AdamW step, {n / 1e6:.0f}M params, fp32 grads ({card})",
                                candidates, n, repeats, copy_gbps, "engine_step", setup=fresh_grad)

    bare = {"orch FusedAdamW (triton)": (lambda: ours.step(), 28)}
    bare.update({name: (opt.step, 28) for name, opt in peers.items()})
    rows += _time_gpu_candidates(f"bare AdamW step, {n / 1e6:.0f}M params", bare, n, repeats, copy_gbps, "bare_step",
                                 setup=fresh_grad)
    del p, grad, low, ours, peers
    torch.cuda.empty_cache()
    return rows


def _torch_sequence(p: torch.Tensor, low: torch.Tensor, opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        torch._foreach_div_([p.grad], LOSS_SCALE)
        torch.nn.utils.clip_grad_norm_([p], MAX_NORM)
        opt.step()
        low.copy_(p.detach())

    return step


def _peer_optimizers(params: list[torch.Tensor]) -> dict[str, torch.optim.Optimizer]:
    peers: dict[str, torch.optim.Optimizer] = {
        "torch AdamW(fused=True)": torch.optim.AdamW(params, lr=LR, fused=True),
        "torch AdamW(foreach=True)": torch.optim.AdamW(params, lr=LR, foreach=True),
    }
    try:
        from apex.optimizers import FusedAdam as ApexFusedAdam  # type: ignore[import-not-found]

        peers["apex FusedAdam"] = ApexFusedAdam(params, lr=LR, adam_w_mode=True)
    except Exception:
        pass
    try:
        from deepspeed.ops.adam import FusedAdam as DeepSpeedFusedAdam  # type: ignore[import-not-found]

        peers["DeepSpeed FusedAdam"] = DeepSpeedFusedAdam(params, lr=LR, adam_w_mode=True)
    except Exception:
        pass
    return peers


def _time_gpu_candidates(title: str, candidates: dict[str, tuple[Callable[[], None], int]], n: int, repeats: int,
                         copy_gbps: float, kind: str, setup: Callable[[], None] | None = None) -> list[dict]:
    times = {name: _cuda_median(fn, repeats, setup) for name, (fn, _) in candidates.items()}
    ours_name = next(iter(candidates))
    print(f"\n{title}")
    print(f"  {'':<36} {'ms':>9} {'ns/param':>9} {'B/param':>8} {'GB/s':>7} {'of copy':>8} {'peer/ours':>10}")
    rows = []
    for name, (_, bytes_per_param) in candidates.items():
        seconds = times[name]
        gbps = bytes_per_param * n / seconds / 1e9
        ratio = seconds / times[ours_name]
        print(f"  {name:<36} {seconds * 1e3:>9.3f} {seconds / n * 1e9:>9.4f} {bytes_per_param:>8} {gbps:>7.0f} "
              f"{gbps / copy_gbps:>7.0%} {'' if name == ours_name else f'{ratio:>10.2f}'}")
        rows.append({"benchmark": "optimizer_kernels", "kind": kind, "name": name, "params": n,
                     "median_s": seconds, "ns_per_param": seconds / n * 1e9, "bytes_per_param": bytes_per_param,
                     "fraction_of_copy_bw": gbps / copy_gbps, "peer_over_ours": ratio})
    return rows


def _cuda_median(fn: Callable[[], object], repeats: int, setup: Callable[[], None] | None = None) -> float:
    for _ in range(3):
        if setup:
            setup()
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if setup:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


# --- CPU -----------------------------------------------------------------------------------

def _cpu(quick: bool) -> list[dict]:
    n = 4_000_000 if quick else 25_000_000
    repeats = 5 if quick else 9
    report = kernel_report()
    checks = ", ".join(f"{k}: {'ok' if v.get('ok') else 'FAILED'} ({v.get('max_rel_error', v.get('error'))})"
                       for k, v in report["checks"].items())
    print(f"Triton kernels ({report['mode']}, triton {report['triton_version']}): {checks or report['reason']}")
    rows = [{"benchmark": "optimizer_kernels", "kind": "kernel_check", "name": "triton kernels",
             "mode": report["mode"], "ok": report["kernels_ok"]}]
    p = torch.randn(n).requires_grad_()
    grad = torch.randn(n)
    low = torch.empty(n, dtype=torch.bfloat16)

    ours = FusedAdamW([p], lr=LR, impl="auto")
    peers: dict[str, Callable[[], None]] = {}
    fused = torch.optim.AdamW([p], lr=LR, fused=True)
    foreach = torch.optim.AdamW([p], lr=LR, foreach=True)

    def sequence(opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            torch._foreach_div_([p.grad], LOSS_SCALE)
            opt.step()
            low.copy_(p.detach())
        return step

    def ours_step() -> None:
        ours.step(grad_scale=LOSS_SCALE, lowp_out=[low])

    peers["torch AdamW(fused=True) sequence"] = sequence(fused)
    peers["torch AdamW(foreach=True) sequence"] = sequence(foreach)
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # type: ignore[import-not-found]

        peers["DeepSpeedCPUAdam sequence"] = sequence(DeepSpeedCPUAdam([p], lr=LR))
    except Exception:
        pass
    candidates = {"orch FusedAdamW (auto, CPU)": ours_step, **peers}

    def timed(fn: Callable[[], None]) -> float:
        p.grad = grad.clone()  # every candidate unscales a fresh scaled gradient (not timed)
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for fn in candidates.values():
        timed(fn)  # warm-up: state allocation
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):  # interleaved, so drifting load on a shared machine hits all alike
        for name, fn in candidates.items():
            samples[name].append(timed(fn))
    medians = {name: statistics.median(v) for name, v in samples.items()}
    ours_name = next(iter(candidates))
    title = f"CPU offload step (unscale + AdamW + bf16 copy), {n / 1e6:.0f}M params, {torch.get_num_threads()} threads"
    print(f"\n{title}")
    print(f"  {'':<36} {'ms':>9} {'ns/param':>9} {'range ms':>15} {'peer/ours':>10}")
    for name, seconds in medians.items():
        ratio = seconds / medians[ours_name]
        spread = f"{min(samples[name]) * 1e3:.1f}-{max(samples[name]) * 1e3:.1f}"
        print(f"  {name:<36} {seconds * 1e3:>9.2f} {seconds / n * 1e9:>9.3f} {spread:>15} "
              f"{'' if name == ours_name else f'{ratio:>10.2f}'}")
        rows.append({"benchmark": "optimizer_kernels", "kind": "cpu_step", "name": name, "params": n,
                     "median_s": seconds, "ns_per_param": seconds / n * 1e9, "peer_over_ours": ratio})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    run(parser.parse_args().quick)
