"""Errors for ds_config mistakes: one readable line per problem, never a pydantic traceback.

Every problem names the key path as a user writes it (``zero_optimization.offload_optimizer.device``,
``optimizer.params.betas[1]``), says what was wrong and, where we can tell, how to fix it.
Validation errors raised by the pydantic models are translated here, so no raw
``ValidationError`` ever reaches a user.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from engine.errors import UserError, closest

# Error type used by our validators to report several problems at sub-paths of one model.
PROBLEMS_ERROR = "orch_problems"
# Error type used by our scalar validators; the message is already user-facing.
VALUE_ERROR = "orch_value"
# One problem as a model validator reports it: (key path below the model, message, how to fix it).
Problem = tuple[str, str, str]


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a ds_config: where (dotted key path), what, and how to fix it."""

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        line = f"{self.path}: {self.message}" if self.path else self.message
        return f"{line}; {self.hint}" if self.hint else line


class ConfigError(UserError, ValueError):
    """A ds_config that cannot be used; ``problems`` lists every mistake found, not just the first."""

    def __init__(self, problems: Sequence[ConfigProblem], source: str | None = None) -> None:
        self.problems: list[ConfigProblem] = list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            return f"{where}{self.problems[0]}"
        lines = [f"{where}{len(self.problems)} problems in the ds_config:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._render()


def unknown_key_problem(path: str, key: str, valid: Iterable[str]) -> ConfigProblem:
    """Problem for a key that is not valid at its level, with the nearest valid key."""
    valid = sorted(valid)
    near = closest(key, valid)
    if near:
        hint = f"did you mean '{near}'?"
    elif len(valid) <= 12:
        hint = "valid keys here: " + ", ".join(valid)
    else:
        hint = "see DeepSpeed's config-json documentation for the keys allowed here"
    return ConfigProblem(path, "unknown key", hint)


def describe(value: Any) -> str:
    """A short, JSON-flavoured description of a given value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f'"{text}" (a string)'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "an object {...}"
    if isinstance(value, (list, tuple)):
        return "a list [...]"
    return type(value).__name__


def problems_error(problems: Sequence[Problem]) -> PydanticCustomError:
    """An error a model validator raises to report several problems at sub-paths of itself.

    Each problem is ``(sub_path, message, hint)``; ``sub_path`` is relative to the model
    (``"offload_optimizer.ratio"``) and may be empty for the model itself.
    """
    return PydanticCustomError(PROBLEMS_ERROR, "{summary}",
                               {"summary": "; ".join(m for _, m, _ in problems), "problems": list(problems)})


def value_error(message: str, hint: str = "") -> PydanticCustomError:
    """An error from a field validator whose message is already written for users."""
    return PydanticCustomError(VALUE_ERROR, "{message}", {"message": message, "hint": hint})


def join_path(*parts: Any) -> str:
    """Join key-path parts: strings with dots, integers as list indexes (``betas[1]``)."""
    out = ""
    for part in parts:
        if part in ("", None):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def translate(exc: ValidationError, prefix: str = "", model: type | None = None) -> list[ConfigProblem]:
    """Turn a pydantic ValidationError into ConfigProblems with full key paths.

    ``model`` is the model class that was validated; it is used to list the valid keys
    (and suggest the nearest one) when a key is unknown.
    """
    problems: list[ConfigProblem] = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        path = join_path(prefix, *loc)
        etype = err["type"]
        ctx = err.get("ctx") or {}
        if etype == PROBLEMS_ERROR:
            for sub, message, hint in ctx["problems"]:
                problems.append(ConfigProblem(join_path(path, sub), message, hint))
        elif etype == "extra_forbidden":
            parent = _model_at(model, loc[:-1]) if model is not None else None
            valid = _keys_of(parent) if parent is not None else []
            problems.append(unknown_key_problem(path, str(loc[-1]), valid))
        else:
            problems.append(ConfigProblem(path, *_message(err, etype, ctx, model, loc)))
    return _dedupe(problems)


def _message(err: dict, etype: str, ctx: dict, model: type | None, loc: list) -> tuple[str, str]:
    given = describe(err.get("input"))
    if etype == VALUE_ERROR:
        return ctx["message"], ctx.get("hint", "")
    if etype == "missing":
        if loc and isinstance(loc[-1], int):
            return "missing list item", ""
        return "required key is missing", "add it"
    if etype in ("model_type", "model_attributes_type", "dict_type"):
        keys = _keys_of(_model_at(model, loc)) if model is not None else []
        hint = ("allowed keys: " + ", ".join(sorted(keys))) if 0 < len(keys) <= 8 else ""
        return f"expected an object {{...}}, got {given}", hint
    if etype in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {given}", ""
    if etype in ("list_type", "tuple_type"):
        return f"expected a list, got {given}", ""
    if etype in ("string_type",):
        return f"expected a string, got {given}", ""
    if etype in ("too_short", "too_long"):
        expected = ctx.get("max_length") or ctx.get("min_length")
        return f"expected a list of {expected} items, got {given}", ""
    if etype == "literal_error":
        allowed = ctx.get("expected", "")
        near = closest(str(err.get("input")), [a.strip(" '\"") for a in allowed.replace(" or ", ", ").split(",")]) \
            if isinstance(err.get("input"), str) else None
        return f"got {given}, allowed: {allowed}", (f"did you mean '{near}'?" if near else "")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if etype in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[etype]} {limit}, got {given}", ""
    return f"{err.get('msg', 'invalid value')}; got {given}", ""


def _model_at(model: type | None, loc: Sequence[Any]) -> type | None:
    """The pydantic model class found by following ``loc`` field names from ``model``."""
    current = model
    for part in loc:
        if current is None or not hasattr(current, "model_fields"):
            return None
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        current = _model_in(field.annotation)
    return current if current is not None and hasattr(current, "model_fields") else None


def _model_in(annotation: Any) -> type | None:
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _keys_of(model: type | None) -> list[str]:
    return list(model.model_fields) if model is not None else []


def _dedupe(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    seen: set[tuple[str, str]] = set()
    out = []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out
