"""Telling a recovery from a failure, and saying where the job resumes.

When a node of an elastic job is lost (or a worker dies and restarts are left), the trainer's
ranks stop with an error and write ``status.json`` with ``state: failed``; a moment later the
torchrun agents re-form and the trainer resumes from the latest checkpoint. Between the two, the
run directory says "failed" although the job is healthy. A backend whose job is still running
asks ``recovering`` whether that is such a window, and says so with ``restarting_detail``:
``restarting after node n2 was lost; resuming from step 30``. "failed" stays for failures: a job
with no restarts left, or one that has ended.

Reads the run directory only (through the run contract); no torch, no cluster calls.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.run_contract import CHECKPOINTS_DIR, read_status

_STEP_TAG = re.compile(r"^step-(\d+)$")   # the bundled trainer's checkpoint tags (engine/checkpoint)
LATEST = "latest"                          # the file naming the newest complete checkpoint


def spec_record(run_dir: str | Path) -> dict[str, Any]:
    """The spec as orch stored it in the run directory (job.json); {} if unreadable."""
    try:
        spec = json.loads((Path(run_dir) / "job.json").read_text())
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def checkpoint_dir(run_dir: str | Path, spec: dict[str, Any] | None = None) -> Path:
    """Where the job's checkpoints go: the spec's ``checkpoint.dir`` or ``<run dir>/checkpoints``."""
    spec = spec_record(run_dir) if spec is None else spec
    configured = (spec.get("checkpoint") or {}).get("dir") if isinstance(spec.get("checkpoint"), dict) else None
    return Path(configured) if configured else Path(run_dir) / CHECKPOINTS_DIR


def resume_step(run_dir: str | Path, spec: dict[str, Any] | None = None) -> int | None:
    """The step a restart resumes from: the latest complete checkpoint's (None: there is none yet)."""
    ckpt = checkpoint_dir(run_dir, spec)
    try:
        tag = (ckpt / LATEST).read_text().strip()
    except OSError:
        return None
    match = _STEP_TAG.match(tag)
    if match:
        return int(match.group(1))
    try:  # a tag of the user's choosing: the manifest knows the step
        step = json.loads((ckpt / tag / "manifest.json").read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def recovering(run_dir: str | Path, restarts_used: int, incarnations: int = 1,
               spec: dict[str, Any] | None = None) -> bool:
    """A running job whose trainer says "failed" while the torchrun agents still have restarts
    (``max_restarts`` per incarnation of the job: a Slurm requeue starts a new one)."""
    if read_status(run_dir).get("state") != "failed":
        return False
    spec = spec_record(run_dir) if spec is None else spec
    max_restarts = spec.get("max_restarts", 3)
    budget = (max_restarts if isinstance(max_restarts, int) else 3) * max(incarnations, 1)
    return restarts_used < budget


def resuming_phrase(run_dir: str | Path, spec: dict[str, Any] | None = None, *, later: bool = False) -> str:
    """``resuming from step 30`` (``will resume ...`` for a job still waiting to start again)."""
    step = resume_step(run_dir, spec)
    if step is None:
        return f"{'will start' if later else 'starting'} over (no checkpoint yet)"
    return f"{'will resume' if later else 'resuming'} from step {step}"


def restarting_detail(run_dir: str | Path, lost: Sequence[str] = (), spec: dict[str, Any] | None = None,
                      node_word: str = "node") -> str:
    """``restarting after node n2 was lost; resuming from step 30`` (or after a worker stopped)."""
    if lost:
        names = ", ".join(lost)
        cause = f"{f'{node_word} ' if node_word else ''}{names} {'was' if len(lost) == 1 else 'were'} lost"
    else:
        step = read_status(run_dir).get("step")
        cause = f"a worker stopped at step {step}" if isinstance(step, int) else "a worker stopped"
    return f"restarting after {cause}; {resuming_phrase(run_dir, spec)}"
