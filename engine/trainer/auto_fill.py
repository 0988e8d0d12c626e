"""The bundled trainer fills a ds_config's ``"auto"`` values, as the HF Trainer does for its scripts.

From the trainer's own flags: ``--micro-batch`` (``train_micro_batch_size_per_gpu``),
``--grad-accum`` (``gradient_accumulation_steps``; the global batch then follows from the batch
rule), ``--lr`` (``optimizer.params.lr``, and the warm-up peak of a scheduler), ``--precision``
(``fp16.enabled`` / ``bf16.enabled``) and ``--steps`` (a scheduler's ``total_num_steps``). The rest
take the values transformers' DeepSpeed integration uses for its TrainingArguments defaults:
betas (0.9, 0.999), eps 1e-8, weight_decay 0, gradient_clipping 1.0, warmup_min_lr 0,
warmup_num_steps 1 (HF's 0; the schema's minimum, and DeepSpeed's WarmupLR treats anything
below 2 as 2), and ZeRO bucket sizes from the model width (``d²``, ``0.9·d²``, ``10·d``).

A flag given explicitly that contradicts a value written in the ds_config is an error naming
both (the HF Trainer refuses such mismatches too); an ``"auto"`` nothing can fill stays, and
``engine.initialize`` then names it.
"""
from __future__ import annotations

from typing import Any

from engine.config.source import fill_auto, read_source

from .args import TrainerArgs, TrainerError

def trainer_auto_values(args: TrainerArgs, d_model: int) -> dict[str, Any]:
    """What the trainer's flags (and HF's defaults for the rest) put where the ds_config says "auto"."""
    values: dict[str, Any] = {
        "optimizer.params.lr": args.lr, "optimizer.params.betas": [0.9, 0.999], "optimizer.params.eps": 1e-8,
        "optimizer.params.weight_decay": 0.0, "gradient_clipping": 1.0,
        "scheduler.params.warmup_min_lr": 0.0, "scheduler.params.warmup_max_lr": args.lr,
        "scheduler.params.warmup_num_steps": 1, "scheduler.params.total_num_steps": args.steps,
        "zero_optimization.reduce_bucket_size": d_model * d_model,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * d_model * d_model),
        "zero_optimization.stage3_param_persistence_threshold": 10 * d_model,
        "fp16.enabled": args.precision == "fp16", "bf16.enabled": args.precision == "bf16",
        "amp.enabled": False,
    }
    if args.micro_batch is not None:
        values["train_micro_batch_size_per_gpu"] = args.micro_batch
    if args.grad_accum is not None:
        values["gradient_accumulation_steps"] = args.grad_accum
    return values


def filled_ds_config(args: TrainerArgs, d_model: int) -> dict[str, Any]:
    """The ds_config with every "auto" the trainer can fill filled (a dict for engine.initialize)."""
    raw, _ = read_source(args.deepspeed_config)
    _refuse_contradictions(raw, args)
    fill_auto(raw, trainer_auto_values(args, d_model))   # no --precision: "auto" precision is fp32
    return raw


def _refuse_contradictions(raw: dict[str, Any], args: TrainerArgs) -> None:
    flags = {"train_micro_batch_size_per_gpu": ("--micro-batch", args.micro_batch),
             "gradient_accumulation_steps": ("--grad-accum", args.grad_accum)}
    if args.precision is not None:
        flags["fp16.enabled"] = ("--precision", args.precision == "fp16")
        flags["bf16.enabled"] = ("--precision", args.precision == "bf16")
    for path, (flag, value) in flags.items():
        written = _get(raw, path)
        if value is None or written is None or written == "auto" or written == value:
            continue
        shown = args.precision if flag == "--precision" else value
        raise TrainerError(f"{flag} {shown} contradicts the ds_config's {path}: {written!r}; write \"auto\" "
                           f"there to let the flag decide, or drop {flag}")


def _get(raw: dict[str, Any], path: str) -> Any:
    node: Any = raw
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node

