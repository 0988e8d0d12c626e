"""``orch doctor``: what this machine can run, like DeepSpeed's ``ds_report`` but for orch.

Each probe is independent and never raises: a piece that cannot be used is a row with the reason
and what to do (MISSING, or for a cluster NO CONFIG / UNREACHABLE: installed but not usable, see
doctor_clusters.py), so the report itself always prints.
"""
from __future__ import annotations

import platform
from collections.abc import Callable

from .doctor_probe import NO_CONFIG, UNREACHABLE, Probe  # noqa: F401  (re-exported)


def _safe(name: str, fn: Callable[[], Probe], optional: bool = False) -> Probe:
    try:
        return fn()
    except Exception as exc:  # a probe must never take the report down
        return Probe(name, False, f"probe failed: {exc}", optional)


def _python() -> Probe:
    return Probe("python", True, f"{platform.python_version()} ({platform.python_implementation()})")


def _torch() -> list[Probe]:
    try:
        import torch
        import torch.distributed as dist
    except ImportError as exc:
        return [Probe("torch", False, f"not importable ({exc}); pip install torch")]
    probes = [Probe("torch", True, torch.__version__)]
    cuda = torch.cuda.is_available()
    probes.append(Probe("cuda", cuda, f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"
                        if cuda else "no CUDA device (CPU jobs use gloo)", optional=True, problem="NO GPU"))
    if cuda:
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        probes.append(Probe("gpus", True, ", ".join(names)))
    probes.append(Probe("gloo", dist.is_available() and dist.is_gloo_available(), "torch.distributed gloo backend"))
    nccl = dist.is_available() and dist.is_nccl_available()
    version = ".".join(map(str, torch.cuda.nccl.version())) if nccl and cuda else ""
    probes.append(Probe("nccl", nccl, f"NCCL {version}".strip() if nccl else "not built into this torch",
                        optional=True))
    return probes


def _triton() -> Probe:
    try:
        from engine.ops import kernel_report
    except ImportError as exc:
        return Probe("triton kernels", False, f"engine.ops unavailable: {exc}", optional=True)
    report = kernel_report()
    ok = bool(report.get("kernels_ok", report.get("compiles")))
    detail = report.get("detail") or ", ".join(f"{k}={v}" for k, v in report.items())
    return Probe("triton kernels", ok, str(detail), optional=True)


def _monitors() -> list[Probe]:
    """The clients the ds_config's wandb / comet / tensorboard sections write to (optional extras)."""
    from engine.monitor.clients import CLIENTS  # stdlib only: no torch

    out = []
    for c in CLIENTS:
        version = c.version()
        detail = (f"{c.module} {version}: the ds_config's \"{c.section}\" section writes {c.what}" if version else
                  f"{c.module} not installed; pip install {c.module} (orch's {c.extra!r} extra) to use the "
                  f"ds_config's \"{c.section}\" section")
        out.append(Probe(f"monitor: {c.section}", version is not None, detail, optional=True))
    return out


def run_probes() -> list[Probe]:
    probes = [_safe("python", _python)]
    try:
        probes += _torch()
    except Exception as exc:
        probes.append(Probe("torch", False, f"probe failed: {exc}"))
    probes.append(_safe("triton kernels", _triton, optional=True))
    from . import doctor_clusters

    probes.append(_safe("slurm", doctor_clusters.slurm, optional=True))
    probes.append(_safe("kubernetes", doctor_clusters.kubernetes, optional=True))
    probes.append(_safe("helm", doctor_clusters.helm, optional=True))
    try:
        probes += _monitors()
    except Exception as exc:
        probes.append(Probe("monitors", False, f"probe failed: {exc}", optional=True))
    return probes
