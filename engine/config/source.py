"""Reading a ds_config and rewriting it before validation: deprecated keys and ``"auto"`` values.

Reading: a dict, a JSON file, or inline JSON text. Invalid JSON is reported with file, line and
column; duplicate keys are errors (as in DeepSpeed).

Migration: keys DeepSpeed still accepts under an old name are rewritten to the new one, each
with a ``ConfigDeprecationWarning`` and a line in the returned list.

``"auto"``: the Hugging Face Trainer writes ``"auto"`` where the job should decide a value;
``resolve_auto`` fills those from ``auto_values`` (keyed by full dotted path or, when
unambiguous, by the last key: ``{"lr": 3e-4, "train_micro_batch_size_per_gpu": 4}``).
"""
from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, ConfigProblem, describe


class ConfigDeprecationWarning(DeprecationWarning):
    """A ds_config key was given under a deprecated DeepSpeed name and has been migrated."""


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")

# Where "auto" is accepted: the places the HF Trainer fills (transformers' deepspeed integration).
AUTO_PATHS = frozenset({
    *BATCH_KEYS, "gradient_clipping", "fp16.enabled", "bf16.enabled", "amp.enabled",
    "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps", "optimizer.params.weight_decay",
    "scheduler.params.warmup_min_lr", "scheduler.params.warmup_max_lr", "scheduler.params.warmup_num_steps",
    "scheduler.params.total_num_steps", "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
})
_LEAVES: dict[str, list[str]] = {}
for _p in AUTO_PATHS:
    _LEAVES.setdefault(_p.rsplit(".", 1)[-1], []).append(_p)
# "auto" keys their section requires: while the program's values are unknown, validation sees these.
_REQUIRED_PLACEHOLDERS = {"scheduler.params.total_num_steps": 2**31 - 1}
# A missing value may be taken from another key, as the HF Trainer does (warmup peak = lr).
_FALLBACKS = {"scheduler.params.warmup_max_lr": ("optimizer.params.lr", "lr")}


def read_source(source: Any) -> tuple[dict[str, Any], str | None]:
    """The raw config dict and a label for messages (the file name, or None for a dict)."""
    if isinstance(source, Mapping):
        bad = list(_non_string_keys(source))
        if bad:
            raise ConfigError([ConfigProblem(path, f"key {key!r} is not a string", "ds_config keys are strings")
                               for path, key in bad])
        return copy.deepcopy(dict(source)), None
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return _parse(source, "ds_config (inline JSON)"), None
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError([ConfigProblem("", f"a ds_config must be a file path, JSON text or a dict, "
                                             f"got {type(source).__name__}")])
    path = Path(source).expanduser()
    label = str(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(label, "file not found",
                                         f"check the path (resolved to {path.resolve()})")]) from None
    except IsADirectoryError:
        raise ConfigError([ConfigProblem(label, "is a directory, not a ds_config JSON file")]) from None
    except PermissionError:
        raise ConfigError([ConfigProblem(label, "permission denied while reading the file")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem(label, f"is not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    return _parse(text, label), label


def _non_string_keys(node: Mapping, prefix: str = ""):
    for key, value in node.items():
        if not isinstance(key, str):
            yield prefix or "(top level)", key
        elif isinstance(value, Mapping):
            yield from _non_string_keys(value, f"{prefix}.{key}" if prefix else key)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Comments or trailing commas: accepted by DeepSpeed's hjson reader, not by JSON.
_HJSON_ONLY = re.compile(r"(^|\s)(//|#|/\*)|,\s*[}\]]")


def _parse(text: str, label: str) -> dict[str, Any]:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        hint = ("DeepSpeed reads ds_configs with hjson, which allows comments and trailing commas; "
                "orch reads strict JSON, so remove them") if _HJSON_ONLY.search(text) else ""
        raise ConfigError([ConfigProblem(f"{label}:{exc.lineno}:{exc.colno}", f"invalid JSON: {exc.msg}",
                                         hint)]) from None
    except _DuplicateKey as exc:
        raise ConfigError([ConfigProblem(label, f"duplicate key {str(exc)!r} in one JSON object",
                                         "keep only one of them (DeepSpeed rejects duplicates too)")]) from None
    except ValueError as exc:
        raise ConfigError([ConfigProblem(label, f"invalid JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(label, f"a ds_config must be a JSON object {{...}}, got {describe(data)}")])
    return data


def migrate(raw: dict[str, Any]) -> tuple[list[str], list[str], list[ConfigProblem]]:
    """Rewrite deprecated and aliased keys in place.

    Returns (notes: one line per rewrite, deprecations: the subset that deserve a
    ConfigDeprecationWarning, problems).
    """
    notes: list[str] = []
    deprecations: list[str] = []
    problems: list[ConfigProblem] = []

    def moved(old: str, new: str, detail: str = "") -> None:
        msg = f"'{old}' is deprecated in DeepSpeed; migrated to '{new}'{detail}"
        notes.append(msg)
        deprecations.append(msg)

    if "bfloat16" in raw:
        if "bf16" in raw:
            problems.append(ConfigProblem("bfloat16", "both 'bf16' and its old name 'bfloat16' are set",
                                          "remove 'bfloat16'"))
        else:
            raw["bf16"] = raw.pop("bfloat16")
            moved("bfloat16", "bf16")
    zero = raw.get("zero_optimization")
    if isinstance(zero, bool):
        raw["zero_optimization"] = zero = {"stage": 1 if zero else 0}
        moved("zero_optimization: " + ("true" if zero["stage"] else "false"), "zero_optimization.stage",
              f" = {zero['stage']}")
    if "allgather_size" in raw:
        if zero is None:
            raw["zero_optimization"] = zero = {}
        if isinstance(zero, dict) and "allgather_bucket_size" in zero:
            problems.append(ConfigProblem("allgather_size", "old name of zero_optimization.allgather_bucket_size, "
                                          "which is also set", "remove allgather_size"))
        elif isinstance(zero, dict):
            zero["allgather_bucket_size"] = raw.pop("allgather_size")
            moved("allgather_size", "zero_optimization.allgather_bucket_size")
    if isinstance(zero, dict):
        _migrate_zero(zero, moved, problems)
    if "gradient_checkpointing" in raw:
        value = raw.pop("gradient_checkpointing")
        if not isinstance(value, bool):
            problems.append(ConfigProblem("gradient_checkpointing", f"expected true or false, got {describe(value)}"))
        elif value:
            section = raw.setdefault("activation_checkpointing", {})
            if isinstance(section, dict):
                section["enabled"] = True
            notes.append("'gradient_checkpointing: true' is not a DeepSpeed key (DeepSpeed ignores it); "
                         "orch reads it as activation_checkpointing.enabled = true and checkpoints activations")
        else:
            notes.append("'gradient_checkpointing: false' is not a DeepSpeed key; ignored "
                         "(activation checkpointing stays off)")
    return notes, deprecations, problems


def _migrate_zero(zero: dict[str, Any], moved: Any, problems: list[ConfigProblem]) -> None:
    for old, new in (("cpu_offload", "offload_optimizer"), ("cpu_offload_param", "offload_param")):
        if old not in zero:
            continue
        value = zero.pop(old)
        path = f"zero_optimization.{old}"
        if not isinstance(value, bool):
            problems.append(ConfigProblem(path, f"expected true or false, got {describe(value)}"))
        elif value and isinstance(zero.get(new), dict) and zero[new].get("device", "none") != "none":
            problems.append(ConfigProblem(path, f"deprecated '{old}' and its replacement '{new}' are both set",
                                          f"remove '{old}'"))
        elif value:
            section = zero.get(new) if isinstance(zero.get(new), dict) else {}
            zero[new] = {**section, "device": "cpu"}
            moved(path, f"zero_optimization.{new}.device", ' = "cpu"')
        else:
            moved(path, f"zero_optimization.{new}", " (false: nothing offloaded)")
    if "cpu_offload_use_pin_memory" in zero:
        value = zero.pop("cpu_offload_use_pin_memory")
        path = "zero_optimization.cpu_offload_use_pin_memory"
        if not isinstance(value, bool):
            problems.append(ConfigProblem(path, f"expected true or false, got {describe(value)}"))
        else:
            targets = [k for k in ("offload_optimizer", "offload_param")
                       if isinstance(zero.get(k), dict) and "pin_memory" not in zero[k]]
            for k in targets:
                zero[k]["pin_memory"] = value
            moved(path, " and ".join(f"zero_optimization.{k}.pin_memory" for k in targets) or "offload_*.pin_memory",
                  "" if targets else " (no offload section to apply it to; ignored)")
    old, new = "stage3_gather_fp16_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save"
    if old in zero:
        value = zero.pop(old)
        if new in zero and zero[new] != value:
            problems.append(ConfigProblem(f"zero_optimization.{old}", f"old name of '{new}', which is also set "
                                          "to a different value", f"remove '{old}'"))
        else:
            zero[new] = value
            moved(f"zero_optimization.{old}", f"zero_optimization.{new}")


def resolve_auto(raw: dict[str, Any], auto_values: Mapping[str, Any] | None, *, leave: bool = False,
                 left: set[str] | None = None) -> tuple[dict[str, str], frozenset[str], list[ConfigProblem]]:
    """Replace ``"auto"`` values in place.

    Returns (filled: path -> the auto_values key used, batch keys left for the batch rule,
    problems). A batch key with no value is removed so the batch rule computes it; any other
    ``"auto"`` without a value is a problem naming its path. ``"auto"`` outside ``AUTO_PATHS``
    is left for validation to reject with its path.

    ``leave``: the job's program fills what ``auto_values`` does not (an HF Trainer script does, from
    its TrainingArguments): such entries are removed without a problem, so validation checks the
    rest with defaults in their place, and their paths are added to ``left``.
    """
    values = dict(auto_values or {})
    filled: dict[str, str] = {}
    derived: set[str] = set()
    problems: list[ConfigProblem] = []
    for path, parent, key in list(_auto_leaves(raw)):
        if path not in AUTO_PATHS:
            continue
        source = _lookup(path, values)
        if source is not None:
            parent[key] = values[source]
            filled[path] = source
        elif leave:
            if path in _REQUIRED_PLACEHOLDERS:
                parent[key] = _REQUIRED_PLACEHOLDERS[path]   # required by its section: validate the rest
            else:
                del parent[key]
            if left is not None:
                left.add(path)
        elif path in BATCH_KEYS:
            del parent[key]
            derived.add(path)
        else:
            del parent[key]  # reported here; validation must not report it again
            leaf = path.rsplit(".", 1)[-1]
            short = f"'{leaf}' or " if len(_LEAVES[leaf]) == 1 and leaf != path else ""
            problems.append(ConfigProblem(path, '"auto" but no value was given for it',
                                          f"pass auto_values={{{short}'{path}': ...}} to load_config, "
                                          "or write the value in the ds_config"))
    return filled, frozenset(derived), problems


def fill_auto(raw: dict[str, Any], values: Mapping[str, Any]) -> dict[str, str]:
    """Replace, in place, the ``"auto"`` entries ``values`` has a value for (keys as for
    ``auto_values``); leave the others ``"auto"`` so that loading names them. Returns the
    filled paths and the key each came from. What a program that fills "auto" does first."""
    filled: dict[str, str] = {}
    for path, parent, key in list(_auto_leaves(raw)):
        source = _lookup(path, dict(values)) if path in AUTO_PATHS else None
        if source is not None:
            parent[key] = values[source]
            filled[path] = source
    return filled


def _auto_leaves(node: dict[str, Any], prefix: str = ""):
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if value == "auto" and isinstance(value, str):
            yield path, node, key
        elif isinstance(value, dict):
            yield from _auto_leaves(value, path)


def _lookup(path: str, values: dict[str, Any]) -> str | None:
    leaf = path.rsplit(".", 1)[-1]
    candidates = [path]
    if len(_LEAVES.get(leaf, ())) == 1:
        candidates.append(leaf)
    if leaf == "enabled":
        candidates.append(path.split(".", 1)[0])          # {"fp16": True} fills fp16.enabled
    candidates += list(_FALLBACKS.get(path, ()))
    for key in candidates:
        if key in values and not (isinstance(values[key], str) and values[key] == "auto"):
            return key
    return None
