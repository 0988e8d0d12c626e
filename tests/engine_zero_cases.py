"""A tiny language model, its data, and the runs the ZeRO tests compare (shared by test modules).

``reference_run`` trains in one process in plain fp32 with torch's AdamW on the whole global
batch; ``engine_run`` trains the same model through ``engine.initialize`` on every rank of a
process group (or alone), splitting the same global batch into micro-batches across ranks and
accumulation steps. With the same seed both see the same data and start from the same weights,
so their losses must agree step by step.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, HIDDEN, SEQ = 64, 16, 33, 6   # 33: parameter counts that do not split evenly
GLOBAL_BATCH = 8
STEPS = 20
LR, BETAS, EPS, WEIGHT_DECAY = 1e-2, (0.9, 0.95), 1e-8, 0.01


class TinyLM(nn.Module):
    """Embedding -> Linear -> GELU -> LayerNorm -> Linear head; returns the mean token loss."""

    def __init__(self, hidden: int = HIDDEN, vocab: int = VOCAB) -> None:
        super().__init__()
        self.vocab = vocab
        self.emb = nn.Embedding(vocab, DIM)
        self.fc = nn.Linear(DIM, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.fc(self.emb(x))))
        return F.cross_entropy(self.head(h).float().reshape(-1, self.vocab), y.reshape(-1))


def make_model(seed: int = 0, **kwargs: Any) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kwargs)


def global_batch(step: int, size: int = GLOBAL_BATCH, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (size, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def ds_config(stage: int, gas: int = 1, clip: float = 0.0, precision: str = "fp32", **zero: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": GLOBAL_BATCH, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                   "weight_decay": WEIGHT_DECAY}},
        "zero_optimization": {"stage": stage, **zero},
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return cfg


def reference_run(clip: float = 0.0, steps: int = STEPS) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process fp32 training on the full global batch: the ground truth."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)
    losses = []
    for step in range(steps):
        x, y = global_batch(step)
        loss = model(x, y)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def engine_run(config: dict[str, Any], steps: int = STEPS) -> dict[str, Any]:
    """Train through the engine on this rank; returns global mean losses and final weights."""
    import torch.distributed as dist

    import engine

    model = make_model()
    eng, _, _, _ = engine.initialize(model=model, config=copy.deepcopy(config))
    rank, world = eng.global_rank, eng.world_size
    micro, gas = eng.train_micro_batch_size_per_gpu(), eng.gradient_accumulation_steps()
    losses = []
    for step in range(steps):
        x, y = global_batch(step)
        total = torch.zeros(())
        for m in range(gas):
            rows = slice((m * world + rank) * micro, (m * world + rank + 1) * micro)
            loss = eng(x[rows], y[rows])
            eng.backward(loss)
            eng.step()
            total += loss.detach().float()
        if dist.is_initialized():
            dist.all_reduce(total)
        losses.append(total.item() / (gas * world))
    return {"losses": losses, "skipped": eng.skipped_steps, "global_steps": eng.global_steps,
            "params": {n: p.detach().float().clone() for n, p in model.named_parameters()},
            "memory": eng.model_state_bytes()}


def memory_run(stage: int, hidden: int, bucket: int) -> dict[str, Any]:
    """One bf16 step of a wider model; returns Ψ and this rank's model-state bytes."""
    import engine

    model = make_model(hidden=hidden, vocab=VOCAB)
    config = ds_config(stage, precision="bf16", reduce_bucket_size=bucket, overlap_comm=True)
    config["train_batch_size"] = 4 * _world()
    eng, _, _, _ = engine.initialize(model=model, config=config)
    x, y = global_batch(0, size=4)
    eng.backward(eng(x, y))
    eng.step()
    return {"psi": sum(p.numel() for p in model.parameters()), "bytes": eng.model_state_bytes()}


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def run_cases(cases: dict[str, dict[str, Any]], memory: Optional[dict[str, tuple[int, int, int]]] = None) -> dict:
    """Every case on this rank (one process launch for all of them: start-up dominates)."""
    out = {name: engine_run(cfg) for name, cfg in cases.items()}
    for name, args in (memory or {}).items():
        out[name] = memory_run(*args)
    return out
