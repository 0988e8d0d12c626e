"""Builds ``engine.monitor`` from a ds_config: which monitors, where their files go, what they attach."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .base import Monitor, MonitorMaster

CLIENT_SECTIONS = ("wandb", "csv_monitor", "comet")


def build_monitor(config: Any, rank: int) -> MonitorMaster:
    """The engine's monitor for ``config`` (an EngineConfig); clients open on rank 0 at first use.

    The run directory defaults to ``$ORCH_RUN_DIR`` (set in every orch job), so a user's own
    script under orch gets the same resumable runs as the bundled trainer.
    """
    enabled = any(getattr(config, key).enabled for key in CLIENT_SECTIONS)
    if not enabled:
        return MonitorMaster(enabled=False)

    def opener(master: MonitorMaster) -> list[Monitor]:
        return _open_clients(config, master) if rank == 0 else []

    master = MonitorMaster(opener, enabled=True)
    from engine.run_contract import ENV_RUN_DIR

    env_dir = os.environ.get(ENV_RUN_DIR)
    master.run_dir = Path(env_dir) if env_dir else None
    return master


def run_config(config: Any, run_dir: Path | None) -> dict[str, Any]:
    """What a W&B run / Comet experiment carries as its config: the resolved ds_config and the job."""
    out: dict[str, Any] = {"ds_config": config.to_ds_dict()}
    if run_dir is not None:
        try:
            out["job"] = json.loads((run_dir / "job.json").read_text())
        except (OSError, ValueError):
            pass
    return out


def _open_clients(config: Any, master: MonitorMaster) -> list[Monitor]:
    run_dir = master.run_dir
    state_dir = run_dir / "monitor" if run_dir is not None else None
    attached = {**run_config(config, run_dir), **master.run_config}
    monitors: list[Monitor | None] = []
    if config.wandb.enabled:
        from .wandb_monitor import open_wandb

        monitors.append(open_wandb(config.wandb, run_dir, state_dir, attached))
    if config.csv_monitor.enabled:
        from .csv_monitor import CsvMonitor, csv_log_dir

        monitors.append(CsvMonitor(csv_log_dir(config.csv_monitor, run_dir), state_dir))
    if config.comet.enabled:
        from .comet_monitor import open_comet

        monitors.append(open_comet(config.comet, state_dir, attached))
    return [m for m in monitors if m is not None]
