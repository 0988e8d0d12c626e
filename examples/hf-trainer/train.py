"""An HF Trainer script as the Hugging Face DeepSpeed docs write it, made elastic under orch.

What is orch-specific: ``OrchCallback()`` in ``callbacks`` (progress for ``orch status --metrics``,
the live view and ``orch plot``) and ``resume_checkpoint(...)`` in ``trainer.train`` (continue from
the newest checkpoint after a worker restart, a Slurm requeue or a pod restart). The job spec
passes ``--output_dir {checkpoint_dir} --deepspeed {ds_config}``; everything else is plain HF.

The model is a tiny GPT-2 built from its config and the data fixed random tokens, so the example
runs anywhere without a download; put your own model and dataset in their place.
"""
import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments

from engine.integrations.transformers import OrchCallback, resume_checkpoint


def token_dataset(samples: int = 64, seq_len: int = 16, vocab: int = 96) -> list[dict[str, torch.Tensor]]:
    tokens = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in tokens]


def main() -> None:
    (training_args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    trainer = Trainer(model=model, args=training_args, train_dataset=token_dataset(),
                      callbacks=[OrchCallback()])
    trainer.train(resume_from_checkpoint=resume_checkpoint(training_args.output_dir))


if __name__ == "__main__":
    main()
