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
                auto_values: Mapping[str, Any] | None = None, program_fills_auto: bool = False,
                lenient: bool = False) -> EngineConfig:
    """Read, migrate, resolve and validate a ds_config.

    source: a path (str or os.PathLike) to a JSON file, JSON text starting with "{", or a dict.
    world_size: data-parallel ranks; when given, the batch rule is checked now and the result
        is kept in ``cfg.batch``.
    auto_values: values for ``"auto"`` entries, keyed by full dotted path
        (``"optimizer.params.lr"``) or, when unambiguous, the last key (``"lr"``). Batch keys
        found here also fill a config that sets neither ``train_batch_size`` nor
        ``train_micro_batch_size_per_gpu``.
    program_fills_auto: the job's program fills the ``"auto"`` values ``auto_values`` does not
        (``orch check`` of a user's script): they are listed in ``cfg.auto_left`` instead of
        being errors, everything else is validated, and the batch rule is checked as far as
        the known values go (the sizes are resolved only when no batch key is left).

    lenient: unknown keys that are not near a valid one (DeepSpeed ignores unknown keys: a
        leftover ``cuda_visible_devices`` should not block a migration) become warnings listed in
        ``cfg.ignored_unknown``; a near-typo (``"stgae"``) stays an error, and so does any unknown
        optimizer or scheduler param (DeepSpeed passes those to the constructor, which fails).
        A top-level ``"strict": false`` in the ds_config asks for the same (DeepSpeed ignores it).

    Raises ConfigError (a ValueError) listing every problem; never a pydantic error.
    """
    raw, label = read_source(source)
    if auto_values is not None and not isinstance(auto_values, Mapping):
        raise ConfigError([ConfigProblem("auto_values", f"must be a mapping, got {type(auto_values).__name__}")],
                          label)
    lenient = _strict_switch(raw, label) is False or lenient
    notes, deprecations, problems = migrate(raw)
    for message in deprecations:
        warnings.warn(message, ConfigDeprecationWarning, stacklevel=2)
    _fill_absent_batch(raw, auto_values or {})
    left: set[str] = set()
    filled, derived, auto_problems = resolve_auto(raw, auto_values, leave=program_fills_auto, left=left)
    problems += auto_problems
    cfg, ignored, validation = _validate_leniently(raw, filled, lenient)
    problems += validation
    if problems or cfg is None:
        raise ConfigError(problems, label)
    cfg._ignored_unknown = [f"{p.path}: unknown key ignored (lenient); {p.hint}" for p in ignored]
    for line in cfg._ignored_unknown:
        warnings.warn(f"ds_config: {line}", ConfigLenientWarning, stacklevel=2)
    cfg._migrations = notes
    cfg._auto_derived = derived
    cfg._auto_left = frozenset(left)
    if world_size is not None:
        _resolve_batch(cfg, world_size, left, label)
    return cfg


def _strict_switch(raw: dict[str, Any], label: str | None) -> bool:
    """The ds_config's own top-level ``"strict"`` (removed from ``raw``; DeepSpeed ignores the key)."""
    strict = raw.pop("strict", True)
    if not isinstance(strict, bool):
        raise ConfigError([ConfigProblem("strict", f"must be true or false, got {strict!r}",
                                         "false turns unknown keys that are not near-typos into warnings")], label)
    return strict


def _validate_leniently(raw: dict[str, Any], filled: dict[str, str], lenient: bool
                        ) -> tuple[EngineConfig | None, list[ConfigProblem], list[ConfigProblem]]:
    """(config, the unknown keys ignored, the problems left); leniently, ignorable keys are
    dropped and the rest validated again."""
    cfg, validation = _validate(raw, filled)
    ignored = [p for p in validation if _ignorable(p)] if lenient else []
    if ignored:
        for p in ignored:
            _delete_path(raw, p.path)
        cfg, validation = _validate(raw, filled)
    return cfg, ignored, [_with_lenient_hint(p) if _ignorable(p) else p for p in validation]


def _resolve_batch(cfg: EngineConfig, world_size: int, left: set[str], label: str | None) -> None:
    try:
        if not left.intersection(BATCH_KEYS):
            cfg._batch = cfg.resolve_batch(world_size)
        elif cfg.train_batch_size is not None:
            cfg.resolve_batch(world_size)   # the rule as far as the known values go; sizes stay unknown
    except ConfigError as exc:
        raise ConfigError(exc.problems, label) from None


class ConfigLenientWarning(UserWarning):
    """An unknown ds_config key was ignored because the config was loaded leniently."""


def _validate(raw: dict[str, Any], filled: dict[str, str]) -> tuple[EngineConfig | None, list[ConfigProblem]]:
    try:
        return EngineConfig.model_validate(raw), []
    except ValidationError as exc:
        return None, [_explain(p, filled) for p in translate(exc, "", EngineConfig)]


def _ignorable(problem: ConfigProblem) -> bool:
    """An unknown key DeepSpeed would ignore and that is not a near-typo of a valid one."""
    return (problem.message == "unknown key" and not problem.hint.startswith("did you mean")
            and not problem.path.startswith(("optimizer.params.", "scheduler.params.")))


def _with_lenient_hint(problem: ConfigProblem) -> ConfigProblem:
    return ConfigProblem(problem.path, problem.message,
                         f"{problem.hint}; DeepSpeed ignores unknown keys: remove it, or load leniently "
                         '(a top-level "strict": false, or orch check --lenient) to make it a warning')


def _delete_path(raw: dict[str, Any], path: str) -> None:
    *parents, leaf = path.split(".")
    node: Any = raw
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


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
