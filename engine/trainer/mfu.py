"""Model FLOPs utilisation: the training FLOP/s a run achieves against what its devices could do.

FLOPs per token follow the PaLM paper (appendix B), as nanoGPT and torchtitan count them:
``6N`` for the forward and backward matmuls over the N parameters, plus ``12·L·d·T`` for the
attention scores and their weighted sum (``GPTConfig.flops_per_token``). Recomputation by
activation checkpointing is not credited: that would be hardware FLOPs utilisation, not MFU.

The peak a run is compared with is, per device:

* ``ORCH_PEAK_TFLOPS`` when set (your own figure, e.g. for a GPU not in the table);
* on NVIDIA A100 / H100 / H200, the dense bf16 tensor-core figure of the data sheet (the
  convention of nanoGPT, PaLM and torchtitan, whatever precision the run uses);
* on a CPU, a figure measured once by a matmul probe in the run's compute dtype with the
  process's thread count, cached in ``$ORCH_CACHE_DIR`` (default ``~/.cache/orch``) so later
  runs do not pay for it;
* otherwise unknown: TFLOP/s is still reported, MFU is not.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.run_contract import ENV_PEAK_TFLOPS, cache_dir

# Dense bf16 tensor-core peaks per GPU, FLOP/s, from NVIDIA's data sheets. The first name
# fragment found in the device name wins, so the more specific names come first
# ("NVIDIA H100 PCIe" must not match the SXM figure; "NVIDIA GH200 480GB" is an H200-class die).
GPU_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),   # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),   # SXM4 and PCIe alike
)

PEAK_ENV = ENV_PEAK_TFLOPS


@dataclass(frozen=True)
class Peak:
    """One device's peak FLOP/s and where the number comes from (shown to the user)."""

    flops: float
    source: str


def achieved_flops(flops_per_token: float, tokens_per_s: float) -> float:
    """Model FLOP/s of the whole job: FLOPs per token times tokens per second (all ranks)."""
    return flops_per_token * tokens_per_s


def mfu(flops_per_token: float, tokens_per_s: float, peak_per_device: float, devices: int) -> float:
    """Fraction of the job's combined peak that the model's FLOPs use (0.4 means 40 %)."""
    if peak_per_device <= 0 or devices < 1:
        raise ValueError(f"peak_per_device ({peak_per_device}) and devices ({devices}) must be positive")
    return achieved_flops(flops_per_token, tokens_per_s) / (peak_per_device * devices)


def gpu_peak(device_name: str) -> Peak | None:
    """The table's peak for a CUDA device name, or None for a GPU the table does not know."""
    for fragment, flops in GPU_PEAK_BF16_FLOPS:
        if fragment.lower() in device_name.lower():
            return Peak(flops, f"{device_name}: {flops / 1e12:g} TFLOP/s dense bf16 (data sheet)")
    return None


def peak_from_env() -> Peak | None:
    raw = os.environ.get(PEAK_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{PEAK_ENV}={raw!r} must be a number of TFLOP/s per device, e.g. 989") from None
    if value <= 0:
        raise ValueError(f"{PEAK_ENV}={raw!r} must be > 0")
    return Peak(value * 1e12, f"{PEAK_ENV}={raw}")


def device_peak(device: Any, dtype: Any) -> Peak | None:
    """The peak per device for a torch ``device`` computing in ``dtype`` (see the module docstring)."""
    override = peak_from_env()
    if override is not None:
        return override
    import torch

    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return cpu_peak(dtype, torch.get_num_threads())
    return None


# --- the CPU probe ------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_probe_key(dtype: Any, threads: int) -> str:
    import torch

    return f"{_cpu_model()} | {threads} threads | {str(dtype).removeprefix('torch.')} | torch {torch.__version__}"


def measure_matmul_flops(dtype: Any, *, min_seconds: float = 0.02, max_n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul on this CPU with the current thread count.

    The size grows until one product takes ``min_seconds`` (small products measure call
    overhead, not arithmetic); the best of ``repeats`` is kept, as a peak should be.
    """
    import torch

    n = 256
    while True:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)  # warm up (allocations, kernel selection)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if time.perf_counter() - t0 >= min_seconds or n >= max_n:
            break
        n *= 2
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def cpu_peak(dtype: Any, threads: int) -> Peak:
    """The cached probe figure for this CPU, thread count, dtype and torch; measured on a miss."""
    key = cpu_probe_key(dtype, threads)
    path = cache_dir() / "cpu-peak.json"
    cache = _read_cache(path)
    entry = cache.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return Peak(float(entry["flops"]), f"matmul probe, cached in {path}")
    flops = measure_matmul_flops(dtype)
    cache[key] = {"flops": flops, "measured_at": time.time()}
    _write_cache(path, cache)
    return Peak(flops, f"matmul probe ({key}), measured now and cached in {path}")


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, cache: dict[str, Any]) -> None:
    """Best effort: a read-only home must not stop training, it only costs a probe per run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
