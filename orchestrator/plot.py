"""``orch plot``: loss, tokens/s and learning rate over steps, one colour per run, restarts marked.

Everything comes from the ``metrics.jsonl`` the trainer writes in each run directory (found
through the registry, or given as a path). A run that restarted resumes from a checkpoint and
logs some steps again: each trainer start (a ``start`` record) begins a new line segment in
the run's colour, and a dotted vertical line marks the step it resumed from. matplotlib is an
optional dependency (``pip install 'orch[plot]'``), imported only here and only when plotting.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.run_contract import RunPaths

from .errors import UserError

# (record field, y-axis label); one panel each, sharing the step axis.
PANELS: tuple[tuple[str, str], ...] = (("loss", "loss"), ("tokens_per_s", "tokens/s"), ("lr", "learning rate"))


@dataclass
class Segment:
    """The train records of one trainer start, in the order they were written."""

    records: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pairs = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        return [s for s, _ in pairs], [float(v) for _, v in pairs]


@dataclass
class RunSeries:
    label: str
    run_dir: Path
    segments: list[Segment]
    restarts: list[int]  # the step each restart resumed from

    @property
    def steps_logged(self) -> int:
        return sum(len(s.records) for s in self.segments)


def read_run(label: str, run_dir: Path) -> RunSeries:
    """Split a run's metrics.jsonl into segments at each trainer (re)start."""
    path = RunPaths(run_dir).metrics
    try:
        lines = path.read_text().splitlines()
    except OSError:
        raise UserError(f"{label}: no metrics yet ({path} does not exist)",
                        hint="the trainer writes it from the first log step on; see `orch logs`") from None
    segments, restarts = [Segment()], []
    last_restart_count = None
    for raw in lines:
        try:
            r = json.loads(raw)
        except ValueError:
            continue  # a line still being written
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            continue
        kind = r.get("kind", "train")
        if kind == "start":
            if segments[-1].records or last_restart_count is not None:
                restarts.append(r["step"])
                segments.append(Segment())
            last_restart_count = r.get("restart_count", 0)
        elif kind == "eval":
            segments[-1].evals.append(r)
        elif kind == "train":
            segments[-1].records.append(r)
    segments = [s for s in segments if s.records or s.evals]
    if not segments:
        raise UserError(f"{label}: {path} has no training records yet", hint="wait for the first log step")
    return RunSeries(label, run_dir, segments, restarts)


def resolve_runs(jobs: list[str]) -> list[RunSeries]:
    """Job ids (or names, or unique prefixes) from the registry, or run directories."""
    from .jobs import sync_run_files
    from .registry import Registry

    runs, registry = [], None
    for job in jobs:
        candidate = Path(job).expanduser()
        if candidate.is_dir() and RunPaths(candidate).metrics.exists():
            runs.append(read_run(candidate.name, candidate))
            continue
        registry = registry or Registry()
        record = registry.get(job)
        sync_run_files(record)  # a Kubernetes run's metrics are on its shared volume
        runs.append(read_run(record.job_id, Path(record.run_dir)))
    return runs


def build_figure(runs: list[RunSeries]) -> Any:
    """A matplotlib Figure: one panel per PANELS entry; lines in each panel in run order."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.6 * len(PANELS)), layout="constrained")
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (key, ylabel) in zip(axes, PANELS):
        for run, colour in zip(runs, colours):
            _draw_run(ax, run, key, colour)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("training progress" if len(runs) == 1 else f"{len(runs)} runs")
    axes[-1].set_xlabel("step")
    axes[0].legend(loc="best", fontsize="small")
    return fig


def _draw_run(ax: Any, run: RunSeries, key: str, colour: str) -> None:
    for i, segment in enumerate(run.segments):
        steps, values = segment.series(key)
        label = run.label if i == 0 else None
        ax.plot(steps, values, color=colour, marker="." if len(steps) < 30 else None, label=label,
                gid=f"{key}:{run.label}")
        if key == "loss" and segment.evals:
            e_steps = [r["step"] for r in segment.evals]
            ax.plot(e_steps, [float(r["eval_loss"]) for r in segment.evals], color=colour, linestyle="--",
                    label=f"{run.label} (eval)" if i == 0 else None, gid=f"eval_loss:{run.label}")
    for j, step in enumerate(run.restarts):
        ax.axvline(step, color=colour, linestyle=":", alpha=0.8, gid=f"restart:{run.label}",
                   label=f"{run.label} restart" if key == "loss" and j == 0 else None)


def plot_jobs(jobs: list[str], output: Path) -> tuple[Path, list[RunSeries]]:
    """Write the PNG for ``jobs``; returns its path and what was plotted."""
    if not jobs:
        raise UserError("give at least one job id or run directory", hint="see `orch list`")
    runs = resolve_runs(jobs)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("`orch plot` needs matplotlib, which is not installed",
                        hint="pip install 'orch[plot]' (or: pip install matplotlib)") from None
    fig = build_figure(runs)
    try:
        fig.savefig(output, dpi=100)
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
    return output, runs
