"""The scale simulator: one CPU process plays rank ``r`` of a world of ``N`` to measure what a run would move and hold.

Why: users run 8-1024 NCCL ranks; every CPU test runs 2-4 gloo ranks, and gloo accepts what
NCCL refuses while 2 ranks hide whatever grows with ``N``. torch's fake process group
(``torch.testing._internal.distributed.fake_pg``: a ``FakeStore`` and the ``"fake"`` backend)
answers every collective at once without moving data, so one process can run the engine as rank
``r`` of any world size with the **NCCL plan** of every stage. The training numbers it produces
mean nothing (no rank ever receives real data); what it measures does:

* the communication ledger (engine/comm_ledger.py): bytes this rank sends and receives per
  step, calls per step, by op and dtype, compared with the ZeRO paper's volume
  (arXiv:1910.02054: stages 1-2 move 2Ψ·(N−1)/N elements per step, stage 3 3Ψ·(N−1)/N);
* model-state bytes per rank (``model_state_bytes``) against the paper's formula at the
  configured dtypes (2-byte parameters, 4-byte masters, 8 bytes of Adam state per element);
* stage 3's peak of gathered parameters and staging buffers, against the largest fetch unit;
* the activation memory of one micro-batch (bytes autograd saved for backward).

Stage 3 builds the model under ``engine.zero.Init``, so only ``1/N`` of it plus the live units
is ever resident: a billions-of-parameters model is simulated on a laptop. ``fsdp2_step`` runs
torch's FSDP2 on the same model under the same fake group, its collectives counted by the same
rules and its gathered-parameter peak measured (fsdp2_staging.py), as the peer.
``python -m bench.scale`` prints the table; ``orch check JOB --simulate`` runs one configuration
at a job's own world size (trainer/scale_job.py).
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

__all__ = ["ScaleReport", "fake_world", "fsdp2_step", "simulate", "zero_volume_bytes"]


@dataclass
class ScaleReport:
    """What one simulated rank measured over one steady-state training step."""

    world: int
    stage: int
    model: str
    parameters: int                    # Ψ: trainable elements
    bytes_sent: int                    # this rank, one step
    bytes_received: int
    zero_volume: int                   # the ZeRO paper's bytes per rank per step
    calls: int                         # collectives per step
    model_state_bytes: int             # params + grads + fp32 master + optimizer states on this rank
    model_state_formula: int           # the ZeRO paper's bytes per rank at the configured dtypes (stage 3:
    #                                    plus the persistent parameters' full copy)
    activation_bytes: int              # saved for backward by one micro-batch
    peak_gathered_bytes: int = 0       # stage 3: most bytes of gathered units + staging at once
    largest_unit_bytes: int = 0        # stage 3: the largest fetch unit
    prefetch_bytes: int = 0            # stage 3: stage3_prefetch_bucket_size in bytes
    seconds: float = 0.0               # wall time of the simulated step (CPU; not a GPU figure)
    offloaded_bytes: int = 0           # the part of model_state_bytes offload keeps in host memory
    buffer_bytes: int = 0              # reduce buckets (staging for gradient reductions)
    by_op: dict[str, Any] = field(default_factory=dict)        # since the simulation began (Init included)
    step_by_op: dict[str, Any] = field(default_factory=dict)   # the measured step only

    @property
    def volume_ratio(self) -> float:
        return self.bytes_sent / self.zero_volume if self.zero_volume else 0.0

    @property
    def state_ratio(self) -> float:
        return self.model_state_bytes / self.model_state_formula if self.model_state_formula else 0.0

    @property
    def staging_ratio(self) -> float:
        bound = self.largest_unit_bytes + self.prefetch_bytes
        return self.peak_gathered_bytes / bound if bound else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"volume_ratio": self.volume_ratio, "state_ratio": self.state_ratio,
                               "staging_ratio": self.staging_ratio}


def zero_volume_bytes(stage: int, parameters: int, world: int, element_bytes: int = 2,
                      grad_bytes: int | None = None) -> int:
    """Bytes one rank sends per step by the ZeRO paper: (2 or 3)·Ψ·(N−1)/N elements, i.e. one
    reduction of the gradients (in their accumulation dtype, ``grad_bytes``: fp32 by default,
    engine/zero/grad_precision.py) plus one (stages 1-2) or two (stage 3) gathers of the parameters."""
    gathers = 2 if stage == 3 else 1
    per_element = gathers * element_bytes + (element_bytes if grad_bytes is None else grad_bytes)
    return per_element * parameters * (world - 1) // world


def model_state_formula(stage: int, parameters: int, world: int, param_bytes: int = 2, grad_bytes: int = 2) -> int:
    """Model-state bytes per rank by the ZeRO paper (mixed-precision Adam: 12 bytes of fp32 master
    and moments per element), at the configured parameter and gradient element sizes. Stage 1 also
    holds the reduced gradient of its partition (``grad_bytes``·Ψ/N, the optimizer's gradient, as
    DeepSpeed's stage 1 does): its full gradients are summed into the owners' shards by reduce-scatter."""
    psi, n = parameters, world
    optimizer = 12 * psi // n
    if stage == 3:
        return (param_bytes + grad_bytes) * psi // n + optimizer
    if stage == 2:
        return param_bytes * psi + grad_bytes * psi // n + optimizer
    return (param_bytes + grad_bytes) * psi + grad_bytes * psi // n + optimizer


@contextlib.contextmanager
def fake_world(world: int, rank: int = 0, fill_gathers: bool = True) -> Iterator[None]:
    """A fake process group of ``world`` ranks with this process as ``rank``, using the NCCL plan.

    The engine's all-gathers skip the fake backend (which copies the local piece into every
    rank's slot, ~1 ms per MB of CPU: most of a 7B step) and only go to the ledger: no data moves
    under a fake group anyway. Their outputs are zero-filled (a memset: finite weights, so a step
    is never skipped for a non-finite gradient norm), or with ``fill_gathers=False`` left as they
    are, for runs under ``sim_modes.ShapesOnlyCompute``, which keeps every kernel that reads
    gathered weights from reading them (``simulate`` checks that the measured step was not skipped).
    Reduce-scatters, too, only zero their output (the owner's shard: ``1/N`` of the message),
    which the fake backend leaves unwritten when it is not a slice of the input.
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from . import comm

    if dist.is_initialized():
        raise RuntimeError("fake_world needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    saved = comm.PLANS.get("fake")
    comm.PLANS["fake"] = comm.PLANS["nccl"]
    gather = comm._all_gather_single
    comm._all_gather_single = _zero_fill if fill_gathers else _no_gather
    scatter = comm._reduce_scatter_single
    comm._reduce_scatter_single = _zero_fill
    try:
        yield
    finally:
        comm._all_gather_single, comm._reduce_scatter_single = gather, scatter
        if saved is None:
            comm.PLANS.pop("fake", None)
        else:
            comm.PLANS["fake"] = saved
        dist.destroy_process_group()


def _model_dtype(cfg: dict[str, Any]) -> torch.dtype:
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if cfg.get(key, {}).get("enabled") is True:
            return dtype
    return torch.float32


@contextlib.contextmanager
def _default_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Build a whole (stage 0-2) model in the dtype the engine will cast it to: half the host memory
    when values are not drawn anyway (stage 3's ``zero.Init`` casts each piece as it is cut)."""
    if dtype is None:
        yield
        return
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _zero_fill(output: torch.Tensor, data: torch.Tensor, group: Any = None, async_op: bool = False) -> None:
    """A collective of a fake group as the engine sees it: the output zero-filled, no work to wait for."""
    output.zero_()


def _no_gather(output: torch.Tensor, local: torch.Tensor, group: Any = None, async_op: bool = False) -> None:
    """The all-gather of a fake group as the engine sees it: nothing written, no work to wait for."""


def _saved_bytes(model: nn.Module) -> tuple[contextlib.AbstractContextManager, Callable[[], int]]:
    """A context counting the bytes autograd saves for backward (distinct storages), the model's
    weights excluded: at stage 3 they are views of gathered units, counted as staging instead."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        # the weights' storages of this moment: a released unit's memory may hold activations later
        if ptr not in seen and all(p.untyped_storage().data_ptr() != ptr for p in model.parameters() if p.numel()):
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    return ctx, lambda: sum(seen.values())


def _train_step(model: nn.Module, step: Callable[[torch.Tensor], torch.Tensor],
                backward: Callable[[torch.Tensor], None], tokens: torch.Tensor, count_activations: bool) -> int:
    ctx, saved = _saved_bytes(model)
    with ctx if count_activations else contextlib.nullcontext():
        loss = step(tokens)
    backward(loss)
    return saved() if count_activations else 0


def simulate(model_factory: Callable[[], nn.Module], ds_config: dict[str, Any], *, world: int, rank: int = 0,
             vocab_size: int, seq_len: int = 32, model_name: str = "model", steps: int = 2,
             shapes_only: bool = True) -> ScaleReport:
    """Run ``steps`` training steps of the engine as ``rank`` of a fake world of ``world`` ranks.

    The last step is measured (the first allocates optimizer state and records stage 3's fetch
    trace). Micro-batch and accumulation come from ``ds_config``. ``shapes_only`` (sim_modes.py)
    builds the model without drawing initial values and runs matrix products and attention as
    zero-filled outputs of the right shape: nothing measured depends on values, and a 7B step
    takes seconds.
    """
    import engine
    from engine.comm import ledger
    from engine.sim_modes import NoInitValues, shapes_only as no_arithmetic

    cfg = copy.deepcopy(ds_config)
    ledger.reset()   # the report's by_op is this simulation's alone, not the process's history
    with fake_world(world, rank, fill_gathers=not shapes_only):
        stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
        with (engine.zero.Init(config_dict_or_path=cfg) if stage == 3 else contextlib.nullcontext()), \
                (NoInitValues() if shapes_only else contextlib.nullcontext()), \
                _default_dtype(_model_dtype(cfg) if shapes_only and stage < 3 else None):
            model = model_factory()
        eng, opt, _, _ = engine.initialize(model=model, config=cfg)
        micro, accumulation = eng.train_micro_batch_size_per_gpu(), eng.gradient_accumulation_steps()
        tokens = torch.randint(0, vocab_size, (micro, seq_len), generator=torch.Generator().manual_seed(rank))
        activations = 0
        for i in range(steps):
            ledger.mark_step()
            before = ledger.by_op()
            started = time.perf_counter()
            with no_arithmetic(shapes_only):
                for _ in range(accumulation):
                    measured = _train_step(model, lambda t: eng(t, t), eng.backward, tokens, i == steps - 1)
                    activations = max(activations, measured)
                eng.step()
            elapsed = time.perf_counter() - started
            moved = ledger.mark_step()
        if eng.was_step_skipped():
            raise RuntimeError("the simulated step was skipped (non-finite gradients): its numbers would not be "
                               "a training step's")
        report = _report(eng, opt, world, stage, model_name, moved, activations, elapsed, cfg)
        report.step_by_op = _difference(ledger.by_op(), before)
        return report


def _difference(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out = {}
    for key, now in after.items():
        then = before.get(key, {})
        delta = {k: v - then.get(k, 0) for k, v in now.items()}
        if delta.get("calls"):
            out[key] = delta
    return out


def _report(eng: Any, opt: Any, world: int, stage: int, name: str, moved: dict[str, int], activations: int,
            elapsed: float, cfg: dict[str, Any]) -> ScaleReport:
    from engine.comm import ledger

    psi = opt.layout.numel
    dtype_bytes = torch.finfo(eng.precision.model_dtype).bits // 8
    states = opt.model_state_bytes()
    grad_bytes = _grad_element_bytes(opt, dtype_bytes)
    reduce_bytes = _reduce_element_bytes(opt, grad_bytes)
    report = ScaleReport(
        world=world, stage=stage, model=name, parameters=psi,
        bytes_sent=moved["comm_bytes_sent"], bytes_received=moved["comm_bytes_received"],
        zero_volume=zero_volume_bytes(stage, psi, world, dtype_bytes, reduce_bytes), calls=moved["comm_calls"],
        model_state_bytes=sum(states[k] for k in ("params", "grads", "master", "optimizer_states")),
        model_state_formula=model_state_formula(stage, psi, world, dtype_bytes, grad_bytes)
        + _persistent_bytes(opt, stage, dtype_bytes),
        activation_bytes=activations, seconds=elapsed, by_op=ledger.by_op(),
        offloaded_bytes=opt.offloaded_bytes() if hasattr(opt, "offloaded_bytes") else 0,
        buffer_bytes=states.get("buffers", 0))
    if stage == 3:
        units = [u for u in opt.store.units if not u.persistent]
        report.peak_gathered_bytes = opt.live_peak_bytes
        report.largest_unit_bytes = max((u.nbytes for u in units), default=0)
        prefetch = int(cfg.get("zero_optimization", {}).get("stage3_prefetch_bucket_size", 0) or 0)
        report.prefetch_bytes = prefetch * dtype_bytes
    return report


def _persistent_bytes(opt: Any, stage: int, dtype_bytes: int) -> int:
    """Stage 3 keeps its persistent (small) parameters whole on every rank, by design (DeepSpeed's
    ``stage3_param_persistence_threshold``): the formula counts their full copy."""
    if stage != 3:
        return 0
    return sum(opt.layout.params[i].numel for u in opt.store.units if u.persistent and not u.frozen
               for i in u.params) * dtype_bytes


def _reduce_element_bytes(opt: Any, default: int) -> int:
    """Bytes of a gradient element on the wire: the reduction dtype (``communication_data_type``, else
    the accumulation dtype)."""
    dtype = getattr(getattr(opt, "reducer", None), "dtype", None)
    return torch.finfo(dtype).bits // 8 if dtype is not None else default


def _grad_element_bytes(opt: Any, default: int) -> int:
    grads = getattr(opt, "grad_partition", None)
    if grads is None:
        grads = getattr(opt, "flat_grads", None)
    return grads.element_size() if grads is not None else default


def fsdp2_step(model_factory: Callable[[], nn.Module], blocks: Callable[[nn.Module], list[nn.Module]], *,
               world: int, rank: int = 0, vocab_size: int, seq_len: int = 32, micro_batch: int = 1,
               steps: int = 2, shapes_only: bool = True, reduce_dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """torch's FSDP2 (``fully_shard`` per block and at the root, bf16 parameters, reductions in
    ``reduce_dtype``: pass the engine's gradient dtype for a like-for-like peer) on the same model under
    the same fake group: ``{"bytes_sent", "bytes_received", "calls"}`` per step, counted by the ledger's rules,
    and ``peak_gathered_bytes``: its unsharded parameters and all-gather outputs alive at once in the last
    step (fsdp2_staging.py), to set beside stage 3's ``peak_gathered_bytes`` (``peak_unsharded_bytes``: the
    unsharded parameters alone)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .comm_ledger import CommLedger, record_torch_collectives
    from .fsdp2_staging import Fsdp2StagingProbe
    from .sim_modes import shapes_only as no_arithmetic

    with fake_world(world, rank):
        with torch.device("meta"):
            model = model_factory()
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
        for block in blocks(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, vocab_size, (micro_batch, seq_len))
        book, probe = CommLedger(), Fsdp2StagingProbe(model)
        for _ in range(steps):
            book.reset()
            probe.reset()
            with record_torch_collectives(book), no_arithmetic(shapes_only), probe.watching():
                model(tokens, tokens).backward()
                optimizer.step()
                optimizer.zero_grad()
        dist.barrier()
        totals = book.totals()
    return totals | {"peak_gathered_bytes": probe.peak_bytes, "peak_unsharded_bytes": probe.peak_unsharded_bytes}

