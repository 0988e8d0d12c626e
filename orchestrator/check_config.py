"""How ``orch check`` loads a job's ds_config: "auto" filled by whoever fills it, leniency on request.

- The bundled trainer fills ``"auto"`` from its own flags (engine/trainer/auto_fill.py): check
  fills them from the job's ``args`` the same way, so what is checked is what will run.
- A user's program (an HF Trainer script) fills ``"auto"`` itself at run time: check leaves
  those values to it, lists them, and validates everything else (the batch rule as far as the
  written values go).
- ``lenient``: unknown keys DeepSpeed ignores become notes instead of errors (near-typos of
  real keys stay errors); a ``"strict": false`` in the ds_config does the same.
"""
from __future__ import annotations

import warnings
from typing import Any

from .errors import UserError
from .spec import BUNDLED_TRAINER, JobSpec


def load_job_config(spec: JobSpec, ds: dict[str, Any], *, lenient: bool = False,
                    autotune: bool = False) -> tuple[Any, list[str]]:
    """(the validated EngineConfig, notes to print) for the job's world size. With ``autotune`` (or
    ``autotuning.enabled``) "auto" batch sizes are left for the autotuning answer."""
    from engine.config import ConfigError, ConfigLenientWarning, load_config

    source = str(spec.ds_config_path() or "ds_config (inline)")
    user_program = spec.program != BUNDLED_TRAINER
    tuning = autotune or bool((ds.get("autotuning") or {}).get("enabled")) if isinstance(ds, dict) else autotune
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigLenientWarning)   # reported below, as notes
            cfg = load_config(ds, world_size=spec.world_size, lenient=lenient,
                              auto_values=None if user_program else trainer_auto_values(spec),
                              program_fills_auto=user_program or tuning)
    except ConfigError as exc:
        raise UserError(f"{source}:\n{exc}") from None
    notes += [f"lenient: {line}" for line in cfg.ignored_unknown]
    if cfg.auto_left and not user_program:
        notes.append(f"\"auto\": autotuning answers {', '.join(cfg.auto_left)}")
    elif cfg.auto_left:
        notes.append(f"\"auto\": the program ({spec.program}) must fill {', '.join(cfg.auto_left)} "
                     "(an HF Trainer script does, from its TrainingArguments)")
    return cfg, notes


def trainer_auto_values(spec: JobSpec) -> dict[str, Any]:
    """What ``python -m engine.train`` with the job's ``args`` puts where the ds_config says "auto"."""
    from engine.models.presets import get_preset
    from engine.trainer.args import TrainerArgs, build_parser
    from engine.trainer.auto_fill import trainer_auto_values as values_for

    try:
        ns, _ = build_parser().parse_known_args(list(spec.args))
    except SystemExit:
        raise UserError(f"args: the bundled trainer cannot parse {list(spec.args)} (see python -m engine.train "
                        "--help)") from None
    args = TrainerArgs(deepspeed_config="", model=ns.model, steps=ns.steps, lr=ns.lr, micro_batch=ns.micro_batch,
                       grad_accum=ns.grad_accum, precision=ns.precision)
    try:
        d_model = get_preset(ns.model, seq_len=ns.seq_len).d_model
    except (KeyError, ValueError) as exc:
        raise UserError(f"args: --model {ns.model!r}: {exc}") from None
    return values_for(args, d_model)
