"""The bundled trainer's records as monitor events, under DeepSpeed's names where DeepSpeed has one.

The x-axis is the number of samples seen (``Train/Samples/...``), as in DeepSpeed. The engine
itself writes ``Train/Samples/lr`` and ``Train/Samples/loss_scale`` every optimizer step, so
they are not repeated here. A log record adds:

* ``Train/Samples/train_loss`` (the loss averaged over ranks and over the steps since the
  last record; DeepSpeed's pipeline engine uses the same name) and ``Train/Samples/eval_loss``;
* DeepSpeed's wall-clock breakdown names when ``wall_clock_breakdown`` is on:
  ``elapsed_time_ms_forward``, ``_backward``, ``_step`` (optimizer) ;
* orch's own figures: ``tokens_per_s``, ``tflops``, ``mfu``, ``step_time_ms``, ``grad_norm``,
  ``peak_memory_bytes``, ``restart_count`` and the other phases of the breakdown
  (``elapsed_time_ms_data``, ``_checkpoint``, ``_eval``).
"""
from __future__ import annotations

from typing import Any

from .base import Event

PREFIX = "Train/Samples/"
# record field -> event name (after PREFIX)
TRAIN_FIELDS = {
    "loss": "train_loss", "tokens_per_s": "tokens_per_s", "tflops": "tflops", "mfu": "mfu",
    "grad_norm": "grad_norm", "mem": "peak_memory_bytes", "restart_count": "restart_count",
}
# the breakdown's phase -> DeepSpeed's timer name
BREAKDOWN_NAMES = {"forward": "forward", "backward": "backward", "optimizer": "step", "data": "data",
                   "checkpoint": "checkpoint", "eval": "eval"}


def record_events(record: dict[str, Any]) -> list[Event]:
    """Events for one metrics record (``kind`` train or eval); none for other kinds."""
    step = record.get("samples")
    if not isinstance(step, int):
        return []
    if record.get("kind") == "eval":
        return [(PREFIX + "eval_loss", float(record["eval_loss"]), step)]
    if record.get("kind") != "train":
        return []
    events = [(PREFIX + name, float(record[field]), step) for field, name in TRAIN_FIELDS.items()
              if _number(record.get(field))]
    if _number(record.get("step_time_s")):
        events.append((PREFIX + "step_time_ms", 1000.0 * record["step_time_s"], step))
    for phase, ms in (record.get("breakdown_ms") or {}).items():
        if phase in BREAKDOWN_NAMES and _number(ms):
            events.append((f"{PREFIX}elapsed_time_ms_{BREAKDOWN_NAMES[phase]}", float(ms), step))
    return events


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RecordSink:
    """Attached to the trainer's metrics writer: each record also goes to ``engine.monitor``."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def write(self, record: dict[str, Any]) -> None:
        events = record_events(record)
        if events:
            self.monitor.write_events(events)

    def close(self) -> None:
        """Nothing: the engine closes its monitor (the W&B run ends with the engine's monitoring)."""
