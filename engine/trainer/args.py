"""Command line of ``python -m engine.train``.

The orchestrator renders these exact flag names into torchrun commands; each dashed flag also
accepts its underscore spelling, as DeepSpeed-era scripts write them. Defaults that the
orchestrator controls come from ``ORCH_*`` environment variables so a job spec never has to
repeat them in ``args``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from engine import run_contract as contract
from engine.errors import UserError
from engine.models.presets import PRESETS
from engine.run_contract import DEFAULT_WATCHDOG_TIMEOUT_S


class TrainerError(UserError):
    """A user mistake in how the trainer was started; printed as one line, exit status 2."""


@dataclass(frozen=True)
class TrainerArgs:
    deepspeed_config: str
    model: str = "tiny"
    steps: int = 100
    seq_len: int | None = None
    data: str = "synthetic"
    data_dtype: str | None = None
    seed: int = 1234
    lr: float = 3e-4
    micro_batch: int | None = None   # fills the ds_config's "auto" batch keys (auto_fill.py)
    grad_accum: int | None = None
    precision: str | None = None     # "fp32" | "bf16" | "fp16": fills fp16/bf16.enabled "auto"
    run_dir: str | None = None  # None: resolved at start (needs the rank, see loop.resolve_run_dir)
    save_dir: str | None = None  # None: <run_dir>/checkpoints
    save_every: int = 0
    save_keep: int = contract.DEFAULT_CHECKPOINT_KEEP
    log_every: int | None = None  # None: the ds_config's steps_per_print
    eval_every: int = 0
    eval_iters: int = 4
    watchdog_timeout: float = DEFAULT_WATCHDOG_TIMEOUT_S  # no step for this long: ranks dump stacks, job fails; 0 = off


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as one line (no usage block) with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"engine.train: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _flags(name: str) -> list[str]:
    """``--seq-len`` -> ['--seq-len', '--seq_len']."""
    dashed = f"--{name.replace('_', '-')}"
    under = f"--{name.replace('-', '_')}"
    return [dashed] if dashed == under else [dashed, under]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise TrainerError(f"environment variable {name}={raw!r} must be an integer") from None


def _flag_or_env(flag: int | None, env: str, default: int) -> int:
    """The flag when given, else the orchestrator's environment variable, else the shared default."""
    return flag if flag is not None else _env_int(env, default)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise TrainerError(f"environment variable {name}={raw!r} must be a number") from None


def _positive(flag: str, value: int | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise TrainerError(f"{flag} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.train", description=(
        "Train a GPT-style model with the engine (DeepSpeed-compatible ZeRO). Run under torchrun "
        "for more than one process."))
    p.add_argument(*_flags("deepspeed_config"), "--config", *_flags("engine_config"),
                   dest="deepspeed_config", metavar="PATH", help="ds_config.json (DeepSpeed format)")
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # DeepSpeed habit; implied
    p.add_argument(*_flags("local_rank"), type=int, help=argparse.SUPPRESS)  # the env var LOCAL_RANK wins
    p.add_argument("--model", default="tiny", help=f"model preset: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps to train (total, across restarts)")
    p.add_argument(*_flags("seq_len"), type=int, help="tokens per sample (default: the preset's)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a uint16/uint32 token file (.bin)")
    p.add_argument(*_flags("data_dtype"), choices=["uint16", "uint32"],
                   help="token dtype of --data (default: uint16 if the vocab fits, else uint32)")
    p.add_argument("--seed", type=int, default=1234, help="seed for weights and data order")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="learning rate of the default AdamW, used when the ds_config has no optimizer section; "
                        "also fills a ds_config's \"auto\" lr")
    p.add_argument(*_flags("micro_batch"), type=int, metavar="N",
                   help="fills the ds_config's \"auto\" train_micro_batch_size_per_gpu")
    p.add_argument(*_flags("grad_accum"), type=int, metavar="N",
                   help="fills the ds_config's \"auto\" gradient_accumulation_steps")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="fills the ds_config's \"auto\" fp16.enabled / bf16.enabled")
    p.add_argument(*_flags("run_dir"), help="metrics/status directory (default $ORCH_RUN_DIR or ./runs/<id>)")
    p.add_argument(*_flags("save_dir"),
                   help="checkpoint directory (default $ORCH_CHECKPOINT_DIR or <run-dir>/checkpoints)")
    p.add_argument(*_flags("save_every"), type=int,
                   help="checkpoint every N steps (default $ORCH_CHECKPOINT_EVERY or 0 = never)")
    p.add_argument(*_flags("save_keep"), type=int,
                   help=f"keep the newest K checkpoints (default ${contract.ENV_CHECKPOINT_KEEP} or "
                        f"{contract.DEFAULT_CHECKPOINT_KEEP})")
    p.add_argument(*_flags("log_every"), type=int,
                   help="log every N steps (default: ds_config steps_per_print): the only steps that wait for "
                        "the device, and where a launcher's checkpoint request is answered")
    p.add_argument(*_flags("eval_every"), type=int, default=0, help="evaluate every N steps (0 = never)")
    p.add_argument(*_flags("eval_iters"), type=int, default=4, help="micro-batches per rank in one evaluation")
    p.add_argument(*_flags("watchdog_timeout"), type=float, metavar="SECONDS",
                   help="when no step completes for this long, every rank writes its stacks to "
                        "<run-dir>/hang/ and the job fails (default $ORCH_WATCHDOG_TIMEOUT or 600; 0 = off)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainerArgs:
    """Parse ``argv`` (default sys.argv[1:]) and the ORCH_* environment into TrainerArgs."""
    ns = build_parser().parse_args(argv)
    if not ns.deepspeed_config:
        raise TrainerError("--deepspeed_config PATH is required (a DeepSpeed ds_config.json)")
    save_every = _flag_or_env(ns.save_every, contract.ENV_CHECKPOINT_EVERY, contract.DEFAULT_CHECKPOINT_EVERY)
    save_keep = _flag_or_env(ns.save_keep, contract.ENV_CHECKPOINT_KEEP, contract.DEFAULT_CHECKPOINT_KEEP)
    args = TrainerArgs(
        deepspeed_config=ns.deepspeed_config, model=ns.model, steps=ns.steps, seq_len=ns.seq_len,
        data=ns.data, data_dtype=ns.data_dtype, seed=ns.seed, lr=ns.lr,
        micro_batch=ns.micro_batch, grad_accum=ns.grad_accum, precision=ns.precision,
        run_dir=ns.run_dir or os.environ.get(contract.ENV_RUN_DIR) or None,
        save_dir=ns.save_dir or os.environ.get(contract.ENV_CHECKPOINT_DIR) or None,
        save_every=save_every, save_keep=save_keep, log_every=ns.log_every,
        eval_every=ns.eval_every, eval_iters=ns.eval_iters,
        watchdog_timeout=(ns.watchdog_timeout if ns.watchdog_timeout is not None
                          else _env_float(contract.ENV_WATCHDOG_TIMEOUT, DEFAULT_WATCHDOG_TIMEOUT_S)),
    )
    _positive("--steps", args.steps)
    _positive("--micro-batch", args.micro_batch)
    _positive("--grad-accum", args.grad_accum)
    _positive("--seq-len", args.seq_len)
    _positive("--save-every", args.save_every, allow_zero=True)
    _positive("--save-keep", args.save_keep)
    _positive("--log-every", args.log_every)
    _positive("--eval-every", args.eval_every, allow_zero=True)
    _positive("--eval-iters", args.eval_iters)
    if not (args.watchdog_timeout >= 0 and math.isfinite(args.watchdog_timeout)):
        raise TrainerError(f"--watchdog-timeout must be >= 0 seconds (0 = off), got {args.watchdog_timeout}")
    if not args.lr > 0:
        raise TrainerError(f"--lr must be > 0, got {args.lr}")
    if not os.path.isfile(args.deepspeed_config):
        raise TrainerError(f"ds_config file {args.deepspeed_config!r} does not exist (--deepspeed_config)")
    return args
