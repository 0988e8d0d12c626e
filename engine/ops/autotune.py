"""Block sizes for the Triton kernels: tuned once per (GPU, kernel, dtypes) and cached on disk.

Our kernels are memory bound, so the only knobs are the elements per program (``block``) and
the warps per program. Tuning runs once per GPU model on scratch buffers (never on the live
optimizer state, which a step would change) and the winner is written to
``~/.cache/orch/triton-autotune.json`` (``ORCH_CACHE_DIR`` moves it), so later processes and
the other ranks of a job start with it.

In Triton's CPU interpreter each program costs about a millisecond of Python, so there the
block is large (64 Ki elements) and nothing is tuned.

``ORCH_OPS_BLOCK`` (and ``ORCH_OPS_NUM_WARPS``) force a configuration, for debugging;
``ORCH_OPS_AUTOTUNE=0`` skips tuning and uses the default.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.run_contract import cache_dir


@dataclass(frozen=True)
class KernelConfig:
    block: int
    num_warps: int = 4


INTERPRETER_CONFIG = KernelConfig(block=65536, num_warps=4)
GPU_DEFAULT = KernelConfig(block=2048, num_warps=8)
GPU_CANDIDATES: tuple[KernelConfig, ...] = tuple(
    KernelConfig(block, warps) for block in (1024, 2048, 4096, 8192) for warps in (4, 8, 16) if block // (32 * warps) >= 4
)

_memory: dict[str, KernelConfig] = {}
_lock = threading.Lock()


def cache_path() -> Path:
    return cache_dir() / "triton-autotune.json"


def forced_config() -> KernelConfig | None:
    """The configuration forced through ORCH_OPS_BLOCK / ORCH_OPS_NUM_WARPS, if any."""
    block = os.environ.get("ORCH_OPS_BLOCK")
    if not block:
        return None
    try:
        value = int(block)
        warps = int(os.environ.get("ORCH_OPS_NUM_WARPS", "4"))
    except ValueError:
        raise ValueError(f"ORCH_OPS_BLOCK={block!r} / ORCH_OPS_NUM_WARPS must be integers") from None
    if value <= 0 or value & (value - 1):
        raise ValueError(f"ORCH_OPS_BLOCK={value} must be a power of two (Triton blocks are)")
    return KernelConfig(value, warps)


def config_for(
    kernel: str,
    device: torch.device,
    dtype_key: str,
    *,
    interpreted: bool,
    measure: Callable[[KernelConfig], float] | None = None,
) -> KernelConfig:
    """The launch configuration for ``kernel`` on ``device`` with dtypes ``dtype_key``.

    ``measure(config)`` returns a time (any unit, lower is better); it is called only the first
    time a GPU model meets this kernel and dtypes.
    """
    forced = forced_config()
    if forced is not None:
        return forced
    if interpreted or device.type != "cuda":
        return INTERPRETER_CONFIG
    key = _cache_key(kernel, device, dtype_key)
    with _lock:
        if key in _memory:
            return _memory[key]
        config = _read_cache(cache_path()).get(key)
        if config is None:
            if measure is None or os.environ.get("ORCH_OPS_AUTOTUNE", "1") == "0":
                config = GPU_DEFAULT
            else:
                config, _ = choose(GPU_CANDIDATES, measure)
                write_cache(cache_path(), key, config)
        _memory[key] = config
        return config


def launch_config(
    kernel: str,
    device: torch.device,
    dtypes: dict[str, torch.dtype],
    *,
    interpreted: bool,
    block: int | None = None,
    num_warps: int | None = None,
    measure: Callable[[KernelConfig], float] | None = None,
) -> KernelConfig:
    """An explicit ``block`` (tests, benchmarks, tuning itself) or the tuned/cached choice."""
    if block is not None:
        if block <= 0 or block & (block - 1):
            raise ValueError(f"block={block} must be a power of two")
        return KernelConfig(block, num_warps or GPU_DEFAULT.num_warps)
    key = ",".join(f"{name}={str(dt).removeprefix('torch.')}" for name, dt in dtypes.items())
    return config_for(kernel, device, key, interpreted=interpreted, measure=measure)


def choose(candidates: Iterable[KernelConfig], measure: Callable[[KernelConfig], float]) -> tuple[KernelConfig, dict[KernelConfig, float]]:
    """Measure every candidate and return the fastest (ties: the first listed) and all timings."""
    timings: dict[KernelConfig, float] = {}
    for config in candidates:
        try:
            timings[config] = float(measure(config))
        except Exception:  # a configuration that does not fit this GPU (registers, shared memory)
            continue
    if not timings:
        return GPU_DEFAULT, timings
    best = min(timings, key=lambda c: timings[c])
    return best, timings


def time_cuda(fn: Callable[[], None], *, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cache_key(kernel: str, device: torch.device, dtype_key: str) -> str:
    from .dispatch import triton_status

    name = torch.cuda.get_device_name(device)
    return f"{kernel}|{dtype_key}|{name}|triton-{triton_status().version}"


def _read_cache(path: Path) -> dict[str, KernelConfig]:
    try:
        raw = json.loads(path.read_text())
        return {key: KernelConfig(int(v["block"]), int(v["num_warps"])) for key, v in raw.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}  # missing or unreadable: tune again and rewrite it


def write_cache(path: Path, key: str, config: KernelConfig) -> None:
    """Add one entry, keeping the others; the rename makes concurrent writers safe."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {k: asdict(v) for k, v in _read_cache(path).items()}
        entries[key] = asdict(config)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".triton-autotune.")
        with os.fdopen(fd, "w") as handle:
            json.dump(entries, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home directory only costs tuning again next time


def read_cache(path: Path | None = None) -> dict[str, KernelConfig]:
    """The cached configurations (for reports and tests)."""
    return _read_cache(path or cache_path())
