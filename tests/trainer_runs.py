"""Running ``python -m engine.train`` for real in tests (one process, or several under torchrun)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.dist_utils import free_port

TINY_CONFIG = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 2,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0}},
    "zero_optimization": {"stage": 2},
}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without orch/Slurm/torchrun variables of an outer job; one thread per rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "SLURM_", "TORCHELASTIC_"))}
    # Two cores shared by everything: one intra-op thread per process avoids spin-waiting.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def write_config(directory: Path, config: dict | None = None, **changes: object) -> Path:
    """``directory/ds_config.json``: ``config`` (default ``TINY_CONFIG``) with ``changes`` on top."""
    path = directory / "ds_config.json"
    path.write_text(json.dumps({**(config or TINY_CONFIG), **changes}))
    return path


def run_trainer(*args: str, ranks: int = 1, timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, "-m", "engine.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={ranks}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "engine.train", *args]
    # Own session, so a hung run is killed with all its workers, not just the torchrun parent.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(**env), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"trainer did not finish in {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]
