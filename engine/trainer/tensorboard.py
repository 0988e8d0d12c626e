"""Optional TensorBoard output of the bundled trainer, switched on by the ds_config's own section.

DeepSpeed users write ``"tensorboard": {"enabled": true, "output_path": "...", "job_name": "..."}``;
the trainer honours it with ``torch.utils.tensorboard`` (which needs the ``tensorboard``
package). Event files go to ``<output_path>/<job_name>``, or ``<run_dir>/tensorboard/<job_name>``
when ``output_path`` is empty. Every numeric field of a metrics record becomes a scalar
``train/<field>`` (``eval/<field>`` for evaluations) at the record's step; metrics.jsonl stays
the record of truth, TensorBoard is a view of it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.run_contract import RunPaths

# Fields that are bookkeeping, not curves.
_SKIP = frozenset({"kind", "step", "total_steps", "time", "world_size", "restart_count", "samples"})


def tensorboard_dir(section: Any, run_dir: Path) -> Path:
    base = Path(section.output_path).expanduser() if section.output_path else RunPaths(run_dir).tensorboard
    return base / (section.job_name or "DeepSpeedJobName")


class TensorBoardSink:
    """Writes records as scalars; construct with ``open_tensorboard`` (which may decline)."""

    def __init__(self, writer: Any, log_dir: Path) -> None:
        self._writer, self.log_dir = writer, log_dir

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        prefix = "eval" if record.get("kind") == "eval" else "train"
        for key, value in _scalars(record):
            self._writer.add_scalar(f"{prefix}/{key}", value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    out = []
    for key, value in record.items():
        if key in _SKIP:
            continue
        if isinstance(value, dict):  # the step-time breakdown
            out += [(f"{key}/{k}", float(v)) for k, v in value.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((key, float(value)))
    return out


def open_tensorboard(log_dir: Path) -> tuple[TensorBoardSink | None, str]:
    """(sink, message): the sink, or None and the reason it could not be opened."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        return None, (f"tensorboard.enabled is set but TensorBoard cannot be written ({exc}); "
                      "install it with `pip install tensorboard`; metrics.jsonl is written as usual")
    log_dir.mkdir(parents=True, exist_ok=True)
    return TensorBoardSink(SummaryWriter(log_dir=str(log_dir)), log_dir), f"TensorBoard event files in {log_dir}"
