"""Every problem of a job spec and its ds_config in one report.

A spec that fails validation would otherwise hide its ds_config's mistakes until the spec is
fixed and the command run again. Here, when the spec has problems, its ds_config (the file its
``ds_config:`` names, relative to the spec, or the inline mapping) is validated as well, as far as
it can be without a valid spec (every key and value; the batch rule needs the job's world size
and waits for a valid ``nodes``/``procs_per_node``), and both lists are reported together, each
line naming the file, the key and the fix.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import yamlio
from .errors import UserError
from .spec import JobSpec, load_spec


def load_spec_reporting_all(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """``load_spec``; when the spec is invalid, its ds_config's problems are reported with its own."""
    try:
        return load_spec(path, overrides)
    except UserError as spec_error:
        config_lines = ds_config_problems(Path(path), list(overrides or []))
        if not config_lines:
            raise
        raise combined(Path(path), str(spec_error).splitlines(), config_lines) from None


def combined(path: Path, spec_lines: list[str], config_lines: list[str]) -> UserError:
    """One error listing the spec's problems, then the ds_config's."""
    total = len(spec_lines) + len(config_lines)
    lines = [f"{total} problems in {path} and its ds_config:"]
    lines += [f"  - {line}" for line in spec_lines + config_lines]
    return UserError("\n".join(lines))


def ds_config_problems(spec_path: Path, overrides: list[str]) -> list[str]:
    """One line per ds_config problem (``<file>: <key>: what; fix``); [] when it is fine or there is
    none to check (no ds_config key, a spec that is not even a mapping)."""
    from .spec import apply_overrides

    try:
        data = yamlio.load_file(spec_path)
        if isinstance(data, dict):
            data = apply_overrides(data, overrides)
    except UserError:
        return []
    if not isinstance(data, dict) or data.get("ds_config") is None:
        return []
    source, label = _config_source(data["ds_config"], spec_path.resolve().parent)
    if source is None:
        return [f"ds_config: {label}"]
    return _validate(source, label)


def _config_source(value: Any, base_dir: Path) -> tuple[Any, str]:
    """(the parsed ds_config, its label) or (None, what is wrong with the reference)."""
    if isinstance(value, dict):
        return value, "ds_config (inline)"
    if not isinstance(value, str):
        return None, f"expected a path to a JSON file or a mapping, got {type(value).__name__}"
    file = Path(value).expanduser()
    file = file if file.is_absolute() else base_dir / file
    try:
        return json.loads(file.read_text(encoding="utf-8")), str(file)
    except FileNotFoundError:
        return None, f"file {file} not found (paths are relative to the job spec's directory)"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read {file}: {exc}"
    except json.JSONDecodeError as exc:
        return None, f"{file}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"


def _validate(ds: Any, label: str) -> list[str]:
    """The ds_config's problems as the engine finds them (all of them), without the batch rule."""
    import warnings

    from engine.config import ConfigError, load_config

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notes belong to `orch check` of a valid spec
            load_config(ds, world_size=None, program_fills_auto=True)
    except ConfigError as exc:
        return [f"{label}: {problem}" for problem in exc.problems]
    return []


def run_all(*steps: Callable[[], Any]) -> list[Any]:
    """Run every check step even when an earlier one finds problems (rendering for the cluster,
    then the ds_config for the job's world size): their results, or one error listing what each
    step found, so a user fixes everything in one edit."""
    results, problems = [], []
    for step in steps:
        try:
            results.append(step())
        except UserError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError("\n".join(problems))
    return results
