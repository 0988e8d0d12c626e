"""Reading what the monitoring clients leave on disk: W&B offline runs and Comet offline archives.

W&B 0.31 writes ``wandb/offline-run-<time>-<id>/run-<id>.wandb``, read with the engine's own
reader (engine/monitor/wandb_history.py, which the W&B monitor uses to resume).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

@dataclass
class WandbRun:
    """One offline run directory: its id, config and history rows (``_step`` -> keys)."""

    path: Path
    run_id: str = ""
    resumed: bool = False
    config: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return [int(r["_step"]) for r in self.rows]


def read_wandb_run(run_path: Path) -> WandbRun:
    from engine.monitor.wandb_history import records

    run = WandbRun(run_path)
    for record in records(next(run_path.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.resumed = record.run.run_id, record.run.resumed
            run.config.update({c.key: json.loads(c.value_json) for c in record.run.config.update})
        elif kind == "config":
            run.config.update({c.key: json.loads(c.value_json) for c in record.config.update})
        elif kind == "history":
            run.rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return run


def wandb_runs(wandb_dir: Path) -> list[WandbRun]:
    """Every offline run under ``wandb_dir``, oldest first."""
    return [read_wandb_run(p) for p in sorted(wandb_dir.glob("offline-run-*"))]


def comet_metrics(offline_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Metric name -> [(step, value)] over every Comet offline archive in ``offline_dir``."""
    out: dict[str, list[tuple[int, float]]] = {}
    for archive in sorted(offline_dir.glob("*.zip")):
        with zipfile.ZipFile(archive) as z:
            for line in z.read("messages.json").decode().splitlines():
                metric = json.loads(line).get("payload", {}).get("metric")
                if metric and metric.get("step") is not None:
                    out.setdefault(metric["metricName"], []).append((int(metric["step"]), float(metric["metricValue"])))
    return out
