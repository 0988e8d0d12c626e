"""What the checkpoint tests share: a small model with every kind of state, its runs, and a way to
run several world sizes inside one launch of processes.

``CkptNet`` has what real models have and checkpoints get wrong: a tied embedding/head (one
Parameter, two state_dict names), a buffer, a frozen parameter, BatchNorm running statistics,
two parameter groups, sizes that do not split evenly, and optional dropout (RNG).

``Phases`` lets one set of spawned processes act as several jobs in turn: a TCPStore outlives
the process groups, and each phase creates a default group of the first ``n`` ranks from it
(the others wait). Starting interpreters and importing torch is most of a multi-process test's
cost, so the resharding matrix (world sizes 1, 2, 3, 4) is one launch of 4 processes.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tests.dist_utils import train_global_batches

VOCAB, DIM, HIDDEN, SEQ = 40, 12, 21, 5
GLOBAL_BATCH = 8


class CkptNet(nn.Module):
    def __init__(self, dropout: float = 0.0, hidden: int = HIDDEN, batch_norm: bool = True) -> None:
        super().__init__()
        self.hidden = hidden
        self.emb = nn.Embedding(VOCAB, DIM)
        self.up = nn.Linear(DIM, hidden)
        self.frozen = nn.Linear(hidden, hidden)
        self.frozen.requires_grad_(False)
        # BatchNorm's statistics depend on the micro-batch, so runs on different world sizes
        # compare only with the per-sample LayerNorm.
        self.norm = nn.BatchNorm1d(hidden) if batch_norm else nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight                     # tied
        self.register_buffer("temperature", torch.tensor([1.0, 0.5]))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(self.emb(x))).reshape(-1, self.hidden)
        h = self.drop(self.norm(self.frozen(h)))
        logits = self.head(self.down(h)).float() * self.temperature[0]
        return F.cross_entropy(logits, y.reshape(-1))


def make_net(seed: int = 0, dropout: float = 0.0, hidden: int = HIDDEN, batch_norm: bool = True) -> CkptNet:
    torch.manual_seed(seed)
    return CkptNet(dropout, hidden, batch_norm)


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() == 2]
    rest = [p for n, p in trainable if p.dim() != 2]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def ds_config(stage: int, world: int, precision: str = "fp32", gas: int = 1, clip: float = 0.0,
              scheduler: bool = True, **checkpoint: Any) -> dict[str, Any]:
    micro = GLOBAL_BATCH // (gas * world) if GLOBAL_BATCH % (gas * world) == 0 else 2
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-2, "betas": [0.9, 0.95], "weight_decay": 0.05}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 200},
    }
    if scheduler:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 2e-2}}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    if checkpoint:
        cfg["checkpoint"] = checkpoint
    return cfg


def with_checkpoints(eng: Any) -> Any:
    """The engine, with ``save_checkpoint``/``load_checkpoint`` even before engine.py inherits them.

    Once ``Engine`` inherits ``CheckpointMethods`` (the lead's change) this returns ``eng`` as is.
    """
    from engine.checkpoint.engine_methods import CheckpointMethods

    if not isinstance(eng, CheckpointMethods):
        eng.__class__ = type("Engine", (CheckpointMethods, type(eng)), {})
    return eng


def build(stage: int, precision: str = "fp32", seed: int = 0, dropout: float = 0.0, gas: int = 1,
          clip: float = 0.0, batch_norm: bool = True, **checkpoint: Any) -> Any:
    import engine

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    model = make_net(seed, dropout, batch_norm=batch_norm)
    eng, _, _, _ = engine.initialize(model=model, model_parameters=param_groups(model),
                                     config=ds_config(stage, world, precision, gas, clip, **checkpoint))
    return with_checkpoints(eng)


class Sampler:
    """Data order with state: a position and a numpy-drawn shuffle (resume must restore both)."""

    def __init__(self) -> None:
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np

        order = np.random.permutation(64)[:GLOBAL_BATCH]       # numpy's global RNG: part of a checkpoint
        g = torch.Generator().manual_seed(self.position)
        pool = torch.randint(0, VOCAB, (64, SEQ + 1), generator=g)
        self.position += 1
        tokens = pool[torch.as_tensor(order)]
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def train(eng: Any, sampler: Sampler, steps: int) -> list[float]:
    """``steps`` optimizer steps on the global batch stream; mean loss over all ranks per step."""
    return list(train_global_batches(eng, (sampler.next_batch() for _ in range(steps))))


def full_state(eng: Any) -> dict[str, Any]:
    """Every rank's partitions gathered and cut by parameter name: what a checkpoint must hold."""
    import torch.distributed as dist

    from engine.checkpoint.state_names import model_names

    opt = eng.optimizer
    layout = opt.layout

    def canonical(local: torch.Tensor) -> torch.Tensor:
        if layout.partition_count == 1:
            return layout.unshard([local.detach().float()])
        parts = [torch.empty_like(local) for _ in range(layout.partition_count)]
        dist.all_gather(parts, local.detach().contiguous())
        return layout.unshard([p.float() for p in parts])

    names = model_names(eng.module, opt.params, [p.name for p in layout.params]).params
    vectors = {"master": canonical(opt.master_partition())}
    scalars = {}
    for key, value in opt.optimizer_state_partitions().items():
        if value.dim() == 1:
            vectors[key] = canonical(value)
        else:
            scalars[key] = float(value)
    per_name = {kind: {n: vec[e.offset:e.offset + e.numel].clone() for n, e in zip(names, layout.params)}
                for kind, vec in vectors.items()}
    return {"vectors": per_name, "scalars": scalars,
            "params": _model_state(eng),
            "lr": eng.get_lr(), "global_steps": eng.global_steps,
            "scheduler": copy.deepcopy(eng.lr_scheduler.state_dict()) if eng.lr_scheduler else None,
            "loss_scaler": eng.loss_scaler.state_dict()}


def _model_state(eng: Any) -> dict[str, torch.Tensor]:
    """The module's full state_dict (stage 3 gathers its partitioned parameters; a collective)."""
    gather = getattr(eng.optimizer, "full_state_dict", None)
    if gather is not None:
        return gather(eng.module, rank0_only=False)
    return {n: p.detach().clone() for n, p in eng.module.state_dict().items()}


def differences(saved: dict[str, Any], loaded: dict[str, Any]) -> list[str]:
    """What differs between two ``full_state`` results (empty when equal exactly)."""
    out = []
    for kind, tensors in saved["vectors"].items():
        for name, value in tensors.items():
            other = loaded["vectors"].get(kind, {}).get(name)
            if other is None or not torch.equal(value, other):
                out.append(f"{kind}[{name}]")
    for key in ("scalars", "lr", "global_steps", "scheduler", "loss_scaler"):
        if saved[key] != loaded[key]:
            out.append(f"{key}: {saved[key]} != {loaded[key]}")
    for name, value in saved["params"].items():
        if not torch.equal(value, loaded["params"][name]):
            out.append(f"param {name}")
    return out


class Phases:
    """Run successive 'jobs' of different world sizes in one set of processes (see the module doc)."""

    def __init__(self, total: int) -> None:
        import torch.distributed as dist

        self.rank, self.total = int(os.environ["RANK"]), total
        self.store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), total, self.rank == 0,
                                   wait_for_workers=True)
        self.count = 0

    @contextlib.contextmanager
    def world(self, n: int) -> Iterator[bool]:
        """Inside: True on ranks < n, which form the default process group of size n."""
        import torch.distributed as dist

        self.count += 1
        active = self.rank < n
        if active:
            os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(n), LOCAL_RANK=str(self.rank))
            dist.init_process_group("gloo", store=dist.PrefixStore(f"phase-{self.count}", self.store),
                                    rank=self.rank, world_size=n)
        try:
            yield active
        finally:
            if active:
                dist.destroy_process_group()
            self._barrier(f"after-{self.count}")

    def _barrier(self, key: str, timeout: float = 300.0) -> None:
        self.store.add(key, 1)
        deadline = time.monotonic() + timeout
        while int(self.store.add(key, 0)) < self.total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"phase barrier {key}: not every rank arrived")
            time.sleep(0.005)


def saver(root: str, asynchronous: bool, ready: Any) -> None:
    """A training process that checkpoints every step until it is killed (test_checkpoint_crash)."""
    from pathlib import Path

    torch.set_num_threads(1)
    eng = build(2, "bf16", seed=0, async_save=asynchronous)
    sampler = Sampler()
    if (Path(root) / "latest").exists():
        _, client_state = eng.load_checkpoint(root)
        sampler.load_state_dict(client_state["sampler"])
    while True:
        train(eng, sampler, 1)
        eng.save_checkpoint(root, client_state={"sampler": sampler.state_dict()}, keep=2)
        ready.set()
