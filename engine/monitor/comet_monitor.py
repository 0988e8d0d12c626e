"""``comet``: a Comet experiment per job, with DeepSpeed's keys and its offline mode.

Keys as DeepSpeed 0.19.8 reads them: ``api_key``, ``project``, ``workspace`` (each may also come
from Comet's own config file or ``COMET_*`` variables), ``experiment_name``, ``experiment_key``,
``mode`` (Comet's start mode: ``get``, ``create`` or ``get_or_create``), ``online`` (false: an
offline experiment archived under ``COMET_OFFLINE_DIRECTORY``, uploaded later with
``comet upload``) and ``samples_log_interval`` (an event name is logged again only once that
many more samples have been seen, as DeepSpeed does).

Like W&B, an elastic restart continues the same experiment: its key is kept in the run
directory (``monitor/comet.json``) and passed back with mode ``get_or_create``, and steps
logged before the restart are skipped. Rank 0 only; a missing package or credentials give one
warning and training goes on.
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import Event, Sink, job_name, load_state, save_state, warn_once
from .clients import missing_client_message

CREDENTIALS_HINT = ("set comet.api_key or COMET_API_KEY, or \"online\": false for an offline experiment "
                    "(uploaded later with `comet upload`)")


class SampleInterval:
    """DeepSpeed's rule: log a name again once ``interval`` more samples have passed."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self._last: dict[str, int] = {}

    def due(self, name: str, samples: int) -> bool:
        last = self._last.get(name)
        if last is not None and samples - last < self.interval:
            return False
        self._last[name] = samples
        return True


class CometMonitor(Sink):
    name = "comet"

    def __init__(self, experiment: Any, interval: int, state_dir: Path | None) -> None:
        super().__init__(state_dir)
        self.experiment = experiment
        self.schedule = SampleInterval(interval)

    def emit(self, events: Sequence[Event]) -> None:
        for name, value, step in events:
            if self.schedule.due(name, step):
                self.experiment.log_metric(name, value, step=step)

    def finish(self) -> None:
        self.experiment.end()


def open_comet(section: Any, state_dir: Path | None, run_config: Mapping[str, Any]) -> CometMonitor | None:
    """The monitor, or None after one warning saying why there is none."""
    try:
        import comet_ml
    except ImportError:
        warn_once("comet-missing", missing_client_message("comet"))
        return None
    saved = load_state(state_dir, "comet").get("experiment_key")
    key = section.experiment_key or saved or (uuid.uuid4().hex if state_dir is not None else None)
    mode = section.mode or ("get_or_create" if key else None)
    try:
        experiment = comet_ml.start(api_key=section.api_key, project=section.project, workspace=section.workspace,
                                    experiment_key=key, mode=mode, online=section.online)
    except Exception as exc:
        warn_once("comet-init", f"comet.enabled is set but Comet could not start an experiment ({exc}); "
                  f"{CREDENTIALS_HINT}. Training goes on without Comet.")
        return None
    name = section.experiment_name or job_name()
    if name:
        experiment.set_name(name)
    if not saved:
        experiment.log_parameters(_flat(run_config))
    save_state(state_dir, "comet", {"experiment_key": experiment.get_key()})
    return CometMonitor(experiment, section.samples_log_interval, state_dir)


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Comet parameters are flat: ``{"ds_config": {"zero_optimization": {"stage": 2}}}`` ->
    ``{"ds_config.zero_optimization.stage": 2}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out
