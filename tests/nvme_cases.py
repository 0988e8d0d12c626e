"""What the NVMe offload tests share: a small tmpfs to fill or make read-only, and a training
script held alive until a signal (swap files must go at exit and on SIGTERM)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Any]:
    """Mount a small tmpfs (needs root); ``small_mount(size, readonly)`` returns its path."""
    mounted: list[Path] = []

    def mount(size: str, readonly: bool = False) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if readonly else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.skip(f"mounting a small tmpfs needs root (mount said: {result.stderr.strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], capture_output=True)


def nvme_error(config: dict[str, Any]) -> str:
    """What ``engine.initialize`` of the small test model with ``config`` says as an
    ``NvmeOffloadError`` ("no error" when it builds): run on a rank of ``run_distributed``."""
    import engine
    from engine.zero.nvme import NvmeOffloadError
    from tests.engine_zero_cases import build

    try:
        engine.initialize(model=build(), config=config)
    except NvmeOffloadError as exc:
        return str(exc)
    return "no error"


def hold(script: str, nvme: Path, seconds: float = 120) -> subprocess.Popen:
    """Run ``script`` (argv: nvme_path, a free port, seconds to sleep once it printed "ready")
    until it is ready; returns the process."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(nvme), str(free_port()), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:            # the engine's config notes come first
        if line.strip() == "ready":
            return proc
    raise AssertionError(f"the training script ended before it was ready: {proc.stderr.read()}")
