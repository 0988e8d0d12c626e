"""A Hugging Face Trainer script as users write them, for orch's HF tests (tests/orchestrator/test_hf_jobs.py).

Arguments are parsed with ``HfArgumentParser`` (so any unexpected flag kills it, as it would a
user's script); the ds_config reaches it through ``--deepspeed {ds_config}`` in the job spec. The
model is a tiny GPT-2 built from its config (no download) trained on fixed random tokens.

``--fail_rank R --fail_step S``: rank R exits with code 1 once, at the end of step S (a marker
file in the output directory makes the restarted worker carry on), to test restarts and resume.
Rank 0 appends every logged ``(step, loss)`` to ``<output_dir>/losses.jsonl``.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainerCallback,
                          TrainingArguments)

from engine.integrations.transformers import OrchCallback, resume_checkpoint


@dataclass
class ScriptArguments:
    fail_rank: int = -1
    fail_step: int = -1
    samples: int = 64


class FailOnce(TrainerCallback):
    """Exit this rank once at the end of ``step`` (a test's stand-in for a crashed worker)."""

    def __init__(self, rank: int, step: int, marker: Path) -> None:
        self.rank, self.step, self.marker = rank, step, marker

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and args.process_index == self.rank and not self.marker.exists():
            self.marker.write_text(str(self.step))
            os._exit(1)


class LossLog(TrainerCallback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n")


def token_dataset(samples: int, seq_len: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (samples, seq_len), generator=generator)
    return [{"input_ids": row, "labels": row} for row in tokens]


def main() -> None:
    training_args, script = HfArgumentParser((TrainingArguments, ScriptArguments)).parse_args_into_dataclasses()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=16, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    out = Path(training_args.output_dir)
    callbacks = [OrchCallback(), LossLog(out / "losses.jsonl")]
    if script.fail_rank >= 0:
        callbacks.append(FailOnce(script.fail_rank, script.fail_step, out / "failed-once"))
    trainer = Trainer(model=model, args=training_args, train_dataset=token_dataset(script.samples, 16, 96),
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume_checkpoint(training_args.output_dir))


if __name__ == "__main__":
    main()
