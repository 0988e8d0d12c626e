"""Hugging Face ``Trainer`` jobs under orch: progress records, and resume after any restart.

Three lines make an HF script first-class on every orch cluster::

    args: ["--output_dir", "{checkpoint_dir}", "--deepspeed", "{ds_config}", ...]   # the job spec
    trainer = Trainer(..., callbacks=[OrchCallback()])                               # progress
    trainer.train(resume_from_checkpoint=resume_checkpoint(training_args.output_dir))  # resume

``OrchCallback`` writes what the bundled trainer writes (``status.json`` and ``metrics.jsonl`` in
``$ORCH_RUN_DIR``, through the run contract's writers), so ``orch status --metrics``, the live
view of ``orch submit --follow`` and ``orch plot`` read an HF run like any other. Only the world
process zero writes; outside an orch job (no ``ORCH_RUN_DIR``) the callback does nothing.

``resume_checkpoint`` finds HF's newest complete ``checkpoint-<step>`` under the output
directory (default ``$ORCH_CHECKPOINT_DIR``): after torchrun restarts the workers, Slurm requeues
the job or a pod restarts, the script continues from there, or starts fresh when there is none.

transformers is optional for orch (``pip install 'orch[hf]'``); this module is the only part of
the engine that imports it.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from engine import run_contract as contract

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("engine.integrations.transformers needs Hugging Face transformers: "
                      "pip install 'orch[hf]' (or: pip install transformers accelerate)") from exc

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # HF's PREFIX_CHECKPOINT_DIR + "-<global step>"
TRAINER_STATE = "trainer_state.json"                 # HF writes it last into a checkpoint
STATUS_EVERY_S = 1.0                                 # status.json between log steps, at most this often


def resume_checkpoint(output_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The newest complete HF checkpoint (``checkpoint-<step>`` holding ``trainer_state.json``)
    under ``output_dir``, else under ``$ORCH_CHECKPOINT_DIR``; None when there is none yet.

    A checkpoint cut short by a crash lacks ``trainer_state.json`` (HF writes it after the model,
    optimizer and RNG states) and is passed over, so a restart resumes from the one before."""
    folder = output_dir if output_dir is not None else os.environ.get(contract.ENV_CHECKPOINT_DIR)
    if not folder:
        return None
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return None
    complete = [(int(m.group(1)), p) for p in entries
                if (m := CHECKPOINT_NAME.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return str(max(complete)[1]) if complete else None


def _global_batch(args: Any) -> int:
    """Samples per optimizer step across the job (HF's total train batch size)."""
    return int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * max(1, args.world_size)


class OrchCallback(TrainerCallback):
    """Writes an HF Trainer run's progress through orch's run contract.

    Records, as the bundled trainer's (engine/trainer/metrics.py): one ``start`` record per
    (re)start of training (the step it resumed from, world size, restart count: ``orch plot``
    draws restarts from these), one ``train`` record per HF log step (step, loss, lr, grad norm,
    samples/s, tokens/s when HF counts input tokens, i.e. ``include_num_input_tokens_seen``),
    ``eval`` records, and ``status.json`` (running, then finished, with step and max steps).
    """

    def __init__(self, run_dir: str | os.PathLike[str] | None = None) -> None:
        explicit = run_dir if run_dir is not None else os.environ.get(contract.ENV_RUN_DIR)
        self.run_dir = Path(explicit) if explicit else None
        self._last: tuple[float, int, int] | None = None  # (time, step, input tokens seen) at the last record
        self._status_at = 0.0
        self._restarts = 0

    def _writes(self, state: Any) -> bool:
        return self.run_dir is not None and bool(state.is_world_process_zero)

    def _status(self, state_name: str, args: Any, state: Any, **fields: Any) -> None:
        assert self.run_dir is not None
        contract.write_status(self.run_dir, state_name, step=state.global_step, total_steps=state.max_steps,
                              world_size=args.world_size, restart_count=self._restarts,
                              program="transformers.Trainer", **fields)
        self._status_at = time.monotonic()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._writes(state):
            return
        assert self.run_dir is not None
        self._last = (time.monotonic(), state.global_step, int(state.num_input_tokens_seen or 0))
        # This process's environment counts only its own agent's restarts (a node whose workers were
        # restarted because another node's failed still sees 0); the agents' record counts the job's.
        self._restarts = max(contract.restart_count(),
                             contract.job_restart_count() + contract.agent_restarts(self.run_dir))
        contract.append_record(self.run_dir, {
            "kind": "start", "step": state.global_step, "total_steps": state.max_steps,
            "world_size": args.world_size, "restart_count": self._restarts,
            "global_batch": _global_batch(args), "program": "transformers.Trainer"})
        self._status("running", args, state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._writes(state) and time.monotonic() - self._status_at >= STATUS_EVERY_S:
            self._status("running", args, state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not self._writes(state) or not logs:
            return
        assert self.run_dir is not None
        if "loss" in logs:  # eval metrics come through on_evaluate
            contract.append_record(self.run_dir, self._train_record(args, state, logs))
            self._status("running", args, state)

    def _train_record(self, args: Any, state: Any, logs: dict[str, Any]) -> dict[str, Any]:
        now, step, tokens = time.monotonic(), state.global_step, int(state.num_input_tokens_seen or 0)
        then, step_then, tokens_then = self._last or (now, step, tokens)
        self._last = (now, step, tokens)
        elapsed, steps = now - then, step - step_then
        samples_per_s = steps * _global_batch(args) / elapsed if elapsed > 0 and steps > 0 else None
        tokens_per_s = (tokens - tokens_then) / elapsed if elapsed > 0 and tokens > tokens_then else None
        return {
            "kind": "train", "step": step, "total_steps": state.max_steps, "epoch": logs.get("epoch"),
            "loss": float(logs["loss"]), "lr": _number(logs.get("learning_rate")),
            "grad_norm": _number(logs.get("grad_norm")), "samples_per_s": samples_per_s,
            "tokens_per_s": tokens_per_s, "step_time_s": elapsed / steps if steps > 0 else None,
            "world_size": args.world_size, "restart_count": self._restarts,
        }

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        if self._writes(state) and metrics and "eval_loss" in metrics:
            assert self.run_dir is not None
            contract.append_record(self.run_dir, {"kind": "eval", "step": state.global_step,
                                                  "eval_loss": float(metrics["eval_loss"])})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._writes(state):
            self._status("finished", args, state)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None
