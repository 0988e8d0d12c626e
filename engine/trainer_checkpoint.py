"""When the bundled trainer saves and resumes; the engine does the writing and reading.

The trainer only says "save now" or "resume if there is something to resume"; the checkpoint
format (sharded ``step-<N>/`` directories, a manifest, the ``latest`` pointer, resharding on a
new world size) belongs to ``Engine.save_checkpoint`` / ``Engine.load_checkpoint``. The trainer's
own state (step, data position) travels in ``client_state`` through objects with
``state_dict``/``load_state_dict``.
"""
from __future__ import annotations

import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

_STEP_DIR = re.compile(r"^step-(\d+)$")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Checkpointer:
    """Save every ``every`` steps (0 = only on request), keep the newest ``keep``, resume from latest.

    ``control_dir`` is where a launcher asks for an immediate checkpoint: the Slurm template
    writes ``checkpoint-request`` there shortly before the time limit and waits for
    ``checkpoint-done`` before requeueing the job.
    """

    save_dir: Path
    every: int = 0
    keep: int = 3
    control_dir: Path | None = None
    is_rank0: bool = True
    last_saved_step: int | None = field(default=None, init=False)
    _answered: str | None = field(default=None, init=False)

    def resume(self, engine: Any, state: dict[str, Stateful]) -> int:
        """Load ``<save_dir>/latest`` if it exists; returns the step to continue from (0 if none)."""
        if not (self.save_dir / "latest").exists():
            return 0
        load = getattr(engine, "load_checkpoint", None)
        if load is None:
            warnings.warn(f"{self.save_dir}/latest exists but this engine cannot load checkpoints; "
                          "starting from step 0", stacklevel=2)
            return 0
        _path, client_state = load(str(self.save_dir))
        client_state = client_state or {}
        for name, obj in state.items():
            if name in client_state:
                obj.load_state_dict(client_state[name])
        step = int(client_state.get("step", getattr(engine, "global_steps", 0)))
        self.last_saved_step = step
        return step

    def due(self, step: int) -> bool:
        """A periodic save is due after ``step`` optimizer steps."""
        return self.every > 0 and step % self.every == 0 and step != self.last_saved_step

    def requested(self) -> bool:
        """Rank 0 sees a launcher's checkpoint request it has not answered yet.

        Only rank 0 looks (nodes may see a shared filesystem at different moments); the caller
        spreads the answer to every rank before they save together.
        """
        request = self._request()
        return request is not None and request != self._answered

    def _request(self) -> str | None:
        if not self.is_rank0 or self.control_dir is None:
            return None
        try:
            return (self.control_dir / "checkpoint-request").read_text()
        except OSError:
            return None

    def save(self, engine: Any, step: int, state: dict[str, Stateful]) -> bool:
        """Every rank calls this together. Returns False when the engine cannot save yet."""
        save = getattr(engine, "save_checkpoint", None)
        if save is None:
            if self.last_saved_step is None and self.is_rank0:
                warnings.warn("this engine has no save_checkpoint yet; not saving", stacklevel=2)
            self.last_saved_step = step
            return False
        client_state = {"step": step, **{name: obj.state_dict() for name, obj in state.items()}}
        save(str(self.save_dir), client_state=client_state)
        self.last_saved_step = step
        if self.is_rank0:
            self._prune()
            request = self._request()
            if request is not None and request != self._answered:
                assert self.control_dir is not None
                (self.control_dir / "checkpoint-done").write_text(f"{step}\n")
                self._answered = request
        return True

    def _prune(self) -> None:
        """Delete all but the newest ``keep`` ``step-<N>`` directories (never the one ``latest`` names)."""
        latest_file = self.save_dir / "latest"
        latest = latest_file.read_text().strip() if latest_file.is_file() else None
        steps = sorted(
            (int(m.group(1)), p) for p in self.save_dir.iterdir()
            if p.is_dir() and (m := _STEP_DIR.match(p.name))
        )
        for _, path in steps[: max(0, len(steps) - self.keep)]:
            if path.name != latest:
                shutil.rmtree(path, ignore_errors=True)
