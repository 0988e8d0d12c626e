"""What a training run tells the outside world: metrics.jsonl, status.json and console lines.

Only rank 0 writes. ``metrics.jsonl`` gets one JSON object per line (append + flush, so a crash
loses at most the line being written), told apart by ``kind``:

* ``start``: once per (re)start of the trainer: the step it starts from, world size, restart
  count, FLOPs per token and the peak MFU is measured against (``orch plot`` draws restarts
  from these);
* ``train``: one per log step, with at least ``TRAIN_FIELDS``; ``tflops`` is the whole job's
  model TFLOP/s, ``mfu`` a fraction of the job's peak (None when the device's peak is
  unknown), ``breakdown_ms`` the per-phase milliseconds per step when the ds_config sets
  ``wall_clock_breakdown`` (None otherwise);
* ``eval``: ``eval_loss`` at an evaluation step.

``status.json`` is replaced atomically (temp file + rename) so ``orch status`` never reads half
a file. With a TensorBoard sink attached, every record is also written there.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from engine.log import TRAINER, get_logger
from engine.run_contract import RunPaths

log = get_logger(TRAINER)

# Fields every training record carries (tests and `orch status` rely on these names).
TRAIN_FIELDS = (
    "step", "loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "step_time_s", "samples",
    "world_size", "restart_count", "mem", "time", "tflops", "mfu", "breakdown_ms",
)
START_FIELDS = ("step", "world_size", "restart_count", "flops_per_token", "peak_tflops", "peak_source")


def peak_memory_bytes() -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated on GPU runs, else this process's peak RSS."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    # ru_maxrss is kilobytes on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "peak_rss"


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


class MetricsWriter:
    """Rank 0's log sink; on other ranks every method is a no-op."""

    def __init__(self, run_dir: str | os.PathLike[str], *, enabled: bool, console: bool = True) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.paths = RunPaths(run_dir)
        self._console = None
        self._file = None
        self.tensorboard: Any = None  # a TensorBoardSink, attached by the trainer when configured
        self.sinks: list[Any] = []    # more record sinks (``write``/``close``): the ds_config's monitors
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = self.paths.metrics.open("a", buffering=1)
        if console:
            from rich.console import Console

            self._console = Console(stderr=False, highlight=False, soft_wrap=True)

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line and print a console line for it."""
        if not self.enabled:
            return
        record = {**record, "time": record.get("time", time.time())}
        assert self._file is not None
        self._file.write(json.dumps(record, default=float) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        for sink in self.sinks:
            sink.write(record)
        if self._console is not None and record.get("kind") in ("train", "eval"):
            self._console.print(format_console_line(record))

    def info(self, message: str) -> None:
        """A line about the run (``engine.train <message>``), through the ``engine.train`` logger."""
        if self.enabled and self._console is not None:
            log.info(message)

    def status(self, state: str, **fields: Any) -> None:
        """Replace status.json: ``state`` is running | finished | failed."""
        if self.enabled:
            write_json_atomic(self.paths.status, {"state": state, **fields, "time": time.time()})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"


def format_console_line(r: dict[str, Any]) -> str:
    """One rich-markup line per record: the numbers a person scans during a run."""
    if r.get("kind") == "eval":
        return f"[bold]step {r['step']:>6}[/]  [magenta]eval_loss {r['eval_loss']:.4f}[/]"
    parts = [
        f"[bold]step {r['step']:>6}/{r.get('total_steps', '?')}[/]",
        f"loss [green]{r['loss']:.4f}[/]",
        f"lr {r['lr']:.3e}",
    ]
    if r.get("grad_norm") is not None:
        parts.append(f"gnorm {r['grad_norm']:.3f}")
    if r.get("loss_scale") is not None:
        parts.append(f"scale {r['loss_scale']:g}")
    parts += [
        f"{r['tokens_per_s']:,.0f} tok/s",
        f"{r['step_time_s'] * 1000:.0f} ms/step",
    ]
    if r.get("tflops") is not None:
        parts.append(format_flops(r["tflops"], r.get("mfu")))
    parts.append(f"mem {_human_bytes(r['mem'])}")
    line = "  ".join(parts)
    if r.get("breakdown_ms"):
        line += "\n" + " " * 8 + "time (ms/step) | " + format_breakdown(r["breakdown_ms"])
    return line


def format_flops(tflops: float, mfu: float | None) -> str:
    """``12.3 TFLOP/s (MFU 41.2%)``; small CPU figures keep three significant digits."""
    text = f"{tflops:.3g} TFLOP/s" if tflops < 10 else f"{tflops:,.1f} TFLOP/s"
    return text + (f" (MFU {mfu:.1%})" if mfu is not None else "")


def format_breakdown(breakdown: dict[str, Any]) -> str:
    """DeepSpeed's wall_clock_breakdown shape: ``forward: 12.1 | backward: 30.4 | ...``."""
    parts = []
    for name, ms in breakdown.items():
        if ms is None:
            parts.append(f"{name}: in backward")
        elif ms > 0 or name in ("forward", "backward", "optimizer"):
            parts.append(f"{name}: {ms:.1f}")
    return " | ".join(parts)
