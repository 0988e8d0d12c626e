"""The log files of a Slurm job, read and followed.

A job writes one file per node (srun ``--output=<run dir>/logs/node-%N.log``: the torchrun agent
and the ranks it started on that node) and the batch shell's own output
(``slurm-<job id>.out``: the orch lines, srun's errors, the pre-timeout handler). All are opened
in append mode, so a requeued job continues the same files.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from engine.run_contract import RunPaths

from ...errors import UserError
from ...logtail import follow as follow_files

BATCH = "batch"


def log_files(run_dir: Path, native_id: str) -> dict[str, Path]:
    """Stream name -> file: ``batch`` and one entry per node that has written a log so far."""
    files = {BATCH: run_dir / f"slurm-{native_id}.out"}
    for path in sorted(RunPaths(run_dir).logs.glob("node-*.log")):
        files[path.stem.removeprefix("node-")] = path
    return files


def select(files: dict[str, Path], node: str | None, *, must_exist: bool) -> dict[str, Path]:
    """All streams, or the one named ``node`` (``n1``, ``node-n1`` or ``batch``)."""
    if node is None:
        return files
    name = node.removeprefix("node-")
    if name in files and (files[name].exists() or not must_exist):
        return {name: files[name]}
    if not must_exist:
        return {name: RunPaths(files[BATCH].parent).node_log(name)}
    have = [k for k, p in files.items() if p.exists()]
    raise UserError(f"no log for node {node!r}; this job has: {', '.join(have) or 'none yet'}",
                    hint="node names are Slurm's (see `orch status`); `batch` is the batch script's output")


def follow(run_dir: Path, native_id: str, node: str | None, *, keep_going: Callable[[], bool] | None,
           poll_s: float = 0.5) -> Iterator[str]:
    """Lines of the selected logs; with ``keep_going`` set, keep reading new lines (and new
    nodes' files) until it returns False, then read what was written last and stop."""
    streams = select(log_files(run_dir, native_id), node, must_exist=keep_going is None)
    if keep_going is None and not any(p.exists() for p in streams.values()):
        raise UserError(f"no logs in {run_dir} yet",
                        hint="they appear when the job starts (`orch status`); if it has run, the run "
                             "directory must be on a filesystem the nodes share (ORCH_RUN_ROOT)")
    if node is None:  # all streams, listed again each round: a requeued job may land on new nodes
        return follow_files(lambda: log_files(run_dir, native_id), prefixed=True, keep_going=keep_going,
                            poll_s=poll_s)
    return follow_files(lambda: streams, prefixed=False, keep_going=keep_going, poll_s=poll_s)
