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


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The usual split: weight decay on matrices, none on biases, norms and embeddings."""
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("emb")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and not n.startswith("emb"))]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def reference_run(clip: float = 0.0, steps: int = STEPS, groups: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process fp32 training on the full global batch: the ground truth."""
    model = make_model()
    params = param_groups(model) if groups else model.parameters()
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)
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


def train_steps(eng: Any, start: int, stop: int) -> list[float]:
    """Steps ``start..stop-1`` of the global-batch stream; returns the mean loss over all ranks."""
    import torch.distributed as dist

    rank, world = eng.global_rank, eng.world_size
    micro, gas = eng.train_micro_batch_size_per_gpu(), eng.gradient_accumulation_steps()
    losses = []
    for step in range(start, stop):
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
    return losses


def engine_run(config: dict[str, Any], steps: int = STEPS, groups: bool = False) -> dict[str, Any]:
    """Train through the engine on this rank; returns global mean losses and final weights."""
    import engine

    model = make_model()
    eng, _, _, _ = engine.initialize(model=model, model_parameters=param_groups(model) if groups else None,
                                     config=copy.deepcopy(config))
    losses = train_steps(eng, 0, steps)
    return {"losses": losses, "skipped": eng.skipped_steps, "global_steps": eng.global_steps,
            "params": {n: p.detach().float().clone() for n, p in model.named_parameters()},
            "memory": eng.model_state_bytes()}


def reshard_run(stage_a: int, stage_b: int) -> dict[str, Any]:
    """Train with ``stage_a``, rebuild the full state from every rank's partitions, load it into a
    fresh engine with ``stage_b`` (another partition layout), and train both on: what a
    checkpoint saved by one layout and resumed by another must do."""
    import torch.distributed as dist

    import engine

    cfg = ds_config(stage_a, clip=0.1, reduce_bucket_size=300)
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_type": "linear"}}
    a, zero_a, _, _ = engine.initialize(model=make_model(), config=copy.deepcopy(cfg))
    train_steps(a, 0, 5)
    world = dist.get_world_size() if dist.is_initialized() else 1

    def full(t: torch.Tensor) -> torch.Tensor:
        parts = [t.clone() for _ in range(world)]
        if world > 1:
            dist.all_gather(parts, t.contiguous())
        return zero_a.layout.unshard(parts) if zero_a.layout.partition_count > 1 else zero_a.layout.unshard([t])

    master = full(zero_a.master_partition())
    states = {k: full(v) if v.dim() == 1 else v for k, v in zero_a.optimizer_state_partitions().items()}
    cfg["zero_optimization"]["stage"] = stage_b
    b, zero_b, _, _ = engine.initialize(model=make_model(seed=1), config=cfg)
    zero_b.load_full(master, states)
    b.lr_scheduler.load_state_dict(a.lr_scheduler.state_dict())
    b.counters.load_state_dict(a.counters.state_dict())
    b.loss_scaler.load_state_dict(a.loss_scaler.state_dict())
    return {"a": train_steps(a, 5, 10), "b": train_steps(b, 5, 10), "lr": (a.get_lr(), b.get_lr()),
            "global_steps": (a.global_steps, b.global_steps), "state_keys": sorted(states)}


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


def run_cases(cases: dict[str, tuple[dict[str, Any], bool]],
              memory: Optional[dict[str, tuple[int, int, int]]] = None,
              reshard: Optional[dict[str, tuple[int, int]]] = None) -> dict:
    """On this rank: every training case ``name -> (ds_config, param groups?)``, every memory
    case ``name -> (stage, hidden, bucket)`` and every reshard case ``name -> (stage_a, stage_b)``.

    One process launch runs them all: interpreter and torch start-up dominate the cost.
    """
    out: dict[str, Any] = {name: engine_run(cfg, groups=groups) for name, (cfg, groups) in cases.items()}
    out.update({name: memory_run(*args) for name, args in (memory or {}).items()})
    out.update({name: reshard_run(*args) for name, args in (reshard or {}).items()})
    return out
