"""Loading a ds_config: read, migrate deprecated keys, fill ``"auto"``, validate, resolve the batch.

``load_config`` accepts a path, JSON text or a dict and raises one ``ConfigError`` listing every
problem (unknown keys come with the nearest valid key); it never lets a pydantic error through.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from .errors import ConfigError, ConfigProblem, translate
from .model import EngineConfig
from .source import BATCH_KEYS, ConfigDeprecationWarning, migrate, read_source, resolve_auto


def load_config(source: Any, *, world_size: int | None = None,
                auto_values: Mapping[str, Any] | None = None) -> EngineConfig:
    """Read, migrate, resolve and validate a ds_config.

    source: a path (str or os.PathLike) to a JSON file, JSON text starting with "{", or a dict.
    world_size: data-parallel ranks; when given, the batch rule is checked now and the result
        is kept in ``cfg.batch``.
    auto_values: values for ``"auto"`` entries, keyed by full dotted path
        (``"optimizer.params.lr"``) or, when unambiguous, the last key (``"lr"``). Batch keys
        found here also fill a config that sets neither ``train_batch_size`` nor
        ``train_micro_batch_size_per_gpu``.

    Raises ConfigError (a ValueError) listing every problem; never a pydantic error.
    """
    raw, label = read_source(source)
    if auto_values is not None and not isinstance(auto_values, Mapping):
        raise ConfigError([ConfigProblem("auto_values", f"must be a mapping, got {type(auto_values).__name__}")],
                          label)
    notes, deprecations, problems = migrate(raw)
    for message in deprecations:
        warnings.warn(message, ConfigDeprecationWarning, stacklevel=2)
    _fill_absent_batch(raw, auto_values or {})
    filled, derived, auto_problems = resolve_auto(raw, auto_values)
    problems += auto_problems
    cfg: EngineConfig | None = None
    try:
        cfg = EngineConfig.model_validate(raw)
    except ValidationError as exc:
        problems += [_explain(p, filled) for p in translate(exc, "", EngineConfig)]
    if problems or cfg is None:
        raise ConfigError(problems, label)
    cfg._migrations = notes
    cfg._auto_derived = derived
    if world_size is not None:
        try:
            cfg._batch = cfg.resolve_batch(world_size)
        except ConfigError as exc:
            raise ConfigError(exc.problems, label) from None
    return cfg


def _fill_absent_batch(raw: dict[str, Any], auto_values: Mapping[str, Any]) -> None:
    """A config with no batch size takes the job's (DeepSpeed would refuse to start)."""
    if isinstance(auto_values, Mapping) and not any(k in raw for k in BATCH_KEYS[:2]):
        for key in BATCH_KEYS:
            if key not in raw and key in auto_values:
                raw[key] = auto_values[key]


def _explain(problem: ConfigProblem, filled: dict[str, str]) -> ConfigProblem:
    """Say where a bad value came from when it was an "auto" filled from auto_values."""
    source = next((key for path, key in filled.items()
                   if problem.path == path or problem.path.startswith((path + ".", path + "["))), None)
    if source is not None:
        return ConfigProblem(problem.path, f"{problem.message} (the value of auto_values[{source!r}] for \"auto\")",
                             problem.hint)
    if '"auto" (a string)' in problem.message and not problem.hint:
        return ConfigProblem(problem.path, problem.message, AUTO_HINT)
    return problem


AUTO_HINT = ('"auto" is accepted only where the HF Trainer fills values (batch sizes, gradient_clipping, '
             "fp16/bf16.enabled, optimizer lr/betas/eps/weight_decay, scheduler warmup and total steps, "
             "ZeRO bucket sizes); write a value here")
