"""Scalar types and the base model shared by every ds_config section.

JSON configs are read strictly but in DeepSpeed's spirit: ``5e8`` is a valid integer (JSON
parses it as a float, and DeepSpeed configs use it everywhere), while ``true`` is not a number
and ``"2"`` is not an integer. Each validator writes its own user-facing message.
"""
from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator

from engine.errors import closest

from .errors import Problem, describe, problems_error, value_error


def _as_int(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise value_error(f"expected an integer, got {describe(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise value_error(f"expected a whole number, got {describe(value)}")
        return int(value)
    return value


def _as_float(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise value_error(f"expected a number, got {describe(value)}")
    if not math.isfinite(value):
        raise value_error(f"expected a finite number, got {describe(value)}")
    return float(value)


def _as_str(value: Any) -> Any:
    if not isinstance(value, str):
        raise value_error(f"expected a string, got {describe(value)}")
    return value


def _as_pair(value: Any) -> Any:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise value_error(f"expected a list of 2 numbers, got {describe(value)}"
                          + (f" of {len(value)}" if isinstance(value, (list, tuple)) else ""))
    return value


Int = Annotated[int, BeforeValidator(_as_int)]
NonNegInt = Annotated[int, BeforeValidator(_as_int), Field(ge=0)]
PosInt = Annotated[int, BeforeValidator(_as_int), Field(ge=1)]
Float = Annotated[float, BeforeValidator(_as_float)]
NonNegFloat = Annotated[float, BeforeValidator(_as_float), Field(ge=0)]
PosFloat = Annotated[float, BeforeValidator(_as_float), Field(gt=0)]
Fraction = Annotated[float, BeforeValidator(_as_float), Field(ge=0, le=1)]
Str = Annotated[str, BeforeValidator(_as_str)]
Bool = StrictBool
# Adam/Lion (beta1, beta2); the range is checked by the optimizer's params model.
Betas = Annotated[tuple[Float, Float], BeforeValidator(_as_pair)]


def choice(*allowed: str, case_insensitive: bool = True) -> Any:
    """A string restricted to ``allowed``; matching ignores case and returns the canonical spelling."""
    canon = {a.lower(): a for a in allowed} if case_insensitive else {a: a for a in allowed}

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise value_error(f"expected one of {', '.join(repr(a) for a in allowed)}, got {describe(value)}")
        key = value.lower() if case_insensitive else value
        if key not in canon:
            near = closest(value, allowed)
            raise value_error(f"got {describe(value)}, allowed: {', '.join(repr(a) for a in allowed)}",
                              f"did you mean '{near}'?" if near else "")
        return canon[key]

    return Annotated[str, BeforeValidator(check)]


# DeepSpeed spells precision names several ways; these are the ones its config accepts.
DType = choice("fp32", "fp16", "bf16")

# DeepSpeed's DtypeEnum (runtime/config.py) also reads these spellings where it parses a dtype
# itself (``data_types``); they mean the canonical names above.
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "torch.float32": "fp32", "float16": "fp16", "half": "fp16",
                 "torch.float16": "fp16", "bfloat16": "bf16", "torch.bfloat16": "bf16"}


def _dtype_alias(value: Any) -> Any:
    return DTYPE_ALIASES.get(value.lower(), value) if isinstance(value, str) else value


AliasedDType = Annotated[DType, BeforeValidator(_dtype_alias)]


class Section(BaseModel):
    """Base of every ds_config section: unknown keys are errors, field names are DeepSpeed's keys.

    A section with rules that span its fields (or that fills a dynamic default) overrides
    ``_check``; every problem it returns is reported at once, under its key path, with its fix.
    """

    model_config = ConfigDict(extra="forbid", validate_default=False, protected_namespaces=())

    def _check(self) -> list[Problem]:
        """``(key below this section, what is wrong, how to fix it)`` for each mistake; runs after
        every field validated, and may normalise values (canonical names, dynamic defaults)."""
        return []

    @model_validator(mode="after")
    def _report_problems(self) -> "Section":
        problems = self._check()
        if problems:
            raise problems_error(problems)
        return self


class Opaque(BaseModel):
    """A DeepSpeed section orch's engine does not interpret: any keys are accepted.

    Only ``enabled`` is read, to decide whether the feature is reported as ignored or
    rejected (see ``EngineConfig.ignored_features``).
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    enabled: Bool = False

    def extras(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})


def any_enabled(value: Any) -> bool:
    """True when a nested DeepSpeed section switches anything on (``"enabled": true`` anywhere)."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        return value.get("enabled") is True or any(any_enabled(v) for v in value.values())
    if isinstance(value, list):
        return any(any_enabled(v) for v in value)
    return False
