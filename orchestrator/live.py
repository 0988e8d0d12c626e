"""Following a job: the live view of ``orch submit --follow`` and the progress line of ``orch status``.

UI only. Progress comes from the files the trainer writes in its run directory, read through the
run contract (``engine.run_contract``: ``status.json`` and ``metrics.jsonl``), so it works for any
cluster whose run directory this machine can read; states come from the backend.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from engine.run_contract import last_metrics, read_status

from .recovery import recovering as restarts_left, resuming_phrase
from .registry import JobRecord, Registry
from .types import JobState

POLL_SECONDS = (0.5, 1.0, 2.0, 2.0, 5.0)  # back off, like submitit's watcher, but stay responsive


def progress_line(run_dir: Path, *, with_metrics: bool = True, job_state: JobState | None = None,
                  restarts: int = 0) -> str:
    """The trainer's progress. While the job recovers (RESTARTING, or RUNNING with restarts left,
    e.g. a pod whose container restarts) its last attempt's "failed" is shown as the recovery it
    is (where it stopped, where it resumes); "failed" is kept for failures."""
    status = read_status(run_dir)
    if not status:
        return ""
    recovering = status.get("state") == "failed" and (
        job_state == JobState.RESTARTING or (job_state == JobState.RUNNING and restarts_left(run_dir, restarts)))
    where = f"step {status.get('step', '?')}/{status.get('total_steps', '?')}"
    parts = ([f"trainer restarting: stopped at {where}, {resuming_phrase(run_dir)}"] if recovering
             else [f"trainer {status.get('state', '?')}: {where}"])
    if with_metrics:
        m = last_metrics(run_dir)
        for key, fmt in (("loss", "loss {:.4f}"), ("tokens_per_s", "{:,.0f} tok/s"), ("tflops", "{:.3g} TFLOP/s"),
                         ("mfu", "MFU {:.1%}"), ("lr", "lr {:.2e}"), ("world_size", "world {}"),
                         ("restart_count", "restarts {}"), ("comm_calls_per_step", "{:.0f} collectives/step")):
            if isinstance(m.get(key), (int, float)):
                parts.append(fmt.format(m[key]))
        if isinstance(m.get("comm_bytes_per_step"), (int, float)):
            from .check import human_bytes

            parts.append(f"comm {human_bytes(m['comm_bytes_per_step'])}/step per rank")
        if isinstance(m.get("breakdown_ms"), dict):
            parts.append("ms/step " + " ".join(f"{k} {v:.1f}" for k, v in m["breakdown_ms"].items()
                                               if isinstance(v, (int, float)) and v > 0))
    line = ", ".join(parts)
    if status.get("state") == "failed" and status.get("error"):
        line += f"\n  {'why it stopped' if recovering else 'trainer error'}: {status['error']}"
    return line


def missing_metrics_note(cluster: str, job_id: str, run_dir: Path) -> str:
    """Why ``orch status --metrics`` has no trainer line to show, and where to look instead."""
    if cluster == "kubernetes":
        return (f"no trainer metrics yet: a Kubernetes run keeps them on its shared volume (kubernetes."
                f"checkpoint_pvc or shared_volume), else inside its pods; `orch logs {job_id}` shows the "
                f"trainer's step lines (loss, tokens/s, MFU)")
    return f"no trainer metrics recorded yet in {run_dir}"


def _view(record: JobRecord, nodes: dict[str, str], progress: Progress, task: Any) -> Group:
    run_dir = Path(record.run_dir)
    status, metrics = read_status(run_dir), last_metrics(run_dir)
    total = status.get("total_steps") or metrics.get("total_steps")
    step = status.get("step") or metrics.get("step") or 0
    if total:
        progress.update(task, total=total, completed=step)
    table = Table(title=f"{record.job_id} on {record.cluster}: {record.state.value}", expand=False)
    for col in ("node", "state", "step", "loss", "tokens/s", "world", "restarts"):
        table.add_column(col)
    rows = nodes or {"job": record.state.value}
    for node, state in sorted(rows.items()):
        table.add_row(node, state, str(step), _fmt(metrics.get("loss"), "{:.4f}"),
                      _fmt(metrics.get("tokens_per_s"), "{:,.0f}"), str(metrics.get("world_size", "")),
                      str(max(record.restarts, int(metrics.get("restart_count") or 0))))
    return Group(table, progress)


def _fmt(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else ""


def wait_for_job(job_id: str, *, console: Console, live: bool, timeout_s: float | None = None) -> JobRecord:
    """Poll until the job finishes; with ``live`` show per-node states and training progress."""
    from . import jobs

    registry = Registry()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    progress = Progress(TextColumn("steps"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        console=console)
    task = progress.add_task("steps", total=None)
    polls = 0
    record, st = jobs.status(job_id, registry)
    with Live(_view(record, st.nodes, progress, task), console=console, refresh_per_second=2,
              transient=False) if live else _NoLive() as view:
        while not record.state.finished:
            time.sleep(POLL_SECONDS[min(polls, len(POLL_SECONDS) - 1)])
            polls += 1
            record, st = jobs.status(job_id, registry)
            if live:
                view.update(_view(record, st.nodes, progress, task))
            if deadline is not None and time.monotonic() > deadline:
                break
    return record


class _NoLive:
    def __enter__(self) -> _NoLive:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, _: object) -> None:
        return None
