"""``kernel_report()``: whether our Triton kernels work on this machine, for ``orch doctor``.

It imports triton, runs a tiny AdamW step and a norm with a planted inf through the kernels
(compiled for the GPU when there is one, in Triton's interpreter otherwise) and compares them
with float64 references computed here.
"""
from __future__ import annotations

import time
import traceback
from typing import Any

import torch

from .autotune import cache_path
from .dispatch import interpreter_mode, triton_status
from .torch_impl import has_fused_cpu_adamw


def kernel_report() -> dict[str, Any]:
    status = triton_status()
    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "triton_importable": status.available,
        "triton_version": status.version,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "mode": "unavailable",
        "kernels_ok": False,
        "checks": {},
        "torch_fused_cpu_adamw": has_fused_cpu_adamw(),
        "autotune_cache": str(cache_path()),
        "reason": status.reason,
        "compiles": False,
        "detail": "",
    }
    if not status.available:
        report["reason"] = f"{status.reason}; optimizers use torch (foreach on GPU, torch's fused AdamW on CPU)"
        report["detail"] = report["reason"]
        return report
    interpreted = interpreter_mode()
    device = torch.device("cpu") if interpreted and not cuda else torch.device("cuda" if cuda else "cpu")
    report["mode"] = "interpreter" if interpreted else "compiled"
    report["reason"] = (
        "no CUDA device: kernels run in Triton's CPU interpreter (correct, slow; the GPU compiles the same code)"
        if interpreted and not cuda else
        "TRITON_INTERPRET=1: kernels run in Triton's interpreter" if interpreted else
        f"kernels compiled for {report['device']}"
    )
    for name, check in (("adamw", _check_adamw), ("grad_norm", _check_norm)):
        start = time.perf_counter()
        try:
            ok, error = check(device)
            report["checks"][name] = {"ok": ok, "max_rel_error": error, "seconds": round(time.perf_counter() - start, 3)}
        except Exception as exc:  # a compile failure is the answer, not a crash of the report
            lines = traceback.format_exception_only(type(exc), exc)
            report["checks"][name] = {"ok": False, "error": "".join(lines).strip()[-500:]}
    report["kernels_ok"] = all(c["ok"] for c in report["checks"].values())
    report["compiles"] = all("error" not in c for c in report["checks"].values())
    report["detail"] = _detail(report)
    return report


def _detail(report: dict[str, Any]) -> str:
    """One line for a human: did it work, where, and how close to float64."""
    where = ("in Triton's CPU interpreter" if report["mode"] == "interpreter" else f"compiled for {report['device']}")
    parts = []
    for name, check in report["checks"].items():
        if "error" in check:
            parts.append(f"{name} FAILED: {check['error'].splitlines()[-1]}")
        else:
            parts.append(f"{name} {'ok' if check['ok'] else 'WRONG'} (max rel err {check['max_rel_error']:.1e})")
    verdict = "kernels correct" if report["kernels_ok"] else "kernels NOT usable"
    return f"triton {report['triton_version']}: {verdict} {where}; " + ", ".join(parts)


def _check_adamw(device: torch.device) -> tuple[bool, float]:
    from .adamw_kernel import adamw_step
    from .scaling import GradMultiplier

    gen = torch.Generator().manual_seed(0)
    n, lr, b1, b2, eps, wd, scale = 1000, 1e-2, 0.9, 0.999, 1e-8, 0.1, 4.0
    p = torch.randn(n, generator=gen)
    g = (torch.randn(n, generator=gen) * scale).to(torch.bfloat16)
    expect = _adamw_reference(p.double(), g.double() / scale, lr, b1, b2, eps, wd)
    p, g = p.to(device), g.to(device)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    low = torch.full((n,), float("nan"), dtype=torch.bfloat16, device=device)
    adamw_step([p], [g], [m], [v], [low], lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, step=1,
               multiplier=GradMultiplier(grad_scale=scale), block=1024)
    error = ((p.double().cpu() - expect).abs() / expect.abs().clamp_min(1e-3)).max().item()
    copied = bool(torch.equal(low.cpu(), p.cpu().to(torch.bfloat16)))
    return error < 1e-5 and copied, error


def _adamw_reference(p, g, lr, b1, b2, eps, wd):
    m = (1 - b1) * g
    v = (1 - b2) * g * g
    return p * (1 - lr * wd) - lr / (1 - b1) * m / (v.sqrt() / (1 - b2) ** 0.5 + eps)


def _check_norm(device: torch.device) -> tuple[bool, float]:
    from .norm_kernel import norm_and_overflow

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=gen)
    expect = x.double().norm().item()
    x = x.to(device)
    total, found = norm_and_overflow([x], 2.0, block=1024)
    error = abs(total.item() - expect) / expect
    x[17] = float("inf")
    _, found_planted = norm_and_overflow([x], 2.0, block=1024)
    ok = error < 1e-5 and found.item() == 0.0 and found_planted.item() == 1.0
    return ok, error
