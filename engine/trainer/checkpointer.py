"""When the bundled trainer saves and resumes; the engine does the writing and reading.

The trainer only says "save now" or "resume if there is something to resume"; the checkpoint
format (sharded ``step-<N>/`` directories, a manifest, the ``latest`` pointer, resharding on a
new world size) belongs to ``Engine.save_checkpoint`` / ``Engine.load_checkpoint``. The trainer's
own state (step, data position) travels in ``client_state`` through objects with
``state_dict``/``load_state_dict``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.run_contract import CHECKPOINT_DONE, CHECKPOINT_REQUEST, DEFAULT_CHECKPOINT_KEEP, ENV_CHECKPOINT_ASYNC


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
    keep: int = DEFAULT_CHECKPOINT_KEEP
    control_dir: Path | None = None
    is_rank0: bool = True
    # None: the ds_config's checkpoint.async_save decides; the job spec's checkpoint.async_save
    # reaches the trainer as ORCH_CHECKPOINT_ASYNC=1.
    async_save: bool | None = field(default_factory=lambda: os.environ.get(ENV_CHECKPOINT_ASYNC) == "1" or None)
    last_saved_step: int | None = field(default=None, init=False)
    _answered: str | None = field(default=None, init=False)

    def resume(self, engine: Any, state: dict[str, Stateful]) -> int:
        """Load ``<save_dir>/latest`` if it exists; returns the step to continue from (0 if none)."""
        if not (self.save_dir / "latest").exists():
            return 0
        _path, client_state = engine.load_checkpoint(str(self.save_dir))
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
            return (self.control_dir / CHECKPOINT_REQUEST).read_text()
        except OSError:
            return None

    def save(self, engine: Any, step: int, state: dict[str, Stateful]) -> bool:
        """Every rank calls this together; the engine keeps the newest ``keep`` checkpoints."""
        client_state = {"step": step, **{name: obj.state_dict() for name, obj in state.items()}}
        engine.save_checkpoint(str(self.save_dir), client_state=client_state, keep=self.keep,
                               async_save=self.async_save)
        self.last_saved_step = step
        request = self._request()
        if request is not None and request != self._answered:
            # the launcher requeues as soon as it reads checkpoint-done: the files must be complete
            engine.wait_for_checkpoint()
            assert self.control_dir is not None
            (self.control_dir / CHECKPOINT_DONE).write_text(f"{step}\n")
            self._answered = request
        return True
