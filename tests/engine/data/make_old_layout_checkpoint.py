"""Writes a 2-rank checkpoint in the layout before shards were even per unit (each parameter
group cut into N contiguous ranges): tests/engine/data/zero3_old_layout/ (stage 3) and
tests/engine/data/zero2_old_layout/ (stage 2, reduce buckets of 2000 elements).

Run with the engine of the last commit with that layout on the path: a452289 for stage 3,
2a88b26 for stages 1-2 (before reduce buckets were sharded evenly), e.g.:

    git archive a452289 engine | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old torchrun --nproc-per-node 2 tests/engine/data/make_old_layout_checkpoint.py OUT [STAGE]

``OUT/expected.pt`` holds rank 0's full fp32 weights and the losses, to compare against.
"""
import sys

import torch

import engine
from engine.models import build_model

MODEL = dict(n_layer=1, d_model=32, n_head=2, vocab_size=128, seq_len=16)
CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 40}}
ZERO12 = {"reduce_bucket_size": 2000}   # stages 1-2: several buckets, so the new layout has several spans


def config(stage: int) -> dict:
    return CONFIG if stage == 3 else dict(CONFIG, zero_optimization=dict(ZERO12, stage=stage))


def batches(rank: int, steps: int = 3):
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        yield torch.randint(0, MODEL["vocab_size"], (2, MODEL["seq_len"]), generator=g)


def main(out: str, stage: int = 3) -> None:
    engine.init_distributed()
    model = build_model("tiny", seed=7, **MODEL)
    eng, opt, _, _ = engine.initialize(model=model, config=config(stage))
    losses = []
    for x in batches(eng.global_rank):
        loss = eng(x, x)
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
    eng.save_checkpoint(out, tag="step-3")
    if stage == 3:
        state = opt.full_state_dict(eng.module)
    else:
        state = {k: v.detach().cpu().clone() for k, v in eng.module.state_dict().items()}
    if eng.global_rank == 0:
        torch.save({"state_dict": state, "losses": losses}, f"{out}/expected.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
