"""The bundled trainer's run: what ``python -m engine.train`` (engine/train.py) executes.

A GPT preset, a token source, ``engine.initialize`` with the user's ds_config, and the loop:
forward / backward / step per micro-batch, a log line every ``--log-every`` steps, a checkpoint
every ``--save-every`` steps, and resume from ``<save-dir>/latest`` on start, so that every kind
of restart (torchrun, Slurm requeue, pod restart, resubmission) continues the same run.
Every piece of a step runs inside a named phase of the Monitor (monitor.py): the
wall-clock breakdown times them and the hang watchdog reports the phase a stuck rank was in.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.models.presets import get_preset
from engine.run_contract import RunPaths, restart_count
from engine.trainer.args import TrainerArgs, parse_args
from engine.trainer.auto_fill import filled_ds_config
from engine.trainer.checkpointer import Checkpointer
from engine.trainer.data import GlobalBatchSampler, TokenSource, open_source
from engine.trainer.metrics import MetricsWriter, peak_memory_bytes
from engine.trainer.monitor import Monitor, build_monitor, prepare_distributed
from engine.trainer.watchdog import stall_if_requested


@dataclass
class Run:
    """What the loop needs, assembled once at start."""

    args: TrainerArgs
    engine: Any
    source: TokenSource
    sampler: GlobalBatchSampler
    checkpointer: Checkpointer
    monitor: Monitor
    rank: int
    world_size: int
    device: Any
    micro_batch: int
    grad_accum: int
    log_every: int

    @property
    def metrics(self) -> MetricsWriter:
        return self.monitor.metrics


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return train(parse_args(argv))
    except UserError as exc:  # a bad flag, ds_config, data file, model name, launcher env or checkpoint
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}engine.train: error: {exc}", file=sys.stderr)
        return exc.exit_code


def train(args: TrainerArgs) -> int:
    run = setup(args)
    start = run.checkpointer.resume(run.engine, {"sampler": run.sampler})
    total = args.steps
    run.monitor.started(start, total, args.model, run.checkpointer.save_dir if start else None)
    try:
        loop(run, start)
    except BaseException as exc:
        run.metrics.status("failed", step=getattr(run.engine, "global_steps", None), total_steps=total,
                           error=repr(exc))
        raise
    finally:
        run.monitor.close()
    run.metrics.status("finished", step=total, total_steps=total, world_size=run.world_size,
                       restart_count=restart_count())
    leave_process_group(run)
    return 0


def leave_process_group(run: Run) -> None:
    """After a run that finished: the last checkpoint written, every rank done, then the group
    destroyed while the interpreter is whole (engine.comm.shutdown_distributed says why: a group
    left to interpreter exit aborts a rank now and then). Only on success: after a failure the
    other ranks may still be inside a collective, and the exit itself ends this rank's part."""
    import torch.distributed as dist

    from engine.comm import shutdown_distributed

    wait = getattr(run.engine, "wait_for_checkpoint", None)
    if callable(wait):
        wait()
    if dist.is_initialized():
        dist.barrier()
    shutdown_distributed()


def setup(args: TrainerArgs) -> Run:
    # Mistakes in the model name or data file are reported before torch is even imported.
    model_cfg = get_preset(args.model, seq_len=args.seq_len)
    source = open_source(args.data, vocab_size=model_cfg.vocab_size, seq_len=model_cfg.seq_len,
                         seed=args.seed, dtype=args.data_dtype)
    import torch

    import engine

    prepare_distributed(args)
    engine.init_distributed(timeout=collective_timeout(args.watchdog_timeout))
    rank, world = _rank_and_world()
    run_dir = resolve_run_dir(args.run_dir, rank, world)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    from engine.models import build_model

    # Validated before the model is built: a bad ds_config fails in a second, not after a 3B init.
    ds_source = filled_ds_config(args, model_cfg.d_model)   # "auto" filled from the flags, as HF does
    ds_config = engine.load_config(ds_source, world_size=world)
    model = build_model(args.model, seed=args.seed, device=device, seq_len=args.seq_len)
    model_engine, _, _, _ = engine.initialize(
        model=model, model_parameters=model.parameters(), config=ds_source,
        optimizer=None if ds_config.optimizer is not None else _default_optimizer(args.lr))
    if model_engine.activation_checkpointing_enabled:  # ds_config section or gradient_checkpointing
        model.set_activation_checkpointing(True)
    monitor = build_monitor(args, run_dir, rank, world, model_engine, model_cfg.flops_per_token())
    paths = RunPaths(run_dir)
    save_dir = Path(args.save_dir) if args.save_dir else paths.checkpoints
    checkpointer = Checkpointer(save_dir, every=args.save_every, keep=args.save_keep,
                                control_dir=paths.control, is_rank0=rank == 0)
    micro, accum = model_engine.train_micro_batch_size_per_gpu(), model_engine.gradient_accumulation_steps()
    log_every = args.log_every or model_engine.steps_per_print() or 10
    monitor.metrics.info(f"model {args.model} ({model_cfg.num_parameters() / 1e6:.2f}M params), world size {world}, "
                         f"micro-batch {micro} x accumulation {accum} -> global batch {micro * accum * world}, "
                         f"run dir {run_dir}")
    return Run(args, model_engine, source, GlobalBatchSampler(micro * accum * world), checkpointer,
               monitor, rank, world, model_engine.device, micro, accum, log_every)


def collective_timeout(watchdog_s: float) -> Any:
    """The process group's per-collective timeout: longer than the hang watchdog and its grace period.

    With NCCL's default (10 minutes) equal to the watchdog's, NCCL aborted the stuck collective
    first and the watchdog's stack and flight-recorder dumps were lost. None (torch's default)
    when the watchdog is off."""
    from datetime import timedelta

    if watchdog_s <= 0:
        return None
    grace = min(30.0, max(5.0, watchdog_s / 2))   # the watchdog's own grace period (watchdog.py)
    return timedelta(seconds=max(600.0, watchdog_s + 2 * grace + 90))


@dataclass
class _Window:
    """Steps since the last log record: their summed loss (a device tensor, never read between
    log steps) and the wall time they took."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    loss_sum: Any = None

    def add(self, loss: Any) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.steps += 1


@dataclass(frozen=True)
class WindowFigures:
    """A log window's figures on the host, the same on every rank."""

    loss: float                 # mean over the window's steps and over the ranks
    grad_norm: float | None     # the last step's global gradient norm
    checkpoint_requested: bool  # a launcher asked rank 0 for a checkpoint


def loop(run: Run, start: int) -> None:
    window = _Window()
    for step in range(start + 1, run.args.steps + 1):
        window = iteration(run, step, window)
    if run.checkpointer.every and run.checkpointer.last_saved_step != run.args.steps:
        with run.monitor.phase("checkpoint", run.args.steps):
            run.checkpointer.save(run.engine, run.args.steps, {"sampler": run.sampler})


def iteration(run: Run, step: int, window: _Window) -> _Window:
    """One step of the loop; returns the log window to continue with.

    Between log steps nothing here waits for the device: the loss stays a device tensor and no
    collective runs. A log step (every ``log_every`` steps, and the last) makes one collective and
    one device-to-host copy (``summarize``) that carry the loss, the gradient norm and rank 0's
    view of a launcher's checkpoint request, so a request is answered at the next log step.
    (With ``wall_clock_breakdown`` the step timer also synchronises at every phase; step_timer.py.)
    """
    window.add(train_step(run, step))
    logging = step % run.log_every == 0 or step == run.args.steps
    figures = summarize(run, step, window) if logging else None   # step time: the device catches up here
    paused = time.perf_counter()  # evaluation and checkpoints do not count as step time
    if run.args.eval_every and step % run.args.eval_every == 0:
        # Before the step's train record, so the last line of metrics.jsonl is a train record.
        with run.monitor.phase("eval", step):
            run.metrics.log({"kind": "eval", "step": step, "eval_loss": evaluate(run)})
    window.start += time.perf_counter() - paused
    if figures is not None:
        # Before the checkpoint: a run killed after saving step k resumes at k + 1, so a record
        # written after the save would be lost for good (a hole in the loss curve). The save's
        # time goes to the next record's breakdown.
        log_train(run, step, window, figures)
        window = _Window()
    if run.checkpointer.due(step) or (figures is not None and figures.checkpoint_requested):
        paused = time.perf_counter()
        with run.monitor.phase("checkpoint", step):
            run.checkpointer.save(run.engine, step, {"sampler": run.sampler})
        run.monitor.beat(step)   # a long save is progress, not a hang
        window.start += time.perf_counter() - paused
    run.monitor.beat(step)
    return window


def summarize(run: Run, step: int, window: _Window) -> WindowFigures:
    """The window's figures on the host: one all_reduce of a device tensor and one copy back."""
    import torch

    with run.monitor.phase("metrics", step):
        loss = (window.loss_sum.detach().float() / window.steps).reshape(())
        norm = run.engine.get_global_grad_norm()
        values = [loss, loss.new_full((), 1.0 if run.checkpointer.requested() else 0.0)]
        if torch.is_tensor(norm):
            values.append(norm.detach().float().reshape(()).to(loss.device))
        stacked = _sum_across_ranks(torch.stack(values), run.world_size)
        host = stacked.tolist()
    world = run.world_size
    grad_norm = host[2] / world if torch.is_tensor(norm) else (None if norm is None else float(norm))
    return WindowFigures(host[0] / world, grad_norm, host[1] > 0)


def train_step(run: Run, step: int) -> Any:
    """One optimizer step: ``grad_accum`` micro-batches; returns this rank's mean loss (a tensor)."""
    total, phase, accum = None, run.monitor.phase, run.grad_accum
    for micro_step in range(accum):
        with phase("data", step, micro_step, accum):
            x, y = _batch(run, run.sampler.micro_batch_indices(micro_step, run.rank, run.world_size,
                                                               run.micro_batch))
        with phase("forward", step, micro_step, accum):
            loss = run.engine(x, y)
        with phase("backward", step, micro_step, accum):
            stall_if_requested(run.rank, step)
            run.engine.backward(loss)
        with phase("optimizer", step, micro_step, accum):
            run.engine.step()
        total = loss.detach() if total is None else total + loss.detach()
    run.sampler.advance()
    return total / accum


def evaluate(run: Run) -> float:
    """Mean loss over a fixed set of samples (the same ones at every evaluation).

    Their indices lie far beyond any training position, so synthetic eval samples are never
    trained on; for a token file they are windows of the same file (a fixed probe, not a split).
    """
    import torch

    base = 1 << 62  # indices far past any training position: never trained on (synthetic data)
    run.engine.eval()
    with torch.no_grad():
        losses = []
        for i in range(run.args.eval_iters):
            first = base + (i * run.world_size + run.rank) * run.micro_batch
            x, y = _batch(run, range(first, first + run.micro_batch))
            losses.append(run.engine(x, y).float())
    run.engine.train()
    return _mean_across_ranks(torch.stack(losses).mean(), run.world_size)


def log_train(run: Run, step: int, window: _Window, figures: WindowFigures) -> None:
    elapsed = time.perf_counter() - window.start
    tokens_per_s = run.sampler.global_batch_size * run.source.seq_len * window.steps / elapsed
    engine_ = run.engine
    mem, mem_kind = peak_memory_bytes()
    record = {
        "kind": "train", "step": step, "total_steps": run.args.steps, "loss": figures.loss,
        "lr": engine_.get_lr()[0], "grad_norm": figures.grad_norm,
        "loss_scale": _loss_scale(engine_), "tokens_per_s": tokens_per_s, "step_time_s": elapsed / window.steps,
        **run.monitor.throughput_fields(tokens_per_s, window.steps),
        "samples": run.sampler.consumed_samples, "world_size": run.world_size,
        "restart_count": restart_count(), "mem": mem, "mem_kind": mem_kind, "time": time.time(),
        **_comm_fields(window.steps),
    }
    run.metrics.log(record)
    run.metrics.status("running", step=step, total_steps=run.args.steps, loss=figures.loss,
                       world_size=run.world_size, restart_count=record["restart_count"])


def _comm_fields(steps: int) -> dict[str, float]:
    """What this rank's collectives moved per step since the last record (engine.comm's ledger)."""
    from engine.comm import ledger

    moved = ledger.mark_step()
    return {"comm_bytes_per_step": moved["comm_bytes_sent"] / max(1, steps),
            "comm_calls_per_step": moved["comm_calls"] / max(1, steps)}


def resolve_run_dir(run_dir: str | None, rank: int, world: int) -> Path:
    """The run directory; the default (./runs/<id>) is chosen by rank 0 and shared with all ranks.

    Under torchrun the id is the rendezvous run id, which survives worker restarts, so a
    restarted worker finds the same directory and resumes from its checkpoints.
    """
    if run_dir:
        return Path(run_dir)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    name = run_id if run_id and run_id != "none" else time.strftime("%Y%m%d-%H%M%S")
    chosen = [str(Path("runs") / name)]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


# --- helpers --------------------------------------------------------------------------------

def _batch(run: Run, indices: range) -> tuple[Any, Any]:
    import torch

    tokens = torch.from_numpy(run.source.samples(indices))
    if run.device.type == "cuda":
        tokens = tokens.pin_memory().to(run.device, non_blocking=True)
    return tokens[:, :-1], tokens[:, 1:]


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_across_ranks(value: Any, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        value = value.detach().float().clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def _sum_across_ranks(value: Any, world: int) -> Any:
    """``value`` summed over the ranks, in place (a device tensor: right for NCCL)."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(value)
    return value


def _default_optimizer(lr: float) -> Any:
    """AdamW for ds_configs without an ``optimizer`` section (DeepSpeed scripts pass their own)."""
    import torch

    return lambda groups: torch.optim.AdamW(groups, lr=lr)


def _loss_scale(engine_: Any) -> float | None:
    """The fp16 loss scale; None in bf16/fp32, which train without one."""
    return float(engine_.loss_scale) if engine_.precision.name == "fp16" else None


if __name__ == "__main__":
    raise SystemExit(main())
