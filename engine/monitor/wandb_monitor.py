"""``wandb``: a Weights & Biases run per job, resumed (not restarted) by elastic restarts.

DeepSpeed's section keys keep their meaning (``project``, ``group``, ``team`` = W&B entity).
Events are logged with their step (the samples seen, as DeepSpeed does), one ``wandb.log``
per batch of events. The run's id is kept in the run directory (``monitor/wandb.json``), so
a restarted trainer calls ``wandb.init(id=<same id>, resume="allow")`` and the curves continue
in the same run; steps W&B already holds are skipped (wandb_history.py: the server's step
online, the earlier attempts' offline files offline), since W&B refuses, or would double, a step
it has seen, while steps a killed attempt handed over but W&B never stored are logged again. ``WANDB_RUN_ID`` still wins when set.

Only rank 0 opens a run. A missing package, missing credentials or an unreachable server give
one warning and training goes on: a dashboard outage must not cost a training run.
"""
from __future__ import annotations

import os
import secrets
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import Event, Sink, job_name, load_state, save_state, warn_once
from .clients import missing_client_message

CREDENTIALS_HINT = ("run `wandb login` or set WANDB_API_KEY; set WANDB_MODE=offline to keep the run "
                    "on disk and `wandb sync` it later")


class WandbMonitor(Sink):
    name = "wandb"

    def __init__(self, run: Any) -> None:
        # No StepMark file: what W&B holds is read from W&B itself (server or offline files),
        # since steps handed to a killed process may never have reached either.
        super().__init__(None)
        from .wandb_history import held_through

        self.mark.resume_after = held_through(run)
        self.run = run

    def emit(self, events: Sequence[Event]) -> None:
        # One row per step: W&B needs steps in increasing order, and one call per step is cheapest.
        row: dict[str, Any] = {}
        step = events[0][2]
        for name, value, event_step in events:
            if event_step != step:
                self.run.log(row, step=step)
                row, step = {}, event_step
            row[name] = value
        self.run.log(row, step=step)

    def finish(self) -> None:
        self.run.finish()


def open_wandb(section: Any, run_dir: Path | None, state_dir: Path | None,
               run_config: Mapping[str, Any]) -> WandbMonitor | None:
    """The monitor, or None after one warning saying why there is none."""
    try:
        import wandb
    except ImportError:
        warn_once("wandb-missing", missing_client_message("wandb"))
        return None
    run_id = _run_id(state_dir)
    kwargs: dict[str, Any] = {
        "project": section.project, "group": section.group, "entity": section.team,
        "id": run_id, "resume": "allow", "config": dict(run_config), "name": job_name(),
    }
    if run_dir is not None and not os.environ.get("WANDB_DIR"):
        kwargs["dir"] = str(run_dir)
    try:
        run = wandb.init(**kwargs)
    except Exception as exc:  # no credentials, no network, a bad entity: W&B's own message says which
        warn_once("wandb-init", f"wandb.enabled is set but W&B could not start a run ({exc}); "
                  f"{CREDENTIALS_HINT}. Training goes on without W&B.")
        return None
    save_state(state_dir, "wandb", {"run_id": run.id, "project": section.project})
    return WandbMonitor(run)


def _run_id(state_dir: Path | None) -> str | None:
    explicit = os.environ.get("WANDB_RUN_ID")
    if explicit:
        return explicit
    if state_dir is None:
        return None  # W&B picks one; no run directory to remember it in (DeepSpeed's behaviour)
    saved = load_state(state_dir, "wandb").get("run_id")
    return str(saved) if saved else new_run_id()


def new_run_id() -> str:
    """An id of W&B's shape (8 lowercase letters and digits); chosen here so it can be saved first."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))
