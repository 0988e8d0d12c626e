"""Tiny language models, their data, and the runs the ZeRO tests compare (shared by test modules).

``reference_run`` trains in one process in plain fp32 with torch's AdamW on the whole global
batch; ``engine_run`` trains the same model through ``engine.initialize`` on every rank of a
process group (or alone), splitting the same global batch into micro-batches across ranks and
accumulation steps. With the same seed both see the same data and start from the same weights,
so their losses must agree step by step.

Models (``MODELS``): ``tinylm`` (embedding, MLP, head), ``gpt`` (engine/models/gpt.py's GPT with
its lm_head tied to the token embedding), ``gpt-ckpt`` (the same with activation checkpointing)
and ``functional-tied`` (a head that uses the embedding's weight outside any module call, declared
with ``engine.zero.register_external_parameter``). ``engine_run(..., init=True)`` builds the model
inside ``engine.zero.Init`` (already partitioned).
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tests.dist_utils import train_global_batches

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


class FunctionalTiedLM(nn.Module):
    """Embedding -> Linear -> GELU -> logits against the embedding matrix (``F.linear``, no module call)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc = nn.Linear(DIM, DIM)
        try:  # stage 3 must gather emb.weight for this module's own forward too
            import engine

            engine.zero.register_external_parameter(self, self.emb.weight)
        except ImportError:
            pass

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(self.emb(x)))
        return F.cross_entropy(F.linear(h, self.emb.weight).float().reshape(-1, VOCAB), y.reshape(-1))


def make_gpt(seed: int = 0, checkpointing: bool = False) -> nn.Module:
    """engine/models' GPT, 2 layers of width 32, lm_head tied to the token embedding."""
    from engine.models import build_model

    return build_model("tiny", seed=seed, n_layer=2, d_model=32, n_head=4, vocab_size=VOCAB, seq_len=SEQ,
                       activation_checkpointing=checkpointing)


def _functional_tied(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FunctionalTiedLM()


MODELS = {"tinylm": make_model, "gpt": make_gpt, "gpt-ckpt": lambda seed=0: make_gpt(seed, checkpointing=True),
          "functional-tied": _functional_tied}


# -- models with frozen parameters (stage 3 partitions them too; test_engine_zero3_frozen.py) ------
LORA_RANK = 4


class LoRALinear(nn.Module):
    """``base(x) + b(a(x))``: a frozen Linear and a trainable low-rank update (LoRA)."""

    def __init__(self, base: nn.Linear, rank: int = LORA_RANK) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Linear(base.in_features, rank, bias=False)
        self.b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.b.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.b(self.a(x))


def make_lora_gpt(seed: int = 0, checkpointing: bool = False) -> nn.Module:
    """The tiny GPT, every weight frozen, LoRA adapters on each block's four Linears."""
    model = make_gpt(seed, checkpointing).requires_grad_(False)
    torch.manual_seed(seed + 7)
    for block in model.blocks:
        for owner, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc"), (block.mlp, "proj")):
            setattr(owner, name, LoRALinear(getattr(owner, name)))
    return model


def make_half_frozen_gpt(seed: int = 0) -> nn.Module:
    """The tiny GPT with its embeddings (tied to lm_head) and first block frozen, and one LayerNorm
    of the second block half frozen (weight frozen, bias trained: a module with both kinds whose
    input needs no gradient)."""
    model = make_gpt(seed)
    for p in (model.wte.weight, model.wpe.weight, model.blocks[1].ln1.weight, *model.blocks[0].parameters()):
        p.requires_grad_(False)
    return model


class FrozenTwiceLM(nn.Module):
    """A frozen Linear applied twice in a row (weight sharing across layers, as ALBERT does): the
    first call's backward runs after the second's has finished with the same gathered weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.mid = nn.Linear(DIM, DIM)
        self.shared = nn.Linear(DIM, DIM).requires_grad_(False)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.shared(self.shared(F.gelu(self.mid(self.emb(x)))))
        return F.cross_entropy(self.head(h).reshape(-1, VOCAB), y.reshape(-1))


def make_frozen_twice(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FrozenTwiceLM()


MODELS["frozen-twice"] = make_frozen_twice
MODELS["lora-gpt"] = make_lora_gpt
MODELS["lora-gpt-ckpt"] = functools.partial(make_lora_gpt, checkpointing=True)
MODELS["half-frozen-gpt"] = make_half_frozen_gpt


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
    """The usual split: weight decay on matrices, none on biases, norms and embeddings.

    ``ds_shape`` is the shape of a parameter ZeRO-3 holds partitioned (as in DeepSpeed)."""
    def matrix(n: str, p: torch.Tensor) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) == 2 and not n.startswith("emb")

    decay = [p for n, p in model.named_parameters() if matrix(n, p)]
    rest = [p for n, p in model.named_parameters() if not matrix(n, p)]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def reference_run(clip: float = 0.0, steps: int = STEPS, groups: bool = False,
                  model_name: str = "tinylm") -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process fp32 training on the full global batch: the ground truth."""
    model = MODELS[model_name]()
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


@functools.lru_cache(maxsize=None)
def cached_reference(clip: float, groups: bool,
                     model_name: str = "tinylm") -> tuple[list[float], dict[str, torch.Tensor]]:
    """``reference_run`` for the test process, computed once per setting."""
    return reference_run(clip, groups=groups, model_name=model_name)


def worst_loss_gap(losses: list[float], reference: list[float]) -> float:
    """The largest relative difference between two loss curves, step by step."""
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


def param_gap(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference, leaving out attention's key bias: its gradient is zero in exact arithmetic
    (it shifts every score of a query equally), so Adam turns rounding noise into its updates."""
    if name.endswith("attn.qkv.bias"):
        d = got.numel() // 3
        return max((got[:d] - ref[:d]).abs().max().item(), (got[2 * d:] - ref[2 * d:]).abs().max().item())
    return (got - ref).abs().max().item()


def check_against_reference(run: dict[str, Any], reference: tuple[list[float], dict[str, torch.Tensor]], *,
                            loss_tol: float, param_tol: float, label: str = "") -> None:
    """An ``engine_run`` reproduces the reference's losses (relative) and final weights (absolute)."""
    ref_losses, ref_params = reference
    worst = worst_loss_gap(run["losses"], ref_losses)
    assert worst <= loss_tol, f"{label}losses differ from the reference by {worst:.2e} (relative)"
    assert set(run["params"]) == set(ref_params), f"{label}parameter names differ from the reference's"
    for name, ref in ref_params.items():
        diff = param_gap(name, run["params"][name], ref)
        assert diff <= param_tol, f"{label}{name} differs from the reference by {diff:.2e}"


def check_resumed_in_another_layout(run: dict[str, Any]) -> None:
    """A ``reshard_run``: the engine that loaded the full state trains on exactly as the one that saved it."""
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(run["state_keys"]), run["state_keys"]
    assert run["global_steps"] == (10, 10), run["global_steps"]
    assert run["lr"][0] == run["lr"][1], run["lr"]
    worst = worst_loss_gap(run["a"], run["b"])
    assert worst <= 1e-6, f"resumed run differs by {worst:.2e}"


def train_steps(eng: Any, start: int, stop: int) -> list[float]:
    """Steps ``start..stop-1`` of the global-batch stream; returns the mean loss over all ranks."""
    return list(train_global_batches(eng, map(global_batch, range(start, stop))))


def build(model_name: str = "tinylm", init: bool = False, seed: int = 0) -> nn.Module:
    """The named model, built whole or (``init``) inside ``engine.zero.Init``, already partitioned."""
    if not init:
        return MODELS[model_name](seed=seed)
    import engine

    with engine.zero.Init():
        return MODELS[model_name](seed=seed)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 value (gathered when ZeRO-3 holds only partitions)."""
    import engine

    params = list(model.parameters())
    with engine.zero.GatheredParameters(params):
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def engine_run(config: dict[str, Any], steps: int = STEPS, groups: bool = False, model_name: str = "tinylm",
               init: bool = False) -> dict[str, Any]:
    """Train through the engine on this rank; returns global mean losses and final weights."""
    import engine

    model = build(model_name, init)
    eng, _, _, _ = engine.initialize(model=model, model_parameters=param_groups(model) if groups else None,
                                     config=copy.deepcopy(config))
    losses = train_steps(eng, 0, steps)
    return {"losses": losses, "skipped": eng.skipped_steps, "global_steps": eng.global_steps,
            "params": full_weights(model), "memory": eng.model_state_bytes(), "split": eng.model_state_split()}


def reshard_run(stage_a: int, stage_b: int, zero: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Train with ``stage_a``, rebuild the full state from every rank's partitions, load it into a
    fresh engine with ``stage_b`` (another partition layout), and train both on: what a
    checkpoint saved by one layout and resumed by another must do."""
    import torch.distributed as dist

    import engine

    cfg = ds_config(stage_a, clip=0.1, **{"reduce_bucket_size": 300, **(zero or {})})
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


def memory_run(stage: int, hidden: int, bucket: int, zero: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One bf16 step of a wider model; returns Ψ and this rank's model-state bytes."""
    import engine

    model = make_model(hidden=hidden, vocab=VOCAB)
    psi = sum(p.numel() for p in model.parameters())
    config = ds_config(stage, precision="bf16", reduce_bucket_size=bucket, overlap_comm=True, **(zero or {}))
    config["train_batch_size"] = 4 * _world()
    eng, _, _, _ = engine.initialize(model=model, config=config)
    x, y = global_batch(0, size=4)
    eng.backward(eng(x, y))
    eng.step()
    threshold = (zero or {}).get("stage3_param_persistence_threshold", -1)
    persistent = sum(p.numel() for p in model.parameters() if p.numel() <= threshold) if stage == 3 else 0
    return {"psi": psi, "persistent": persistent, "bytes": eng.model_state_bytes(), "split": eng.model_state_split()}


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def run_cases(cases: dict[str, tuple],
              memory: Optional[dict[str, tuple]] = None,
              reshard: Optional[dict[str, tuple]] = None,
              extra: Optional[dict[str, tuple[Any, tuple]]] = None) -> dict:
    """On this rank: every training case ``name -> (ds_config, param groups?[, model name[, Init?]])``,
    every memory case ``name -> (stage, hidden, bucket[, zero keys])``, every reshard case
    ``name -> (stage_a, stage_b[, zero keys])`` and every ``extra`` case ``name -> (function, args)``.

    One process launch runs them all: interpreter and torch start-up dominate the cost.
    """
    out: dict[str, Any] = {}
    for name, (cfg, groups, *how) in cases.items():
        out[name] = engine_run(cfg, groups=groups, model_name=how[0] if how else "tinylm",
                               init=bool(how[1]) if len(how) > 1 else False)
    out.update({name: memory_run(*args) for name, args in (memory or {}).items()})
    out.update({name: reshard_run(*args) for name, args in (reshard or {}).items()})
    out.update({name: fn(*args) for name, (fn, args) in (extra or {}).items()})
    return out


# -- stage 3 extras: a per-rank memory budget, save_16bit_model, resuming across world sizes ---------
MODELS["gpt-deep"] = lambda seed=0: _deep_gpt(seed)


def _deep_gpt(seed: int = 0) -> nn.Module:
    """8 GPT blocks of width 32: many equal layers, so the largest one is a small part of the model."""
    from engine.models import build_model

    return build_model("tiny", seed=seed, n_layer=8, d_model=32, n_head=4, vocab_size=VOCAB, seq_len=SEQ)


BUDGET_FRACTION = 0.6   # of the model's whole fp32 training state (16Ψ bytes)
BUDGET_ZERO = {"stage3_param_persistence_threshold": 100, "stage3_prefetch_bucket_size": 3000,
               "stage3_max_live_parameters": 3000, "stage3_max_reuse_distance": 0, "reduce_bucket_size": 2000}


def budget_run(steps: int = 10) -> dict[str, Any]:
    """Build ``gpt-deep`` inside ``engine.zero.Init`` and train it at stage 3 against a per-rank budget."""
    import engine

    with torch.device("meta"):
        psi = sum(p.numel() for p in _deep_gpt().parameters())
    budget = int(BUDGET_FRACTION * 16 * psi)
    with engine.zero.Init() as init:
        model = _deep_gpt()
    whole = sum(p.numel() for p in model.parameters())   # Init leaves every parameter empty
    shapes = [p._zero3_init.numel for p in model.parameters()]
    eng, opt, _, _ = engine.initialize(model=model, config=ds_config(3, 1, 0.1, **BUDGET_ZERO))
    losses = train_steps(eng, 0, steps)
    states = sum(eng.model_state_bytes().values())
    live_peak = eng.model_state_split()["live_peak"]
    return {"psi": psi, "budget": budget, "whole_after_init": whole, "largest_param": max(shapes),
            "init_largest_whole": init.stats.largest_whole_bytes, "init_kept": init.stats.kept_bytes,
            "peak": states + live_peak, "live_peak": live_peak, "losses": losses,
            "largest_unit": max(u.nbytes for u in opt.store.units if not u.persistent),
            "max_live_bytes": BUDGET_ZERO["stage3_max_live_parameters"] * 4}


def _shared_tmpdir() -> str:
    """A directory rank 0 made, known to every rank."""
    import tempfile

    import torch.distributed as dist

    box = [tempfile.mkdtemp(prefix="zero3-") if not dist.is_initialized() or dist.get_rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return str(box[0])


def save16_run() -> dict[str, Any]:
    """``save_16bit_model`` at stage 3: refused without the config flag, the whole model with it."""
    import os
    import shutil
    import warnings

    import torch.distributed as dist

    import engine

    where = _shared_tmpdir()
    base = ds_config(3, 1, 0.0, precision="bf16", stage3_param_persistence_threshold=0)
    eng, _, _, _ = engine.initialize(model=make_gpt(), config=copy.deepcopy(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved_without = eng.save_16bit_model(where, "refused.bin")
    base["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    model = make_gpt()
    eng, _, _, _ = engine.initialize(model=model, config=base)
    train_steps(eng, 0, 2)
    saved = eng.save_16bit_model(where, "model.bin")
    weights = full_weights(model)
    out: dict[str, Any] = {"saved_without_flag": saved_without, "saved": saved,
                           "file_without_flag": os.path.exists(os.path.join(where, "refused.bin"))}
    state = torch.load(os.path.join(where, "model.bin"), weights_only=True)
    plain = make_gpt()
    out.update(keys=sorted(state), plain_keys=sorted(plain.state_dict()), dtype=str(state["wte.weight"].dtype),
               max_diff=max((state[n].float() - w).abs().max().item() for n, w in weights.items()),
               tied_same=bool(torch.equal(state["wte.weight"], state["lm_head.weight"])))
    plain.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    if dist.is_initialized():
        dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(where, ignore_errors=True)
    return out


RESUME_ZERO = {"stage3_param_persistence_threshold": 0, "reduce_bucket_size": 300}


def _resume_config(stage: int) -> dict[str, Any]:
    cfg = ds_config(stage, clip=0.1, **(RESUME_ZERO if stage == 3 else {"reduce_bucket_size": 300}))
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_type": "linear"}}
    return cfg


def save_full_state_run(stage: int, path: str) -> list[float]:
    """Train 5 steps, write the full (canonical) state to ``path`` from rank 0, train 5 more."""
    import torch.distributed as dist

    import engine

    eng, zero, _, _ = engine.initialize(model=make_model(), config=_resume_config(stage))
    train_steps(eng, 0, 5)
    world = _world()

    def full(t: torch.Tensor) -> torch.Tensor:
        parts = [t.clone() for _ in range(world)]
        if world > 1:
            dist.all_gather(parts, t.contiguous())
        return zero.layout.unshard(parts if zero.layout.partition_count > 1 else parts[:1])

    state = {"master": full(zero.master_partition()),
             "states": {k: full(v) if v.dim() == 1 else v for k, v in zero.optimizer_state_partitions().items()},
             "scheduler": eng.lr_scheduler.state_dict(), "counters": eng.counters.state_dict()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(state, path)
    return train_steps(eng, 5, 10)


def load_full_state_run(stage: int, path: str) -> list[float]:
    """A fresh engine (another seed, maybe another stage and world size) resumes from ``path``."""
    import engine

    eng, zero, _, _ = engine.initialize(model=make_model(seed=1), config=_resume_config(stage))
    state = torch.load(path, weights_only=True)
    zero.load_full(state["master"], state["states"])
    eng.lr_scheduler.load_state_dict(state["scheduler"])
    eng.counters.load_state_dict(state["counters"])
    return train_steps(eng, 5, 10)


def checkpoint_save_run(stage: int, directory: str) -> list[float]:
    """Train 5 steps, ``save_checkpoint`` (every rank), train 5 more."""
    import engine

    eng, _, _, _ = engine.initialize(model=make_model(), config=_resume_config(stage))
    train_steps(eng, 0, 5)
    eng.save_checkpoint(directory)
    return train_steps(eng, 5, 10)


def checkpoint_load_run(stage: int, directory: str) -> list[float]:
    """A fresh engine at ``stage`` (and this world size) loads the latest checkpoint and trains on."""
    import engine

    eng, _, _, _ = engine.initialize(model=make_model(seed=1), config=_resume_config(stage))
    path, _ = eng.load_checkpoint(directory)
    assert path is not None, f"no checkpoint found in {directory}"
    return train_steps(eng, 5, 10)


def run_all(calls: list[tuple[Any, tuple]]) -> list[Any]:
    """Several of the runs above, one after another, in one launch."""
    return [fn(*args) for fn, args in calls]


def example_config_run(name: str, steps: int = 3) -> dict[str, Any]:
    """Train TinyLM a few steps with ``examples/ds_configs/<name>`` as a user's script would: the
    file as it is (the script passes a torch AdamW when the file has no optimizer section)."""
    import json
    from pathlib import Path

    import engine

    cfg = json.loads((Path(__file__).resolve().parents[1] / "examples" / "ds_configs" / name).read_text())
    if "train_batch_size" not in cfg and "train_micro_batch_size_per_gpu" not in cfg:
        cfg["train_micro_batch_size_per_gpu"] = 2
    model = make_model()
    optimizer = None if "optimizer" in cfg else torch.optim.AdamW(model.parameters(), lr=LR)
    eng, _, _, _ = engine.initialize(model=model, optimizer=optimizer, config=cfg)
    size = eng.world_size * eng.train_micro_batch_size_per_gpu() * eng.gradient_accumulation_steps()
    losses = list(train_global_batches(eng, (global_batch(step, size=size) for step in range(steps))))
    return {"losses": losses, "global_steps": eng.global_steps, "stage": eng.zero_optimization_stage(),
            "offloaded": eng.model_state_split()["offloaded"]}


def reduction_timing_run(config: dict[str, Any]) -> dict[str, Any]:
    """``engine_run`` that also records, for every gradient reduction of the data-parallel group
    (the engine's ``Comm.all_reduce`` / ``reduce_scatter_into``), whether it was issued while
    autograd's backward was still running, and how many reduce buckets the engine has."""
    from engine import comm
    from engine.zero.stage3_hooks import in_backward

    issued = {"inside": 0, "after": 0}
    originals = {name: getattr(comm.Comm, name) for name in ("all_reduce", "reduce_scatter_into")}

    def recording(original: Any) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            issued["inside" if in_backward() else "after"] += 1
            return original(self, *args, **kwargs)
        return call

    for name, original in originals.items():
        setattr(comm.Comm, name, recording(original))
    try:
        import engine

        model = build("tinylm")
        eng, _, _, _ = engine.initialize(model=model, config=copy.deepcopy(config))
        losses = train_steps(eng, 0, STEPS)
    finally:
        for name, original in originals.items():
            setattr(comm.Comm, name, original)
    return {"losses": losses, "params": full_weights(model), "global_steps": eng.global_steps,
            "buckets": len(eng.optimizer.reducer.buckets), **issued}


class ReentrantTwiceLM(nn.Module):
    """One Linear applied in two reentrant checkpoint segments: its gradient is accumulated twice in
    one backward, the second time after its bucket (that Linear alone) has gone out."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.shared = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = self.emb(x)
        h = checkpoint(self.shared, h, use_reentrant=True)
        h = checkpoint(self.shared, h, use_reentrant=True)
        return F.cross_entropy(self.head(h).reshape(-1, VOCAB), y.reshape(-1))


def reentrant_twice_run(stage: int) -> dict[str, Any]:
    """The first training step of ``ReentrantTwiceLM`` at ``stage`` (one parameter per bucket):
    the error it ends with, by type and message, or ``None``."""
    import engine

    torch.manual_seed(0)
    eng, _, _, _ = engine.initialize(model=ReentrantTwiceLM(), config=ds_config(stage, reduce_bucket_size=64))
    try:
        train_steps(eng, 0, 1)
    except Exception as error:   # noqa: BLE001 - the test reads what the user would see
        return {"error": type(error).__name__, "message": str(error)}
    return {"error": None, "message": ""}


def nccl_plan_run(config: dict[str, Any], model_name: str = "tinylm") -> dict[str, Any]:
    """``engine_run`` with the collectives the NCCL plan uses (``reduce`` to each owner, equal-piece
    ``all_gather_into_tensor``) carried out by gloo: the GPU code paths, checked on CPU."""
    from engine import comm

    saved = comm.PLANS["gloo"]
    comm.PLANS["gloo"] = comm.PLANS["nccl"]
    try:
        return engine_run(config, model_name=model_name)
    finally:
        comm.PLANS["gloo"] = saved
