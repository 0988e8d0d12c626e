"""Run a function on N real processes joined by a gloo process group (for tests).

    from tests.dist_utils import run_distributed

    def check_sum(scale):                 # module level: child processes import it by name
        import torch, torch.distributed as dist
        t = torch.ones(1) * scale
        dist.all_reduce(t)
        return t.item()

    assert run_distributed(check_sum, 2, 3.0) == [6.0, 6.0]

Each rank is a fresh ``spawn``ed interpreter with the environment torchrun would give it
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port)
and one compute thread, so N ranks fit on a 2-core machine. With ``init=True`` (the default)
the gloo group is created before ``fn`` runs and destroyed after; with ``init=False`` ``fn``
creates it (to test ``engine.init_distributed`` itself).

Results come back per rank, in rank order. They travel pickled by value, so tensors are
fine. A rank that raises makes ``run_distributed`` raise ``RankError`` with that rank's
traceback; ranks that have not answered within ``timeout`` seconds are killed and
``TimeoutError`` names them. No process outlives the call.

``train_global_batches`` is the data-parallel training loop those functions share (the ZeRO,
checkpoint and DeepSpeed peer tests): the same global batches split the same way on any world size.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional

__all__ = ["RankError", "free_port", "run_distributed", "train_global_batches"]


class RankError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable[..., Any], args: tuple, rank: int, world: int, port: int, init: bool,
           env: dict[str, str], results: Any) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1", **env})
    try:
        import torch

        torch.set_num_threads(1)
        if init:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            value = fn(*args)
        finally:
            if init:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 180.0,
                    init: bool = True, env: Optional[dict[str, str]] = None) -> list[Any]:
    """``[fn(*args) on rank 0, ..., on rank world_size-1]``, run in ``world_size`` processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, args, r, world_size, port, init, dict(env or {}), results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    answers: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(answers) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(answers))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in answers]
                if dead:
                    raise RankError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} before answering")
                continue
            if not ok:
                raise RankError(f"rank {rank} raised:\n{payload}")
            answers[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10 if len(answers) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [answers[r] for r in range(world_size)]


def train_global_batches(eng: Any, batches: Iterable[tuple[Any, Any]]) -> Iterator[float]:
    """One optimizer step per global batch ``(x, y)``, as a data-parallel job takes it; after each
    step, yields the mean loss over every micro-batch of every rank.

    Rank ``r`` takes rows ``[(m*world + r)*micro, +micro)`` at accumulation step ``m``, so runs that
    differ only in world size, accumulation or library see the same samples per step and must
    report the same losses. ``eng`` comes from ``engine.initialize`` or ``deepspeed.initialize``
    (both have ``global_rank``, ``world_size`` and DeepSpeed's batch getters).
    """
    import torch
    import torch.distributed as dist

    rank, world = eng.global_rank, eng.world_size
    micro, gas = eng.train_micro_batch_size_per_gpu(), eng.gradient_accumulation_steps()
    for x, y in batches:
        total = torch.zeros(())
        for m in range(gas):
            rows = slice((m * world + rank) * micro, (m * world + rank + 1) * micro)
            loss = eng(x[rows], y[rows])
            eng.backward(loss)
            eng.step()
            total += loss.detach().float()
        if world > 1:
            dist.all_reduce(total)
        yield total.item() / (gas * world)


def tiny_gpt_losses(config: dict, steps: int, micro: int) -> list[float]:
    """Train the tiny GPT under ``config`` in this rank for ``steps`` steps of ``micro`` samples each
    (every rank its own slice of the same synthetic stream); the world-mean loss of every step."""
    import torch
    import torch.distributed as dist

    import engine
    from engine.models import build_model
    from engine.trainer.data import SyntheticTokens

    model = build_model("tiny", seed=0)
    eng, _, _, _ = engine.initialize(model=model, config=config)
    data = SyntheticTokens(model.config.vocab_size, model.config.seq_len, seed=3)
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for step in range(steps):
        first = (step * world + rank) * micro
        tokens = torch.from_numpy(data.samples(range(first, first + micro))).long()
        loss = eng(tokens[:, :-1], tokens[:, 1:])
        eng.backward(loss)
        eng.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def ledgered_steps(eng: Any, train_steps: Callable[[Any, int, int], list[float]], steps: int) -> tuple[list[float], list[int]]:
    """Run ``steps`` single steps through ``train_steps(eng, step, step + 1)``; the losses and the bytes
    this rank sent in collectives during each step (the communication ledger, reset first)."""
    from engine.comm_ledger import ledger

    ledger.reset()
    losses, per_step = [], []
    for step in range(steps):
        ledger.mark_step()
        losses += train_steps(eng, step, step + 1)
        per_step.append(ledger.mark_step()["comm_bytes_sent"])
    return losses, per_step
