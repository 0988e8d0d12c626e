"""The monitor interface and the fan-out the engine and the trainer write through.

DeepSpeed scripts log through ``model_engine.monitor.write_events([(name, value, step), ...])``
and DeepSpeed's engine writes ``Train/Samples/lr`` (and ``loss_scale`` under fp16) at every
optimizer step, with the number of samples seen as the step. orch keeps that interface, so a
dashboard built on DeepSpeed's names keeps working, and adds the trainer's own figures.

Why a high-water mark: an elastic restart resumes from the last checkpoint and replays the
steps after it. A monitor that simply appended again would log those steps twice (W&B and
Comet show a zig-zag, CSV files get repeated rows). Each sink therefore remembers, in the run
directory, the highest step it has written; after a restart it skips events up to that step.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

Event = tuple[str, Any, int]  # (name, value, step): DeepSpeed's tensorboard-style event

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning once per process (a missing client must not flood the log),
    through the engine's logger (rank 0's console, stderr)."""
    if key not in _warned:
        _warned.add(key)
        from engine.log import get_logger

        get_logger("engine.monitor").warning(message)


class Monitor(Protocol):
    """A destination for events; implementations swallow their own client errors (see ``Sink``)."""

    def write_events(self, event_list: Sequence[Event]) -> None: ...

    def close(self) -> None: ...


class StepMark:
    """The highest step a sink has written, kept in ``<state_dir>/<name>.step`` across restarts.

    One small line per write (the file stays open, line-buffered): cheaper than an atomic
    rename per step, and the last complete line is the mark after a kill.
    """

    def __init__(self, state_dir: Path | None, name: str) -> None:
        self.resume_after = -1
        self._file = None
        self._last = -1
        if state_dir is None:
            return
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / f"{name}.step"
        self.resume_after = _last_int(path)
        self._last = self.resume_after
        self._file = path.open("w", buffering=1)
        if self.resume_after >= 0:
            self._file.write(f"{self.resume_after}\n")

    def fresh(self, events: Iterable[Event]) -> list[Event]:
        """The events a previous attempt of this run has not written yet."""
        return [e for e in events if e[2] > self.resume_after]

    def written(self, events: Sequence[Event]) -> None:
        top = max((e[2] for e in events), default=-1)
        if top > self._last:
            self._last = top
            if self._file is not None:
                self._file.write(f"{top}\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _last_int(path: Path) -> int:
    try:
        lines = path.read_text().split()
    except OSError:
        return -1
    for line in reversed(lines):
        if line.lstrip("-").isdigit():
            return int(line)
    return -1


class Sink:
    """Base of the client monitors: resume filtering, and a client error disables, never crashes."""

    name = "monitor"

    def __init__(self, state_dir: Path | None) -> None:
        self.mark = StepMark(state_dir, self.name)
        self.failed = False

    def write_events(self, event_list: Sequence[Event]) -> None:
        if self.failed:
            return
        events = self.mark.fresh(event_list)
        if not events:
            return
        try:
            self.emit(events)
        except Exception as exc:  # a monitoring outage must not stop training
            self.failed = True
            warn_once(f"{self.name}-write", f"{self.name}: writing events failed ({exc!r}); "
                      f"no more events go to {self.name} in this run. Training goes on.")
            return
        self.mark.written(events)

    def emit(self, events: Sequence[Event]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        try:
            if not self.failed:
                self.finish()
        except Exception as exc:
            warn_once(f"{self.name}-close", f"{self.name}: closing failed ({exc!r})")
        finally:
            self.mark.close()

    def finish(self) -> None:
        """Flush and end the client's run (overridden by sinks that hold one)."""


class MonitorMaster:
    """DeepSpeed's ``engine.monitor``: fans events out to the enabled monitors on rank 0.

    ``enabled`` is True when any monitor is configured, on every rank (as in DeepSpeed), so
    callers can skip building events; only rank 0 has monitors to write to. The clients open
    on first use (or an explicit ``open``), so the bundled trainer can first say which run
    directory and run config they belong to.
    """

    def __init__(self, opener: Callable[["MonitorMaster"], list[Monitor]] | None = None, *,
                 enabled: bool = False) -> None:
        self.monitors: list[Monitor] = []
        self.enabled = enabled
        self.run_dir: Path | None = None
        self.run_config: dict[str, Any] = {}
        self._opener = opener

    def open(self, run_dir: Path | None = None, run_config: dict[str, Any] | None = None) -> None:
        """Open the clients now, for ``run_dir`` (state, default output) with ``run_config`` attached."""
        if run_dir is not None:
            self.run_dir = Path(run_dir)
        self.run_config.update(run_config or {})
        opener, self._opener = self._opener, None
        if opener is not None:
            self.monitors = opener(self)

    def write_events(self, event_list: Sequence[Event]) -> None:
        if self._opener is not None:
            self.open()
        for monitor in self.monitors:
            monitor.write_events(event_list)

    def close(self) -> None:
        self._opener = None
        for monitor in self.monitors:
            monitor.close()
        self.monitors = []


def job_name(default: str | None = None) -> str | None:
    """The orch job's name (set in the job environment), used as a run's display name."""
    from engine.run_contract import ENV_JOB_NAME

    return os.environ.get(ENV_JOB_NAME) or default


def load_state(state_dir: Path | None, name: str) -> dict[str, Any]:
    """A sink's saved identity (``<state_dir>/<name>.json``: run id, experiment key), {} when none."""
    if state_dir is None:
        return {}
    try:
        data = json.loads((state_dir / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_state(state_dir: Path | None, name: str, payload: dict[str, Any]) -> None:
    """Replace ``<state_dir>/<name>.json`` atomically (a kill mid-write leaves the old one)."""
    if state_dir is None:
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"{name}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload) + "\n")
    os.replace(tmp, path)
